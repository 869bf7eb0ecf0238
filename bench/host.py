"""gm's host cost per call, without a GPU: `python -m bench.host [--profile NAME] [--calls N]`.

Each module runs forward+backward on tiny CPU tensors with backend="cuda" routed (through tools/cuda_emu's patches)
to a stub extension whose kernel entry points return at once, so what is timed is the Python and torch dispatch
that a GPU step pays before its kernels run: argument checks, backend choice, autograd, layout helpers, weight
packing, allocations and launch arguments. On the H200 machine's host that cost was what set the eager time of
the small benchmark cases (bench/NOTES.md), so it is tracked here, where it can be measured. A tiny real
nn.Linear fwd+bwd is printed as the yardstick. --profile NAME adds a cProfile listing for one module; --breakdown
times MaskedConv2d's cuda path piece by piece beside the floor of an autograd.Function making the same 8 launches.
--models adds each model's training step (its mnist preset on a 1x1x6x6 image, loss and backward), PixelCNN with
its fused (ReLU, conv) chains (gm.nn.relu_conv) on and off. --proxies times the IAF step's and masked_linear's eager
baselines (real PyTorch ops on tiny CPU tensors) beside gm's ops: the host side of those host-bound eager ratios.
--bindings builds bench/pybind_call.cpp (g++ and pybind11) and times what a pybind11 call's argument conversion
costs at masked_conv's GEMM binding: the stub extension above takes any arguments for free, so the table cannot.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import types

import torch


class _StubExtension(types.ModuleType):
    """Every attribute is a kernel entry point that does nothing (and counts its calls in `calls`)."""

    with_cuda = True
    calls = 0

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def entry(*args, **kwargs):
            type(self).calls += 1

        # kept: later lookups find it as a module attribute, ~0.02 us as on the real gm._C (a fresh closure per
        # lookup cost ~1.2 us, which the table then charged to every launch)
        setattr(self, name, entry)
        return entry


# aten ops that launch no kernel on a GPU: views, allocations, metadata.
_NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view", "aten::as_strided",
    "aten::expand", "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::permute",
    "aten::detach", "aten::alias", "aten::split", "aten::chunk", "aten::slice", "aten::select", "aten::unsqueeze",
    "aten::squeeze", "aten::narrow", "aten::resize_", "aten::lift_fresh", "aten::result_type", "aten::is_nonzero",
    "aten::item", "aten::_local_scalar_dense", "aten::unbind", "aten::split_with_sizes", "aten::flatten",
    "aten::contiguous", "aten::to", "aten::_to_copy", "aten::numpy_T", "aten::size", "aten::stride",
}  # fmt: skip


def launches(run) -> tuple[int, int]:
    """(gm kernel entry calls, other aten ops that would launch a kernel) in one call of `run`: each a GPU launch
    and its host cost on a GPU. aten ops counted at their outermost level (an op called by another is part of it);
    .to() and .contiguous() count through the copy they make (aten::copy_) when they make one."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    before = _StubExtension.calls
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    entries = _StubExtension.calls - before
    ops = 0
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name in _NO_KERNEL:
            continue
        parent = e.cpu_parent
        while parent is not None and not (parent.name.startswith("aten::") and parent.name not in _NO_KERNEL):
            parent = parent.cpu_parent
        ops += parent is None
    return entries, ops


def _modules():
    from gm import nn as gnn  # noqa: PLC0415

    made = (
        (lambda: gnn.MaskedConv2d(8, 8, 3, mask="B", backend="cuda"), (2, 8, 5, 5)),
        (lambda: gnn.RowLSTM(8, 8, backend="cuda"), (2, 8, 5, 5)),
        (lambda: gnn.DiagonalBiLSTM(8, 8, backend="cuda"), (2, 8, 5, 5)),
        (lambda: gnn.MinibatchDiscrimination(8, kernels=4, dim=3, backend="cuda"), (6, 8)),
        (lambda: gnn.MaskedLinear(_made_mask(16, 8), backend="cuda"), (4, 16)),
        (lambda: gnn.IAFStep(8, 16, backend="cuda"), (4, 8)),
        (lambda: torch.nn.Linear(8, 8), (4, 8)),
    )
    return dict(zip(_MODULE_NAMES, made, strict=True))


