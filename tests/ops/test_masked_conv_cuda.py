"""The cuda backend of masked_conv2d (implicit GEMM on tensor cores) against the float64 reference.

Every test needs a CUDA GPU and gm._C built with CUDA: marked gpu, skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from gm._ext import cuda_status
from gm._memory_format import format_of, is_channels_last
from gm.ops.masked_conv import masked_conv2d, pack_plan, pack_weight
from gm.reference.masked_conv import masked_conv2d as reference
from tests._util import assert_rel, poison_empty

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16]

# (N, C_in, C_out, H, W, kh, kw, mask, colors)
SHAPES = [
    pytest.param(2, 16, 24, 9, 11, 7, 7, "A", 1, id="7x7A-N2-C16-24-9x11"),
    pytest.param(3, 24, 40, 8, 8, 3, 3, "B", 1, id="3x3B-N3-C24-40-8x8"),
    pytest.param(2, 6, 12, 5, 5, 1, 1, "A", 3, id="1x1A-rgb-C6-12"),
    pytest.param(2, 12, 9, 6, 10, 1, 5, "B", 3, id="1x5B-rgb-C12-9"),
    pytest.param(5, 3, 17, 7, 7, 7, 7, "A", 1, id="7x7A-odd-N5-C3-17-7x7"),
    pytest.param(5, 3, 17, 7, 7, 3, 3, "B", 1, id="3x3B-odd-N5-C3-17-7x7"),
    pytest.param(8, 64, 64, 16, 16, 3, 3, "B", 1, id="3x3B-round-N8-C64-16x16"),
    pytest.param(8, 64, 64, 16, 16, 7, 7, "A", 1, id="7x7A-round-N8-C64-16x16"),
    pytest.param(2, 136, 200, 12, 13, 5, 5, "B", 1, id="5x5B-tails-C136-200"),
]


def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ok, why = cuda_status()
    if not ok:
        pytest.skip(why)


def _groups(c: int, colors: int):
    if colors == 1:
        return None
    from gm.nn.masked_conv import color_groups  # noqa: PLC0415

    return color_groups(c, colors=colors).cuda()


def _case(n, cin, cout, h, w, kh, kw, dtype, channels_last=False):
    dev = torch.device("cuda")
    x = torch.randn(n, cin, h, w, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(cout, cin, kh, kw, device=dev) / (cin * kh * kw) ** 0.5
    b = torch.randn(cout, device=dev)
    gy = torch.randn(n, cout, h, w, device=dev)
    return x.to(dtype), wt.to(dtype), b.to(dtype), gy.to(dtype)


def _run(fn, x, w, b, gy, **kw):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    y = fn(x, w, b, **kw)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, b.grad


def _check_against_reference(x, w, b, gy, dtype, mask, in_groups, out_groups):
    kw = dict(mask=mask, in_groups=in_groups, out_groups=out_groups)
    got = _run(lambda *a, **k: masked_conv2d(*a, backend="cuda", **k), x, w, b, gy, **kw)
    ref = _run(reference, x.double(), w.double(), b.double(), gy.double(), **kw)
    for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
        assert g.dtype == dtype, f"{name} dtype {g.dtype}"
        assert_rel(g, r, dtype, what=f"cuda {name}")
    # y is the kernel's own output, in x's memory format (channels-last for a channels-last x, else NCHW), and so is
    # the input gradient
    assert is_channels_last(got[0]) == is_channels_last(x) and is_channels_last(got[1]) == is_channels_last(x)
    assert got[0].is_contiguous(memory_format=format_of(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "cin", "cout", "h", "w", "kh", "kw", "mask", "colors"), SHAPES)
def test_cuda_matches_reference(n, cin, cout, h, w, kh, kw, mask, colors, dtype, monkeypatch):
    _need_cuda()
    poison_empty(monkeypatch)
    x, wt, b, gy = _case(n, cin, cout, h, w, kh, kw, dtype)
    _check_against_reference(x, wt, b, gy, dtype, mask, _groups(cin, colors), _groups(cout, colors))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_channels_last_input(dtype, monkeypatch):
    _need_cuda()
    poison_empty(monkeypatch)
    x, wt, b, gy = _case(3, 32, 48, 10, 9, 7, 7, dtype, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    _check_against_reference(x, wt, b, gy, dtype, "A", None, None)


def test_cuda_float32_exact_path_without_tf32(monkeypatch):
    """With tf32 disallowed, float32 uses split-tf32 products: fp32-level error, far inside the tf32 tolerance."""
    _need_cuda()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, wt, b, gy = _case(4, 40, 72, 12, 12, 7, 7, torch.float32)
    got = _run(lambda *a, **k: masked_conv2d(*a, backend="cuda", **k), x, wt, b, gy, mask="B")
    ref = _run(reference, x.double(), wt.double(), b.double(), gy.double(), mask="B")
    for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
        err = (g.double() - r).norm().item() / r.norm().item()
        assert err < 1e-5, f"{name}: relative error {err:.3g} without tf32"


def test_cuda_weight_grad_of_masked_taps_is_exactly_zero():
    _need_cuda()
    x, wt, b, gy = _case(2, 16, 16, 8, 8, 5, 5, torch.bfloat16)
    _, _, dw, _ = _run(lambda *a, **k: masked_conv2d(*a, backend="cuda", **k), x, wt, b, gy, mask="A")
    assert (dw[:, :, 3:] == 0).all() and (dw[:, :, 2, 2:] == 0).all()


def test_cuda_weight_grad_split_reduction_is_deterministic():
    _need_cuda()
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415

    x, wt, _, gy = _case(16, 64, 64, 32, 32, 7, 7, torch.bfloat16)
    _, taps = pack_weight(wt, "A", None, None)
    plan = pack_plan(wt.shape, "A", None, None, wt.device)
    first = c.weight_grad(x, gy, taps, plan, tuple(wt.shape), wt.dtype)
    for _ in range(3):
        assert torch.equal(c.weight_grad(x, gy, taps, plan, tuple(wt.shape), wt.dtype), first)


def test_cuda_rejects_float64():
    _need_cuda()
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415

    x = torch.randn(1, 2, 4, 4, device="cuda", dtype=torch.float64)
    packed, taps = pack_weight(torch.randn(3, 2, 3, 3, device="cuda", dtype=torch.float64), "B", None, None)
    with pytest.raises(ValueError, match="float64"):
        c.forward(x, packed, None, taps)


def test_cuda_backward_shares_grad_conversion():
    """backward() converts grad once for both gradients and gives the same bits as the separate calls."""
    _need_cuda()
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415

    x, wt, _, gy = _case(3, 20, 12, 9, 8, 7, 7, torch.bfloat16)
    packed, taps = pack_weight(wt, "B", None, None)
    plan = pack_plan(wt.shape, "B", None, None, wt.device)
    shape = tuple(wt.shape)
    dx, dw, _ = c.backward(gy, x, packed, taps, plan, shape, wt.dtype, True, True)
    assert torch.equal(dx, c.input_grad(gy, packed, taps))
    assert torch.equal(dw, c.weight_grad(x, gy, taps, plan, shape, wt.dtype))
    assert c.backward(gy, x, packed, taps, plan, shape, wt.dtype, False, True)[0] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_nhwc_conversion(dtype, monkeypatch):
    _need_cuda()
    poison_empty(monkeypatch)
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415

    x = torch.randn(3, 37, 5, 13, device="cuda").to(dtype)
    got = c._nhwc(x, 40)
    assert torch.equal(got[..., :37], x.permute(0, 2, 3, 1)) and (got[..., 37:] == 0).all()
