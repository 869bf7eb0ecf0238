"""diagonal_lstm: every backend on this machine against gm.reference, forward and all gradients."""

from __future__ import annotations

import importlib

import pytest
import torch

from gm.ops import diagonal_lstm
from gm.ops.diagonal_lstm import weight_grad
from gm.reference.diagonal_lstm import diagonal_lstm as reference
from gm.reference.diagonal_lstm import diagonal_lstm_literal
from tests._util import assert_auto_picks_triton, assert_rel, fast_backends, poison_empty

CPU = torch.device("cpu")
BACKENDS = fast_backends(CPU)

# (N, h, H, W)
SHAPES = [
    pytest.param(2, 3, 5, 4, id="N2-h3-5x4"),
    pytest.param(1, 2, 3, 7, id="N1-h2-3x7"),
    pytest.param(2, 4, 6, 1, id="W1"),
    pytest.param(3, 3, 1, 6, id="H1"),
    pytest.param(2, 8, 4, 4, id="h8-round"),
]


def _inputs(n, hid, h, w, dtype, device=CPU, scale=0.5):
    gates = torch.randn(n, 4 * hid, h, w, dtype=dtype, device=device, requires_grad=True)
    w_ss = (scale * torch.randn(4 * hid, hid, 2, dtype=dtype, device=device)).requires_grad_()
    dy = torch.randn(n, hid, h, w, dtype=dtype, device=device)
    return gates, w_ss, dy


def _ref_and_grads(gates, w_ss, dy, reverse):
    """The reference in float64 (the oracle) and its gradients."""
    g, w = (t.detach().double().requires_grad_() for t in (gates, w_ss))
    y = reference(g, w, reverse=reverse)
    return (y, *torch.autograd.grad(y, (g, w), dy.double()))


def _check(backend, gates, w_ss, dy, reverse, dtype, device):
    ref = _ref_and_grads(gates, w_ss, dy, reverse)
    y = diagonal_lstm(gates, w_ss, reverse=reverse, backend=backend)
    grads = torch.autograd.grad(y, (gates, w_ss), dy)
    for what, out, r in zip(("h", "dgates", "dw_ss"), (y, *grads), ref):
        assert out.dtype == dtype
        assert_rel(out, r, dtype, f"{backend} {what}", device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize(("n", "hid", "h", "w"), SHAPES)
def test_matches_reference(backend, dtype, reverse, n, hid, h, w, monkeypatch):
    if backend == "triton" and dtype == torch.float32 and (n, hid, h, w) != (2, 3, 5, 4):
        pytest.skip("interpreter time: triton float32 on one shape, float64 on all")
    gates, w_ss, dy = _inputs(n, hid, h, w, dtype)
    poison_empty(monkeypatch)
    _check(backend, gates, w_ss, dy, reverse, dtype, CPU)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_triton_several_unit_blocks(reverse, monkeypatch):
    """h = 20 > the interpreted 16-unit blocks: two output blocks (the last partial) and two 16-channel chunks per
    tap (the last padded), so the per-block gates, the state read back from y and the backward's pull over the
    next diagonal's dgates all cross block boundaries."""
    gates, w_ss, dy = _inputs(2, 20, 3, 4, torch.float64, scale=0.3)
    poison_empty(monkeypatch)
    _check("triton", gates, w_ss, dy, reverse, torch.float64, CPU)


def test_zero_state_outside_is_the_literal_recurrence():
    """Zeroing the state outside the image (what the kernels do) changes no output and no gradient of the literal
    recurrence on the zero-filled skewed gates, bit for bit (see gm.reference.diagonal_lstm)."""
    gates, w_ss, dy = _inputs(2, 3, 5, 4, torch.float64, scale=1.0)
    y = reference(gates, w_ss)
    y_lit = diagonal_lstm_literal(gates, w_ss)
    assert torch.equal(y, y_lit)
    for a, b in zip(torch.autograd.grad(y, (gates, w_ss), dy), torch.autograd.grad(y_lit, (gates, w_ss), dy)):
        assert torch.equal(a, b)


def test_pixel_recurrence():
    """The skewed scan is the LSTM over (pixel above, pixel left) in raster order."""
    n, hid, h, w = 2, 3, 4, 5
    gates, w_ss, _ = _inputs(n, hid, h, w, torch.float64)
    gates, w_ss = gates.detach(), w_ss.detach()
    hs = torch.zeros(n, hid, h + 1, w + 1, dtype=torch.float64)
    cs = torch.zeros_like(hs)
    for i in range(h):
        for j in range(w):
            a = gates[:, :, i, j] + hs[:, :, i, j + 1] @ w_ss[..., 0].T + hs[:, :, i + 1, j] @ w_ss[..., 1].T
            a_i, a_f, a_o, a_g = a.chunk(4, dim=1)
            cs[:, :, i + 1, j + 1] = torch.sigmoid(a_f) * cs[:, :, i + 1, j] + torch.sigmoid(a_i) * torch.tanh(a_g)
            hs[:, :, i + 1, j + 1] = torch.sigmoid(a_o) * torch.tanh(cs[:, :, i + 1, j + 1])
    torch.testing.assert_close(reference(gates, w_ss), hs[:, :, 1:, 1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_reverse_is_flip(backend):
    gates, w_ss, _ = _inputs(2, 3, 4, 5, torch.float64)
    y = diagonal_lstm(gates, w_ss, reverse=True, backend=backend)
    y_flip = diagonal_lstm(gates.flip(-1), w_ss, backend=backend).flip(-1)
    torch.testing.assert_close(y, y_flip, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="gm._C not built")
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradcheck_cpu(reverse):
    gates, w_ss, _ = _inputs(2, 2, 3, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda g, w: diagonal_lstm(g, w, reverse=reverse, backend="cpu"), (gates, w_ss))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "triton")])
