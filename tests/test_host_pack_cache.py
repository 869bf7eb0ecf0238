"""The packed-weight cache of the cuda launchers (gm._ext.packed): a forward always packs and keeps the form for its
backward, which reuses it unless the weight changed since (an in-place update, a swapped .data); a later forward never
reuses a pack (a write through `.data` bypasses the version counter); a form lives no longer than its weight, and
the forms are exactly the packs the launchers made before the cache (gm.ops._lstm_cuda.pack_weights,
gm.ops._masked_conv_cuda.weight_operands). The emulated launches (tools/cuda_emu) check whole ops: after an in-place
update or a .data write the next call gives the bits of a call on a fresh copy of the weight; and the LSTM scans'
shared-memory attribute, now raised only when a launch needs more than before, still admits a larger launch after a
smaller one.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import gm
from gm import _ext
from gm.ops import _lstm_cuda as L
from gm.ops import _masked_conv_cuda as C
from gm.ops.masked_conv import pack_plan, pack_weight
from tests._util import poison_empty, triton_here
from tools.cuda_emu import build, load, patches, unavailable_reason


def _count(calls: list):
    def pack():
        calls.append(1)
        return torch.full((3,), float(len(calls)))

    return pack


def test_backward_reuses_the_forward_pack_until_the_weight_changes_in_place():
    w = torch.nn.Parameter(torch.randn(4, 2))
    calls: list = []
    first = _ext.packed(w, "form", _count(calls), fresh=True)
    assert _ext.packed(w, "form", _count(calls), fresh=False) is first and len(calls) == 1
    with torch.no_grad():
        w.mul_(2)  # an optimizer step: bumps w._version
    assert _ext.packed(w, "form", _count(calls), fresh=False) is not first and len(calls) == 2
    _ext.packed(w, "other form", _count(calls), fresh=False)  # another key: its own pack
    assert len(calls) == 3


def test_a_forward_always_packs():
    """A write through .data does not move the version counter (EMA and weight-clipping code do it): a forward
    therefore never reuses an earlier pack."""
    w = torch.nn.Parameter(torch.randn(4, 2))
    calls: list = []
    first = _ext.packed(w, "form", _count(calls), fresh=True)
    w.data.mul_(2)
    second = _ext.packed(w, "form", _count(calls), fresh=True)
    assert second is not first and len(calls) == 2
    assert _ext.packed(w, "form", _count(calls), fresh=False) is second  # its backward reuses the new pack


def test_pack_sees_a_swapped_data():
    w = torch.nn.Parameter(torch.randn(4, 2))
    calls: list = []
    _ext.packed(w, "form", _count(calls), fresh=True)
    w.data = torch.randn(4, 2)  # as module.half() / .to() do: same object, other storage
    _ext.packed(w, "form", _count(calls), fresh=False)
    assert len(calls) == 2


def test_pack_lives_no_longer_than_its_weight():
    w = torch.randn(4, 2, requires_grad=True)
    box = [w]
    form = _ext.packed(w, "form", lambda: box[0] * 2, fresh=True)  # called with grad enabled
    assert form.grad_fn is None  # made without autograd: holds no reference to w
    alive = weakref.ref(form)
    box.clear()
    del w, form
    gc.collect()
    assert alive() is None


def test_pack_cache_switch_and_uncacheable_weights(monkeypatch):
    calls: list = []
    with torch.inference_mode():
        w_inf = torch.randn(3)
    _ext.packed(w_inf, "form", _count(calls), fresh=True)
    _ext.packed(w_inf, "form", _count(calls), fresh=False)
    assert len(calls) == 2  # inference tensors have no version counter: packed every time
    w = torch.randn(3)
    monkeypatch.setattr(_ext, "PACK_CACHE", False)
    _ext.packed(w, "form", _count(calls), fresh=True)
    _ext.packed(w, "form", _count(calls), fresh=False)
    assert len(calls) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hid, taps", [(3, 2), (17, 3)])
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32], ids=["same", "from_float32"])
def test_lstm_pack_is_the_gather_of_each_pass(emu, dtype, hid, taps, weight_dtype):
    """pack_weights' one gather gives each pass's fragment-order operand, the padded positions zero, cast to the
    scan's dtype (an fp32 parameter under bf16 gates) as torch rounds it."""
    w = torch.randn(4 * hid, hid, taps).to(dtype if weight_dtype == "same" else weight_dtype)
    fwd, bwd = L.pack_weights(w, dtype, fresh=True)
    assert fwd.dtype == bwd.dtype == dtype
    padded = torch.nn.functional.pad(w.to(dtype).reshape(-1), (0, 1))
    assert torch.equal(fwd, padded[L._pack_index_of(hid, taps, False, dtype)])
    assert torch.equal(bwd, padded[L._pack_index_of(hid, taps, True, dtype)])
    assert bwd.data_ptr() % 16 == 0  # the kernels' 16-byte fragment loads
    with torch.no_grad():
        w.add_(1)
    fwd2, _ = L.pack_weights(w, dtype, fresh=False)
    want = torch.nn.functional.pad(w.to(dtype).reshape(-1), (0, 1))[L._pack_index_of(hid, taps, False, dtype)]
    assert torch.equal(fwd2, want)