_MODULE_NAMES = (
    "MaskedConv2d 3x3 B", "RowLSTM", "DiagonalBiLSTM", "MinibatchDiscrimination", "MaskedLinear (MADE mask)", "IAFStep",
    "nn.Linear (real, tiny)",
)  # fmt: skip


def _profile_name(asked: str, names: list[str]) -> str:
    """The table's module that --profile ASKED names: the exact name, or the one name it starts (case-insensitive)."""
    if asked in names:
        return asked
    hits = [n for n in names if n.lower().startswith(asked.lower())]
    if len(hits) != 1:
        raise SystemExit(
            f"--profile: got {asked!r}, expected one module of the table (or a prefix naming exactly one): "
            + ", ".join(repr(n) for n in names)
        )
    return hits[0]


def _made_mask(width: int, features: int) -> torch.Tensor:
    """A degree-sorted hidden-to-hidden MADE mask (the masked_linear bench case's, small)."""
    from gm.nn.made import hidden_degrees  # noqa: PLC0415

    deg = hidden_degrees(width, features)
    return (deg[:, None] >= deg[None, :]).float()


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor):
    params = list(module.parameters())

    def run():
        out = module(x)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        x.grad = None
        for p in params:
            p.grad = None

    return run


def model_step(name: str):
    """A training step's run (loss and backward) of model `name` at its mnist preset on a 1x1x6x6 binary image."""
    import gm.models as models  # noqa: PLC0415

    model = models.get(name, "mnist", backend="cuda")
    x = (torch.rand(1, 1, 6, 6) > 0.5).float()
    params = list(model.parameters())

    def run():
        model.loss(x).mean().backward()
        for p in params:
            p.grad = None

    return run


def _launch_stub(*args) -> None:
    """A launch with nothing behind it (what the stub extension's entry points are, without the counting)."""


class _Floor(torch.autograd.Function):
    """The least an op's eager fwd+bwd can cost in Python: an autograd.Function making 8 stub launches (3 forward, 5
    backward) and 5 allocations, as MaskedConv2d's cuda path does."""

    @staticmethod
    def forward(ctx, x, w, b):
        y = torch.empty(x.shape)
        for _ in range(3):
            _launch_stub(x.data_ptr(), w.data_ptr(), y.data_ptr(), 2, 8, 5, 5, 8, 8, 0, 0, 1)
        ctx.save_for_backward(x, w)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx, dw, db = torch.empty(x.shape), torch.empty(w.shape), torch.empty(w.shape[0])
        for _ in range(5):
            _launch_stub(g.data_ptr(), x.data_ptr(), dx.data_ptr(), 2, 8, 5, 5, 8, 8, 0, 0, 1)
        return dx, dw, db


