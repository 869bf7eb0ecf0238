"""gm's CUDA kernels run on the CPU under the host emulator (tools/cuda_emu), through their real launchers.

The emulated module is built from csrc/ as it is now (the .cu files compiled by g++ against stand-in CUDA headers,
every CUDA thread a fiber, __syncthreads a real barrier released in a shuffled order, warp shuffles / ldmatrix /
mma.sync / cp.async emulated from the PTX ISA), cached by content under ~/.cache/gm/cuda_emu (GM_EMU_CACHE moves
it). gm's public functions are called with backend="cuda" on CPU tensors: argument checks, the custom op, autograd,
the Python launcher, the pybind entry point and the kernel all run; torch.empty is NaN-poisoned so an element a
kernel forgets to write fails. Results are compared with gm.reference in float64 at tests/_util.REL_TOL (TF32 cases
at the GPU float32 tolerance).

Every run covers the scalar kernels (minibatch, iaf_step: float64, float32, bfloat16, odd shapes, the thread-stride
edges), the tensor-core kernels at small and medium shapes (the row_lstm and diagonal_lstm scans, masked_linear,
iaf_made_output, masked_conv2d: bf16, fp16, 3xTF32, TF32; every mask and activation) and mutation checks (the emulator
must catch a removed per-step __syncthreads in each LSTM scan's backward, a removed cp.async wait and a removed barrier
in the GEMM pipeline, and masked_conv2d's channels-last store one channel off). GM_EMU_GEMM=1 adds the GEMMs' whole
matrix at medium and large shapes (about 4 minutes more). Skipped only where the emulator cannot build (not Linux, no
g++, no pybind11). The file takes about 90 s on a 2-core machine with a cold cache (most of it compiling), under 50 s
warm. tools/cuda_emu/README.md says what this does and does not prove.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import gm
import tests._util as util
from gm.reference.diagonal_lstm import diagonal_lstm as diagonal_ref
from gm.reference.iaf import iaf_step as iaf_step_ref
from gm.reference.iaf import masked_linear as masked_linear_ref
from gm.reference.minibatch import minibatch_discrimination as minibatch_ref
from gm.reference.row_lstm import row_lstm as row_ref
from tests._util import poison_empty, rel_err
from tools.cuda_emu import build, load, patches, unavailable_reason

CPU = torch.device("cpu")


def _build(**kw):
    why = unavailable_reason()
    if why:
        pytest.skip(f"the CUDA emulator cannot build here: {why}")
    return load(build(**kw))


@pytest.fixture(scope="module")
def emu_module():
    return _build()


def _activate(module, monkeypatch):
    for obj, attr, value in patches(module):
        monkeypatch.setattr(obj, attr, value)
    poison_empty(monkeypatch)


@pytest.fixture
def emu(emu_module, monkeypatch, request):
    _activate(emu_module, monkeypatch)
    before, failed = emu_module.emu_stats(), request.session.testsfailed
    yield emu_module
    if request.session.testsfailed > failed:
        return  # the test already failed: no second report from teardown
    after = emu_module.emu_stats()
    assert after["launches"] > before["launches"], "no kernel ran in the emulator"
    unchecked = after["unchecked_launches"] - before["unchecked_launches"]
    assert unchecked == 0, f"{unchecked} launches not followed by GM_CUDA_CHECK_LAUNCH (cudaGetLastError)"


def _check(name, got, want, dtype):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, tol = rel_err(got, want), util.rel_tol(dtype, CPU)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.1g} ({dtype})"


def _close(got, want, dtype):
    return bool(torch.isfinite(got).all()) and rel_err(got, want) <= util.rel_tol(dtype, CPU)


def _leaves(dtype, *tensors):
    """The kernel's inputs in `dtype` (requiring grad) and float64 copies of exactly those values."""
    ours = [t.to(dtype).requires_grad_() if t is not None else None for t in tensors]
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in ours]
    return ours, ref


def _grads(out, leaves, grad):
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(out, present, grad)


DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# The tensor-core kernels' dtypes: float32 as 3xTF32 and as TF32 (see _precision below).
TC_DTYPES = [torch.bfloat16, torch.float16, "3xtf32", "tf32"]

# --------------------------------------------------------------------------------------------------------- row_lstm
# The tensor-core scans (csrc/row_lstm/row_lstm_cuda.cu) and the dw GEMM.
# (N, h, H, W, k, initial state): h padded to 16 (3, 4, 8), several m16 tiles (33, 40), W = 1, k = 1 and 5, two
# 32-column chunks (W = 37), 4h > 64 and h*k > 64 (several dw tiles).
ROW_CASES = [
    (2, 4, 5, 7, 3, True),
    (1, 3, 4, 1, 1, False),
    (2, 8, 3, 6, 5, False),
    (1, 33, 3, 17, 3, True),
    (1, 40, 4, 9, 3, False),
    (1, 9, 3, 37, 3, True),
]
# Beyond the matrix, in bfloat16: 20 warp items on 16 warps; 640 pixels (the weight gradient's two pixel splits).
ROW_PARAMS = [pytest.param(c, d, id=f"{d}-{c}")
              for c, d in [*itertools.product(ROW_CASES, TC_DTYPES), ((1, 70, 2, 33, 3, True), torch.bfloat16),
                           ((2, 8, 16, 20, 3, True), torch.bfloat16)]]  # fmt: skip


def _row_lstm(case, dtype):
    n, hid, height, width, k, init = case
    g = torch.randn(n, 4 * hid, height, width, dtype=torch.float64)
    w = torch.randn(4 * hid, hid, k, dtype=torch.float64) / (hid * k) ** 0.5
    h0 = torch.randn(n, hid, width, dtype=torch.float64) if init else None
    c0 = torch.randn(n, hid, width, dtype=torch.float64) if init else None
    dy = torch.randn(n, hid, height, width, dtype=torch.float64).to(dtype)
    (g, w, h0, c0), (gr, wr, h0r, c0r) = _leaves(dtype, g, w, h0, c0)
    y = gm.ops.row_lstm(g, w, h0=h0, c0=c0, backend="cuda")
    grads = _grads(y, (g, w, h0, c0), dy)
    y_ref = row_ref(gr, wr, h0=h0r, c0=c0r)
    grads_ref = _grads(y_ref, (gr, wr, h0r, c0r), dy.double())
    return [("y", y, y_ref)] + list(zip(("dgates", "dw", "dh0", "dc0")[: len(grads)], grads, grads_ref, strict=True))


@pytest.mark.parametrize(("case", "dtype"), ROW_PARAMS)
def test_row_lstm(gemm, monkeypatch, case, dtype):
    dtype = _precision(dtype, monkeypatch)
    for name, got, want in _row_lstm(case, dtype):
        _check(name, got, want, dtype)