@pytest.mark.parametrize(
    "shape, mask, grouped", [((6, 3, 3, 3), "A", True), ((16, 8, 1, 1), "B", False), ((9, 12, 5, 5), "B", True)]
)
def test_conv_operands_are_the_padded_packed_weight(emu, shape, mask, grouped):
    """weight_operands' one gather equals pack_weight (kept taps, forbidden centre pairs zero) laid out and padded as
    the GEMMs read it, and follows an in-place update of the weight."""
    from gm.nn import color_groups  # noqa: PLC0415

    cout, cin = shape[:2]
    gi, go = (color_groups(cin, 3), color_groups(cout, 3)) if grouped else (None, None)
    w = torch.randn(shape)
    plan = pack_plan(w.shape, mask, gi, go, w.device)
    for _ in range(2):
        ops = C.weight_operands(w, plan, fresh=False)
        packed, _ = pack_weight(w, mask, gi, go)
        assert torch.equal(ops.forward, C._forward_operand(packed)[0])
        assert torch.equal(ops.input_grad, C._input_grad_operand(packed)[0])
        with torch.no_grad():
            w.mul_(-3)


# ------------------------------------------------------------------------------------------------ emulated launches


@pytest.fixture(scope="module")
def emu_module():
    why = unavailable_reason()
    if why:
        pytest.skip(f"the CUDA emulator cannot build here: {why}")
    return load(build())


@pytest.fixture
def emu(emu_module, monkeypatch):
    for obj, attr, value in patches(emu_module):
        monkeypatch.setattr(obj, attr, value)
    poison_empty(monkeypatch)
    return emu_module


def _fwd_bwd(op, x, w):
    """(y, dx, dw) of op(x, w), w a leaf that requires grad."""
    x = x.detach().requires_grad_()
    w.grad = None
    y = op(x, w)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad, w.grad


_OPS = {
    "row_lstm": (lambda g, w: gm.ops.row_lstm(g, w, backend="cuda"), (2, 12, 3, 5), (12, 3, 3)),
    "diagonal_lstm": (lambda g, w: gm.ops.diagonal_lstm(g, w, reverse=True, backend="cuda"), (2, 8, 3, 4), (8, 2, 2)),
    "masked_conv2d": (lambda x, w: gm.ops.masked_conv2d(x, w, mask="A", backend="cuda"), (2, 3, 4, 5), (5, 3, 3, 3)),
}


def _sees_in_place_updates(op, x_shape, w_shape):
    """Forward and backward after an optimizer-style update, or a write through .data, equal those of a fresh copy of
    the weight."""
    x = torch.randn(x_shape)
    w = torch.nn.Parameter(torch.randn(w_shape) / 3)
    before = _fwd_bwd(op, x, w)
    again = _fwd_bwd(op, x, w)
    with torch.no_grad():
        w.mul_(-0.5)
    got = _fwd_bwd(op, x, w)
    want = _fwd_bwd(op, x, torch.nn.Parameter(w.detach().clone()))
    assert not torch.equal(got[0], before[0])
    for g, b, a, r in zip(got, before, again, want, strict=True):
        assert torch.equal(a, b) and torch.equal(g, r)
    w.data.mul_(-1)  # unseen by the version counter: the next forward packs anyway
    got = _fwd_bwd(op, x, w)
    want = _fwd_bwd(op, x, torch.nn.Parameter(w.detach().clone()))
    for g, r in zip(got, want, strict=True):
        assert torch.equal(g, r)


