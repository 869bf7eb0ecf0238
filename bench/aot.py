"""python -m bench.aot [--arch 90] [--ops row_lstm,...] [--quick] [--first-config | --picks SLUG] [--out FILE]

Compiles every Triton kernel that the benchmark cases launch, at the cases' GPU shapes and in every autotune config,
for a GPU target (default sm_90), on a machine WITHOUT a GPU. Nothing runs: the op launchers are driven with CPU tensors
of the GPU shapes, each launch is turned into a compile for the target (Triton's own specialisation: dtypes, 16-byte
alignment, integer divisibility, constexprs), and the resulting cubin is inspected. It reports, per kernel variant and
config: registers per thread, spill stores/loads, shared memory, whether tl.dot became wgmma (Hopper) or mma.sync, and
any compile error. A kernel that fails here would fail on the GPU; one that spills or needs more shared memory than an
SM has (227 KiB on sm_90) would be slow or refused there. Exit status 1 when any variant failed to compile or does
not fit.

Limits: the Triton here (the pinned 3.9) is not the GPU machine's (3.6), so a pass here is strong evidence, not proof.
Outputs of the skipped launches are uninitialised, so values computed from them on the host are garbage (only shapes
matter). Run it in its own process: it must import triton without the interpreter.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported anywhere (gm.kernels would otherwise choose 1)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclasses.dataclass
class Variant:
    kernel: str
    config: str
    spec: str = ""
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None
    mma: str = "-"
    seconds: float = 0.0
    error: str | None = None
    loop: str = "-"  # the hot loop's SASS instructions per iteration (hot_loop)
    first_case: str = ""  # the first benchmark case or direct call that compiled this variant

    def problems(self, arch: int) -> list[str]:
        out = []
        if self.error:
            out.append("compile error")
        if self.smem is not None and self.smem > SMEM_LIMIT.get(arch, 227 * 1024):
            out.append(f"shared memory {self.smem} B > {SMEM_LIMIT.get(arch)} B")
        return out


class _FakeDriver:
    """Just enough of Triton's driver for JITFunction.run(warmup=True): a target, a device, a stream."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _resource_usage(ptx: str, arch: int) -> tuple[int | None, int | None, int | None]:
    """(registers, spill store bytes, spill load bytes): Triton's ptxas run again on the PTX with -v."""
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself used for this arch
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)  # fmt: skip
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (
        int(regs.group(1)) if regs else None,
        int(spills.group(1)) if spills else None,
        int(spills.group(2)) if spills else None,
    )


def _mma_kind(asm: dict) -> str:
    ptx = asm.get("ptx", "")
    if "wgmma" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    if ".fma" in ptx or "fma.rn" in ptx:
        return "fma"
    return "-"