def test_row_lstm_rejects_float64(emu):
    g = torch.randn(1, 8, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        gm.ops.row_lstm(g, torch.randn(8, 2, 3, dtype=torch.float64), backend="cuda")
    gm.ops.row_lstm(g.float(), torch.randn(8, 2, 3), backend="cuda")  # float32 runs (the fixture wants a launch)


def test_row_lstm_reports_the_shared_memory_limit(emu):
    """The float32 backward at h=128, W=64 needs 272 KB of shared memory, more than the 227 KB opt-in: a clear
    error (the forward fits)."""
    g = torch.randn(1, 4 * 128, 1, 64, requires_grad=True)
    w = torch.randn(4 * 128, 128, 3) / 20
    y = gm.ops.row_lstm(g, w, backend="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------------- diagonal_lstm
# (N, h, H, W): h padded to 16 (h=3, 5), several m16 tiles (40, 70), H = 1 and W = 1, two 32-row chunks (H = 37, 33),
# more warp items than the 16 warps of a block (h=70, H=37: 20 forward items; 10 backward items on 8 warp pairs,
# two rounds).
# Beyond the matrix, in bfloat16 (the slowest to emulate): the items loop; 640 pixels (two weight-gradient splits).
DIAG_CASES = [(2, 4, 5, 7), (1, 3, 4, 1), (2, 5, 1, 6), (1, 40, 3, 4), (1, 70, 9, 4), (2, 9, 33, 2)]
DIAG_PARAMS = [pytest.param(c, r, d, id=f"{d}-{'rev' if r else 'fwd'}-{c}")
               for c, d in [*itertools.product(DIAG_CASES, TC_DTYPES), ((1, 70, 37, 3), torch.bfloat16),
                            ((2, 8, 16, 20), torch.bfloat16)]
               for r in (False, True)]  # fmt: skip


@pytest.mark.parametrize(("case", "reverse", "dtype"), DIAG_PARAMS)
def test_diagonal_lstm(gemm, monkeypatch, case, reverse, dtype):
    """The tensor-core scans (csrc/diagonal_lstm/diagonal_lstm_cuda.cu): y, dgates, dw against the float64 reference."""
    dtype = _precision(dtype, monkeypatch)
    n, hid, height, width = case
    g = torch.randn(n, 4 * hid, height, width, dtype=torch.float64)
    w = torch.randn(4 * hid, hid, 2, dtype=torch.float64) / (2 * hid) ** 0.5
    dy = torch.randn(n, hid, height, width, dtype=torch.float64).to(dtype)
    (g, w), (gr, wr) = _leaves(dtype, g, w)
    y = gm.ops.diagonal_lstm(g, w, reverse=reverse, backend="cuda")
    dg, dw = _grads(y, (g, w), dy)
    y_ref = diagonal_ref(gr, wr, reverse=reverse)
    dg_ref, dw_ref = _grads(y_ref, (gr, wr), dy.double())
    _check("y", y, y_ref, dtype)
    _check("dgates", dg, dg_ref, dtype)
    _check("dw", dw, dw_ref, dtype)


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("op", ["row_lstm", "diagonal_lstm"])
def test_lstm_weight_gradient_in_deterministic_mode(gemm, deterministic, op):
    """Under torch.use_deterministic_algorithms the scans' weight gradient takes one pixel split (each element of dw a
    single atomic add onto zero); at 640 pixels (two splits otherwise) it still matches the float64 reference."""
    n, hid, height, width = 2, 8, 16, 20
    taps = 3 if op == "row_lstm" else 2
    g = torch.randn(n, 4 * hid, height, width, dtype=torch.float64)
    w = torch.randn(4 * hid, hid, taps, dtype=torch.float64) / (taps * hid) ** 0.5
    dy = torch.randn(n, hid, height, width, dtype=torch.float64).to(torch.bfloat16)
    (g, w), (gr, wr) = _leaves(torch.bfloat16, g, w)
    fn, ref = (gm.ops.row_lstm, row_ref) if op == "row_lstm" else (gm.ops.diagonal_lstm, diagonal_ref)
    _, dw = _grads(fn(g, w, backend="cuda"), (g, w), dy)
    _, dw_ref = _grads(ref(gr, wr), (gr, wr), dy.double())
    _check("dw", dw, dw_ref, torch.bfloat16)


def test_diagonal_lstm_channel_slice(emu):
    """DiagonalBiLSTM's chunk of one 8h conv output (a channel slice) and a channels-last grad, read as they are."""
    both = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    w = torch.randn(8, 2, 2, dtype=torch.float64) / 2
    (both, w), (both_r, w_r) = _leaves(torch.bfloat16, both, w)
    dy = torch.randn(2, 2, 3, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = gm.ops.diagonal_lstm(both[:, 8:], w, backend="cuda")
    y_ref = diagonal_ref(both_r[:, 8:], w_r)
    for name, got, want in zip(("y", "dboth", "dw"), (y, *_grads(y, (both, w), dy)),
                               (y_ref, *_grads(y_ref, (both_r, w_r), dy.double())), strict=True):  # fmt: skip
        _check(name, got, want, torch.bfloat16)


def test_diagonal_lstm_reports_the_shared_memory_limit(emu):
    """The float32 forward at h=256, H=128 needs 399 KB of shared memory (two (129 x h) state buffers and the c
    slots), more than the 227 KB opt-in: a clear error that points to triton, before any launch. (The fixture wants
    a launch: a small call runs after.)"""
    g = torch.randn(1, 4 * 256, 128, 1)
    with pytest.raises(ValueError, match="shared memory.*triton"):
        gm.ops.diagonal_lstm(g, torch.randn(4 * 256, 256, 2) / 20, backend="cuda")
    gm.ops.diagonal_lstm(torch.randn(1, 8, 2, 2), torch.randn(8, 2, 2), backend="cuda")


def test_diagonal_lstm_rejects_float64(emu):
    g = torch.randn(1, 8, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        gm.ops.diagonal_lstm(g, torch.randn(8, 2, 2, dtype=torch.float64), backend="cuda")
    gm.ops.diagonal_lstm(g.float(), torch.randn(8, 2, 2), backend="cuda")  # float32 runs (the fixture wants a launch)


@pytest.mark.parametrize("op_name", ["row_lstm", "diagonal_lstm"])
def test_lstm_fake_implementations_match_the_cuda_kernels(emu, op_name):
    """torch.compile sees the ops through their fake implementations: for backend="cuda" their outputs' shapes,
    dtypes and strides (the channels-last (N, 5h, H, W) saved state) must be the kernels' (opcheck's fake-tensor
    test, forward and backward ops)."""
    g = torch.randn(2, 16, 3, 5, dtype=torch.bfloat16)
    if op_name == "row_lstm":
        args = (g, torch.randn(16, 4, 3, dtype=torch.bfloat16) / 4, None, None, "cuda")
    else:
        args = (g, torch.randn(16, 4, 2, dtype=torch.bfloat16) / 4, False, "cuda")
    op = getattr(torch.ops.gm, op_name).default
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))
    outs = op(*args)
    backward = getattr(torch.ops.gm, op_name + "_backward").default
    dy = torch.randn_like(outs[0])
    if op_name == "row_lstm":
        bargs = (dy, g, args[1], None, None, outs[1], outs[2], "cuda", True)
    else:
        bargs = (dy, g, args[1], outs[0], outs[1], False, "cuda")
    torch.library.opcheck(backward, bargs, test_utils=("test_faketensor",))


# ---------------------------------------------------------------------------------------------- the PixelRNN layers
@pytest.mark.parametrize("layer", ["RowLSTM", "DiagonalBiLSTM"])
def test_pixelrnn_layer(gemm, layer):
    """The layers end to end on backend="cuda" (masked convs and scans; the diagonal scans read channel slices of one
    conv output) against the same weights on backend="reference": output and every parameter's gradient."""
    torch.manual_seed(0)
    kwargs = {"learn_init": True} if layer == "RowLSTM" else {}
    ours = getattr(gm.nn, layer)(6, 9, colors=3, backend="cuda", **kwargs).to(torch.bfloat16)
    ref = getattr(gm.nn, layer)(6, 9, colors=3, backend="reference", **kwargs).double()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(2, 6, 5, 7).to(torch.bfloat16)
    y, y_ref = ours(x), ref(x.double())
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    _check("y", y, y_ref, torch.bfloat16)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters(), strict=True):
        _check(f"d{name}", p.grad, p_ref.grad, torch.bfloat16)


@pytest.mark.parametrize("channels_last_node", [True, False], ids=["channels-last node", "converting node"])
@pytest.mark.parametrize(("residual", "dtype", "x_format", "shape"), [
    (True, torch.bfloat16, torch.contiguous_format, (2, 6, 5, 7)), (False, torch.bfloat16, torch.contiguous_format,
                                                                    (2, 6, 5, 7)),
    (True, torch.float32, torch.channels_last, (2, 6, 5, 7)), (False, torch.float32, torch.channels_last, (2, 6, 5, 7)),
    (True, torch.float32, torch.contiguous_format, (1, 6, 1, 5)), (True, torch.bfloat16, torch.channels_last,
                                                                   (2, 6, 4, 1)),
])  # fmt: skip
def test_diagonal_bilstm_one_node_equals_composed(gemm, residual, dtype, x_format, shape, channels_last_node,
                                                  monkeypatch):  # fmt: skip
    """DiagonalBiLSTM's one-node path (gm.nn.diagonal_lstm.FUSED_LAYER) on backend="cuda" gives the bits of the
    composed ops, output and every gradient in the same memory format: both the channels-last node (the scans
    reading and writing their halves of the layer's (N, H, W, 8h) gates and gate gradients in place, the weight
    gradient reading them channels-last) and the one that converts around each scan (CHANNELS_LAST=False), the bias
    gradients included (both paths sum them in the convs' weight-gradient kernels)."""
    from gm.nn import diagonal_lstm as dl  # noqa: PLC0415
    from tests.nn.test_diagonal_lstm import fused_and_composed  # noqa: PLC0415

    monkeypatch.setattr(dl, "CHANNELS_LAST", channels_last_node)
    torch.manual_seed(0)
    layer = gm.nn.DiagonalBiLSTM(6, 9, colors=3, residual=residual, backend="cuda").to(dtype)
    x = torch.randn(*shape).to(dtype).contiguous(memory_format=x_format)
    node = "_FusedBiLSTMChannelsLast" if channels_last_node else "_FusedBiLSTM"
    fused_and_composed(layer, x, monkeypatch, dl, node)


# (residual, learn_init, dtype, x's memory format, x's shape (N, 6, H, W), hidden): odd sizes among them (N = 1,
# H = 1, W = 1, h = 3: one m16 tile of 16 padded units).
ROW_LAYER_CASES = [
    (True, True, torch.bfloat16, torch.contiguous_format, (2, 6, 5, 7), 9),
    (False, True, torch.bfloat16, torch.contiguous_format, (2, 6, 5, 7), 9),
    (True, False, torch.float32, torch.channels_last, (2, 6, 5, 7), 9),
    (False, False, torch.float32, torch.channels_last, (2, 6, 5, 7), 9),
    (True, True, torch.float32, torch.contiguous_format, (1, 6, 1, 5), 3),
    (True, False, torch.bfloat16, torch.channels_last, (2, 6, 4, 1), 3),
    (False, True, torch.bfloat16, torch.channels_last, (1, 6, 3, 1), 9),
]


@pytest.mark.parametrize("channels_last_node", [True, False], ids=["channels-last node", "converting node"])
@pytest.mark.parametrize(("residual", "learn_init", "dtype", "x_format", "shape", "hidden"), ROW_LAYER_CASES)
def test_row_lstm_layer_one_node_equals_composed(gemm, residual, learn_init, dtype, x_format, shape, hidden,
                                                 channels_last_node, monkeypatch):  # fmt: skip
    """RowLSTM's one-node path (gm.nn.row_lstm.FUSED_LAYER) on backend="cuda" gives the bits of the composed ops,
    output and every gradient in the same memory format, for each subset of wanted gradients: both the channels-last
    node (the scan reading the input conv's (N, H, W, 4h) output in place and writing y, its state and the gate
    gradient channels-last, the weight gradient reading them so) and the one that calls the ops' implementations
    (CHANNELS_LAST=False), the bias gradients included (both paths sum them in the convs' weight-gradient kernels)."""
    from gm.nn import row_lstm as rl  # noqa: PLC0415
    from tests.nn.test_row_lstm import one_node_equals_composed  # noqa: PLC0415

    monkeypatch.setattr(rl, "CHANNELS_LAST", channels_last_node)
    torch.manual_seed(0)
    layer = gm.nn.RowLSTM(6, hidden, colors=3, residual=residual, learn_init=learn_init, backend="cuda").to(dtype)
    with torch.no_grad():
        for p in layer.parameters():  # non-zero initial state and biases, so each gradient is a real one
            if p.dim() == 1:
                p.normal_()
    x = torch.randn(*shape).to(dtype).contiguous(memory_format=x_format)
    node = "_FusedRowLSTMChannelsLast" if channels_last_node else "_FusedRowLSTM"
    one_node_equals_composed(layer, x, monkeypatch, node=node)


# (N, h, H, W, k, initial state, dtype): a two-chunk width with several m16 tiles; H = 1 with k = 5; W = 1 with
# k = 1 (the weight gradient's taps then all but one off the image); 3xTF32 and TF32.
ROW_CL_CASES = [
    ((2, 9, 4, 6, 3, True), torch.bfloat16),
    ((1, 33, 2, 37, 3, True), torch.bfloat16),
    ((1, 3, 1, 5, 5, False), "3xtf32"),
    ((2, 8, 3, 1, 1, True), "tf32"),
]


@pytest.mark.parametrize(("case", "dtype"), ROW_CL_CASES, ids=[f"{d}-{c}" for c, d in ROW_CL_CASES])
def test_row_lstm_channels_last_scan_equals_the_op(gemm, case, dtype, monkeypatch):
    """gm.ops.row_lstm.cuda_forward_channels_last / cuda_backward_channels_last (the scans in their channels-last
    layout, as gm.nn.RowLSTM's one-node path calls them) against the op's cuda scans on the same values in NCHW: y,
    the saved state, dgates, dw, dh0, dc0 bit for bit, from gates that are a channel slice of a wider tensor (pixels
    4h + 8 apart) and into a gate gradient that is one (the kernels' gate_stride), writing nothing outside it (NaN
    poison); a gate stride under 4h is refused by the kernels' launcher."""
    from gm.ops.row_lstm import (  # noqa: PLC0415
        _row_lstm_backward_impl,
        _row_lstm_impl,
        cuda_backward_channels_last,
        cuda_forward_channels_last,
    )

    dtype = _precision(dtype, monkeypatch)
    n, hid, height, width, k, init = case
    torch.manual_seed(3)
    wide = torch.randn(n, height, width, 4 * hid + 8).to(dtype)
    gates_cl = wide[..., 5 : 5 + 4 * hid]  # (N, H, W, 4h), pixels 4h + 8 apart
    w = (torch.randn(4 * hid, hid, k) / (hid * k) ** 0.5).to(dtype)
    h0, c0 = (torch.randn(n, hid, width).to(dtype) if init else None for _ in range(2))
    dy = torch.randn(n, hid, height, width).to(dtype)
    gates = gates_cl.permute(0, 3, 1, 2).contiguous()
    y, hs, cs = _row_lstm_impl(gates, w, h0, c0, "cuda")
    hs = y if hs.numel() == 0 else hs  # the op's float32 state is y itself
    y_cl, hs_cl, cs_cl = cuda_forward_channels_last(gates_cl, w, h0, c0)
    for name, got, want in (("y", y_cl, y), ("hs", hs_cl, hs), ("cs", cs_cl, cs)):
        assert got.is_contiguous() and torch.equal(got.permute(0, 3, 1, 2), want), name
    dgates, dw, dh0, dc0 = _row_lstm_backward_impl(dy, gates, w, h0, c0, hs, cs, "cuda", True)
    dwide = torch.full_like(wide, float("nan"))
    dg_cl = dwide[..., 3 : 3 + 4 * hid]
    grads = cuda_backward_channels_last(dy.permute(0, 2, 3, 1), dg_cl, w, h0, c0, hs_cl, cs_cl, True)
    assert torch.equal(dg_cl.permute(0, 3, 1, 2), dgates), "dgates"
    assert dwide[..., :3].isnan().all() and dwide[..., 3 + 4 * hid :].isnan().all(), "written outside its slice"
    for name, got, want in zip(("dw", "dh0", "dc0"), grads, (dw, dh0, dc0), strict=True):
        assert (got is None) == (want.numel() == 0), name
        assert got is None or (got.dtype == want.dtype and torch.equal(got, want)), name
    with pytest.raises(ValueError, match="gate_stride must be at least 4h"):
        gemm.row_lstm_forward_cuda(gates_cl.data_ptr(), 0, 0, 0, 0, 0, 0, n, hid, height, width, k, 4 * hid - 1,
                                   gm._ext.dtype_code(gates_cl), 0, 0)  # fmt: skip


@pytest.mark.parametrize("model_name", ["pixelcnn", "rowlstm", "diagonal_bilstm"])
def test_models(gemm, model_name):
    """Each whole model (preset tiny-rgb, 1x5x4 images) on backend="cuda" in float32 (3xTF32) against the float64
    reference: loss and every parameter's gradient (tests/models/test_models.compare_model, the GPU test's check)."""
    from tests.models.test_models import compare_model  # noqa: PLC0415

    compare_model(model_name, "tiny-rgb", "cuda", torch.float32, CPU, shape=(1, 5, 4))


@pytest.mark.parametrize(("model_name", "node"), [("diagonal_bilstm", "_FusedBiLSTMChannelsLast"),
                                                  ("rowlstm", "_FusedRowLSTMChannelsLast")])  # fmt: skip
def test_pixelrnn_model_channels_last_on_cuda(gemm, model_name, node):
    """The PixelRNN models on backend="cuda" run channels-last (their channels_last property): every layer takes
    and returns channels-last activations and gradients and runs the channels-last one-node path; on the cpu
    backend the Row LSTM model stays NCHW (the C++ row scan reads NCHW rows), the Diagonal BiLSTM runs channels-last,
    and on triton both do (tests/models/test_models.py)."""
    from gm import models as M  # noqa: PLC0415

    for backend in set(util.fast_backends(CPU)) - {"cuda"}:  # cpu, triton (interpreted) where they run here
        expected = backend == "triton" or (backend == "cpu" and model_name == "diagonal_bilstm")
        assert M.get(model_name, "tiny", backend=backend).channels_last == expected, backend
    model = M.get(model_name, "tiny-rgb", backend="cuda")
    assert model.channels_last
    seen = []

    def hook(module, inputs, output):
        cl = torch.channels_last
        seen.append((inputs[0].is_contiguous(memory_format=cl), output.is_contiguous(memory_format=cl),
                     type(output.grad_fn).__name__))  # fmt: skip
        output.register_hook(lambda g: seen.append(("grad", g.is_contiguous(memory_format=cl))))

    for layer in model.layers:
        layer.register_forward_hook(hook)
    x = torch.randint(0, 256, (2, 3, 5, 4)).float()
    model.loss(x).backward()
    assert seen[: len(model.layers)] == [(True, True, f"{node}Backward")] * len(model.layers)
    assert seen[len(model.layers) :] == [("grad", True)] * len(model.layers)


# -------------------------------------------------------------------------------------------------------- minibatch
# (N, B, C): C in the specialised set (1, 3, 5, 8) and the generic kernel (11); N across the 32/64-row tiles.
MB_CASES = [(300, 20, 5), (129, 9, 3), (1, 3, 5), (70, 5, 1), (40, 3, 11), (65, 9, 8)]


@pytest.mark.parametrize("case", MB_CASES, ids=str)
@pytest.mark.parametrize("exclude_self", [True, False], ids=["excl", "incl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minibatch(emu, case, exclude_self, dtype):
    (m,), (mr,) = _leaves(dtype, 0.3 * torch.randn(*case, dtype=torch.float64))
    go = torch.randn(case[0], case[1], dtype=torch.float64).to(dtype)
    o = gm.ops.minibatch_discrimination(m, exclude_self=exclude_self, backend="cuda")
    (dm,) = _grads(o, (m,), go)
    o_ref = minibatch_ref(mr, exclude_self=exclude_self)
    (dm_ref,) = _grads(o_ref, (mr,), go.double())
    _check("o", o, o_ref, dtype)
    _check("dm", dm, dm_ref, dtype)


# The pair walk (each unordered pair of 128-row tiles once, both sides credited by atomic adds), forced whatever the
# time model picks: (N, B, C, tile pairs a block): 3 tiles (odd: k = 0, 1), 2 tiles (even: the k = 1 pair taken by
# the lower tile alone), 5 tiles with 2 and 3 pairs a block (k = 0..2 split across blocks), a ragged last tile.
MB_PAIR_CASES = [(300, 20, 5, 1), (129, 9, 3, 1), (600, 9, 8, 2), (520, 3, 1, 3), (256, 11, 2, 2)]


@pytest.mark.parametrize("case", MB_PAIR_CASES, ids=str)
@pytest.mark.parametrize("exclude_self", [True, False], ids=["excl", "incl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minibatch_pair_walk(emu, case, exclude_self, dtype, monkeypatch):
    from gm.ops import minibatch as mb  # noqa: PLC0415

    n, b, c, steps = case
    monkeypatch.setattr(mb, "FORCE_PAIR_STEPS", steps)
    (m,), (mr,) = _leaves(dtype, 0.3 * torch.randn(n, b, c, dtype=torch.float64))
    with torch.no_grad():  # tied rows (the sign's subgradient 0 on both sides) across two tiles
        m[200 % n] = m[7]
        mr[200 % n] = mr[7]
    go = torch.randn(n, b, dtype=torch.float64).to(dtype)
    before = emu.emu_stats()["launches"]
    o = gm.ops.minibatch_discrimination(m, exclude_self=exclude_self, backend="cuda")
    (dm,) = _grads(o, (m,), go)
    # memset, kernel (and the 16-bit types' rounding) per pass: the pair kernels ran, not the rows walk
    assert emu.emu_stats()["launches"] - before == (2 if dtype == torch.bfloat16 else 1) * 2
    o_ref = minibatch_ref(mr, exclude_self=exclude_self)
    (dm_ref,) = _grads(o_ref, (mr,), go.double())
    _check("o", o, o_ref, dtype)
    _check("dm", dm, dm_ref, dtype)


def test_minibatch_pair_walk_nan_and_deterministic_mode(emu, monkeypatch):
    """A NaN row makes its kernel's sums NaN on both sides, as in the reference; with deterministic algorithms on,
    the model's choice is the rows walk (bit-for-bit the same result as the forced rows walk)."""
    from gm.ops import minibatch as mb  # noqa: PLC0415

    m = 0.3 * torch.randn(300, 4, 5, dtype=torch.float64)
    m[250, 1, 2] = float("nan")
    monkeypatch.setattr(mb, "FORCE_PAIR_STEPS", 1)
    o = gm.ops.minibatch_discrimination(m, backend="cuda")
    o_ref = minibatch_ref(m)
    assert torch.equal(o.isnan(), o_ref.isnan()) and o[:, 1].isnan().all()
    keep = ~o_ref.isnan()
    assert rel_err(o[keep], o_ref[keep]) <= util.rel_tol(torch.float64, CPU)
    monkeypatch.setattr(mb, "FORCE_PAIR_STEPS", None)
    assert mb.cuda_plan(4096, 100, 5, CPU, backward=True)[1] > 0  # the model's pick at a large N: pairs
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert mb.cuda_plan(4096, 100, 5, CPU, backward=True)[1] == 0


# --------------------------------------------------------------------------------------------------------- iaf_step
@pytest.mark.parametrize("shape", [(13, 7), (3, 70), (1, 1), (4, 3, 5)], ids=str)
@pytest.mark.parametrize("mode", ["gated", "affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_iaf_step(emu, shape, mode, dtype):
    (z, m, s), (zr, mr, sr) = _leaves(dtype, *(torch.randn(*shape, dtype=torch.float64) for _ in range(3)))
    z_new, ld = gm.ops.iaf_step(z, m, s, mode=mode, backend="cuda")
    gz, gl = torch.randn_like(z_new), torch.randn_like(ld)
    grads = torch.autograd.grad((z_new, ld), (z, m, s), (gz, gl))
    z_ref, ld_ref = iaf_step_ref(zr, mr, sr, mode=mode)
    grads_ref = torch.autograd.grad((z_ref, ld_ref), (zr, mr, sr), (gz.double(), gl.double()))
    _check("z_new", z_new, z_ref, dtype)
    _check("logdet", ld, ld_ref, dtype)
    for name, got, want in zip(("dz", "dm", "ds"), grads, grads_ref, strict=True):
        _check(name, got, want, dtype)


# ----------------------------------------------------------------------------------------------------------- GEMMs
# The tensor-core GEMMs (masked_linear, iaf_made_output, masked_conv2d): 256 threads a block with warp-collective
# ldmatrix/mma, so these are the slower cases. "3xtf32" and "tf32" are float32 at that tensor-core precision
# (torch.backends.cuda.matmul.allow_tf32 / cudnn.allow_tf32 False or True); TF32 is held to the GPU float32 tolerance.
# By default: every dtype x mask x activation at a small shape, plus one medium case per dtype and mask;
# GM_EMU_GEMM=1 adds the whole matrix at medium and large shapes (about 4 minutes more).
FULL_GEMM = os.environ.get("GM_EMU_GEMM") == "1"
_full_only = pytest.mark.skipif(not FULL_GEMM, reason="larger emulated GEMM cases: set GM_EMU_GEMM=1")


@pytest.fixture
def gemm(emu):
    from tests.ops import test_masked_linear  # noqa: PLC0415

    # cuBLAS/cuDNN setting objects, which monkeypatch cannot restore: saved and restored by hand.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    test_masked_linear.clear_mask_cache()
    yield emu
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    test_masked_linear.clear_mask_cache()


def _precision(dtype, monkeypatch):
    """The torch dtype for a GEMM case, with the float32 tensor-core precision switched on or off."""
    tf32 = dtype == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32  # the gemm fixture restores
    if dtype not in ("tf32", "3xtf32"):
        return dtype
    if tf32:
        import tests._util as util  # noqa: PLC0415

        monkeypatch.setattr(
            util, "rel_tol", lambda d, device=None: util.REL_TOL_GPU_FP32 if d == torch.float32 else util.REL_TOL[d]
        )
    return torch.float32


def _gemm_params(shapes, dtypes, *axes, default=lambda si, combo: si == 0, skip=lambda combo: False):
    """pytest params over shapes x dtypes x axes; `default(shape index, combo)` says which run without GM_EMU_GEMM."""
    out = []
    for si, shape in enumerate(shapes):
        for combo in itertools.product(dtypes, *axes):
            if skip(combo):
                continue
            marks = () if default(si, combo) else (_full_only,)
            out.append(pytest.param(*combo, shape, marks=marks))
    return out


LINEAR_MASKS = ["mixed", "made_hidden", "made_output", "random"]
LINEAR_ACTS = [None, "elu", "relu"]
# (rows, out, in): one tile, then several row/column blocks with partly-masked tiles, then split-K weight gradients.
LINEAR_SHAPES = [(5, 37, 29), (77, 130, 70), (130, 300, 260), (300, 256, 192)]


def _linear_default(si, combo):
    dtype, mask, act = combo
    if si == 0:
        return True  # the whole small matrix
    if si == 1:  # one activation per (dtype, mask), rotating
        return LINEAR_ACTS.index(act) == (TC_DTYPES.index(dtype) + LINEAR_MASKS.index(mask)) % 3
    return si == 2 and dtype == torch.bfloat16 and mask == "mixed" and act == "elu"


@pytest.mark.parametrize(
    "dtype, mask, activation, shape",
    # TF32 operand rounding moves pre-activations near 0 across the ReLU kink: the float64 oracle does not apply.
    _gemm_params(
        LINEAR_SHAPES,
        TC_DTYPES,
        LINEAR_MASKS,
        LINEAR_ACTS,
        default=_linear_default,
        skip=lambda c: c[0] == "tf32" and c[2] == "relu",
    ),
    ids=str,
)
def test_masked_linear_gemm(gemm, dtype, mask, activation, shape, monkeypatch):
    from tests.ops import test_masked_linear  # noqa: PLC0415

    torch.manual_seed(0)
    test_masked_linear._compare("cuda", shape, _precision(dtype, monkeypatch), activation, CPU, mask)


# (rows, K, O, dtype): widths off 16-byte rows (the launchers, which pad), then whole ones (the planned launches),
# one with leading dims and no bias, a split-K weight gradient.
LINEAR_NODE_CASES = [
    ((9, 29), 37, torch.bfloat16),
    ((9, 32), 24, torch.bfloat16),
    ((2, 5, 12), 8, "3xtf32"),
    ((300, 64), 256, torch.float16),
]


@pytest.mark.parametrize(("x_shape", "o", "dtype"), LINEAR_NODE_CASES, ids=str)
@pytest.mark.parametrize("activation", [None, "elu", "relu"])
def test_masked_linear_planned_equals_the_registered_op(gemm, x_shape, o, dtype, activation, monkeypatch):
    """masked_linear's eager cuda path on a plan (gm.ops._masked_linear_cuda.LayerPlan, widths whole 16-byte rows)
    gives bit for bit what the registered op gives, for every subset of wanted gradients and without autograd;
    widths off 16-byte rows take the launchers, and each case checks which path ran. Outputs and scratch start
    as NaN (the fixture poisons torch.empty; the plan's byte scratch likewise)."""
    from gm.ops import _eager  # noqa: PLC0415
    from gm.ops import _masked_linear_cuda as kc  # noqa: PLC0415
    from gm.ops.masked_linear import masked_linear  # noqa: PLC0415
    from tests.ops.test_masked_linear import MASKS  # noqa: PLC0415

    dtype = _precision(dtype, monkeypatch)
    k = x_shape[-1]
    planned = (k * dtype.itemsize) % 16 == 0 and (o * dtype.itemsize) % 16 == 0
    monkeypatch.setattr(kc, "scratch", lambda nbytes, device: torch.full((nbytes,), 255, dtype=torch.uint8))
    runs = []
    forward = kc.linear_forward
    monkeypatch.setattr(kc, "linear_forward", lambda *a: runs.append(1) or forward(*a))
    torch.manual_seed(5)
    leaves = [torch.randn(*x_shape, dtype=dtype), torch.randn(o, k, dtype=dtype) / k**0.5]
    with_bias = len(x_shape) == 2  # the case with leading dims runs without a bias
    leaves += [torch.randn(o, dtype=dtype)] if with_bias else []
    mask = MASKS["mixed"](o, k)
    for wanted in ({0, 1, 2}, {0}, {1}, {2}, set()):
        wanted = {i for i in wanted if i < len(leaves)}
        outs = {}
        for fast in (True, False):
            monkeypatch.setattr(_eager, "EAGER_FAST_PATH", fast)
            runs.clear()
            x, w, *b = (t.detach().requires_grad_(i in wanted) for i, t in enumerate(leaves))
            y = masked_linear(x, w, mask, b[0] if b else None, activation=activation, backend="cuda")
            leaf = (x, w, *b)
            grads = torch.autograd.grad(y, [leaf[i] for i in sorted(wanted)], torch.ones_like(y)) if wanted else ()
            outs[fast] = [y, *grads]
            assert len(runs) == int(fast and planned), (fast, planned)
        for a, b_ in zip(outs[True], outs[False], strict=True):
            assert torch.equal(a, b_), wanted


def test_masked_linear_plan_follows_a_mask_written_in_place(gemm, monkeypatch):
    """A plan holds its mask's tile maps: a mask written in place (its version moves) gets a new plan, whose result
    is the registered op's on the new mask, not the old plan's."""
    from gm.ops import _eager  # noqa: PLC0415
    from gm.ops.masked_linear import masked_linear  # noqa: PLC0415

    torch.manual_seed(6)
    x, w, b = torch.randn(9, 32, dtype=torch.bfloat16), torch.randn(24, 32, dtype=torch.bfloat16), None
    mask = torch.ones(24, 32)
    first = masked_linear(x, w, mask, b, backend="cuda")
    mask[:, 16:] = 0  # in place: the tile maps change
    outs = {}
    for fast in (True, False):
        monkeypatch.setattr(_eager, "EAGER_FAST_PATH", fast)
        outs[fast] = masked_linear(x, w, mask, b, backend="cuda")
    assert torch.equal(outs[True], outs[False]) and not torch.equal(outs[True], first)


def test_planned_paths_refuse_a_mask_written_between_forward_and_backward(gemm):
    """As the registered ops do (they save the masks): a mask written in place after the planned forward makes the
    backward an error, not a gradient of a different function."""
    from gm.ops.masked_linear import masked_linear  # noqa: PLC0415
    from tests.ops import test_made_iaf  # noqa: PLC0415

    z, ctx, weights, masks, biases = test_made_iaf._inputs(5, 8, 16, 2, 0, True, torch.bfloat16)
    z_new, ld = gm.ops.made_iaf_step(z, weights, masks, biases, backend="cuda")
    masks[1].mul_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(test_made_iaf._loss(z_new, ld), z)
    x, w, mask = torch.randn(9, 32, requires_grad=True), torch.randn(24, 32), torch.ones(24, 32)
    y = masked_linear(x.bfloat16(), w.bfloat16(), mask, backend="cuda")
    mask.mul_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

# (N, H, D): a tiny head, partial column blocks without bias, then several row and column blocks.
MADE_SHAPES = [(5, 7, 3), (33, 48, 16), (77, 130, 70), (70, 100, 130), (300, 256, 64)]


@pytest.mark.parametrize(
    "dtype, mode, random_mask, shape",
    _gemm_params(MADE_SHAPES, TC_DTYPES, ["gated", "affine"], [False, True], default=lambda si, c: si < 2),
    ids=str,
)
def test_iaf_made_output_gemm(gemm, dtype, mode, random_mask, shape, monkeypatch):
    from tests.ops import test_iaf  # noqa: PLC0415

    torch.manual_seed(1)
    test_iaf._fused_compare(
        "cuda", shape, _precision(dtype, monkeypatch), mode, CPU, bias=shape[0] != 33, random_mask=random_mask
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, "3xtf32"], ids=str)
def test_made_iaf_step_gemm(gemm, dtype, monkeypatch):
    """The whole-step op on the cuda backend: two hidden layers with context, the fused output layer, every
    gradient, through its single autograd node."""
    from tests.ops import test_made_iaf  # noqa: PLC0415

    torch.manual_seed(2)
    test_made_iaf._compare("cuda", (9, 5, 21, 2, 3, True), _precision(dtype, monkeypatch), "gated")


# (N, D, hidden, n_hidden, context, dtype, mode): widths that are not whole 16-byte rows (the per-layer launchers,
# which pad: the input and hidden widths, then only the output layer's 2D), then whole ones (gm.ops._made_iaf_cuda's
# planned launches), in both dtypes and modes, one wide D.
MADE_IAF_NODE_CASES = [
    (7, 5, 24, 3, 2, torch.bfloat16, "gated", True),
    (6, 1, 8, 2, 3, "3xtf32", "gated", True),
    (7, 8, 24, 3, 8, torch.bfloat16, "gated", True),
    (9, 4, 12, 2, 0, "3xtf32", "affine", False),
    (5, 72, 80, 2, 0, torch.float16, "gated", True),
]  # (..., bias)


def _planned(case) -> bool:
    """Whether the step takes the planned launches: the input, hidden and [m, s] widths whole 16-byte rows."""
    n, d, hidden, n_hidden, context, dtype, mode, _ = case
    size = 4 if dtype == "3xtf32" else dtype.itemsize
    return all((w * size) % 16 == 0 for w in (d + context, 2 * d, hidden))


@pytest.mark.parametrize(
    "case, activation",
    # without an activation the per-layer launchers run act_grad (an identity): only the planned cases take None
    [(c, a) for c in MADE_IAF_NODE_CASES for a in ("elu", "relu", None) if a or _planned(c)],
    ids=str,
)
def test_made_iaf_step_one_node_equals_the_per_layer_ops(gemm, case, activation, monkeypatch):
    """On cuda the one-node step chains the layers' backward: each input gradient into a hidden layer's output comes
    back as that layer's pre-activation gradient from the GEMM's epilogue (no separate activation-gradient pass).
    Bit for bit what the per-layer ops give (their separate pass reads the rounded input gradient, as the epilogue
    rounds it first), for every subset of wanted gradients; three hidden layers with context, two without. Steps
    whose widths are whole 16-byte rows take the planned launches (gm.ops._made_iaf_cuda), the others the per-layer
    launchers: each case checks which ran. Outputs and scratch start as NaN, so an element left unwritten fails."""
    from gm.ops import _eager  # noqa: PLC0415
    from gm.ops import _made_iaf_cuda as planned  # noqa: PLC0415
    from gm.ops import _masked_linear_cuda as kc  # noqa: PLC0415
    from tests.ops import test_made_iaf  # noqa: PLC0415

    plan_expected = _planned(case)
    n, d, hidden, n_hidden, context, dtype, mode, bias = case
    dtype = _precision(dtype, monkeypatch)
    torch.manual_seed(3)
    z, ctx, weights, masks, biases = test_made_iaf._inputs(n, d, hidden, n_hidden, context, bias, dtype, mode)
    leaves = test_made_iaf._leaves(z, ctx, weights, biases)
    # (the fixture NaN-fills torch.empty's floating tensors; the planned backward's byte scratch likewise)
    monkeypatch.setattr(kc, "scratch", lambda nbytes, device: torch.full((nbytes,), 255, dtype=torch.uint8))
    calls, plans = [], []
    act_grad, plan_forward = kc.act_grad, planned.forward
    monkeypatch.setattr(kc, "act_grad", lambda *a, **k: calls.append(1) or act_grad(*a, **k))
    monkeypatch.setattr(planned, "forward", lambda *a, **k: plans.append(1) or plan_forward(*a, **k))
    for wanted in (set(range(len(leaves))), {0}, {2}, {len(leaves) - 1}):
        runs = {}
        for fast in (True, False):
            monkeypatch.setattr(_eager, "EAGER_FAST_PATH", fast)
            calls.clear()
            plans.clear()
            fresh = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(leaves)]
            it = iter(fresh)
            zz, cc = next(it), (next(it) if context else None)
            ww = [next(it) for _ in weights]
            bb = [next(it) if b is not None else None for b in biases]
            z_new, ld = gm.ops.made_iaf_step(zz, ww, masks, bb, context=cc, mode=mode, activation=activation,
                                             backend="cuda")  # fmt: skip
            grads = torch.autograd.grad(test_made_iaf._loss(z_new, ld), [fresh[i] for i in sorted(wanted)])
            runs[fast] = ([z_new, ld, *grads], len(calls), len(plans))
        for a, b in zip(runs[True][0], runs[False][0], strict=True):
            assert torch.equal(a, b), wanted
        assert runs[True][1] == 0, "the one-node step ran a separate activation-gradient pass"
        assert runs[True][2] == int(plan_expected), "planned launches ran where they should not, or did not run"
        assert runs[False][2] == 0, "the registered per-layer ops ran the planned launches"
    outs = {}
    for fast in (True, False):  # a forward without autograd (sampling) takes the planned launches too
        monkeypatch.setattr(_eager, "EAGER_FAST_PATH", fast)
        plans.clear()
        with torch.no_grad():
            outs[fast] = gm.ops.made_iaf_step(z, weights, masks, biases, context=ctx, mode=mode, activation=activation,
                                              backend="cuda")  # fmt: skip
        assert len(plans) == int(fast and plan_expected)
    for a, b in zip(outs[True], outs[False], strict=True):
        assert torch.equal(a, b)



def test_made_iaf_step_planned_under_inference_mode(gemm, monkeypatch):
    """Masks made under torch.inference_mode track no version: the plan's key takes them (as the mask cache does),
    and the planned forward equals the registered per-layer ops'."""
    from gm.ops import _eager  # noqa: PLC0415
    from tests.ops import test_made_iaf  # noqa: PLC0415

    torch.manual_seed(4)
    with torch.inference_mode():
        z, ctx, weights, masks, biases = test_made_iaf._inputs(5, 8, 16, 2, 0, True, torch.bfloat16)
        outs = {}
        for fast in (True, False):
            monkeypatch.setattr(_eager, "EAGER_FAST_PATH", fast)
            outs[fast] = gm.ops.made_iaf_step(z, weights, masks, biases, backend="cuda")
    for a, b in zip(outs[True], outs[False], strict=True):
        assert torch.equal(a, b)

# (N, C_in, C_out, H, W, kh, kw, mask, colour groups)
CONV_SHAPES = [
    (1, 4, 5, 3, 7, 1, 5, "B", False),
    (2, 16, 16, 8, 8, 3, 3, "B", False),
    (2, 6, 9, 5, 6, 3, 3, "B", True),
    (2, 3, 5, 7, 7, 7, 7, "A", False),
    (1, 42, 138, 6, 5, 3, 3, "A", True),
]


@pytest.mark.parametrize("dtype, shape", _gemm_params(CONV_SHAPES, TC_DTYPES, default=lambda si, c: si < 3), ids=str)
def test_masked_conv2d_gemm(gemm, dtype, shape, monkeypatch):
    from gm.nn import color_groups  # noqa: PLC0415
    from gm.reference import masked_conv2d as conv_ref  # noqa: PLC0415

    n, cin, cout, height, width, kh, kw, mask, grouped = shape
    dtype = _precision(dtype, monkeypatch)
    torch.manual_seed(2)
    gi, go = (color_groups(cin, 3), color_groups(cout, 3)) if grouped else (None, None)
    x = torch.randn(n, cin, height, width, dtype=torch.float64)
    w = torch.randn(cout, cin, kh, kw, dtype=torch.float64) / (cin * kh * kw) ** 0.5
    b = torch.randn(cout, dtype=torch.float64)
    gy = torch.randn(n, cout, height, width, dtype=torch.float64).to(dtype)
    (x, w, b), (xr, wr, br) = _leaves(dtype, x, w, b)
    y = gm.ops.masked_conv2d(x, w, b, mask=mask, in_groups=gi, out_groups=go, backend="cuda")
    grads = _grads(y, (x, w, b), gy)
    y_ref = conv_ref(xr, wr, br, mask=mask, in_groups=gi, out_groups=go)
    grads_ref = _grads(y_ref, (xr, wr, br), gy.double())
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), (y, *grads), (y_ref, *grads_ref), strict=True):
        _check(name, got, want, dtype)


@pytest.mark.parametrize("mask, grouped", [("A", True), ("B", False)])
def test_masked_conv2d_weight_grad_over_splits(gemm, mask, grouped, monkeypatch):
    """The weight gradient's epilogue (the splits added in a fixed order, scattered to (C_out, C_in, kh, kw) with
    zeros at masked taps and at the centre's forbidden colour pairs, cast to the weight's dtype) over three pixel
    splits; the same bits on every call, and backward() gives what the separate calls give."""
    from gm.nn import color_groups  # noqa: PLC0415
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415
    from gm.ops.masked_conv import pack_plan, pack_weight  # noqa: PLC0415
    from gm.reference import masked_conv2d as conv_ref  # noqa: PLC0415

    monkeypatch.setattr(c, "reduction_splits", lambda *args, **kwargs: 3)
    torch.manual_seed(3)
    cin = cout = 6
    gi, go = (color_groups(cin, 3), color_groups(cout, 3)) if grouped else (None, None)
    x = torch.randn(2, cin, 5, 6, dtype=torch.float64)
    w = torch.randn(cout, cin, 5, 5, dtype=torch.float64) / (cin * 25) ** 0.5
    gy = torch.randn(2, cout, 5, 6, dtype=torch.float64)
    (x16, w16), (xr, wr) = _leaves(torch.bfloat16, x, w)
    y_ref = conv_ref(xr, wr, None, mask=mask, in_groups=gi, out_groups=go)
    (dw_ref,) = torch.autograd.grad(y_ref, (wr,), gy)
    x16, w16, gy16 = x16.detach(), w16.detach(), gy.to(torch.bfloat16)
    packed, taps = pack_weight(w16, mask, gi, go)
    plan = pack_plan(w16.shape, mask, gi, go, w16.device)
    shape = tuple(w16.shape)
    dw = c.weight_grad(x16, gy16, taps, plan, shape, torch.bfloat16)
    _check("dweight", dw, dw_ref, torch.bfloat16)
    assert (dw[dw_ref == 0] == 0).all(), "masked taps must get exactly zero"
    assert torch.equal(c.weight_grad(x16, gy16, taps, plan, shape, torch.bfloat16), dw)
    dx, dw2, _ = c.backward(gy16, x16, packed, taps, plan, shape, torch.bfloat16, True, True)
    assert torch.equal(dw2, dw) and torch.equal(dx, c.input_grad(gy16, packed, taps))


# The centre tap's colour ranges (gm.ops._masked_conv_cuda.centre_table): (N, C_in, C_out, H, W, kh, kw, mask). 264
# channels in groups of 88: the forward's first output tile (groups 0-1) reduces the centre over 176 of 264 input
# channels, the input gradient's second and third input tiles start theirs at output channel 88 and 176, and the
# weight gradient's centre tile (C_out tile 0, C_in tile 2) lies outside its range. 396 in groups of 132, mask A:
# the first output tile (group 0) and the last input tile (group 2) connect nothing at the centre (no centre chunk
# at all; for the 1x1, no chunk: the bias alone).
CENTRE_SHAPES = [
    (1, 264, 264, 4, 4, 1, 1, "B"),
    (1, 396, 396, 3, 3, 1, 1, "A"),
    (1, 264, 264, 3, 4, 3, 3, "B"),
]


def _centre_case(shape, dtype, monkeypatch, bias: bool = True):
    """[(name, cuda result, float64 reference)] of y, dx, dweight (and dbias) for a colour-grouped masked_conv2d,
    every GEMM taking the centre ranges however little they skip (a fresh plan cache, _CENTRE_MIN_SKIP 0)."""
    from collections import OrderedDict  # noqa: PLC0415

    from gm.nn import color_groups  # noqa: PLC0415
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415
    from gm.ops import masked_conv as mc  # noqa: PLC0415
    from gm.reference import masked_conv2d as conv_ref  # noqa: PLC0415

    monkeypatch.setattr(mc, "_PLANS", OrderedDict())
    monkeypatch.setattr(c, "_CENTRE_MIN_SKIP", 0.0)

    n, cin, cout, height, width, kh, kw, mask = shape
    gi, go = color_groups(cin, 3), color_groups(cout, 3)
    torch.manual_seed(5)
    x = torch.randn(n, cin, height, width, dtype=torch.float64)
    w = torch.randn(cout, cin, kh, kw, dtype=torch.float64) / (cin * kh * kw) ** 0.5
    b = torch.randn(cout, dtype=torch.float64) if bias else None
    gy = torch.randn(n, cout, height, width, dtype=torch.float64)
    (x, w, b), (xr, wr, br) = _leaves(dtype, x, w, b)
    y = gm.ops.masked_conv2d(x, w, b, mask=mask, in_groups=gi, out_groups=go, backend="cuda")
    got = (y, *_grads(y, (x, w, b), gy.to(dtype)))
    y_ref = conv_ref(xr, wr, br, mask=mask, in_groups=gi, out_groups=go)
    want = (y_ref, *_grads(y_ref, (xr, wr, br), gy))
    return list(zip(("y", "dx", "dweight", "dbias")[: len(got)], got, want, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, "3xtf32"])
@pytest.mark.parametrize("shape", CENTRE_SHAPES, ids=str)
def test_masked_conv2d_centre_ranges(gemm, shape, dtype, monkeypatch):
    """Colour-grouped layers whose GEMM tiles reduce the centre tap over part of its channels (and the weight
    gradient's tiles outside the range): every output and gradient against the float64 reference, the weight
    gradient exactly zero at forbidden centre pairs, and the table the launches read as the plan computes it."""
    from gm.nn import color_groups  # noqa: PLC0415
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415
    from gm.ops.masked_conv import pack_plan  # noqa: PLC0415

    dtype = _precision(dtype, monkeypatch)
    results = _centre_case(shape, dtype, monkeypatch)
    for name, got, want in results:
        _check(name, got, want, dtype)
    dw, dw_ref = results[2][1], results[2][2]
    assert (dw[dw_ref == 0] == 0).all(), "forbidden centre pairs must get exactly zero"
    n, cin, cout, height, width, kh, kw, mask = shape
    plan = pack_plan((cout, cin, kh, kw), mask, color_groups(cin, 3), color_groups(cout, 3), "cpu")
    monkeypatch.setattr(c, "_CENTRE_MIN_SKIP", 0.1)  # the shipped threshold, on the plan's first table
    centre = c.centre_table(plan)
    # rows per C_out tile (the C_in range) and per C_in tile (the C_out range); the 1x1 layers' ranges skip 16-18% (B)
    # and over half (A) of their GEMMs' products, the 3x3's a fifth of that: its GEMMs keep the plain variant
    if (cin, mask) == (264, "B"):
        fwd, dx = [[0, 176], [0, 264], [0, 264]], [[0, 264], [88, 264], [176, 264]]
    else:
        fwd, dx = [[396, 0], [0, 132], [0, 264], [0, 264]], [[132, 396], [132, 396], [264, 396], [396, 0]]
    assert centre.weight_grad.tolist() == fwd
    taken = kh == 1
    assert (centre.forward is not None, centre.input_grad is not None) == (taken, taken)
    if taken:
        assert centre.forward.tolist() == fwd and centre.input_grad.tolist() == dx


# masked_conv2d's output in its input's memory format (gm._memory_format): channels-last x or grad gives a channels-last
# output, written NHWC by the kernel. (N, C_in, C_out, H, W, kh, kw, mask, colour groups, bias): odd channel counts;
# 198 pixels (two pixel tiles, the last partial); a narrow output (5 channels: the NHWC store's flat walk puts several
# pixels in a warp); two channel tiles (138: a full-width one, its own store loop, then one 10 wide); an aligned
# channels-last input (16), read in place.
CL_CASES = [
    (2, 5, 13, 9, 11, 3, 3, "B", False, True),
    (2, 13, 5, 9, 11, 3, 3, "A", False, False),
    (1, 15, 21, 12, 13, 5, 5, "A", True, True),
    (1, 16, 138, 5, 7, 1, 3, "B", False, True),
]


def _conv_channels_last_vs_nchw(case, dtype):
    """[(name, channels-last result, NCHW result)] of the cuda launchers (forward, input_grad, backward's dx and weight
    gradient) on channels-last and on NCHW copies of the same x and grad."""
    from gm.nn import color_groups  # noqa: PLC0415
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415
    from gm.ops.masked_conv import pack_plan, pack_weight  # noqa: PLC0415

    n, cin, cout, height, width, kh, kw, mask, grouped, has_bias = case
    torch.manual_seed(4)
    gi, go = (color_groups(cin, 3), color_groups(cout, 3)) if grouped else (None, None)
    x = torch.randn(n, cin, height, width).to(dtype)
    w = (torch.randn(cout, cin, kh, kw) / (cin * kh * kw) ** 0.5).to(dtype)
    b = torch.randn(cout).to(dtype) if has_bias else None
    gy = torch.randn(n, cout, height, width).to(dtype)
    x_cl, gy_cl = x.contiguous(memory_format=torch.channels_last), gy.contiguous(memory_format=torch.channels_last)
    packed, taps = pack_weight(w, mask, gi, go)
    plan, shape = pack_plan(w.shape, mask, gi, go, w.device), tuple(w.shape)
    dx_cl, dw_cl, _ = c.backward(gy_cl, x_cl, packed, taps, plan, shape, dtype, True, True)
    dx, dw, _ = c.backward(gy, x, packed, taps, plan, shape, dtype, True, True)
    return [
        ("y", c.forward(x_cl, packed, b, taps), c.forward(x, packed, b, taps)),
        ("dx", c.input_grad(gy_cl, packed, taps), c.input_grad(gy, packed, taps)),
        ("backward dx", dx_cl, dx),
        ("backward dweight", dw_cl, dw),
    ]


@pytest.mark.parametrize(
    "dtype, case", [pytest.param(d, c, id=f"{d}-{c}") for d in (torch.bfloat16, "3xtf32") for c in CL_CASES]
)
def test_masked_conv2d_channels_last_output(gemm, dtype, case, monkeypatch):
    """forward, input_grad and backward on channels-last x and grad: channels-last outputs (written NHWC by the GEMM's
    epilogue) holding exactly the NCHW path's values, bias or not; torch.empty is NaN-poisoned, so an element the
    NHWC store skips fails. The NCHW values are checked against the float64 reference, and an aligned channels-last
    input reaches the kernel without a copy."""
    from gm._memory_format import is_channels_last  # noqa: PLC0415
    from gm.nn import color_groups  # noqa: PLC0415
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415
    from gm.reference import masked_conv2d as conv_ref  # noqa: PLC0415

    dtype = _precision(dtype, monkeypatch)
    results = _conv_channels_last_vs_nchw(case, dtype)
    for name, got, want in results:
        if name != "backward dweight":
            assert is_channels_last(got), f"{name}: strides {got.stride()}, expected channels-last"
            assert want.is_contiguous(), f"{name}: the NCHW path's strides {want.stride()}"
        assert torch.isfinite(got).all(), f"{name}: elements left unwritten (NaN poison) or not finite"
        assert torch.equal(got, want), f"{name}: channels-last result differs from the NCHW path's"
    n, cin, cout, height, width, kh, kw, mask, grouped, has_bias = case
    torch.manual_seed(4)  # the inputs of _conv_channels_last_vs_nchw again, in float64
    x = torch.randn(n, cin, height, width).to(dtype).double()
    w = (torch.randn(cout, cin, kh, kw) / (cin * kh * kw) ** 0.5).to(dtype).double()
    b = torch.randn(cout).to(dtype).double() if has_bias else None
    gi, go = (color_groups(cin, 3), color_groups(cout, 3)) if grouped else (None, None)
    _check("y", results[0][2], conv_ref(x, w, b, mask=mask, in_groups=gi, out_groups=go), dtype)
    if cin % 8 == 0:
        x_cl = x.to(dtype).contiguous(memory_format=torch.channels_last)
        assert c._nhwc(x_cl, cin).data_ptr() == x_cl.data_ptr(), "an aligned channels-last input must not be copied"


# ------------------------------------------------------------------------------------------------- mutation checks
# Seeded bugs the emulator must catch, all in one mutant build: {file: [(text, replacement)]}. If a kernel is edited
# so an anchor no longer occurs exactly once, the build says so: point the anchor at an equivalent line.
ROW_SCAN = "csrc/row_lstm/row_lstm_cuda.cu"
DIAG_SCAN = "csrc/diagonal_lstm/diagonal_lstm_cuda.cu"
MAINLOOP = "csrc/common/mma_sync.cuh"  # cp_async_mainloop: the stage pipeline of every GEMM
MUTATIONS = {
    # row_lstm backward (tensor cores): the barrier between a warp pair's exchange of partial dh and the reads of it
    # (the per-row barrier's removal does not show here, as for the diagonal scan below).
    ROW_SCAN: [("__syncthreads();  // the partners' partial sums are in shared memory", "")],
    # diagonal_lstm backward (tensor cores): the barrier between a warp pair's exchange of partial dh and the reads
    # of it. (Its per-step barrier, between the warps' da writes and the next step's B-fragment reads of them, is
    # needed on a GPU but its removal does not show here: the fibers released from the exchange barrier each run
    # their plain cell code, writes included, before any warp's next collective completes.)
    DIAG_SCAN: [("__syncthreads();  // the partners' partial sums are in shared memory", "")],
    # GEMM main loop: the wait for this thread's cp.async of the stage it computes on.
    MAINLOOP: [("    cp_async_wait<kStages - 2>();  // this thread's copies of iteration `it` have landed\n", "")],
}
# GEMM main loop: the barrier after the wait (other threads' copies landed; the old stage is free). A build of its own:
# with the wait also gone, a wrong weight gradient would not show that the barrier's absence is caught.
BARRIER_MUTATIONS = {
    MAINLOOP: [("    __syncthreads();  // iteration `it` complete for all threads; the slot of it - 1 is free to refill\n",
                "")],
}


# masked_conv2d's own seeded bugs, a build of their own (the pipeline mutations above break every GEMM):
# - the NHWC store one channel off (a thread that starts at channel o > 0 writes each value one element early:
#   channels written twice, the tile's last one never); the NCHW store and the weight gradient are untouched;
# - the idle-warp test one warp too eager, in the GEMM (a warp whose columns start under 32 before the tile's last
#   channel skips its MMAs) and in the weight gradient (the same along its 64-row C_in side): the NCHW and NHWC paths
#   alike go wrong, so the channels-last-against-NCHW comparison still sees the NHWC store alone.
CONV = "csrc/masked_conv/masked_conv_cuda.cu"
CONV_MUTATIONS = {
    CONV: [("T* dst = static_cast<T*>(args.out) + (m0 + m) * args.n_out + n0 + o;",
            "T* dst = static_cast<T*>(args.out) + (m0 + m) * args.n_out + n0 + (o > 0 ? o - 1 : 0);"),
           ("const bool warp_on = n0 + wn0 < args.n_out && m0 + wm0 < m_total;",
            "const bool warp_on = n0 + wn0 + 32 < args.n_out && m0 + wm0 < m_total;"),
           ("const bool warp_on = c0 + wm0 < args.c_in && o0 + wn0 < args.c_out;",
            "const bool warp_on = c0 + wm0 + 64 < args.c_in && o0 + wn0 < args.c_out;")],
}  # fmt: skip
# The centre ranges' seeded bugs, a build of their own (the idle-warp mutation above breaks every last tile): the
# input gradient's centre chunks not offset past its range's start (it reduces the wrong output channels), the end
# chunk rounded down (the forward drops the last channels of its range), and the weight gradient skipping a centre
# tile that its range only partly covers.
CENTRE_MUTATIONS = {
    CONV: [(" + (kCentre && kiter >= k_centre ? centre_skip : 0);", ";"),
           ("kc_hi = (range.y * elem + kKBytes - 1) / kKBytes;", "kc_hi = (range.y * elem) / kKBytes;"),
           ("tile_on = tile_on && c0 < r.y && r.x < c0 + kBM;", "tile_on = tile_on && c0 + kBM <= r.y && r.x < c0 + kBM;")],
}  # fmt: skip


@pytest.fixture(scope="module")
def mutant():
    return _build(mutations=MUTATIONS)


@pytest.fixture(scope="module")
def conv_mutant():
    return _build(mutations=CONV_MUTATIONS)


@pytest.fixture(scope="module")
def centre_mutant():
    return _build(mutations=CENTRE_MUTATIONS)


@pytest.fixture(scope="module")
def barrier_mutant():
    return _build(mutations=BARRIER_MUTATIONS)


def test_emulator_catches_a_missing_barrier(mutant, monkeypatch):
    """Without the row_lstm backward's exchange barrier (3 warp pairs at h=40) the gradients must be wrong (the
    unmutated kernel passes test_row_lstm)."""
    _activate(mutant, monkeypatch)
    results = _row_lstm((2, 40, 5, 7, 3, True), torch.bfloat16)
    wrong = [name for name, got, want in results if not _close(got, want, torch.bfloat16)]
    assert "dgates" in wrong, f"the emulator missed the removed barrier: only {wrong} differ"


def test_emulator_catches_a_missing_scan_barrier(mutant, monkeypatch):
    """Without the diagonal backward's exchange barrier (3 warp pairs at h=40), dgates must be wrong."""
    _activate(mutant, monkeypatch)
    g = torch.randn(1, 160, 5, 6, dtype=torch.float64)
    w = torch.randn(160, 40, 2, dtype=torch.float64) / 9
    (g, w), (gr, wr) = _leaves(torch.bfloat16, g, w)
    dy = torch.randn(1, 40, 5, 6).to(torch.bfloat16)
    (dg,) = _grads(gm.ops.diagonal_lstm(g, w, backend="cuda"), (g,), dy)
    (dg_ref,) = _grads(diagonal_ref(gr, wr), (gr,), dy.double())
    assert not _close(dg, dg_ref, torch.bfloat16), "the emulator missed the removed scan barrier"


def _masked_linear_vs_reference(module, monkeypatch):
    """(y, y_ref, dw, dw_ref) of one bf16 masked_linear on `module`'s cuda kernels, against the float64 reference."""
    from tests.ops import test_masked_linear  # noqa: PLC0415

    _activate(module, monkeypatch)
    test_masked_linear.clear_mask_cache()
    x, w, b, mask = test_masked_linear._inputs(77, 130, 70, torch.bfloat16, "cpu", "mixed")
    y = gm.ops.masked_linear(x, w, mask, b, backend="cuda")
    gy = torch.randn_like(y)
    dw = torch.autograd.grad(y, w, gy)[0]
    test_masked_linear.clear_mask_cache()
    xr, wr = x.detach().double(), w.detach().double().requires_grad_()
    y_ref = masked_linear_ref(xr, wr, mask, b.detach().double())
    dw_ref = torch.autograd.grad(y_ref, wr, gy.double())[0]
    return y, y_ref, dw, dw_ref


def test_emulator_catches_gemm_pipeline_bugs(mutant, barrier_mutant, monkeypatch):
    """masked_linear with a missing cp.async wait (forward) and, in a separate build, a missing main-loop barrier
    (weight gradient): copies land at their wait, and warps may run ahead of each other (the default random order),
    so both must show."""
    y, y_ref, _, _ = _masked_linear_vs_reference(mutant, monkeypatch)
    assert not _close(y, y_ref, torch.bfloat16), "the emulator missed the removed cp.async wait"
    _, _, dw, dw_ref = _masked_linear_vs_reference(barrier_mutant, monkeypatch)
    assert not _close(dw, dw_ref, torch.bfloat16), "the emulator missed the removed weight-gradient barrier"


def test_emulator_catches_a_wrong_nhwc_channel(conv_mutant, monkeypatch):
    """With the NHWC store one channel off, the channels-last forward and input gradient must differ from the NCHW
    path (the unmutated kernel passes test_masked_conv2d_channels_last_output)."""
    _activate(conv_mutant, monkeypatch)
    for case in (CL_CASES[0], CL_CASES[3]):  # narrow channel tiles; a full-width one and a narrow one
        results = _conv_channels_last_vs_nchw(case, torch.bfloat16)
        wrong = [name for name, got, want in results if not torch.equal(got, want)]
        assert wrong == ["y", "dx", "backward dx"], f"{case}: the emulator missed the wrong channel: {wrong} differ"


def test_emulator_catches_an_eager_idle_warp(conv_mutant, monkeypatch):
    """With the GEMM's and the weight gradient's idle-warp tests one warp too eager, CONV_SHAPES' last case (138
    output channels: a second channel tile 10 wide, which one warp column computes; 42 input channels, which one warp
    row of the weight gradient covers) must go wrong in y, dx and dweight on the NCHW path (the unmutated kernels
    pass test_masked_conv2d_gemm there)."""
    from gm.nn import color_groups  # noqa: PLC0415
    from gm.reference import masked_conv2d as conv_ref  # noqa: PLC0415

    _activate(conv_mutant, monkeypatch)
    n, cin, cout, height, width, kh, kw, mask, _ = CONV_SHAPES[-1]
    gi, go = color_groups(cin, 3), color_groups(cout, 3)
    torch.manual_seed(2)
    x = torch.randn(n, cin, height, width, dtype=torch.float64)
    w = torch.randn(cout, cin, kh, kw, dtype=torch.float64) / (cin * kh * kw) ** 0.5
    gy = torch.randn(n, cout, height, width, dtype=torch.float64)
    (x16, w16), (xr, wr) = _leaves(torch.bfloat16, x, w)
    y = gm.ops.masked_conv2d(x16, w16, mask=mask, in_groups=gi, out_groups=go, backend="cuda")
    got = (y, *_grads(y, (x16, w16), gy.to(torch.bfloat16)))
    y_ref = conv_ref(xr, wr, None, mask=mask, in_groups=gi, out_groups=go)
    want = (y_ref, *_grads(y_ref, (xr, wr), gy))
    right = [name for name, g, r in zip(("y", "dx", "dweight"), got, want, strict=True) if _close(g, r, torch.bfloat16)]
    assert right == [], f"the emulator missed the eager idle-warp test: {right} still match the reference"


def test_emulator_catches_wrong_centre_ranges(centre_mutant, monkeypatch):
    """With the three centre-range mutations, the 264-channel 1x1 mask-B case goes wrong in y (its first tile's range
    ends at channel 176, mid-chunk in neither dtype: the rounded-down end drops channels 160-175 in bf16), dx (tiles
    whose range starts at 88 and 176) and dweight (C_in tile 1 of C_out tile 0 is partly inside); the unmutated
    kernels pass test_masked_conv2d_centre_ranges there."""
    _activate(centre_mutant, monkeypatch)
    results = _centre_case(CENTRE_SHAPES[0], torch.bfloat16, monkeypatch, bias=False)
    right = [name for name, got, want in results if _close(got, want, torch.bfloat16)]
    assert right == [], f"the emulator missed the centre-range mutations: {right} still match the reference"


def test_diagonal_lstm_shared_memory_model_matches_the_kernels(emu):
    """gm.ops._lstm_cuda.diagonal_fits (auto's test for picking the cuda scans) agrees with the kernels' own check at
    the boundary: h=176 (float32, H=32) needs 225,952 bytes in the backward, under the 227 KB opt-in, and runs
    forward and backward; h=177 pads to 192 and needs 244,896: the backward refuses it."""
    from gm.ops._lstm_cuda import diagonal_fits, diagonal_smem_bytes  # noqa: PLC0415

    assert diagonal_smem_bytes(176, 32, 4) == 225_952 and diagonal_fits(176, 32, 4, 0)
    assert diagonal_smem_bytes(177, 32, 4) == 244_896 and not diagonal_fits(177, 32, 4, 0)
    for hid, fits in ((176, True), (177, False)):
        _scan_runs_or_refuses(gm.ops.diagonal_lstm, (1, 4 * hid, 32, 1), (4 * hid, hid, 2), fits)


def _scan_runs_or_refuses(scan, gates_shape, w_shape, fits: bool) -> None:
    """The cuda scan forward, then its backward: finite gate gradients where the size fits the shared memory, else
    the backward's refusal naming the triton backend."""
    gates = (0.1 * torch.randn(*gates_shape)).requires_grad_()
    w = (torch.randn(*w_shape) / w_shape[1]).requires_grad_()
    y = scan(gates, w, backend="cuda")
    if fits:
        y.sum().backward()
        assert torch.isfinite(gates.grad).all()
    else:
        with pytest.raises(ValueError, match="shared memory.*triton"):
            y.sum().backward()


@pytest.mark.parametrize(("hid", "width", "need", "fits"), [(176, 32, 231_616, True), (177, 32, 251_072, False),
                                                             (80, 64, 208_192, True), (96, 64, 246_080, False)])
def test_row_lstm_shared_memory_model_matches_the_kernels(emu, hid, width, need, fits):
    """gm.ops._lstm_cuda.row_fits (what lets auto send row_lstm to the cuda scans, where a benchmark measured them
    ahead) agrees with the kernels' own check at the boundary (float32, k=3): the backward's shared memory for
    hidden size and width against the 227 KB opt-in; a fitting size runs forward and backward, the next refuses."""
    from gm.ops._lstm_cuda import row_fits, row_smem_bytes  # noqa: PLC0415

    assert row_smem_bytes(hid, width, 3, 4) == need and row_fits(hid, width, 3, 4, 0) == fits
    _scan_runs_or_refuses(gm.ops.row_lstm, (1, 4 * hid, 1, width), (4 * hid, hid, 3), fits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layout_transpose(emu, dtype):
    """csrc/layout's tiled transpose through gm.ops._lstm_cuda.to_nhwc / to_nchw: exact copies at sizes off the
    32 x 32 tile, from a channel slice (the DiagonalBiLSTM's half of one conv output), and back."""
    from gm.ops._lstm_cuda import to_nchw, to_nhwc  # noqa: PLC0415

    full = torch.randn(3, 70, 5, 7).to(dtype)
    part = full[:, 33:68]  # a channel slice: images 70*35 elements apart
    nhwc = to_nhwc(part)
    assert nhwc.shape == (3, 5, 7, 35) and nhwc.is_contiguous()
    assert torch.equal(nhwc, part.permute(0, 2, 3, 1))
    back = to_nchw(nhwc)
    assert back.is_contiguous() and torch.equal(back, part)
    cl = full.contiguous(memory_format=torch.channels_last)
    assert to_nhwc(cl).data_ptr() == cl.data_ptr()  # already channels-last: no copy


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_layout_gather(emu, src_dtype, dst_dtype):
    """csrc/layout's packing gather (gm._ext.gather): out[i] = src.view(-1)[idx[i]] cast as torch casts, exactly 0
    at the sentinel index src.numel(); repeated and unordered indices, a length off the 256-thread block, a
    non-contiguous source (packed from its contiguous copy) and an empty index."""
    from gm._ext import gather  # noqa: PLC0415

    src = (torch.randn(7, 11) * 3).to(src_dtype).t()  # non-contiguous
    flat = src.contiguous().reshape(-1)
    idx = torch.randint(0, src.numel() + 1, (1000,), dtype=torch.int32)
    idx[:5] = src.numel()
    got = gather(src, idx, dst_dtype)
    want = torch.cat((flat, flat.new_zeros(1)))[idx.long()].to(dst_dtype)
    assert got.dtype == dst_dtype and torch.equal(got, want)
    assert gather(src, idx[:0], dst_dtype).numel() == 0


def test_masked_conv2d_refuses_more_channels_than_its_division_covers(emu):
    """The GEMM finds (tap, channel chunk) by a multiply-high that is exact below 8192 chunks of 64 bytes: more input
    channels (512 KB a pixel) get a clear error pointing to triton, not a wrong result."""
    x = torch.randn(1, 131072, 1, 1)
    with pytest.raises(ValueError, match="512 KB.*triton"):
        gm.ops.masked_conv2d(x, torch.randn(1, 131072, 1, 1), mask="B", backend="cuda")
    gm.ops.masked_conv2d(torch.randn(1, 8, 3, 3), torch.randn(4, 8, 3, 3), mask="B", backend="cuda")


# ---------------------------------------------------------------------------------------------------------------------
# The fused (ReLU, conv) layers (gm.nn.relu_conv) on cuda: the GEMM's ReLU on its A fragments (max.NaN), its gate and
# residual epilogue, the weight gradient's ReLU on x's fragments.


@pytest.mark.parametrize("precision", [torch.bfloat16, "tf32", "3xtf32"], ids=str)
@pytest.mark.parametrize("case", [CL_CASES[0], CL_CASES[2], CL_CASES[3], (1, 264, 264, 3, 4, 1, 1, "B", True, True)],
                         ids=["3x3B", "5x5A-rgb", "1x3B-138", "1x1B-rgb-264-centre"])  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_masked_conv2d_relu_fusions(gemm, case, channels_last, precision, monkeypatch):
    """forward(relu_in, residual) = conv(relu(x)) + b + r; input_grad(gate=x, residual=r2) = relu'(x) * conv^T(g) +
    r2, exactly r2 where x <= 0; weight_grad(relu_in) = the weight gradient of conv(relu(x)); against the float64
    reference, in x's layout; a NaN in x stays NaN through the ReLU (max.NaN), as torch's relu keeps it. The 264-channel
    case takes the weight as weight_operands makes it, with its centre ranges (the fused GEMMs' centre variant)."""
    from collections import OrderedDict  # noqa: PLC0415

    from gm.nn import color_groups  # noqa: PLC0415
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415
    from gm.ops import masked_conv as mc  # noqa: PLC0415
    from gm.ops.masked_conv import pack_plan, pack_weight  # noqa: PLC0415
    from gm.reference import masked_conv2d as conv_ref  # noqa: PLC0415

    monkeypatch.setattr(mc, "_PLANS", OrderedDict())
    dtype = _precision(precision, monkeypatch)
    n, cin, cout, height, width, kh, kw, mask, grouped, has_bias = case
    torch.manual_seed(5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gi, go = (color_groups(cin, 3), color_groups(cout, 3)) if grouped else (None, None)
    x = torch.randn(n, cin, height, width).to(dtype)
    x.view(-1)[::7] = 0.0
    x = x.contiguous(memory_format=fmt)
    w = (torch.randn(cout, cin, kh, kw) / (cin * kh * kw) ** 0.5).to(dtype)
    b = torch.randn(cout).to(dtype) if has_bias else None
    r = torch.randn(n, cout, height, width).to(dtype)
    gy = torch.randn(n, cout, height, width).to(dtype).contiguous(memory_format=fmt)
    r2 = torch.randn(n, cin, height, width).to(dtype)
    xr = x.double().relu().requires_grad_()
    wr = w.double().requires_grad_()
    y_ref = conv_ref(xr, wr, b.double() if b is not None else None, mask=mask, in_groups=gi, out_groups=go)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (xr, wr), gy.double())
    packed, taps = pack_weight(w, mask, gi, go)
    plan = pack_plan(w.shape, mask, gi, go, w.device)
    if cin > 128:
        packed = c.weight_operands(w, plan, fresh=True)
        assert packed.centre.forward is not None and packed.centre.input_grad is not None
    y = c.forward(x, packed, b, taps, relu_in=True, residual=r)
    assert y.is_contiguous(memory_format=fmt)
    _check("y", y, y_ref + r.double(), dtype)
    dx = c.input_grad(gy, packed, taps, gate=x, residual=r2)
    assert dx.is_contiguous(memory_format=fmt)
    _check("dx", dx, torch.where(x > 0, dx_ref, 0.0) + r2.double(), dtype)
    assert torch.equal(dx[x <= 0], r2[x <= 0])
    dw = c.weight_grad(x, gy, taps, plan, tuple(w.shape), dtype, relu_in=True)
    _check("dweight", dw, dw_ref, dtype)
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = float("nan")
    assert torch.isnan(c.forward(x_nan, packed, b, taps, relu_in=True)).any()


@pytest.mark.parametrize("kind", ["block", "head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relu_conv_chain_on_cuda(emu, kind, dtype, monkeypatch):
    """gm.nn.relu_conv's one node on cuda (the PixelCNN residual block, the output head; channels-last, colour
    groups) against the composed modules on cuda: output and every gradient."""
    from gm.models.common import OutputHead  # noqa: PLC0415
    from gm.models.pixelcnn import ResidualBlock  # noqa: PLC0415
    from gm.nn import relu_conv  # noqa: PLC0415

    torch.manual_seed(6)
    m = ResidualBlock(6, 3, "cuda") if kind == "block" else OutputHead(12, 9, 6, 3, "cuda")
    for p in m.parameters():
        torch.nn.init.uniform_(p, -0.6, 0.6)
    m = m.to(dtype)
    x = torch.randn(2, 12, 5, 4).to(dtype).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(2, 12 if kind == "block" else 6, 5, 4).to(dtype).contiguous(memory_format=torch.channels_last)
    got = {}
    for fused in (True, False):
        monkeypatch.setattr(relu_conv, "FUSED", fused)
        xl = x.detach().requires_grad_()
        y = m(xl)
        assert (type(y.grad_fn).__name__ == "_ReluConvChainBackward") == fused
        got[fused] = (y, *torch.autograd.grad(y, (xl, *m.parameters()), gy))
    names = ["y", "dx"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got[True], got[False], strict=True):
        _check(f"fused {name} vs composed", a, b.double(), dtype)


@pytest.mark.parametrize("precision", [torch.bfloat16, "3xtf32"], ids=str)
@pytest.mark.parametrize("case", [CL_CASES[0], CL_CASES[3]], ids=["3x3B", "1x3B-138"])
def test_masked_conv2d_weight_grad_sums_the_bias_gradient(gemm, case, precision, monkeypatch):
    """weight_grad(bias_grad=True): the weight gradient bit-identical to weight_grad's, and the bias gradient (the
    grad tiles summed by the first tap's first channel tile, per pixel split, the splits added by the unpack pass)
    against the float64 sum; three pixel splits, two output channel tiles (138)."""
    from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415
    from gm.ops.masked_conv import pack_plan  # noqa: PLC0415

    dtype = _precision(precision, monkeypatch)
    monkeypatch.setattr(c, "reduction_splits", lambda *args, **kwargs: 3)
    n, cin, cout, height, width, kh, kw, mask, _, _ = case
    torch.manual_seed(7)
    x = torch.randn(n, cin, height, width).to(dtype)
    gy = torch.randn(n, cout, height, width).to(dtype).contiguous(memory_format=torch.channels_last)
    plan = pack_plan((cout, cin, kh, kw), mask, None, None, x.device)
    args = (x, gy, plan.taps, plan, (cout, cin, kh, kw), dtype)
    dw, db = c.weight_grad(*args, bias_grad=True)
    assert torch.equal(dw, c.weight_grad(*args))
    _check("dbias", db, gy.double().sum(dim=(0, 2, 3)), dtype)


def test_the_emulator_and_gm_C_bind_the_tap_table_side_by_side(emu_module):
    """gm._C and the emulator's module both bind masked_conv's tap table (a pybind11 class) in one process: each
    registers it module-locally (a second global registration of the type refused to import), and each module's
    launches get that module's tables (_masked_conv_cuda._tap_table keys them by module)."""
    from gm import _ext  # noqa: PLC0415
    from gm.ops._masked_conv_cuda import _tap_table  # noqa: PLC0415

    ok, why = _ext.ext_status()
    if not ok:
        pytest.skip(f"gm._C is not built: {why}")
    real = _ext.ext()
    taps = ((-1, 0), (0, -1), (0, 0))
    assert _tap_table(real, taps, False).count == 3 and _tap_table(emu_module, taps, True).count == 3
    assert type(_tap_table(real, taps, False)) is not type(_tap_table(emu_module, taps, False))
    with pytest.raises(ValueError, match="kept taps"):
        real.masked_conv_taps([], [])
