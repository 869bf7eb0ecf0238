"""diagonal_lstm: PixelRNN's Diagonal LSTM scan (van den Oord et al. 2016, Sec. 3.2), one direction.

For each pixel (i, j), scanning the image along its diagonals (j - i constant... i.e. skewed columns t = i + j):
    [i, f, o, g] = gates[:, :, i, j] + w_ss[..., 0] @ h[:, :, i-1, j] + w_ss[..., 1] @ h[:, :, i, j-1]
    c[i, j] = sigmoid(f) * c[i, j-1] + sigmoid(i) * tanh(g);   h[i, j] = sigmoid(o) * tanh(c[i, j])
with h and c zero outside the image (above row 0 and left of column 0). This is DESIGN.md's definition (skew the
gates with zero fill, run the LSTM over the W+H-1 skewed columns with s[:, :, i] = w_up @ h_{t-1}[i-1] +
w_left @ h_{t-1}[i], unskew): in skewed coordinates h_{t-1}[i-1] is the pixel above and h_{t-1}[i] the pixel to
the left. "Zero state outside the image" is exact, not an approximation: run literally on the zero-filled skewed
gates, cells left of a row's start stay exactly (0, 0) (a fixed point of the cell) and cells right of a row's
end never reach a pixel of the image, so every backend zeroes (or skips) them and agrees with the literal
recurrence on every output and gradient (tests/ops/test_diagonal_lstm.py checks this bit for bit).
reverse=True scans right to left: diagonal_lstm(gates.flip(-1), w_ss).flip(-1), by addressing (no copy).

The cpu, cuda and triton scans also run channels-last, outside the op (FORWARD_CHANNELS_LAST / BACKWARD_CHANNELS_LAST):
gates and gate gradients (N, H, W, 4h) with pixels possibly further apart (a direction's half of gm.nn.DiagonalBiLSTM's
(N, H, W, 8h) input conv output), y and dy (N, H, W, h), for the layer's one-node path, whose convolutions take
channels-last operands as they are.
"""

from __future__ import annotations

import torch

from gm._backend import resolve
from gm._checks import check_same, check_tensor
from gm._ext import device_guard, dtype_code, ext, stream_of
from gm.ops._eager import EagerOp, backward_call
from gm.ops._lstm_cuda import cuda_scan_ok, diagonal_fits, pack_weights, pixel_stride, precision, to_nchw, to_nhwc

_OP = "gm::diagonal_lstm"


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The cell state (and accumulation) dtype: float32 for half types and float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_grad(dgates: torch.Tensor, y: torch.Tensor, reverse: bool, gate_stride: int = 0) -> torch.Tensor:
    """The triton backend's dw_ss (4h, h, 2), float32 (float64 for float64) = sum over pixels of dgates (x) (h above,
    h left): the row scan's weight-gradient GEMM kernel with the diagonal's up/left taps, on NCHW operands
    (gate_stride 0), else on channels-last ones (its CL variant): dgates (N, H, W, 4h) with pixels gate_stride apart
    and y (N, H, W, h)."""
    from gm.kernels import row_lstm as kr  # noqa: PLC0415

    return kr.weight_grad(dgates, y.contiguous(), None, 2, taps=2 if reverse else 1, gate_stride=gate_stride)


# ----------------------------------------------------------------------------------------------------------------
# Backends: forward -> (y, state), backward (given the forward's state) -> (dgates, dw_ss). The state is what the
# backend's backward reads besides y: the cell state c (N, h, H, W) contiguous; for the cpu backend on 16-bit inputs
# (N, 2h, H, W) = [c, y in float32] (it scans in float32, and its backward recomputes from the unrounded h); for triton
# and cuda (N, 5h, H, W) channels-last [c and the four gate activations] (state_shape()).


