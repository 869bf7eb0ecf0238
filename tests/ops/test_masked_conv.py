"""masked_conv2d: every backend on this machine against gm.reference, forward and all gradients."""

from __future__ import annotations

import functools

import pytest
import torch

import gm
from gm.nn import MaskedConv2d, color_groups
from gm.reference import conv_mask
from gm.reference import masked_conv2d as reference
from tests._util import DEVICE, HAS_GPU, assert_rel, fast_backends, poison_empty

BACKENDS = fast_backends()
DTYPES = [torch.float32, torch.bfloat16] if HAS_GPU else [torch.float64, torch.float32]

# (id, N, C_in, C_out, H, W, kh, kw, mask, groups) ; groups: None, "rgb" (colour groups) or "rand" (random orders)
SHAPES = [
    pytest.param(2, 3, 5, 7, 7, 7, 7, "A", None, id="7x7A-N2-C3to5-7x7"),
    pytest.param(2, 6, 9, 5, 6, 3, 3, "B", "rgb", id="3x3B-rgb-5x6"),
    pytest.param(3, 3, 6, 4, 4, 1, 1, "A", "rgb", id="1x1A-rgb"),
    pytest.param(1, 4, 5, 3, 7, 1, 5, "B", None, id="1x5B-N1"),
    pytest.param(2, 5, 4, 6, 5, 5, 3, "A", "rand", id="5x3A-random-orders"),
    pytest.param(2, 4, 3, 3, 3, 1, 1, "A", None, id="1x1A-no-taps"),
    pytest.param(2, 16, 16, 8, 8, 3, 3, "B", None, id="3x3B-round"),
]


def _groups(kind, cin, cout):
    if kind is None:
        return None, None
    if kind == "rgb":
        return color_groups(cin, 3).to(DEVICE), color_groups(cout, 3).to(DEVICE)
    return torch.randint(0, 4, (cin,), device=DEVICE), torch.randint(0, 4, (cout,), device=DEVICE)


def _inputs(n, cin, cout, h, w, kh, kw, dtype):
    x = torch.randn(n, cin, h, w, device=DEVICE, dtype=dtype, requires_grad=True)
    wt = torch.randn(cout, cin, kh, kw, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.randn(cout, device=DEVICE, dtype=dtype, requires_grad=True)
    return x, wt, b


def _ref_and_grads(x, wt, b, mask, gi, go, gy):
    """The reference in float64 (the oracle), with its gradients."""
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, wt, b))
    y = reference(xd, wd, bd, mask=mask, in_groups=gi, out_groups=go)
    return (y, *torch.autograd.grad(y, (xd, wd, bd), gy.double()))


def _check_against_reference(backend, dtype, n, cin, cout, h, w, kh, kw, mask, groups, monkeypatch):
    """y and every gradient of `backend` against the float64 reference (outputs NaN-poisoned); (got, ref)."""
    gi, go = _groups(groups, cin, cout)
    x, wt, b = _inputs(n, cin, cout, h, w, kh, kw, dtype)
    gy = torch.randn(n, cout, h, w, device=DEVICE, dtype=dtype)
    ref = _ref_and_grads(x, wt, b, mask, gi, go, gy)
    poison_empty(monkeypatch)
    y = gm.ops.masked_conv2d(x, wt, b, mask=mask, in_groups=gi, out_groups=go, backend=backend)
    got = (y, *torch.autograd.grad(y, (x, wt, b), gy))
    for name, g, r in zip(("y", "dx", "dweight", "dbias"), got, ref, strict=True):
        assert g.dtype == dtype
        assert_rel(g, r, dtype, f"{backend} {name}")
    return got, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "cin", "cout", "h", "w", "kh", "kw", "mask", "groups"), SHAPES)
def test_matches_reference(backend, dtype, n, cin, cout, h, w, kh, kw, mask, groups, monkeypatch):
    _check_against_reference(backend, dtype, n, cin, cout, h, w, kh, kw, mask, groups, monkeypatch)