@pytest.mark.parametrize("name", list(_OPS))
def test_op_sees_the_weight_after_an_in_place_update(emu, name):
    _sees_in_place_updates(*_OPS[name])


_TRITON_OPS = {
    "row_lstm": (lambda g, w: gm.ops.row_lstm(g, w, backend="triton"), (2, 12, 3, 5), (12, 3, 3)),
    "diagonal_lstm": (lambda g, w: gm.ops.diagonal_lstm(g, w, reverse=True, backend="triton"), (2, 8, 3, 4),
                      (8, 2, 2)),  # fmt: skip
    "masked_conv2d A grouped": (
        lambda x, w: gm.ops.masked_conv2d(x, w, mask="A", in_groups=_GROUPS[0], out_groups=_GROUPS[1],
                                          backend="triton"), (2, 3, 4, 5), (6, 3, 3, 3)),  # fmt: skip
    "masked_conv2d B NHWC": (
        lambda x, w: gm.ops.masked_conv2d(x.to(memory_format=torch.channels_last), w, mask="B", backend="triton"),
        (2, 4, 3, 5), (5, 4, 1, 3)),  # fmt: skip
}
_GROUPS = (torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2]))


@pytest.mark.parametrize("name", list(_TRITON_OPS))
def test_triton_op_sees_the_weight_after_an_in_place_update(name):
    """As the cuda ops: the Triton launchers keep their packs (masked_conv2d's operands, the scans' w_ss) from a
    forward for its backward."""
    if not triton_here():
        pytest.skip("no triton backend here")
    _sees_in_place_updates(*_TRITON_OPS[name])


def test_conv_forward_without_backward_packs_the_forward_operand_alone(emu, monkeypatch):
    """A forward under no_grad (sampling) gathers only the operand it reads; with a backward to come, both (the
    backward reuses the input-gradient one). The outputs agree."""
    seen = []
    real = C.weight_operands

    def spy(weight, plan, *, fresh, input_grad=True):
        ops = real(weight, plan, fresh=fresh, input_grad=input_grad)
        seen.append(ops.input_grad is not None)
        return ops

    monkeypatch.setattr(C, "weight_operands", spy)
    x = torch.randn(2, 3, 4, 5)
    w = torch.nn.Parameter(torch.randn(5, 3, 3, 3) / 3)
    with torch.no_grad():
        y0 = gm.ops.masked_conv2d(x, w, mask="A", backend="cuda")
    y1 = gm.ops.masked_conv2d(x, w, mask="A", backend="cuda")
    y1.sum().backward()
    assert seen == [False, True] and torch.equal(y0, y1.detach())  # (x needs no gradient: no input-grad GEMM)


@pytest.mark.parametrize("name", ["row_lstm", "diagonal_lstm"])
def test_triton_scan_packs_once_per_step(name, monkeypatch):
    """The Triton scans pack w_ss once per forward+backward (the forward's pack serves the backward), and again
    after an in-place update."""
    if not triton_here():
        pytest.skip("no triton backend here")
    from gm.kernels import diagonal_lstm as kd  # noqa: PLC0415
    from gm.kernels import row_lstm as kr  # noqa: PLC0415

    calls = []
    if name == "row_lstm":
        real = kr.pack_weight
        monkeypatch.setattr(kr, "pack_weight", lambda w: calls.append(1) or real(w))
    else:
        real = kd.gather
        monkeypatch.setattr(kd, "gather", lambda *a: calls.append(1) or real(*a))
    op, g_shape, w_shape = _TRITON_OPS[name]
    w = torch.nn.Parameter(torch.randn(w_shape) / 3)
    _fwd_bwd(op, torch.randn(g_shape), w)
    assert len(calls) == 1
    with torch.no_grad():
        w.mul_(0.5)
    _fwd_bwd(op, torch.randn(g_shape), w)
    assert len(calls) == 2