def test_opcheck(backend):
    """The fake implementation matches each backend's real outputs, the triton state's (N, 5h, H, W) channels-last
    layout included."""
    gates, w_ss, _ = _inputs(2, 2, 3, 4, torch.float64)
    torch.library.opcheck(torch.ops.gm.diagonal_lstm.default, (gates, w_ss, True, backend))


def test_empty_batch():
    gates, w_ss, _ = _inputs(0, 2, 3, 4, torch.float64)
    y = diagonal_lstm(gates, w_ss, backend="reference")
    assert y.shape == (0, 2, 3, 4)


def test_bad_input():
    g = torch.randn(2, 12, 4, 4)
    w = torch.randn(12, 3, 2)
    with pytest.raises(ValueError, match="gates must have 4h = 12"):
        diagonal_lstm(torch.randn(2, 8, 4, 4), w)
    with pytest.raises(ValueError, match=r"w_ss must have shape \(4h, h, 2\)"):
        diagonal_lstm(g, torch.randn(12, 3, 3))
    with pytest.raises(ValueError, match=r"w_ss must have shape \(4h, h, 2\)"):
        diagonal_lstm(g, torch.randn(12, 4, 2))
    with pytest.raises(ValueError, match="w_ss has dtype"):
        diagonal_lstm(g, w.double())
    with pytest.raises(ValueError, match="gates must have 4 dimensions"):
        diagonal_lstm(g[0], w)
    with pytest.raises(ValueError, match="reverse must be a bool"):
        diagonal_lstm(g, w, reverse=1)
    with pytest.raises(ValueError, match="gates must have dtype"):
        diagonal_lstm(g.int(), w)
    with pytest.raises(ValueError, match="backend must be one of"):
        diagonal_lstm(g, w, backend="tpu")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="gm._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_cpu_half_scans_in_float32(dtype, reverse, monkeypatch):
    """16-bit inputs on the cpu backend (a model under --precision bf16 on a CPU) are widened and scanned in float32:
    output and gradients in the input dtype, within its tolerance of the float64 reference; the saved state is
    [c, float32 h], which the fake implementation reports too (opcheck)."""
    gates, w_ss, dy = _inputs(2, 3, 5, 4, dtype)
    poison_empty(monkeypatch)
    _check("cpu", gates, w_ss, dy, reverse, dtype, CPU)
    op = torch.ops.gm.diagonal_lstm.default
    torch.library.opcheck(op, (gates.detach(), w_ss.detach(), reverse, "cpu"), test_utils=("test_faketensor",))