# Colour layers wider than the interpreter's 16-channel blocks, where the Triton kernels reduce the centre tap over the
# channel range each block connects (gm.ops.masked_conv.centre_ranges) and the weight gradient leaves out centre
# tiles outside it: 1x1 mask B (the first block's range ends at channel 16, the input gradient's last starts at 32),
# 1x1 mask A (blocks that connect nothing: the bias alone), 3x3 (taps before the centre), random orders (ranges over
# non-contiguous groups), a ragged 40 -> 56.
CENTRE_SHAPES = [
    pytest.param(48, 48, 1, "B", "rgb", id="1x1B-rgb-48"),
    pytest.param(48, 48, 1, "A", "rgb", id="1x1A-rgb-48"),
    pytest.param(48, 48, 3, "B", "rgb", id="3x3B-rgb-48"),
    pytest.param(40, 56, 3, "A", "rand", id="3x3A-random-40to56"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("cin", "cout", "kh", "mask", "groups"), CENTRE_SHAPES)
def test_centre_ranges(backend, cin, cout, kh, mask, groups, monkeypatch):
    torch.manual_seed(7)
    got, ref = _check_against_reference(backend, DTYPES[0], 2, cin, cout, 4, 5, kh, kh, mask, groups, monkeypatch)
    assert (got[2][ref[2] == 0] == 0).all(), "forbidden centre pairs must get exactly zero"


def test_centre_ranges_table():
    """centre_ranges' rows for 1x1 mask A over 6 -> 6 channels in colour groups of 2: output o sees inputs of earlier
    colours (forward), input c reaches outputs of later colours (input_grad); (6, 0) where there are none."""
    from gm.ops.masked_conv import centre_ranges, pack_plan  # noqa: PLC0415

    ranges = centre_ranges(pack_plan((6, 6, 1, 1), "A", color_groups(6, 3), color_groups(6, 3), "cpu"))
    assert ranges.forward.tolist() == [[6, 0], [6, 0], [0, 2], [0, 2], [0, 4], [0, 4]]
    assert ranges.input_grad.tolist() == [[2, 6], [2, 6], [4, 6], [4, 6], [6, 0], [6, 0]]
    assert centre_ranges(pack_plan((6, 6, 3, 3), "B", None, None, "cpu")) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_centre_ranges_switch(backend, monkeypatch):
    """gm.ops.masked_conv.CENTRE_RANGES = False (the switch for a GPU failure): no ranges, the same results as with
    them (every centre chunk reduced)."""
    from gm.ops import masked_conv as mc  # noqa: PLC0415

    cin = cout = 48
    gi, go = _groups("rgb", cin, cout)
    x, wt, b = _inputs(1, cin, cout, 3, 4, 1, 1, DTYPES[0])
    with_ranges = gm.ops.masked_conv2d(x, wt, b, mask="B", in_groups=gi, out_groups=go, backend=backend)
    monkeypatch.setattr(mc, "CENTRE_RANGES", False)
    monkeypatch.setattr(mc, "_PLANS", type(mc._PLANS)())
    assert mc.centre_ranges(mc.pack_plan(wt.shape, "B", gi, go, wt.device)) is None
    without = gm.ops.masked_conv2d(x, wt, b, mask="B", in_groups=gi, out_groups=go, backend=backend)
    assert_rel(with_ranges, without, DTYPES[0], f"{backend} y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cin", "cout", "kh", "mask"), [(264, 264, 1, "B"), (396, 396, 1, "A"), (258, 1026, 1, "B"),
                                                          (264, 264, 3, "B")], ids=str)  # fmt: skip
