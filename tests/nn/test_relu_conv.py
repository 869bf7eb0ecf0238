"""gm.nn.relu_conv: the PixelCNN residual block and the output head as one autograd node on triton (ReLU applied as
each convolution loads its input, its derivative in the input gradients' epilogue, the residual in the last
epilogue) against the composed modules on the same backend and against the reference backend: output and every
gradient, both layouts, colour groups, partial gradient needs, the forward without a gradient."""

from __future__ import annotations

import pytest
import torch

from gm.models.common import OutputHead
from gm.models.pixelcnn import ResidualBlock
from gm.nn import relu_conv
from tests._util import DEVICE, HAS_GPU, assert_rel, fast_backends

pytestmark = pytest.mark.skipif("triton" not in fast_backends(), reason="no triton backend here")

DTYPES = [torch.float32, torch.bfloat16] if HAS_GPU else [torch.float64, torch.float32]


def _module(kind: str, colors: int, backend: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "block":
        m = ResidualBlock(6, colors, backend)  # 12 -> 6 -> 6 -> 12 maps
    else:
        m = OutputHead(12, 9, 6, colors, backend)
    for p in m.parameters():  # biases away from zero, so ReLU cuts inside the chain
        torch.nn.init.uniform_(p, -0.6, 0.6)
    return m.to(device=DEVICE, dtype=dtype)


def _run(module, x, gy, fused: bool, monkeypatch):
    monkeypatch.setattr(relu_conv, "FUSED", fused)
    x = x.detach().requires_grad_()
    y = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, (x, *params), gy)
    return y, grads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("colors", [1, 3])
@pytest.mark.parametrize("kind", ["block", "head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_matches_composed_and_reference(kind, colors, channels_last, dtype, monkeypatch):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused_m = _module(kind, colors, "triton", dtype)
    ref_m = _module(kind, colors, "reference", torch.float64)
    x = torch.randn(2, 12, 5, 4, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    out_ch = 12 if kind == "block" else 6
    gy = torch.randn(2, out_ch, 5, 4, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    y, grads = _run(fused_m, x, gy, True, monkeypatch)
    assert type(y.grad_fn).__name__ == "_ReluConvChainBackward"  # one node
    assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    y_c, grads_c = _run(fused_m, x, gy, False, monkeypatch)
    y_r, grads_r = _run(ref_m, x.double(), gy.double(), True, monkeypatch)
    names = ["y", "dx"] + [n for n, _ in fused_m.named_parameters()]
    for name, a, b, r in zip(names, (y, *grads), (y_c, *grads_c), (y_r, *grads_r), strict=True):
        assert a.dtype == dtype
        assert_rel(a, r, dtype, f"fused {name} vs reference")
        assert_rel(a, b, dtype, f"fused {name} vs composed")
        if kind == "head" and name != "y":  # no residual: the same kernels on the same values, but for bias sums
            assert torch.equal(a, b) or name.endswith("bias"), name


@pytest.mark.parametrize("frozen", ["x", "weights", "first_bias"])
def test_partial_gradient_needs(frozen, monkeypatch):
    """Only what requires grad gets a gradient, and it equals the composed path's."""
    m = _module("block", 1, "triton", torch.float64)
    x = torch.randn(2, 12, 4, 3, device=DEVICE, dtype=torch.float64, requires_grad=frozen != "x")
    if frozen == "weights":
        for conv in (m.reduce, m.conv, m.expand):
            conv.weight.requires_grad_(False)
    if frozen == "first_bias":
        m.reduce.bias.requires_grad_(False)
    live = [t for t in (x, *m.parameters()) if t.requires_grad]
    gy = torch.randn(2, 12, 4, 3, device=DEVICE, dtype=torch.float64)
    got = {}
    for fused in (True, False):
        monkeypatch.setattr(relu_conv, "FUSED", fused)
        got[fused] = torch.autograd.grad(m(x), live, gy)
    for a, b in zip(got[True], got[False], strict=True):
        assert_rel(a, b, torch.float64, "gradient")


def test_forward_without_gradient_matches(monkeypatch):
    """Under no_grad (sampling) the chain runs its fused forward without a node; values as with one."""
    m = _module("block", 3, "triton", torch.float64)
    x = torch.randn(1, 12, 3, 5, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        y0 = m(x)
    assert y0.grad_fn is None
    monkeypatch.setattr(relu_conv, "FUSED", False)
    with torch.no_grad():
        assert_rel(y0, m(x), torch.float64, "no-grad forward")


def test_other_backends_run_composed():
    """A conv on another backend: the composed modules (no fused node)."""
    m = _module("block", 1, "reference", torch.float64)
    x = torch.randn(1, 12, 2, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert type(m(x).grad_fn).__name__ != "_ReluConvChainBackward"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["block", "head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_fused_chain_matches_composed(backend, kind, dtype, monkeypatch):
    """On the GPU: the fused node on each backend (the Triton kernels' RELU_IN / GATE / RES, the CUDA GEMM's kFused
    and the weight gradient's kRelu variants) against the composed modules on that backend and the reference, at a
    size with full tiles (h=48, 24x20 images), channels-last as the models run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend not in fast_backends(torch.device("cuda")):
        pytest.skip(f"no {backend} backend here")
    torch.manual_seed(0)
    m = (ResidualBlock(48, 3, backend) if kind == "block" else OutputHead(96, 96, 48, 3, backend)).cuda().to(dtype)
    ref = (ResidualBlock(48, 3, "reference") if kind == "block" else OutputHead(96, 96, 48, 3, "reference")).cuda()
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    ref.double()
    x = torch.randn(4, 96, 24, 20, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    out_ch = 96 if kind == "block" else 48
    gy = torch.randn(4, out_ch, 24, 20, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    y, grads = _run(m, x, gy, True, monkeypatch)
    assert type(y.grad_fn).__name__ == "_ReluConvChainBackward"
    y_c, grads_c = _run(m, x, gy, False, monkeypatch)
    y_r, grads_r = _run(ref, x.double(), gy.double(), False, monkeypatch)
    names = ["y", "dx"] + [n for n, _ in m.named_parameters()]
    for name, a, b, r in zip(names, (y, *grads), (y_c, *grads_c), (y_r, *grads_r), strict=True):
        assert_rel(a, r, dtype, f"{backend} fused {name} vs reference")
        assert_rel(a, b, dtype, f"{backend} fused {name} vs composed")


def test_bad_input_gets_the_composed_paths_errors():
    """A dtype mix or a wrong channel count: the same clear error as the composed modules give."""
    m = _module("block", 1, "triton", torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(1, 12, 3, 3, device=DEVICE, dtype=torch.float32, requires_grad=True))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 10, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True))
