"""Shared test helpers: which backends run here, relative-error tolerances per dtype, NaN poisoning."""

from __future__ import annotations

from pathlib import Path

import torch

from gm._backend import availability
from gm._ext import ext_status

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")

# ||out - ref|| / ||ref|| bounds, by what the dtype can do (float32 on a GPU may use tf32 in convolutions/GEMMs).
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}
REL_TOL_GPU_FP32 = 2e-3  # tf32 operands (torch's default for convolutions)


def rel_tol(dtype: torch.dtype, device: torch.device = DEVICE) -> float:
    if dtype == torch.float32 and device.type == "cuda":
        return REL_TOL_GPU_FP32
    return REL_TOL[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/Inf (an unwritten element?)"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "", device=DEVICE) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    tol = rel_tol(dtype, device)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g} ({dtype})"


def fast_backends(device: torch.device = DEVICE) -> list[str]:
    """The non-reference backends that can run tensors on `device` on this machine."""
    out = []
    for b in ("cpu", "triton", "cuda"):
        ok, _ = availability(b, device)
        if ok and b == "cpu":
            ok = ext_status()[0]
        if ok:
            out.append(b)
    return out


def triton_here() -> bool:
    """Whether the triton backend runs CPU tensors here (under the interpreter)."""
    return "triton" in fast_backends(torch.device("cpu"))


# (N, H, W, hidden, colors) of the PixelRNN layers' channels-last one-node tests: odd sizes (one column, one row, one
# image, h=3) beside a plain one.
ONE_NODE_SHAPES = {"N2-H4-W5-h6": (2, 4, 5, 6, 3), "N1-H3-W1-h3": (1, 3, 1, 3, 3), "N2-H1-W4-h3": (2, 1, 4, 3, 1),
                   "N1-H2-W3-h3": (1, 2, 3, 3, 3)}  # fmt: skip


def random_biases(layer: torch.nn.Module) -> torch.nn.Module:
    """layer with every 1-D parameter (biases, learned initial states) drawn from N(0, 1): the default init zeroes
    them, which would hide one read or differentiated wrongly."""
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:
                p.normal_()
    return layer


def linked_source_tree(tmp_path: Path) -> Path:
    """tmp_path/src laid out as the installed package maps the checkout (kernels/ is gm.kernels), through links, with
    bench, tests and tools beside it: what another Python (the GPU machine's Triton in .venv-triton36) imports gm
    from with PYTHONPATH=src."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    (src / "gm").mkdir(parents=True)
    for entry in (root / "gm").iterdir():
        (src / "gm" / entry.name).symlink_to(entry)
    (src / "gm" / "kernels").symlink_to(root / "kernels")
    for name in ("bench", "tests", "tools"):
        (src / name).symlink_to(root / name)
    return src


def train_eager_and_compiled(main, argv: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """`gm train *argv` twice through gm.cli.main, eager then with --compile (inductor told to draw random numbers
    from torch's generator, as eager does: fallback_random); the two run directories."""
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["train", *argv, "--out", str(eager)]) == 0
    try:
        with inductor_config.patch(fallback_random=True):
            assert main(["train", *argv, "--compile", "--out", str(compiled)]) == 0
    finally:
        torch._dynamo.reset()
    return eager, compiled


def poison_empty(monkeypatch) -> None:
    """Make torch.empty/empty_like/new_empty return NaN-filled tensors, so a kernel that leaves an element
    unwritten fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def nan_fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: nan_fill(real_new_empty(self, *a, **k)))


def assert_auto_picks_triton(op_module: str, call, monkeypatch) -> None:
    """Auto sends CUDA tensors of the scan op in `op_module` to triton (measured faster than its cuda kernels),
    whatever gm._C holds: the cuda forward is replaced by one that fails, and `call(module)` must still run."""
    import importlib  # noqa: PLC0415

    mod = importlib.import_module(op_module)  # gm.ops.<op> is also the function's name: import the module itself

    def refuse(*args, **kwargs):
        raise AssertionError("auto picked the cuda backend")

    monkeypatch.setitem(mod._FORWARD, "cuda", refuse)
    monkeypatch.delenv("GM_BACKEND", raising=False)
    call(mod)


def composed_without_grad_or_mode(layer, x: torch.Tensor, node: str) -> None:
    """A layer with a one-node eager path (autograd Function `node`): with no gradient to record there is no graph,
    and under a mode (here a pass-through torch-function mode) the composed ops run, not the node."""
    from torch.overrides import TorchFunctionMode  # noqa: PLC0415

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        assert layer(x).grad_fn is None
    with Passthrough():
        y = layer(x)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ != f"{node}Backward"