def test_gpu_cuda_centre_ranges(dtype, cin, cout, kh, mask, monkeypatch):
    """Colour layers over several 128-channel tiles, where the cuda GEMMs reduce the centre tap over part of its
    channels (gm.ops._masked_conv_cuda.centre_table; the 1x1s: PixelCNN's head and the emulator's cases) and the
    weight gradient leaves out centre tiles: every output and gradient against the float64 reference."""
    if DEVICE.type != "cuda" or "cuda" not in BACKENDS:
        pytest.skip("needs the cuda backend")
    got, ref = _check_against_reference("cuda", dtype, 2, cin, cout, 9, 10, kh, kh, mask, "rgb", monkeypatch)
    assert (got[2][ref[2] == 0] == 0).all(), "forbidden centre pairs must get exactly zero"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_taps_get_exactly_zero_weight_grad(backend):
    cin, cout = 6, 6
    gi, go = color_groups(cin, 3).to(DEVICE), color_groups(cout, 3).to(DEVICE)
    x, wt, b = _inputs(2, cin, cout, 5, 5, 5, 5, torch.float32)
    y = gm.ops.masked_conv2d(x, wt, b, mask="A", in_groups=gi, out_groups=go, backend=backend)
    (dw,) = torch.autograd.grad(y.sum(), wt)
    m = conv_mask(tuple(wt.shape), "A", gi, go, DEVICE)
    assert (dw[m == 0] == 0).all()
    assert (dw[m == 1] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", ["xwb", "xb", "wb", "b", "xw"])
def test_each_subset_of_gradients(backend, wanted, monkeypatch):
    """Any subset of (x, weight, bias) requiring grad gets those gradients, each against the reference. The bias
    gradient comes with the convolution's others (the backend's backward asked for bias_grad=True: on triton and
    cuda the weight-gradient kernels sum it) when another gradient is computed, and is not asked for when the bias
    needs none."""
    from gm.ops import masked_conv as mc  # noqa: PLC0415

    asked = []
    real = mc._BACKWARD[backend]
    monkeypatch.setitem(mc._BACKWARD, backend, lambda *a, **kw: asked.append(kw.get("bias_grad")) or real(*a, **kw))
    gi, go = _groups("rgb", 6, 9)
    x, wt, b = _inputs(2, 6, 9, 5, 6, 3, 3, torch.float32)
    gy = torch.randn(2, 9, 5, 6, device=DEVICE)
    ref = dict(zip("xwb", _ref_and_grads(x, wt, b, "B", gi, go, gy)[1:], strict=True))
    leaves = dict(zip("xwb", (x, wt, b), strict=True))
    for name, t in leaves.items():
        t.requires_grad_(name in wanted)
    y = gm.ops.masked_conv2d(x, wt, b, mask="B", in_groups=gi, out_groups=go, backend=backend)
    got = torch.autograd.grad(y, [leaves[n] for n in wanted], gy)
    for name, g in zip(wanted, got, strict=True):
        assert_rel(g, ref[name], torch.float32, f"{backend} d{name}")
    if wanted == "b":
        assert asked == []  # a plain sum: no convolution gradient to share a pass with
    else:
        assert asked == ["b" in wanted]


@pytest.mark.parametrize("splits", [1, 3, 5])
def test_triton_weight_grad_any_split_count(splits, monkeypatch):
    """The weight gradient's pixel splits are sized in the kernel from the grid: 3 splits of 70 pixels leave the
    last one short, 5 leave two empty (their partial sums must be zeros, not garbage); the buffer's slots past the
    launched splits (NaN-poisoned) stay out of the sum."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend here")
    from gm.kernels import masked_conv as k  # noqa: PLC0415

    calls = []

    def fake_splits(tiles, pixels, block_p, element_size):  # the buffer is sized for 2 more than the launch uses
        calls.append(tiles)
        return splits + 2 if len(calls) == 1 else splits

    monkeypatch.setattr(k, "_num_splits", fake_splits)
    # the buffer's size is cached per shape: a fresh cache for this test, so the fake is asked (and its answers
    # do not outlive the test)
    monkeypatch.setattr(k, "_most_splits", functools.lru_cache(k._most_splits.__wrapped__))
    x, wt, b = _inputs(2, 3, 4, 5, 7, 3, 3, torch.float32)
    gy = torch.randn(2, 4, 5, 7, device=DEVICE)
    ref = _ref_and_grads(x, wt, b, "B", None, None, gy)
    poison_empty(monkeypatch)
    y = gm.ops.masked_conv2d(x, wt, b, mask="B", backend="triton")
    (dw,) = torch.autograd.grad(y, wt, gy)
    assert_rel(dw, ref[2], torch.float32, f"dweight, {splits} splits")



@pytest.mark.parametrize(("kh", "kw", "mask"), [(5, 5, "A"), (3, 3, "B"), (1, 3, "B")])
def test_triton_int64_offsets(kh, kw, mask, monkeypatch):
    """The Triton kernels' offsets are int32 below 2**31 elements and int64 (WIDE) from there on; a lowered limit
    runs the int64 path on small tensors: forward, input gradient and weight gradient against the reference."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend here")
    from gm.kernels import _common  # noqa: PLC0415

    monkeypatch.setattr(_common, "INT32_LIMIT", 0)
    x, wt, b = _inputs(2, 5, 4, 7, 6, kh, kw, torch.float32)
    gy = torch.randn(2, 4, 7, 6, device=DEVICE)
    ref = _ref_and_grads(x, wt, b, mask, None, None, gy)
    poison_empty(monkeypatch)
    y = gm.ops.masked_conv2d(x, wt, b, mask=mask, backend="triton")
    got = (y, *torch.autograd.grad(y, (x, wt, b), gy))
    for name, g, r in zip(("y", "dx", "dweight", "dbias"), got, ref):
        assert_rel(g, r, torch.float32, f"int64 offsets {name}")