# ------------------------------------------------------------------------------------------------------------
# GPU: cuda and triton at realistic-but-small sizes, float32 and bfloat16 (skipped without a GPU).

GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in fast_backends(torch.device("cuda"))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize(("n", "hid", "h", "w"), [(3, 32, 16, 16), (2, 64, 11, 13), (2, 5, 7, 3), (2, 100, 9, 5),
                                                  (1, 40, 37, 5)])
def test_gpu_matches_reference(backend, dtype, reverse, n, hid, h, w, monkeypatch):
    cuda = torch.device("cuda")
    gates, w_ss, dy = _inputs(n, hid, h, w, dtype, device=cuda, scale=1.0 / hid**0.5)
    poison_empty(monkeypatch)
    _check(backend, gates, w_ss, dy, reverse, dtype, cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("index", range(5))
def test_gpu_triton_every_config(dtype, reverse, index):
    """Each autotune config of the Triton kernels (unit blocks, channel chunks, pipelining depth), not only the
    first one (the GPU tests launch the first config when autotuning is off)."""
    from gm.kernels import diagonal_lstm as k  # noqa: PLC0415

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    fwd_cfg = k._FWD_CONFIGS[index % len(k._FWD_CONFIGS)]
    bwd_cfg = k._BWD_CONFIGS[index % len(k._BWD_CONFIGS)]
    cuda = torch.device("cuda")
    gates, w_ss, dy = _inputs(2, 72, 11, 13, dtype, device=cuda, scale=1.0 / 72**0.5)
    gates, w_ss = gates.detach(), w_ss.detach()
    y, state = k.forward(gates, w_ss, reverse, config=fwd_cfg)
    dgates = k.backward(dy, w_ss, state, reverse, config=bwd_cfg)
    ref = _ref_and_grads(gates, w_ss, dy, reverse)
    assert_rel(y, ref[0], dtype, f"h {fwd_cfg}", device=cuda)
    assert_rel(dgates, ref[1], dtype, f"dgates {bwd_cfg}", device=cuda)
    assert_rel(weight_grad(dgates, y, reverse).to(dtype), ref[2], dtype, f"dw_ss {bwd_cfg}", device=cuda)


@pytest.mark.gpu
def test_gpu_auto_picks_triton(monkeypatch):
    gates = torch.randn(2, 16, 5, 6, device="cuda")
    w_ss = 0.1 * torch.randn(16, 4, 2, device="cuda")

    def call(mod):
        assert mod.diagonal_lstm(gates, w_ss).shape == (2, 4, 5, 6)

    assert_auto_picks_triton("gm.ops.diagonal_lstm", call, monkeypatch)


def test_auto_picks_cuda_scans_only_where_they_run():
    """Auto's cuda test: CUDA tensors of float16/bfloat16/float32 whose scan fits the GPU's shared memory; CPU
    tensors and float64 never (the cuda scans do not take float64)."""
    from gm.ops.diagonal_lstm import cuda_auto_ok  # noqa: PLC0415

    assert not cuda_auto_ok(torch.randn(1, 8, 4, 4), 2)
    if torch.cuda.is_available():
        g = torch.randn(1, 256, 32, 32, device="cuda")
        assert cuda_auto_ok(g, 64) and cuda_auto_ok(g.bfloat16(), 64)
        assert not cuda_auto_ok(g.double(), 64)
        assert not cuda_auto_ok(torch.randn(1, 4 * 256, 128, 1, device="cuda"), 256)


def test_cuda_gate_pixel_stride():
    """gm.ops._lstm_cuda.pixel_stride, the gate_stride the cuda scans take: 4h for a direction's own
    channels-last gates, 8h for its half of a DiagonalBiLSTM's (N, H, W, 8h) tensor, whatever strides torch gives
    size-1 dimensions; layouts whose pixels are not evenly spaced are refused by name."""
    from gm.ops._lstm_cuda import pixel_stride  # noqa: PLC0415

    for n, h, w in ((2, 3, 4), (1, 3, 4), (2, 1, 4), (2, 3, 1)):
        both = torch.empty(n, 8 * 5, h, w).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        assert pixel_stride(both[..., :20], "gates") == 40 and pixel_stride(both[..., 20:], "gates") == 40
        assert pixel_stride(torch.empty(n, h, w, 20), "gates") == 20
    assert pixel_stride(torch.empty(1, 40, 1, 1).permute(0, 2, 3, 1)[..., 20:], "gates") >= 20  # one pixel: any
    assert pixel_stride(torch.empty(2, 3, 8, 20)[:, :, ::2], "gates") == 40  # every other pixel: evenly spaced
    with pytest.raises(ValueError, match="dgates must be channels-last"):
        pixel_stride(torch.empty(2, 20, 3, 4).permute(0, 2, 3, 1), "dgates")  # NCHW storage
    with pytest.raises(ValueError, match="gates must be channels-last"):
        pixel_stride(torch.empty(2, 3, 5, 20)[:, :, :4], "gates")  # rows of 4 pixels 5 apart


HALVES_CASES = [(2, 3, 5, 4), (1, 3, 1, 6), (2, 4, 6, 1), (1, 5, 3, 3), (3, 17, 9, 7)]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n", "hid", "h", "w"), HALVES_CASES)
def test_channels_last_halves_equal_op(backend, dtype, n, hid, h, w):
    """The channels-last scans (FORWARD_CHANNELS_LAST / BACKWARD_CHANNELS_LAST) on each direction's half of one
    (N, H, W, 8h) tensor (pixel stride 8h: gm.nn.DiagonalBiLSTM's one-node path) give the op's backend's bits: y,
    dgates (written into their half only, the other half untouched) and dw_ss; on triton the state too. The cpu
    ones' backward reads c and the pre-activations the forward kept in its state, in the scan's packed layout (the
    gates are not passed to it), where the op's gathers the gates and recomputes the pre-activations: the same
    values."""
    ops = importlib.import_module("gm.ops.diagonal_lstm")  # the module (gm.ops.diagonal_lstm is also the op)
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend} is not available")
    if backend == "triton" and (dtype == torch.float64 or hid > 5):
        pytest.skip("triton: float32/bfloat16 and the small cases (interpreter time)")
    forward_cl, backward_cl = ops.FORWARD_CHANNELS_LAST[backend], ops.BACKWARD_CHANNELS_LAST[backend]
    forward_op, backward_op = (ops._cpu_forward, ops._cpu_backward) if backend == "cpu" else (
        ops._triton_forward, ops._triton_backward)  # fmt: skip
    torch.manual_seed(0)
    g8 = torch.randn(n, h, w, 8 * hid).to(dtype)
    dg8 = torch.full((n, h, w, 8 * hid), float("nan"), dtype=dtype)
    for half, reverse in ((0, False), (1, True)):
        part = slice(4 * hid * half, 4 * hid * (half + 1))
        w_ss = (0.5 * torch.randn(4 * hid, hid, 2)).to(dtype)
        dy = torch.randn(n, h, w, hid).to(dtype)
        y, state = forward_cl(g8[..., part], w_ss, reverse)
        gates = g8[..., part].permute(0, 3, 1, 2).contiguous()
        y_ref, state_ref = forward_op(gates, w_ss, reverse)
        assert y.shape == (n, h, w, hid) and y.dtype == dtype and torch.equal(y.permute(0, 3, 1, 2), y_ref)
        if backend == "triton":
            assert torch.equal(state.permute(0, 3, 1, 2), state_ref)
        dw = backward_cl(dy, dg8[..., part], w_ss, y, state, reverse)
        dg_ref, dw_ref = backward_op(dy.permute(0, 3, 1, 2).contiguous(), gates, w_ss, y_ref, state_ref, reverse)
        assert torch.equal(dg8[..., part].permute(0, 3, 1, 2), dg_ref) and torch.equal(dw, dw_ref)
        assert dw.dtype == dtype
        if half == 0:
            assert dg8[..., 4 * hid :].isnan().all()