class _FloorConv(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Floor.apply(x, self.weight, self.bias)


def breakdown(calls: int) -> list[tuple[str, float]]:
    """(piece, host us) of MaskedConv2d's cuda path, each piece timed on its own (launches stubbed), and the floor."""
    from gm.nn import MaskedConv2d  # noqa: PLC0415
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415
    from gm.ops import masked_conv as mc  # noqa: PLC0415

    m = MaskedConv2d(8, 8, 3, mask="B", backend="cuda")
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    xd, w, b, g = x.detach(), m.weight.detach(), m.bias.detach(), torch.randn(2, 8, 5, 5)
    plan = mc.pack_plan(w.shape, "B", None, None, w.device)
    ops = c.weight_operands(w, plan, fresh=True)
    pieces = {
        "module fwd+bwd": fwd_bwd(m, x),
        "module fwd": lambda: m(x),
        "  op implementation (fwd)": lambda: mc._masked_conv2d_impl(xd, w, b, "B", None, None, "cuda"),
        "    weight pack (gather)": lambda: c.weight_operands(w, plan, fresh=True),
        "    forward launcher": lambda: c.forward(xd, ops, b, plan.taps),
        "  backward implementation": lambda: mc._masked_conv2d_backward_impl(g, xd, w, "B", None, None, "cuda", True,
                                                                             True, True),  # fmt: skip
        "    backward launcher": lambda: c.backward(g, xd, ops, plan.taps, plan, tuple(w.shape), w.dtype, True, True,
                                                    bias_grad=True),  # fmt: skip
        "floor: autograd.Function, 8 launches": fwd_bwd(_FloorConv(w, b), x),
    }
    return [(name, time_us(run, calls)) for name, run in pieces.items()]


def proxies() -> list[tuple[str, object, object]]:
    """(case, the benchmark's eager baseline, gm's op) as fwd+bwd runs on tiny CPU tensors: the baseline's real
    PyTorch ops (their compute is negligible at these sizes, so this is their host cost here), gm's cuda path with
    its launches stubbed. Where the GPU rows are host-bound (issue 5's IAF step and masked_linear; the host issue
    time of each GPU row says which), the ratio of the two is the part of the eager ratio gm's host code controls."""
    import torch.nn.functional as F  # noqa: PLC0415

    from gm.nn.made import made_masks  # noqa: PLC0415
    from gm.ops import made_iaf_step, masked_linear  # noqa: PLC0415
    from gm.reference.iaf import iaf_step as ref_step  # noqa: PLC0415

    n, d, hidden = 4, 8, 16  # the bench's IAF case (2 hidden layers, ELU, gated) at a tiny size
    masks = made_masks(d, hidden, 2, "natural", heads=2)
    z = torch.randn(n, d, requires_grad=True)
    ws = [(torch.randn(m.shape) / 4).requires_grad_() for m in masks]
    bs = [torch.zeros(m.shape[0], requires_grad=True) for m in masks]
    gz, gl = torch.randn(n, d), torch.randn(n)
    leaves = [z, *ws, *bs]

    def iaf_reference():
        h = F.elu(F.linear(z, ws[0] * masks[0], bs[0]))
        h = F.elu(F.linear(h, ws[1] * masks[1], bs[1]))
        out = F.linear(h, ws[2] * masks[2], bs[2])
        return ref_step(z, out[:, :d], out[:, d:], mode="gated")

    def iaf_gm():
        return made_iaf_step(z, ws, masks, bs, mode="gated", backend="cuda")

    mask = _made_mask(16, 8)
    x, w = torch.randn(4, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)
    b = torch.zeros(16, requires_grad=True)
    g = torch.randn(4, 16)

    def run(fn, outs_grads, params):
        def step():
            outs = fn()
            torch.autograd.backward(list(outs) if isinstance(outs, tuple) else [outs], outs_grads)
            for p in params:
                p.grad = None

        return step

    return [
        ("IAF step (MADE, gated)", run(iaf_reference, [gz, gl], leaves), run(iaf_gm, [gz, gl], leaves)),
        ("masked_linear (MADE mask)", run(lambda: F.linear(x, w * mask, b), [g], [x, w, b]),
         run(lambda: masked_linear(x, w, mask, b, backend="cuda"), [g], [x, w, b])),
    ]  # fmt: skip


def bindings(calls: int) -> list[tuple[str, float]]:
    """(call style, us a call) of a pybind11 entry point with masked_conv_gemm_cuda's argument list
    (bench/pybind_call.cpp, built here with g++ into a temporary folder): 24 taps as two sequences with the last four
    arguments as keywords (the binding before session 13) or positional, as one prebuilt object with every argument
    positional (now), and a call without arguments."""
    import importlib.util  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sysconfig  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import pybind11  # noqa: PLC0415

    src = Path(__file__).with_name("pybind_call.cpp")
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / ("gm_pybind_call" + sysconfig.get_config_var("EXT_SUFFIX"))
        subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-std=c++17", f"-I{pybind11.get_include()}",
                        f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(lib)], check=True)  # fmt: skip
        spec = importlib.util.spec_from_file_location("gm_pybind_call", lib)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    dy, dx = tuple(t // 7 - 3 for t in range(24)), tuple(t % 7 - 3 for t in range(24))
    taps = mod.make_taps(list(dy), list(dx))
    vectors, table, none = mod.vectors, mod.table, mod.none
    styles = {
        "two sequences, four keywords (before)":
            lambda: vectors(1, 2, 0, 4, 2, 5, 5, 8, 8, dy, dx, 1, 0, 7, out_nhwc=False, relu_a=False, gate=0, residual=0),
        "two sequences, positional": lambda: vectors(1, 2, 0, 4, 2, 5, 5, 8, 8, dy, dx, 1, 0, 7, False, False, 0, 0),
        "tap table, positional (now)": lambda: table(1, 2, 0, 4, 2, 5, 5, 8, 8, taps, 1, 0, 7, False, False, 0, 0),
        "no arguments": none,
    }  # fmt: skip
    return [(name, time_us(run, calls * 20)) for name, run in styles.items()]


def time_us(run, calls: int, repeats: int = 5) -> float:
    for _ in range(20):
        run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--profile", default=None, help="a module name from the table: cProfile its fwd+bwd")
    p.add_argument("--sort", default="cumulative", help="cProfile sort key (cumulative, tottime, ...)")
    p.add_argument("--models", action="store_true", help="also each model's training step (mnist preset, 6x6)")
    p.add_argument("--breakdown", action="store_true",
                   help="also MaskedConv2d's host time piece by piece, beside an 8-launch autograd.Function's floor")
    p.add_argument("--proxies", action="store_true",
                   help="also the IAF step's and masked_linear's eager baseline (real PyTorch on tiny CPU tensors) "
                        "against gm's op: the host side of their eager ratios")  # fmt: skip
    p.add_argument("--bindings", action="store_true",
                   help="only the cost of a pybind11 call's argument conversion at masked_conv's GEMM binding "
                        "(builds bench/pybind_call.cpp with g++)")  # fmt: skip
    args = p.parse_args(argv)
    if args.bindings:
        print("| masked_conv_gemm_cuda's argument list, passed as | us a call (min of 5) |\n|---|---|")
        for name, us in bindings(args.calls):
            print(f"| {name} | {us:.2f} |", flush=True)
        return 0
    from tools.cuda_emu import emulated  # noqa: PLC0415

    profile_name = _profile_name(args.profile, list(_MODULE_NAMES)) if args.profile else None

    torch.set_num_threads(1)
    torch.manual_seed(0)
    with emulated(_StubExtension("gm_stub_extension")):
        modules = _modules()
        print("| module | host us per fwd+bwd (min of 5) | gm kernel launches | other aten ops with a kernel |")
        print("|---|---|---|---|")
        for name, (make, shape) in modules.items():
            run = fwd_bwd(make(), torch.randn(*shape, requires_grad=True))
            us = time_us(run, args.calls)
            if name.startswith("nn.Linear"):  # a real CPU module: its ops are all "other"
                print(f"| {name} | {us:.1f} | - | {launches(run)[1]} |", flush=True)
                continue
            entries, ops = launches(run)
            print(f"| {name} | {us:.1f} | {entries} | {ops} |", flush=True)
        if args.models:
            from gm.nn import relu_conv  # noqa: PLC0415

            for name in ("pixelcnn", "pixelcnn unfused", "rowlstm", "diagonal_bilstm"):
                relu_conv.FUSED = not name.endswith("unfused")
                run = model_step(name.split()[0])
                us = time_us(run, max(args.calls // 30, 5))
                entries, ops = launches(run)
                print(f"| model {name} (training step) | {us:.1f} | {entries} | {ops} |", flush=True)
            relu_conv.FUSED = True
        if args.proxies:
            print("\n| case | eager baseline, host us | gm (cuda, stubbed), host us | ratio |\n|---|---|---|---|")
            for name, base, ours in proxies():
                b_us, g_us = time_us(base, args.calls), time_us(ours, args.calls)
                print(f"| {name} | {b_us:.1f} | {g_us:.1f} | {b_us / g_us:.2f}x |", flush=True)
        if args.breakdown:
            print("\n| MaskedConv2d (cuda) piece | host us (min of 5) |\n|---|---|")
            for name, us in breakdown(args.calls):
                print(f"| {name} | {us:.1f} |", flush=True)
        if profile_name:
            make, shape = modules[profile_name]
            run = fwd_bwd(make(), torch.randn(*shape, requires_grad=True))
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                run()
            prof.disable()
            pstats.Stats(prof).sort_stats(args.sort).print_stats(40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