@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_input(backend):
    """A channels-last input gives a channels-last output and input gradient (a channels-last model converts
    nothing between layers), with the values of the NCHW call."""
    x, wt, b = _inputs(2, 4, 5, 6, 6, 3, 3, torch.float32)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y = gm.ops.masked_conv2d(x_cl, wt, b, mask="B", backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    ref = reference(x.detach().double(), wt.detach().double(), b.detach().double(), mask="B")
    assert_rel(y, ref, torch.float32, "channels_last forward")
    gy = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    dx, dw = torch.autograd.grad(y, (x_cl, wt), gy)
    assert dx.is_contiguous(memory_format=torch.channels_last) and not dx.is_contiguous()
    xd = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(reference(xd, wt.detach().double(), b.detach().double(), mask="B"), xd,
                                    gy.double())  # fmt: skip
    assert_rel(dx, dx_ref, torch.float32, "channels_last dx")
    # the NCHW call: NCHW out, the same values
    x_c = x.detach().requires_grad_()
    y_c = gm.ops.masked_conv2d(x_c, wt, b, mask="B", backend=backend)
    dx_c, dw_c = torch.autograd.grad(y_c, (x_c, wt), gy.contiguous())
    assert y_c.is_contiguous() and dx_c.is_contiguous()
    for got, want in ((y, y_c), (dx, dx_c), (dw, dw_c)):
        assert_rel(got, want, torch.float32, "channels_last vs NCHW")


@pytest.mark.skipif(HAS_GPU, reason="float64 gradcheck runs on the CPU backends")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    gi, go = color_groups(3, 3), color_groups(6, 3)
    x, wt, b = (t.detach().double().requires_grad_() for t in _inputs(1, 3, 6, 4, 3, 3, 3, torch.float64))
    assert torch.autograd.gradcheck(
        lambda x, w, b: gm.ops.masked_conv2d(x, w, b, mask="A", in_groups=gi, out_groups=go, backend=backend),
        (x, wt, b),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["A", "B"])
def test_causality_exact(backend, mask):
    """d out[pixel p, colour k] / d x is exactly zero at every later pixel, and at p for colours the mask forbids."""
    c, h, w = 6, 5, 5
    layer = MaskedConv2d(c, c, 5, mask=mask, colors=3, backend=backend).to(DEVICE)
    x = torch.randn(1, c, h, w, device=DEVICE, requires_grad=True)
    out = layer(x)
    colours = color_groups(c, 3)
    for py, px in [(2, 2), (0, 4), (4, 0)]:
        for k in range(3):
            (g,) = torch.autograd.grad(out[0, colours == k, py, px].sum(), x, retain_graph=True)
            g = g[0]
            later = torch.zeros(h, w, dtype=torch.bool)
            later.view(-1)[py * w + px + 1 :] = True
            assert (g[:, later] == 0).all(), "depends on a later pixel"
            forbidden = colours >= k if mask == "A" else colours > k
            assert (g[forbidden, py, px] == 0).all(), "depends on a forbidden colour at the same pixel"
            if k > 0 or mask == "B":
                allowed = ~forbidden
                assert (g[allowed, py, px] != 0).any(), "the allowed centre connections are missing"


def test_bad_input_errors():
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    cases = [
        (dict(x=x, weight=torch.randn(4, 3, 2, 3)), "odd kernel"),
        (dict(x=x, weight=torch.randn(4, 5, 3, 3)), "channels"),
        (dict(x=x.double(), weight=w), "dtype"),
        (dict(x=x, weight=w, mask="C"), "mask"),
        (dict(x=x, weight=w, in_groups=torch.zeros(4, dtype=torch.long)), "in_groups"),
        (dict(x=x, weight=w, out_groups=torch.zeros(3, dtype=torch.long)), "out_groups"),
        (dict(x=x, weight=w, bias=torch.randn(5)), "bias"),
        (dict(x=x[0], weight=w), "x must have 4 dimensions"),
        (dict(x=x.int(), weight=w), "x must have dtype"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle):
            gm.ops.masked_conv2d(**kwargs)


def test_unavailable_backend_says_why(monkeypatch):
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 3, 3)
    with pytest.raises(gm.BackendUnavailable, match="cuda backend takes CUDA tensors"):
        gm.ops.masked_conv2d(x, w, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        gm.ops.masked_conv2d(x, w, backend="fast")
    monkeypatch.setenv("GM_BACKEND", "cuda")
    with pytest.raises(gm.BackendUnavailable):
        gm.ops.masked_conv2d(x, w)


@pytest.mark.skipif(HAS_GPU, reason="opcheck/compile are exercised on the CPU backends here")
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} not available")
    x, w, b = _inputs(1, 3, 6, 4, 4, 3, 3, torch.float32)
    gi, go = color_groups(3, 3), color_groups(6, 3)
    torch.library.opcheck(torch.ops.gm.masked_conv2d.default, (x, w, b, "A", gi, go, backend))
    # channels-last: the fake implementation reports the real output's strides
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.gm.masked_conv2d.default, (x_cl, w, b, "A", gi, go, backend))


