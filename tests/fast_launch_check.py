"""gm.kernels._launch against Triton's own launch path, without a GPU: run by tests/test_fast_launch.py in a process
without the interpreter (PYTHONPATH=. python tests/fast_launch_check.py [--timing] [--layers]; prints a JSON
report).

Triton's driver is replaced by a stand-in whose "C launcher" records what it is called with and whose binary loader
hands out a distinct function handle per compiled kernel; kernels really compile (for sm_90). Every gm Triton op then
runs forward and backward on CPU tensors three times: through Triton's path (fast launch off), then twice with it
on (the first call of each launch signature goes through Triton and enters the table, the second is served from
it). The launcher must see the same calls from the first and the third run: the same compiled kernels (function
handles, packed metadata), grids, stream and arguments (tensors by dtype, shape, strides and 16-byte alignment).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported (gm.kernels would choose 1 without a GPU)
os.environ["GM_TRITON_AUTOTUNE"] = "0"  # no GPU to time configs on: the first suitable config (as the GPU tests)

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.aot import _FakeDriver  # noqa: E402

CALLS: list[tuple] = []


class _Launcher:
    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, *args):
        CALLS.append((self.name, args))


class _Utils:
    def __init__(self):
        self.loads = 0

    def load_binary(self, name, kernel, shared, device):
        self.loads += 1  # one load per compiled kernel and device: a handle of its own
        return object(), self.loads, 64, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class _Driver(_FakeDriver):
    """bench.aot's driver stand-in (target, device, stream) that also loads binaries and builds launchers: the
    recording _Launcher, a function handle of its own per compiled kernel."""

    def __init__(self):
        super().__init__(90)
        self.utils = _Utils()
        self.launcher_cls = _Launcher


def _install():
    import types  # noqa: PLC0415

    driver.set_active(_Driver())
    props = types.SimpleNamespace(multi_processor_count=132, name="fast-launch check", major=9, minor=0,
                                  total_memory=80 << 30, shared_memory_per_block_optin=232448)  # fmt: skip
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.current_device = lambda: 0
    import gm._backend as backend  # noqa: PLC0415

    backend.triton_interpreted = lambda: True  # the triton backend takes the CPU tensors


def _norm(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", str(a.dtype), tuple(a.shape), tuple(a.stride()), a.data_ptr() % 16 == 0)
    if isinstance(a, (int, float, bool, str, type(None), tuple)):
        return a
    return repr(type(a))


def _normalized(calls):
    """Each launcher call: kernel name, grid, stream, function, packed metadata, arguments; the launch metadata and
    hooks (positions 6-8) must be inert (None or empty hook chains) and are left out."""
    out = []
    for name, args in calls:
        for hook in args[7:9]:
            assert hook is None or not getattr(hook, "calls", True), f"{name}: a launch hook is installed"
        out.append((name, *map(_norm, args[:6]), *map(_norm, args[9:])))
    return out


def _ops():
    """(label, thunk): each gm Triton op forward and backward at small shapes."""
    import gm.ops as ops  # noqa: PLC0415
    from gm.models.pixelcnn import ResidualBlock  # noqa: PLC0415
    from gm.nn.made import made_masks  # noqa: PLC0415

    torch.manual_seed(0)

    def fb(fn, *tensors):
        def run():
            leaves = [t.detach().requires_grad_() for t in tensors]
            out = fn(*leaves)
            outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
            outs = [o for o in outs if o.requires_grad]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        return run

    t = "triton"
    x = torch.randn(2, 8, 6, 5, dtype=torch.bfloat16)
    w = torch.randn(8, 8, 3, 3, dtype=torch.bfloat16)
    b = torch.randn(8, dtype=torch.bfloat16)
    gates = torch.randn(2, 16, 5, 6)
    mask = made_masks(6, 16, 2)[1]
    rgb = torch.arange(3).repeat_interleave(2)  # gm.nn.color_groups(6, 3)
    block = ResidualBlock(4, 1, t)  # gm.nn.relu_conv's fused node: ReLU on load, its derivative and the residual
    return [
        ("masked_conv2d", fb(lambda x, w, b: ops.masked_conv2d(x, w, b, mask="B", backend=t), x, w, b)),
        ("masked_conv2d channels_last", fb(lambda x, w: ops.masked_conv2d(x, w, mask="A", backend=t),
                                           x.to(memory_format=torch.channels_last), w)),
        ("masked_conv2d colours", fb(lambda x, w: ops.masked_conv2d(  # the centre ranges' CENTRE variants
            x, w, mask="B", in_groups=rgb, out_groups=rgb, backend=t), x[:, :6], w[:6, :6, :1, :1].contiguous())),
        ("row_lstm", fb(lambda g, ws: ops.row_lstm(g, ws, backend=t), gates, torch.randn(16, 4, 3))),
        ("diagonal_lstm", fb(lambda g, ws: ops.diagonal_lstm(g, ws, backend=t), gates, torch.randn(16, 4, 2))),
        ("minibatch", fb(lambda m: ops.minibatch_discrimination(m, backend=t), torch.randn(9, 4, 3))),
        ("masked_linear", fb(lambda x, w: ops.masked_linear(x, w, mask, activation="elu", backend=t),
                             torch.randn(5, 16), torch.randn(16, 16))),
        ("iaf_step", fb(lambda z, m, s: ops.iaf_step(z, m, s, backend=t), *torch.randn(3, 4, 6))),
        ("relu_conv residual block", fb(block, torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last))),
    ]  # fmt: skip


def _jit_runs():
    """A counter of Triton's own JITFunction.run calls (each a launch through Triton's path)."""
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    count = [0]
    original = JITFunction.run

    def run(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    JITFunction.run = run
    return count


def _alignment_case() -> dict:
    """The same launch on an aligned and on a misaligned tensor: Triton compiles two kernels; the fast path must
    launch each with its own (the misaligned signature is a table miss), never the aligned kernel on a misaligned
    address."""
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415
    from gm.kernels._launch import fast  # noqa: PLC0415

    @triton.jit
    def scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) * 2, mask=o < n)

    base = torch.zeros(64)
    handles = {}
    for label, x in (("aligned", base[:32]), ("misaligned", base[1:33]), ("aligned again", base[4:36])):
        for _ in range(2):
            CALLS.clear()
            fast(scale_kernel)[(1,)](x, 32, BLOCK=32)
            handles.setdefault(label, set()).add(CALLS[-1][1][4])
    return {k: sorted(v) for k, v in handles.items()}


def _autotuner_case() -> bool:
    """A triton.autotune kernel whose cache holds the chosen config: fast and Triton launches match."""
    import gm.kernels._launch as launch  # noqa: PLC0415
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    @triton.autotune([triton.Config({"BLOCK": 16}, num_warps=2), triton.Config({"BLOCK": 32}, num_warps=4)],
                     key=["n"])  # fmt: skip
    @triton.jit
    def add_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n), mask=o < n)

    x, y = torch.zeros(40), torch.zeros(40)
    add_kernel.cache[(40, "torch.float32", "torch.float32")] = add_kernel.configs[1]  # as if timed

    def grid(meta):
        return (triton.cdiv(40, meta["BLOCK"]),)

    runs = []
    for enabled in (False, True, True):
        launch.FAST_LAUNCH = enabled
        CALLS.clear()
        launch.fast(add_kernel)[grid](x, y, 40)
        runs.append(_normalized(CALLS))
    return runs[0] == runs[2] and runs[2][0][1] == 2  # grid (cdiv(40, 32),) of the chosen config


def main() -> int:
    _install()
    import gm.kernels._launch as launch  # noqa: PLC0415

    ops = _ops()
    report = {"triton": __import__("triton").__version__, "ops": {}}
    jit = _jit_runs()
    for label, run in ops:
        launch.FAST_LAUNCH = False
        CALLS.clear()
        run()
        slow = _normalized(CALLS)
        launch.FAST_LAUNCH = True
        run()
        CALLS.clear()
        before = jit[0]
        run()
        fast = _normalized(CALLS)
        report["ops"][label] = {"launches": len(slow), "equal": slow == fast, "triton_runs_when_fast": jit[0] - before}
        if slow != fast:
            report["ops"][label]["diff"] = [repr(p) for p in zip(slow, fast, strict=False) if p[0] != p[1]][:3]
    report["alignment"] = _alignment_case()
    report["autotuner_equal"] = _autotuner_case()
    if "--timing" in sys.argv:
        report["us_per_launch"] = _timing(launch)
    if "--layers" in sys.argv:
        report["us_per_layer_fwd_bwd"] = _layer_timing(launch)
    print(json.dumps(report))
    return 0


def _timing(launch) -> dict:
    """Host microseconds per launch of masked_conv's forward kernel (21 arguments), Triton's path against the fast
    one, the launcher stubbed (so this is the Python above the C launcher, plus a Python call for the stub)."""
    import triton.language as tl  # noqa: PLC0415
    from gm.kernels import masked_conv as k  # noqa: PLC0415

    x = torch.empty(2, 8, 6, 5, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    packed = torch.empty(5, 8, 8, dtype=torch.bfloat16)
    args = (x, packed, packed, x, x, x, packed, 2, 6, 5, 8, 8, 5, *x.stride())
    kw = dict(KH=3, KW=3, FLIP=False, HAS_BIAS=True, WIDE=False, ACC=tl.float32, PRECISION="ieee",
              BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)  # fmt: skip
    out = {}
    for label, enabled in (("triton", False), ("fast", True)):
        launch.FAST_LAUNCH = enabled
        kernel = launch.fast(k.masked_conv_fwd_kernel)
        for _ in range(200):
            kernel[(4,)](*args, **kw)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(2000):
                kernel[(4,)](*args, **kw)
            best = min(best, (time.perf_counter() - t0) / 2000 * 1e6)
            CALLS.clear()
        out[label] = round(best, 2)
    return out


def _layer_timing(launch) -> dict:
    """Host microseconds per forward+backward of gm's layers on the triton backend (small CPU tensors, launcher
    stubbed: gm's Python, torch's dispatch and the launch paths), Triton's launch path against the fast one."""
    from gm import nn as gnn  # noqa: PLC0415

    layers = {
        "MaskedConv2d 3x3 B": (gnn.MaskedConv2d(8, 8, 3, mask="B", backend="triton"), (2, 8, 5, 5)),
        "RowLSTM": (gnn.RowLSTM(8, 8, backend="triton"), (2, 8, 5, 5)),
        "DiagonalBiLSTM": (gnn.DiagonalBiLSTM(8, 8, backend="triton"), (2, 8, 5, 5)),
        "MinibatchDiscrimination": (gnn.MinibatchDiscrimination(8, kernels=4, dim=3, backend="triton"), (6, 8)),
        "IAFStep": (gnn.IAFStep(8, 16, backend="triton"), (4, 8)),
    }
    out = {}
    for name, (layer, shape) in layers.items():
        x = torch.randn(*shape, requires_grad=True)

        def run(layer=layer, x=x):
            CALLS.clear()
            y = layer(x)
            outs = [o for o in (y if isinstance(y, tuple) else (y,)) if o.requires_grad]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        row = {}
        for label, enabled in (("triton", False), ("fast", True)):
            launch.FAST_LAUNCH = enabled
            for _ in range(20):
                run()
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(100):
                    run()
                best = min(best, (time.perf_counter() - t0) / 100 * 1e6)
            row[label] = round(best, 1)
        run()
        row["launches"] = len(CALLS)
        out[name] = row
    return out


if __name__ == "__main__":
    raise SystemExit(main())