def test_triton_conv_packs_once_per_step_and_writes_dx_in_x_layout(monkeypatch):
    """The triton masked_conv2d: a forward under no_grad gathers only its own operand; with a backward to come, the
    forward gathers both operands in one launch and the backward reuses them (one gather per step); the input
    gradient of an NCHW x comes out NCHW from the kernel (no layout copy after it). Values as the composed ops'."""
    if not triton_here():
        pytest.skip("no triton backend here")
    from gm.kernels import _layout  # noqa: PLC0415
    from gm.kernels import masked_conv as k  # noqa: PLC0415

    gathers, dx_formats = [], []
    real, real_dx = _layout.gather, k.input_grad
    monkeypatch.setattr(_layout, "gather", lambda *a, **kw: gathers.append(a[1].numel()) or real(*a, **kw))

    def input_grad(*args, **kwargs):
        dx = real_dx(*args, **kwargs)
        dx_formats.append(dx.is_contiguous())
        return dx

    monkeypatch.setattr(k, "input_grad", input_grad)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(5, 3, 3, 3) / 3)
    with torch.no_grad():
        y0 = gm.ops.masked_conv2d(x, w, mask="A", backend="triton")
    assert len(gathers) == 1
    y1 = gm.ops.masked_conv2d(x, w, mask="A", backend="triton")
    y1.backward(torch.ones_like(y1))
    assert gathers[1:] == [2 * gathers[0]] and torch.equal(y0, y1.detach())
    assert dx_formats == [True] and x.grad.is_contiguous()
    from gm.reference.masked_conv import masked_conv2d as reference  # noqa: PLC0415

    rx = x.detach().double().requires_grad_()
    ref = reference(rx, w.detach().double(), mask="A")
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(x.grad, rx.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, mask, grouped", [((6, 3, 3, 3), "A", True), ((16, 8, 1, 1), "B", False), ((9, 12, 5, 5), "B", True)]
)
def test_triton_conv_operands_are_the_packed_weight(shape, mask, grouped):
    """_triton_operands' one gather equals pack_weight (kept taps, forbidden centre pairs zero) and its channel
    transpose, and follows an in-place update of the weight."""
    if not triton_here():
        pytest.skip("no triton backend here")
    from gm.nn import color_groups  # noqa: PLC0415
    from gm.ops.masked_conv import _triton_operands  # noqa: PLC0415

    cout, cin = shape[:2]
    gi, go = (color_groups(cin, 3), color_groups(cout, 3)) if grouped else (None, None)
    w = torch.randn(shape)
    plan = pack_plan(w.shape, mask, gi, go, w.device)
    for _ in range(2):
        fwd, bwd = _triton_operands(w, plan, fresh=False)
        packed, _ = pack_weight(w, mask, gi, go)
        assert torch.equal(fwd, packed) and torch.equal(bwd, packed.transpose(1, 2))
        assert bwd.is_contiguous()
        with torch.no_grad():
            w.mul_(-3)


def test_lstm_smem_attribute_is_raised_for_a_larger_launch(emu):
    """set_smem raises a kernel's dynamic shared memory maximum only past what an earlier launch set: a launch above
    the 48 KB default after a smaller one above it still runs (the emulator refuses a launch over the maximum set),
    and a smaller one after both."""
    hid = 33
    sizes = [L.diagonal_smem_bytes(hid, height, 4) for height in (5, 40, 2)]
    assert 48 * 1024 < sizes[0] < sizes[1] and sizes[2] <= sizes[1]
    w = torch.randn(4 * hid, hid, 2) / 8
    for height in (5, 40, 2):
        g = torch.randn(1, 4 * hid, height, 2, requires_grad=True)
        y = gm.ops.diagonal_lstm(g, w, backend="cuda")
        y.sum().backward()
        assert torch.isfinite(g.grad).all()


# ---------------------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_pack_is_recorded_during_cuda_graph_capture():
    """Under capture the pack is made again (recorded in the graph), so each replay packs the weight as it is then."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    w = torch.randn(64, device="cuda")
    cached = _ext.packed(w, "form", lambda: w * 2, fresh=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _ext.packed(w, "form", lambda: w * 2, fresh=False)
    assert captured is not cached
    w.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, w * 2)