def state_shape(gates: torch.Tensor, backend: str) -> tuple[tuple[int, ...], bool]:
    """(shape, channels_last) of the forward's state output on `backend`."""
    n, g4, height, width = gates.shape
    if backend in ("triton", "cuda"):
        return (n, 5 * (g4 // 4), height, width), True
    if backend == "cpu" and gates.dtype in (torch.float16, torch.bfloat16):
        return (n, 2 * (g4 // 4), height, width), False
    return (n, g4 // 4, height, width), False


def _reference_forward(gates, w_ss, reverse):
    from gm.reference.diagonal_lstm import diagonal_lstm_with_cell  # noqa: PLC0415

    y, c = diagonal_lstm_with_cell(gates, w_ss, reverse=reverse)
    return y, c.contiguous()


def _reference_backward(grad, gates, w_ss, y, c, reverse):
    from gm.reference.diagonal_lstm import diagonal_lstm  # noqa: PLC0415

    # Autograd is switched off below a custom op; torch.func's vjp transform still differentiates.
    _, vjp = torch.func.vjp(lambda g, w: diagonal_lstm(g, w, reverse=reverse), gates, w_ss)
    return vjp(grad)


def _ptr_args(*tensors):
    return [t.data_ptr() for t in tensors]


def _cpu_forward(gates, w_ss, reverse):
    """The C++ scan in float32/float64; 16-bit inputs are widened once and scanned in float32 (the state is float32
    anyway), their float32 h kept beside c for the backward."""
    sdt = state_dtype(gates.dtype)
    g, w = gates.to(sdt).contiguous(), w_ss.to(sdt).contiguous()
    n, g4, height, width = g.shape
    y = torch.empty(n, g4 // 4, height, width, dtype=sdt)
    c = torch.empty_like(y)
    ext().diagonal_lstm_forward_cpu(*_ptr_args(g, w, y, c), 0, n, g4 // 4, height, width, reverse, dtype_code(y),
                                    0, 0, 0, 0)  # fmt: skip
    if sdt == gates.dtype:
        return y, c
    return y.to(gates.dtype), torch.cat([c, y], dim=1)


def _cpu_backward(grad, gates, w_ss, y, c, reverse):
    n, g4, height, width = gates.shape
    sdt = state_dtype(gates.dtype)
    if sdt != gates.dtype:  # widened: the state holds [c, float32 h]
        c, y = c[:, : g4 // 4].contiguous(), c[:, g4 // 4 :].contiguous()
    g, w, d = gates.to(sdt).contiguous(), w_ss.to(sdt).contiguous(), grad.to(sdt).contiguous()
    dgates = torch.empty_like(g)
    dw = torch.empty_like(w)
    ext().diagonal_lstm_backward_cpu(
        d.data_ptr(), g.data_ptr(), 0, *_ptr_args(w, y, c, dgates, dw), n, g4 // 4, height, width, reverse,
        dtype_code(g), 0, 0, 0, 0, 0,
    )  # fmt: skip
    return dgates.to(gates.dtype), dw.to(w_ss.dtype)


def _triton_forward(gates, w_ss, reverse):
    from gm.kernels import diagonal_lstm as k  # noqa: PLC0415

    return k.forward(gates, w_ss, reverse)


def _triton_backward(grad, gates, w_ss, y, c, reverse):
    from gm.kernels import diagonal_lstm as k  # noqa: PLC0415

    dgates = k.backward(grad, w_ss, c, reverse)
    return dgates, weight_grad(dgates, y, reverse).to(w_ss.dtype)


def _scan_forward(gates: torch.Tensor, w_ss: torch.Tensor, reverse: bool, stream: int):
    """(y (N, H, W, h), state (N, H, W, 5h) float32) of the cuda scan on channels-last gates (N, H, W, 4h), whose
    pixels may lie further apart than 4h (a direction's half of the layer's (N, H, W, 8h) conv output), under the
    caller's device guard, on `stream`."""
    prec = precision(gates.dtype, "diagonal_lstm")
    n, height, width, g4 = gates.shape
    hid = g4 // 4
    y = torch.empty(n, height, width, hid, dtype=gates.dtype, device=gates.device)
    state = torch.empty(n, height, width, 5 * hid, dtype=torch.float32, device=gates.device)
    # held until the launch is queued; the backward's form is kept for the backward
    a_pack, _ = pack_weights(w_ss, gates.dtype, fresh=True)
    ext().diagonal_lstm_forward_cuda(
        gates.data_ptr(), a_pack.data_ptr(), y.data_ptr(), state.data_ptr(),
        n, hid, height, width, reverse, pixel_stride(gates, "gates"), dtype_code(gates), prec, stream,
    )  # fmt: skip
    return y, state


def _scan_backward(dy: torch.Tensor, dgates: torch.Tensor, w_ss: torch.Tensor, reverse: bool, state, stream: int):
    """The cuda backward scan: dgates (N, H, W, 4h), channels-last with pixels possibly further apart (as
    _scan_forward's gates), written from dy (N, H, W, h) contiguous and the forward's state."""
    _, a_pack = pack_weights(w_ss, dgates.dtype, fresh=False)  # the forward's pack, unless w_ss changed since
    n, height, width, g4 = dgates.shape
    ext().diagonal_lstm_backward_cuda(
        dy.data_ptr(), a_pack.data_ptr(), state.data_ptr(), dgates.data_ptr(),
        n, g4 // 4, height, width, reverse, pixel_stride(dgates, "dgates"), dtype_code(dgates),
        precision(dgates.dtype, "diagonal_lstm"), stream,
    )  # fmt: skip


def _scan_weight_grad(dgates, y, w_ss, reverse: bool, n: int, height: int, width: int, gate_stride: int,
                      stream: int) -> torch.Tensor:  # fmt: skip
    """dw_ss in w_ss's dtype from the cuda backward's dgates and the forward's y: gate_stride 0, both NCHW; else
    both channels-last (N, H, W, *), dgates' pixels gate_stride apart."""
    dw = torch.empty(w_ss.shape, dtype=torch.float32, device=dgates.device)
    ext().diagonal_lstm_weight_grad_cuda(
        dgates.data_ptr(), y.data_ptr(), dw.data_ptr(), n, w_ss.shape[1], height, width, reverse, gate_stride,
        dtype_code(dgates), precision(dgates.dtype, "diagonal_lstm"), torch.are_deterministic_algorithms_enabled(),
        stream,
    )  # fmt: skip
    return dw.to(w_ss.dtype)


def _cuda_forward(gates, w_ss, reverse):
    with device_guard(gates):  # launch (and set kernel attributes) on the tensors' GPU, all on one stream
        stream = stream_of(gates)
        # no copy when the producer wrote channels-last
        y, state = _scan_forward(to_nhwc(gates, stream), w_ss, reverse, stream)
        y = to_nchw(y, stream)  # NCHW (the op's output), by the tiled transpose
    return y, state.permute(0, 3, 1, 2)


def _cuda_backward(grad, gates, w_ss, y, state, reverse):
    n, g4, height, width = gates.shape
    dgates = torch.empty(n, height, width, g4, dtype=gates.dtype, device=gates.device)
    with device_guard(gates):
        stream = stream_of(gates)
        _scan_backward(to_nhwc(grad.to(gates.dtype), stream), dgates, w_ss, reverse, state.permute(0, 2, 3, 1),
                       stream)  # fmt: skip
        dgates = to_nchw(dgates, stream)  # NCHW, as the op returns it and the weight gradient reads it
        dw = _scan_weight_grad(dgates, y.contiguous(), w_ss, reverse, n, height, width, 0, stream)
    return dgates, dw


def cuda_forward_channels_last(gates: torch.Tensor, w_ss: torch.Tensor, reverse: bool):
    """The cuda scan on channels-last gates (N, H, W, 4h), their pixels possibly further apart than 4h: (y (N, H, W,
    h), state (N, H, W, 5h) float32). gm.nn.DiagonalBiLSTM's one-node path passes each direction's half of its
    input conv's (N, H, W, 8h) output as it is, and keeps y channels-last: no layout conversion."""
    with device_guard(gates):
        return _scan_forward(gates, w_ss, reverse, stream_of(gates))


def cuda_backward_channels_last(dy: torch.Tensor, dgates: torch.Tensor, w_ss: torch.Tensor, y: torch.Tensor,
                                state: torch.Tensor, reverse: bool) -> torch.Tensor:  # fmt: skip
    """The backward of cuda_forward_channels_last: writes dgates (N, H, W, 4h) (channels-last, pixels possibly
    further apart: a direction's half of the layer's (N, H, W, 8h) gate gradients) from dy and y (N, H, W, h)
    contiguous, and returns dw_ss in w_ss's dtype from them (the weight gradient reading channels-last operands)."""
    n, height, width, _ = dgates.shape
    with device_guard(dgates):
        stream = stream_of(dgates)
        _scan_backward(dy.contiguous(), dgates, w_ss, reverse, state, stream)
        return _scan_weight_grad(dgates, y.contiguous(), w_ss, reverse, n, height, width,
                                 pixel_stride(dgates, "dgates"), stream)  # fmt: skip


def triton_forward_channels_last(gates: torch.Tensor, w_ss: torch.Tensor, reverse: bool):
    """cuda_forward_channels_last on the triton scan (diagonal_lstm_fwd_kernel with the gates' pixel stride), the same
    layouts: gates (N, H, W, 4h), pixels possibly further apart than 4h, read in place; (y (N, H, W, h) in gates'
    dtype, state (N, H, W, 5h) in the state dtype)."""
    from gm.kernels import diagonal_lstm as k  # noqa: PLC0415

    return k.forward_channels_last(gates, w_ss, reverse, pixel_stride(gates, "gates"))


def triton_backward_channels_last(dy: torch.Tensor, dgates: torch.Tensor, w_ss: torch.Tensor, y: torch.Tensor,
                                  state: torch.Tensor, reverse: bool) -> torch.Tensor:  # fmt: skip
    """cuda_backward_channels_last on the triton scan: writes dgates (N, H, W, 4h) (pixels possibly further apart)
    from dy and y (N, H, W, h) and the forward's state, and returns dw_ss in w_ss's dtype (the weight gradient's
    channels-last variant, row_lstm_wgrad_kernel with CL and the diagonal taps)."""
    from gm.kernels import diagonal_lstm as k  # noqa: PLC0415

    gate_stride = pixel_stride(dgates, "dgates")
    k.backward_into(dy.contiguous(), dgates, w_ss, state, reverse, gate_stride)
    return weight_grad(dgates, y, reverse, gate_stride).to(w_ss.dtype)


_PACKED = -1  # the C++ scan's own layout of a state part (csrc/diagonal_lstm/diagonal_lstm_cpu.cpp: Planes)


def _cpu_state_parts(state: torch.Tensor, n: int, hid: int, hw: int) -> tuple[torch.Tensor, ...]:
    """(c, z[, h]) of cpu_forward_channels_last's state (one flat tensor): c and z in the scan's packed layout, the
    float32 h of 16-bit inputs as a contiguous (N, H, W, h) block."""
    sizes = [n * hid * hw, n * 4 * hid * hw] + ([n * hid * hw] if state.numel() > 5 * n * hid * hw else [])
    return state.split(sizes)


def cpu_forward_channels_last(gates: torch.Tensor, w_ss: torch.Tensor, reverse: bool):
    """cuda_forward_channels_last on the C++ scan: gates (N, H, W, 4h), pixels possibly further apart than 4h, read in
    place in float32/float64 (16-bit gates are widened once and scanned in float32, as by the op); (y (N, H, W, h) in
    gates' dtype, state). The state, one flat tensor in the state dtype (state_dtype), holds c and z, the
    pre-activations gates + W h (the backward reads them instead of gathering the gates again and recomputing W h,
    one of its three GEMMs), both in the scan's packed layout (each skewed column's channels lane-major, as the
    scan's row buffers hold them: a copy per channel in and out, no transpose), and for 16-bit gates the float32 h."""
    sdt = state_dtype(gates.dtype)
    widened = gates.dtype != sdt
    g = gates.to(sdt) if widened else gates  # the widened copy is a dense (N, H, W, 4h) tensor
    w = w_ss.to(sdt).contiguous()
    n, height, width, g4 = g.shape
    hid, hw = g4 // 4, height * width
    state = torch.empty((6 if widened else 5) * n * hid * hw, dtype=sdt)
    parts = _cpu_state_parts(state, n, hid, hw)
    y = (parts[2] if widened else torch.empty(n * hid * hw, dtype=sdt)).view(n, height, width, hid)
    ext().diagonal_lstm_forward_cpu(
        g.data_ptr(), w.data_ptr(), y.data_ptr(), parts[0].data_ptr(), parts[1].data_ptr(), n, hid, height, width,
        reverse, dtype_code(state), pixel_stride(g, "gates"), hid, _PACKED, _PACKED,
    )  # fmt: skip
    return (y.to(gates.dtype) if widened else y), state


def cpu_backward_channels_last(dy: torch.Tensor, dgates: torch.Tensor, w_ss: torch.Tensor, y: torch.Tensor,
                               state: torch.Tensor, reverse: bool) -> torch.Tensor:  # fmt: skip
    """The backward of cpu_forward_channels_last: writes dgates (N, H, W, 4h) (channels-last, pixels possibly further
    apart) from dy (N, H, W, h), the forward's y and state, and returns dw_ss in w_ss's dtype."""
    n, height, width, g4 = dgates.shape
    hid, hw = g4 // 4, height * width
    sdt = state.dtype
    widened = dgates.dtype != sdt
    parts = _cpu_state_parts(state, n, hid, hw)
    h = parts[2] if widened else y.contiguous()  # the backward reads the unrounded h, as the op's
    d, w = dy.to(sdt).contiguous(), w_ss.to(sdt).contiguous()
    dg = torch.empty(n, height, width, g4, dtype=sdt) if widened else dgates
    dw = torch.empty(w.shape, dtype=sdt)
    ext().diagonal_lstm_backward_cpu(
        d.data_ptr(), 0, parts[1].data_ptr(), w.data_ptr(), h.data_ptr(), parts[0].data_ptr(), dg.data_ptr(),
        dw.data_ptr(), n, hid, height, width, reverse, dtype_code(dw), pixel_stride(dg, "dgates"), hid, _PACKED, hid,
        _PACKED,
    )  # fmt: skip
    if widened:
        dgates.copy_(dg)
    return dw.to(w_ss.dtype)


# The channels-last scans by backend, for gm.nn.DiagonalBiLSTM's one-node path.
FORWARD_CHANNELS_LAST = {
    "cpu": cpu_forward_channels_last,
    "cuda": cuda_forward_channels_last,
    "triton": triton_forward_channels_last,
}
BACKWARD_CHANNELS_LAST = {
    "cpu": cpu_backward_channels_last,
    "cuda": cuda_backward_channels_last,
    "triton": triton_backward_channels_last,
}


_FORWARD = {"reference": _reference_forward, "cpu": _cpu_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {
    "reference": _reference_backward,
    "cpu": _cpu_backward,
    "triton": _triton_backward,
    "cuda": _cuda_backward,
}


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration.


def _diagonal_lstm_impl(gates: torch.Tensor, w_ss: torch.Tensor, reverse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, g4, height, width = gates.shape
    if n * height * width == 0:
        shape, channels_last = state_shape(gates, backend)
        state = gates.new_zeros(shape, dtype=state_dtype(gates.dtype))
        return gates.new_zeros(n, g4 // 4, height, width), (
            state.contiguous(memory_format=torch.channels_last) if channels_last else state
        )
    # triton and cuda read gates through their own channels-last copies, which take a channel slice (DiagonalBiLSTM's
    # chunk of one 8h conv output) as it is; the other backends read NCHW-contiguous gates
    y, state = _FORWARD[backend](gates if backend in ("triton", "cuda") else gates.contiguous(), w_ss.contiguous(),
                                 reverse)  # fmt: skip
    return y.contiguous(), state  # the state in its backend's layout (state_shape): the backward reads it as is


_diagonal_lstm_op = torch.library.custom_op(_OP, _diagonal_lstm_impl, mutates_args=())


@_diagonal_lstm_op.register_fake
def _(gates, w_ss, reverse, backend):
    n, g4, height, width = gates.shape
    y = gates.new_empty(n, g4 // 4, height, width)
    shape, channels_last = state_shape(gates, backend)
    state = gates.new_empty(shape, dtype=state_dtype(gates.dtype))
    return y, (state.contiguous(memory_format=torch.channels_last) if channels_last else state)


def _diagonal_lstm_backward_impl(
    grad: torch.Tensor, gates: torch.Tensor, w_ss: torch.Tensor, y: torch.Tensor, c: torch.Tensor, reverse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if gates.numel() == 0:
        return torch.zeros_like(gates), torch.zeros_like(w_ss)
    # triton and cuda take grad in any layout (they read it through a channels-last copy)
    grad = grad if backend in ("triton", "cuda") else grad.contiguous()
    fused = backend in ("triton", "cuda")  # they read only gates' shape and dtype here
    dgates, dw = _BACKWARD[backend](grad, gates if fused else gates.contiguous(), w_ss.contiguous(), y, c, reverse)
    return dgates.contiguous(), dw.contiguous()


_diagonal_lstm_backward_op = torch.library.custom_op(_OP + "_backward", _diagonal_lstm_backward_impl, mutates_args=())


@_diagonal_lstm_backward_op.register_fake
def _(grad, gates, w_ss, y, c, reverse, backend):
    return gates.new_empty(gates.shape), w_ss.new_empty(w_ss.shape)


def _setup_context(ctx, inputs, output):
    gates, w_ss, reverse, backend = inputs
    y, c = output
    ctx.save_for_backward(gates, w_ss, y, c)
    ctx.reverse, ctx.backend = reverse, backend
    ctx.mark_non_differentiable(c)


def _backward(ctx, grad_y, grad_c):
    gates, w_ss, y, c = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    dgates, dw = backward_call(ctx, _diagonal_lstm_backward_op, _diagonal_lstm_backward_impl, grad_y, gates, w_ss, y,
                               c, ctx.reverse, ctx.backend)  # fmt: skip
    need_g, need_w = ctx.needs_input_grad[:2]
    return (dgates if need_g else None), (dw if need_w else None), None, None


_diagonal_lstm_op.register_autograd(_backward, setup_context=_setup_context)
_DIAGONAL_LSTM = EagerOp(_diagonal_lstm_op, _diagonal_lstm_impl, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------------------------
# Public function.


def check_diagonal_lstm_args(gates, w_ss, reverse) -> None:
    check_tensor("gates", gates, ndim=4)
    check_tensor("w_ss", w_ss, ndim=3)
    check_same("gates", gates, w_ss=w_ss)
    g4, hid, taps = w_ss.shape
    if taps != 2 or g4 != 4 * hid:
        raise ValueError(f"w_ss must have shape (4h, h, 2) (gates i, f, o, g; taps above, left), got {tuple(w_ss.shape)}")
    if hid == 0:
        raise ValueError("w_ss must have h >= 1 hidden units, got shape (0, 0, 2)")
    if gates.shape[1] != g4:
        raise ValueError(
            f"gates must have 4h = {g4} channels to match w_ss {tuple(w_ss.shape)}, got {gates.shape[1]} "
            f"(gates shape {tuple(gates.shape)})"
        )
    if not isinstance(reverse, bool):
        raise ValueError(f"reverse must be a bool, got {reverse!r}")


def cuda_auto_ok(gates: torch.Tensor, hid: int) -> bool:
    """Whether auto may pick the cuda scans for these gates (gm.ops._lstm_cuda.cuda_scan_ok): hidden size and height
    within the kernels' shared memory on the gates' GPU."""
    height, elem = int(gates.shape[2]), gates.element_size()
    return cuda_scan_ok(gates, hid, lambda index: diagonal_fits(int(hid), height, elem, index))


def scan_backend(backend: str | None, t: torch.Tensor, hid: int) -> str:
    """The backend diagonal_lstm runs on for gates like `t` (same device, dtype and image size; gm.nn.DiagonalBiLSTM's
    one-node path passes its input): auto takes the backend a benchmark run measured fastest for diagonal_lstm in
    that dtype on this GPU model (gm._backend.measured_pick) where the cuda scans can run, else the cuda
    (tensor-core) scans where they run, the triton ones otherwise. On an H200 the DiagonalBiLSTM layer (N=32, h=64,
    32x32) ran 5.86 / 4.71 ms fwd+bwd on cuda against 6.97 / 7.49 on triton (fp32 / bf16,
    bench/results/2026-11-28_run3_nvidia-h200.jsonl), the Triton launches costing that host more than the kernels.
    (cuda_auto_ok reads the GPU's properties: only asked when auto chooses.)"""
    auto_cuda = backend is None and cuda_auto_ok(t, hid)
    return resolve(backend, t.device, native_cpu=True, cuda_kernels=auto_cuda, op="diagonal_lstm", dtype=t.dtype)


def diagonal_lstm(
    gates: torch.Tensor, w_ss: torch.Tensor, *, reverse: bool = False, backend: str | None = None
) -> torch.Tensor:
    """Diagonal LSTM scan of PixelRNN over an image, one direction (fused: one kernel launch per pass).

    Args:
        gates: (N, 4h, H, W) input-to-state result (bias included), gate order i, f, o, g, any memory format;
            float16/bfloat16/float32/float64 (the cpu backend scans 16-bit inputs in float32; the cuda backend, on
            tensor cores: float16/bfloat16/float32). State is float32 (float64 for float64).
        w_ss: (4h, h, 2) state-to-state weights, tap 0 for the pixel above, tap 1 for the pixel to the left
            (to the right when reverse). Same dtype and device as gates.
        reverse: scan right to left (≡ flip the width, scan, flip back).
        backend: None (auto: "cuda" for CUDA tensors where gm._C has CUDA kernels, the dtype is 16-bit or float32
            and the scan fits the GPU's shared memory, else "triton"; "cpu" for CPU ones), "reference", "cpu",
            "triton" or "cuda".

    Returns:
        h (N, h, H, W), gates' dtype.

    Example:
        >>> g = torch.randn(2, 4 * 16, 8, 8); w = torch.randn(64, 16, 2) * 0.1
        >>> diagonal_lstm(g, w).shape
        torch.Size([2, 16, 8, 8])
    """
    check_diagonal_lstm_args(gates, w_ss, reverse)
    chosen = scan_backend(backend, gates, w_ss.shape[1])
    return _DIAGONAL_LSTM(gates, w_ss, reverse, chosen)[0]