def hot_loop(cubin: bytes | None) -> str:
    """The kernel's hot loop in SASS (tools/sass_loops.py's loops: a backward branch): the loop with the most tensor-core
    instructions, else the longest, as "instructions per iteration (MMAs)". Instructions per warp and iteration
    against the MMAs they feed is the issue budget of a GEMM loop: bench/NOTES.md, masked_conv's weight gradient
    (360 -> 158)."""
    if not cubin:
        return "-"
    from tools.sass_loops import cuobjdump, kernels, loops  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([cuobjdump(), "-sass", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        return "no SASS"
    found = [loop for insns in kernels(res.stdout).values() for loop in loops(insns)]
    if not found:
        return "no loop"

    def mmas(mix) -> int:
        return mix["HGMMA"] + mix["HMMA"] + mix["DMMA"]

    _, length, mix = max(found, key=lambda f: (mmas(f[2]), f[1]))
    return f"{length} ({mmas(mix)} MMA)" if mmas(mix) else str(length)


_CONFIG_KEYS = {
    "num_warps",
    "num_stages",
    "num_ctas",
    "maxnreg",
    "debug",
    "instrumentation_mode",
    "fpsan_homomorphic_casts",
}


def _short(v) -> str:
    if isinstance(v, torch.Tensor):
        return str(v.dtype).replace("torch.", "")
    text = str(v)
    return text.replace("triton.language.", "").replace("tl.", "")


def _spec(jit, args, kwargs) -> str:
    """What distinguishes one compiled variant: the first tensor's dtype and the non-config constexprs."""
    names = [p.name for p in jit.params]
    bound = dict(zip(names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k not in _CONFIG_KEYS})
    first = next((v for v in bound.values() if isinstance(v, torch.Tensor)), None)
    consts = [f"{p.name}={_short(bound[p.name])}" for p in jit.params if p.is_constexpr and p.name in bound]
    return " ".join(([_short(first)] if first is not None else []) + consts)


class Collector:
    def __init__(self, arch: int, first_config: bool, shard: tuple[int, int] = (0, 1), picks: str | None = None):
        self.arch = arch
        self.first_config = first_config
        self.picks = picks  # a GPU's slug: compile what GM_TRITON_AUTOTUNE=picks launches there (picks_choice)
        self.variants: dict[tuple, Variant] = {}
        self.case = ""
        self.shard, self.calls = shard, 0

    def compile(self, jit, args, kwargs, label: str, config_keys=()):
        self.calls += 1
        if (self.calls - 1) % self.shard[1] != self.shard[0]:
            return  # another shard's compile (the sequence of calls is the same in every shard)
        spec = _spec(jit, args, {k: v for k, v in kwargs.items() if k not in config_keys})
        t0 = time.perf_counter()
        try:
            kernel = jit.run(*args, grid=(1,), warmup=True, **kwargs)
            # Triton's specialisation (16-divisible integers, aligned pointers) makes distinct compiles of one spec.
            key = (jit.__name__, label, spec, kernel.hash if kernel is not None else "?")
            if key in self.variants:
                return
            v = Variant(kernel=jit.__name__, config=label, spec=spec)
            v.regs, v.spill_stores, v.spill_loads = _resource_usage(kernel.asm["ptx"], self.arch)
            v.smem = kernel.metadata.shared
            v.mma = _mma_kind(kernel.asm)
            v.loop = hot_loop(kernel.asm.get("cubin"))
        except Exception as err:  # noqa: BLE001 (the report lists every failure)
            key = (jit.__name__, label, spec)
            if key in self.variants:
                return
            v = Variant(
                kernel=jit.__name__,
                config=label,
                spec=spec,
                error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
            )
        v.seconds = time.perf_counter() - t0
        v.first_case = self.case
        self.variants[key] = v

    def install(self):
        from triton.runtime import driver  # noqa: PLC0415
        from triton.runtime.autotuner import Autotuner  # noqa: PLC0415
        from triton.runtime.jit import JITFunction  # noqa: PLC0415

        driver.set_active(_FakeDriver(self.arch))
        collector = self
        original_run = JITFunction.run

        def size_grid(jit, grid, args, kwargs):  # a launcher may record what its grid function chose, as on a GPU
            if callable(grid):
                grid({**dict(zip(jit.arg_names, args, strict=False)), **kwargs})

        def jit_run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original_run(self, *args, grid=grid, warmup=True, **kwargs)
            size_grid(self, grid, args, kwargs)
            meta = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            collector.compile(self, args, kwargs, " ".join(f"{k}={v}" for k, v in meta.items()) or "default")
            return None

        def autotuner_run(self, *args, **kwargs):
            grid = kwargs.pop("grid", None)
            kwargs.pop("warmup", None)
            # Pruned as on a GPU; --first-config keeps the first that suits the call (what GM_TRITON_AUTOTUNE=0 runs).
            self.nargs = dict(zip(self.arg_names, args, strict=False))
            configs = self.prune_configs(kwargs)
            if collector.picks:
                from gm.kernels._common import picks_choice  # noqa: PLC0415

                configs = picks_choice(self, configs, kwargs, collector.picks)
            elif collector.first_config:
                configs = configs[:1]
            for cfg in configs:
                merged = {**kwargs, **cfg.all_kwargs()}
                label = " ".join(f"{k}={v}" for k, v in cfg.all_kwargs().items() if v is not None and k != "num_ctas")
                size_grid(self.fn, grid, args, merged)
                collector.compile(self.fn, args, merged, label, cfg.kwargs.keys())
            return None

        JITFunction.run = jit_run
        Autotuner.run = autotuner_run

        # Launchers size grids from the device (SM count); answer as an H100/H200 would.
        props = types.SimpleNamespace(multi_processor_count=132, name=f"aot sm_{self.arch}", major=self.arch // 10,
                                      minor=self.arch % 10, total_memory=80 << 30,
                                      shared_memory_per_block_optin=SMEM_LIMIT.get(self.arch, 227 * 1024))  # fmt: skip
        torch.cuda.get_device_properties = lambda *a, **k: props
        torch.cuda.current_device = lambda: 0

        import gm._backend as backend  # noqa: PLC0415

        backend.triton_interpreted = lambda: True  # lets the triton backend take the CPU tensors we drive it with


def _drive(case, collector: Collector) -> None:
    from bench.harness import _fwd_bwd_fn  # noqa: PLC0415

    collector.case = f"{case.op} {case.name} {str(case.dtype).replace('torch.', '')}"
    inputs = case.make_inputs()
    fn = lambda **kw: case.gm(backend="triton", **kw)  # noqa: E731
    with torch.no_grad():
        fn(**inputs)
    if case.backward:
        _fwd_bwd_fn(fn, inputs)()


def _extras() -> list[tuple[str, object]]:
    """Direct op calls at small shapes in every GPU dtype, for what the benchmark cases leave out (bf16/fp16 variants,
    iaf_step, both scan directions, h0/c0): (label, thunk running forward and backward)."""
    import gm.ops as ops  # noqa: PLC0415
    from gm.kernels._layout import sum_splits  # noqa: PLC0415
    from gm.nn import color_groups  # noqa: PLC0415
    from gm.nn.made import made_masks  # noqa: PLC0415

    def grads(out):
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        torch.autograd.backward([o for o in outs if o.requires_grad],
                                [torch.randn_like(o) for o in outs if o.requires_grad])  # fmt: skip

    def leaf(*shape, dtype, scale=1.0):
        return (scale * torch.randn(*shape)).to(dtype).requires_grad_()

    def make(dtype):
        n, c, hid, size = 2, 16, 16, 9
        masks = [mk.to(dtype) for mk in made_masks(8, 32, 1, "natural", heads=2)]
        return [
            ("masked_conv2d 7x7 A", lambda: grads(ops.masked_conv2d(
                leaf(n, c, size, size, dtype=dtype), leaf(c, c, 7, 7, dtype=dtype, scale=0.1), leaf(c, dtype=dtype),
                mask="A", backend="triton"))),
            ("masked_conv2d 3x3 B", lambda: grads(ops.masked_conv2d(
                leaf(n, c, size, size, dtype=dtype), leaf(c, c, 3, 3, dtype=dtype, scale=0.1), mask="B",
                backend="triton"))),
            ("masked_conv2d 1x1 B colours", lambda: grads(ops.masked_conv2d(  # the CENTRE variants
                leaf(n, 3 * c, size, size, dtype=dtype), leaf(3 * c, 3 * c, 1, 1, dtype=dtype, scale=0.1),
                leaf(3 * c, dtype=dtype), mask="B", in_groups=color_groups(3 * c, 3), out_groups=color_groups(3 * c, 3),
                backend="triton"))),
            ("row_lstm h0 c0", lambda: grads(ops.row_lstm(
                leaf(n, 4 * hid, size, size, dtype=dtype), leaf(4 * hid, hid, 3, dtype=dtype, scale=0.1),
                h0=leaf(n, hid, size, dtype=dtype), c0=leaf(n, hid, size, dtype=dtype), backend="triton"))),
            ("diagonal_lstm", lambda: grads(ops.diagonal_lstm(
                leaf(n, 4 * hid, size, size, dtype=dtype), leaf(4 * hid, hid, 2, dtype=dtype, scale=0.1),
                backend="triton"))),
            ("diagonal_lstm reverse", lambda: grads(ops.diagonal_lstm(
                leaf(n, 4 * hid, size, size, dtype=dtype), leaf(4 * hid, hid, 2, dtype=dtype, scale=0.1),
                reverse=True, backend="triton"))),
            ("sum_splits", lambda: sum_splits(  # split-K partial sums (the benchmark shapes may take one split)
                torch.randn(3, 5, 7, dtype=torch.float64 if dtype == torch.float64 else torch.float32), dtype)),
            ("minibatch_discrimination", lambda: grads(ops.minibatch_discrimination(
                leaf(37, 10, 5, dtype=dtype), backend="triton"))),
            ("minibatch_discrimination C=11", lambda: grads(ops.minibatch_discrimination(  # the C > 8 kernels
                leaf(37, 10, 11, dtype=dtype), backend="triton"))),
            ("masked_linear elu", lambda: grads(ops.masked_linear(
                leaf(33, 8, dtype=dtype), leaf(32, 8, dtype=dtype), masks[0], leaf(32, dtype=dtype), activation="elu",
                backend="triton"))),
            ("iaf_made_output", lambda: grads(ops.iaf_made_output(
                leaf(33, 32, dtype=dtype), leaf(16, 32, dtype=dtype), masks[1], leaf(16, dtype=dtype),
                leaf(33, 8, dtype=dtype), mode="gated", backend="triton"))),
        ] + [
            (f"iaf_step {mode}", lambda mode=mode: grads(ops.iaf_step(
                leaf(33, 8, dtype=dtype), leaf(33, 8, dtype=dtype), leaf(33, 8, dtype=dtype), mode=mode,
                backend="triton")))
            for mode in ("gated", "affine")
        ]  # fmt: skip

    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return [(f"{label} {str(dt).replace('torch.', '')}", fn) for dt in dtypes for label, fn in make(dt)]


def _gpu_cases(modules, quick: bool):
    import bench.harness as harness  # noqa: PLC0415

    cuda = torch.device("cuda")
    original = harness.pick

    def pick_gpu(device, quick_, **choices):
        return original(cuda, quick_, **choices)

    out = []
    for name, mod in modules:
        mod.pick = pick_gpu  # the modules imported pick by name
        for case in mod.cases(torch.device("cpu"), quick):
            if case.gm is not None and (case.gm_backends is None or "triton" in case.gm_backends):
                out.append((name, case))
    return out


def _spill(v: Variant) -> str:
    return "-" if v.spill_stores is None else f"{v.spill_stores}/{v.spill_loads}"


def format_report(variants: list[Variant], arch: int) -> str:
    lines = [
        "| kernel | variant | first case | config | regs | spill st/ld B | smem KiB | mma | hot loop SASS | compile s "
        "| problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in sorted(variants, key=lambda v: (v.kernel, v.spec, v.config, v.first_case)):
        probs = "; ".join(v.problems(arch)) or ""
        if v.error:
            probs = f"{probs}: {v.error}"
        smem = f"{v.smem / 1024:.1f}" if v.smem is not None else "-"
        lines.append(
            f"| {v.kernel} | {v.spec} | {v.first_case} | {v.config} | {v.regs if v.regs is not None else '-'} | "
            f"{_spill(v)} | {smem} | {v.mma} | {v.loop} | {v.seconds:.1f} | {probs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100/H200)")
    p.add_argument("--ops", default="", help="comma-separated bench case modules (default: all but models)")
    p.add_argument("--quick", action="store_true", help="the benchmark's quick shapes instead of its GPU shapes")
    p.add_argument("--first-config", action="store_true", help="only the first autotune config of each kernel")
    p.add_argument("--picks", default=None, metavar="SLUG",
                   help="only the config GM_TRITON_AUTOTUNE=picks launches on that GPU (e.g. nvidia-h200): the shipped "
                        "pick for the launch's key, else the first suitable (a picks-only bench run's warm stage)")
    p.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    p.add_argument("--shard", default="0/1", help="K/N: compile only every N-th variant from the K-th (0-based), so N "
                   "processes side by side fill Triton's cache in parallel (bench/gpu_check.sh's warm stage)")
    args = p.parse_args(argv)
    k, n = (int(v) for v in args.shard.split("/"))
    if not 0 <= k < n:
        p.error(f"--shard must be K/N with 0 <= K < N, got {args.shard}")

    if args.picks:
        from gm.kernels._common import TUNED_DIR, tuned_table  # noqa: PLC0415

        if not tuned_table(args.picks):
            p.error(f"--picks: no table of picks for {args.picks!r} (expected {TUNED_DIR / (args.picks + '.json')})")
    from bench.__main__ import _case_modules  # noqa: PLC0415

    selected = [s for s in args.ops.split(",") if s] or None
    modules = [(n, m) for n, m in _case_modules(selected) if selected or n != "models"]
    collector = Collector(args.arch, args.first_config, (k, n), args.picks)
    collector.install()
    failures = []
    for name, case in _gpu_cases(modules, args.quick):
        t0 = time.perf_counter()
        try:
            _drive(case, collector)
        except Exception as err:  # noqa: BLE001
            failures.append(f"{name}: {case.name} {case.dtype}: {type(err).__name__}: {err}")
        print(f"[aot] {name} {case.name} {case.dtype}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if not selected:
        for label, run in _extras():
            collector.case = label
            try:
                run()
            except Exception as err:  # noqa: BLE001
                failures.append(f"extra {label}: {type(err).__name__}: {err}")
    variants = list(collector.variants.values())
    report = format_report(variants, args.arch)
    head = f"Triton {__import__('triton').__version__}, target sm_{args.arch}, {len(variants)} kernel variants"
    text = head + "\n\n" + report + ("\n\nDriver failures:\n" + "\n".join(failures) if failures else "") + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    bad = [v for v in variants if v.problems(args.arch)]
    return 1 if bad or failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