@pytest.mark.skipif(HAS_GPU, reason="compiled on the CPU backend here")
def test_torch_compile_fullgraph():
    layer = MaskedConv2d(3, 6, 3, mask="A", colors=3, backend="cpu")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, y_ref = compiled(x), layer(x)
    torch.testing.assert_close(y, y_ref)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(gx, gx_ref)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("n", "cin", "cout", "h", "w", "kh", "kw", "mask", "groups"), [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[5]]
)
def test_triton_residual_block_fusions(n, cin, cout, h, w, kh, kw, mask, groups, dtype, channels_last, monkeypatch):
    """The Triton launchers' fusions for ReLU -> conv residual blocks (gm.models.pixelcnn's fused block) against the
    float64 reference of the composed ops: forward(relu_in, residual) = conv(relu(x)) + b + r; input_grad(gate=x,
    residual=r2) = relu'(x) * (conv's input gradient) + r2; weight_grad(relu_in) = the weight gradient of conv(relu(x)).
    Both layouts (outputs in x's), NaN-poisoned outputs, x with exact zeros (relu'(0) = 0, as torch's)."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend here")
    from gm.kernels import masked_conv as k  # noqa: PLC0415
    from gm.ops.masked_conv import _triton_operands, pack_plan  # noqa: PLC0415

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gi, go = _groups(groups, cin, cout)
    x, wt, b = _inputs(n, cin, cout, h, w, kh, kw, dtype)
    with torch.no_grad():
        x.view(-1)[::5] = 0.0
    x = x.detach().contiguous(memory_format=fmt)
    r = torch.randn(n, cout, h, w, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    gy = torch.randn(n, cout, h, w, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    r2 = torch.randn(n, cin, h, w, device=DEVICE, dtype=dtype)  # NCHW: the launcher converts it to dx's layout
    relu_x = x.double().relu().requires_grad_()
    wd, bd = wt.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = reference(relu_x, wd, bd, mask=mask, in_groups=gi, out_groups=go)
    dxr, dwr = torch.autograd.grad(ref, (relu_x, wd), gy.double())
    poison_empty(monkeypatch)
    plan = pack_plan(wt.shape, mask, gi, go, wt.device)
    fwd_op, bwd_op = _triton_operands(wt.detach(), plan, fresh=True)
    y = k.forward(x, fwd_op, b.detach(), kh, kw, plan.taps, relu_in=True, residual=r)
    assert y.is_contiguous(memory_format=fmt)
    assert_rel(y, ref + r.double(), dtype, "y")
    dx = k.input_grad(gy, bwd_op, kh, kw, plan.taps, fmt, gate=x, residual=r2)
    assert dx.is_contiguous(memory_format=fmt)
    assert_rel(dx, torch.where(x > 0, dxr, 0.0) + r2.double(), dtype, "dx")
    assert (dx[x == 0] == r2[x == 0]).all()  # relu'(0) = 0: exactly the residual there
    dw = k.weight_grad(x, gy, len(plan.taps), kh, kw, plan.taps, plan.positions, plan.keep, dtype, relu_in=True)
    assert_rel(dw, dwr, dtype, "dweight")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "cin", "cout", "h", "w", "kh", "kw", "mask", "groups"), [SHAPES[0], SHAPES[6]])
def test_triton_weight_grad_sums_the_bias_gradient(n, cin, cout, h, w, kh, kw, mask, groups, dtype, monkeypatch):
    """weight_grad(bias_grad=True): the weight gradient as without it, and the bias gradient (the pixel sum of grad)
    from the same kernels (split partial sums, added in the unpack pass), against the float64 sum; with several
    pixel splits under the interpreter."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend here")
    from gm.kernels import masked_conv as k  # noqa: PLC0415
    from gm.ops.masked_conv import pack_plan  # noqa: PLC0415

    gi, go = _groups(groups, cin, cout)
    x = torch.randn(n, cin, h, w, device=DEVICE, dtype=dtype)
    gy = torch.randn(n, cout, h, w, device=DEVICE, dtype=dtype)
    plan = pack_plan((cout, cin, kh, kw), mask, gi, go, DEVICE)
    args = (x, gy, len(plan.taps), kh, kw, plan.taps, plan.positions, plan.keep, dtype)
    poison_empty(monkeypatch)
    dw, db = k.weight_grad(*args, bias_grad=True)
    assert torch.equal(dw, k.weight_grad(*args))
    assert db.dtype == dtype and db.shape == (cout,)
    assert_rel(db, gy.double().sum(dim=(0, 2, 3)), dtype, "dbias")
