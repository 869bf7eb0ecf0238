"""row_lstm: the Row LSTM scan of PixelRNN (van den Oord et al. 2016, section 3.1), forward and backward.

gates (N, 4h, H, W) is the input-to-state result (bias included), gate order i, f, o, g; w_ss (4h, h, k), k odd.
For each row r, top to bottom:
    s = conv1d(h_{r-1}, w_ss, padding=k // 2);  [i, f, o, g] = gates[:, :, r] + s
    c_r = sigmoid(f) c_{r-1} + sigmoid(i) tanh(g);  h_r = sigmoid(o) tanh(c_r)
with h_{-1} = h0 (or 0), c_{-1} = c0 (or 0), both (N, h, W). Returns h (N, h, H, W).

The forward saves the h of every row in the state dtype (float32; float64 for float64 inputs), (N, h, H, W); for
float32/float64 inputs that is the output itself, for bfloat16/float16 a float32 copy, so the backward sees the exact
state the forward used rather than its rounded output. What else it saves depends on the backend: the cpu backend
keeps c (N, h, H, W) and its backward recomputes each row's gate pre-activations from h_{r-1} (one extra
(4h x hk) @ (hk x W) product per row); the triton and cuda backends keep cs (N, 5h, H, W) = [c and the four gate
activations], so their backwards recompute nothing (half the per-row dots and weight stream, for 4h more values per
pixel of memory).

The cuda scans also run channels-last, outside the op: cuda_forward_channels_last / cuda_backward_channels_last take
gates and gate gradients (N, H, W, 4h) (pixels possibly further apart, a channel slice of a wider tensor) and keep y,
dy, hs (N, H, W, h) and cs (N, H, W, 5h) so, for gm.nn.RowLSTM's one-node path, whose cuda convolutions read and
write NHWC: the layer then converts no layout between its convolutions and its scan. The triton scans likewise
(triton_forward_channels_last / triton_backward_channels_last), for the triton convolutions, which take
channels-last operands as they are.
"""

from __future__ import annotations

import torch

from gm._backend import resolve
from gm._checks import check_same, check_shape, check_tensor
from gm._ext import device_guard, dtype_code, ext, stream_of
from gm.ops._eager import EagerOp, backward_call
from gm.ops._lstm_cuda import cuda_scan_ok, pack_weights, pixel_stride, precision, row_fits

_OP = "gm::row_lstm"


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Backends. Each forward returns (y, hs, cs) with y in gates' dtype and hs, cs in the state dtype (y may be hs).
# Each backward returns (dgates, dw or None, dh0 or None, dc0 or None).


def _reference_forward(gates, w_ss, h0, c0):
    from gm.reference.row_lstm import row_lstm as ref  # noqa: PLC0415

    y = ref(gates, w_ss, h0=h0, c0=c0)
    return y, y.new_empty(0), y.new_empty(0)


def _reference_backward(dy, gates, w_ss, h0, c0, hs, cs, need_w):
    from gm.reference.row_lstm import row_lstm_backward  # noqa: PLC0415

    dgates, dw, dh0, dc0 = row_lstm_backward(dy, gates, w_ss, h0, c0)
    return dgates, dw, (dh0 if h0 is not None else None), (dc0 if c0 is not None else None)


def _cpu_call(name: str):
    fn = getattr(ext(), name, None)
    if fn is None:
        raise NotImplementedError(f"gm._C has no {name}: rebuild gm (pip install --no-build-isolation -e .)")
    return fn


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _cpu_forward(gates, w_ss, h0, c0):
    # The C++ scan runs in the state dtype: float16/bfloat16 inputs are widened once (state is float32 anyway).
    sdt = _state_dtype(gates.dtype)
    g, w = gates.to(sdt).contiguous(), w_ss.to(sdt).contiguous()
    h0 = h0.to(sdt).contiguous() if h0 is not None else None
    c0 = c0.to(sdt).contiguous() if c0 is not None else None
    n, four_h, height, width = g.shape
    hs = torch.empty(n, four_h // 4, height, width, dtype=sdt)
    cs = torch.empty_like(hs)
    _cpu_call("row_lstm_forward_cpu")(
        g.data_ptr(), w.data_ptr(), _ptr(h0), _ptr(c0), hs.data_ptr(), cs.data_ptr(),
        n, four_h // 4, height, width, w.shape[2], dtype_code(hs),
    )  # fmt: skip
    return (hs.to(gates.dtype) if gates.dtype != sdt else hs), hs, cs


def _cpu_backward(dy, gates, w_ss, h0, c0, hs, cs, need_w):
    sdt = hs.dtype
    g, w, d = gates.to(sdt).contiguous(), w_ss.to(sdt).contiguous(), dy.to(sdt).contiguous()
    h0 = h0.to(sdt).contiguous() if h0 is not None else None
    c0 = c0.to(sdt).contiguous() if c0 is not None else None
    n, four_h, height, width = g.shape
    dgates = torch.empty_like(g)
    dw = torch.empty_like(w) if need_w else None
    dh0 = torch.empty_like(h0) if h0 is not None else None
    dc0 = torch.empty_like(c0) if c0 is not None else None
    _cpu_call("row_lstm_backward_cpu")(
        d.data_ptr(), g.data_ptr(), w.data_ptr(), _ptr(h0), _ptr(c0), hs.data_ptr(), cs.data_ptr(),
        dgates.data_ptr(), _ptr(dw), _ptr(dh0), _ptr(dc0),
        n, four_h // 4, height, width, w.shape[2], dtype_code(hs),
    )  # fmt: skip
    return dgates.to(gates.dtype), dw, dh0, dc0


def _triton_forward(gates, w_ss, h0, c0):
    from gm.kernels import row_lstm as k  # noqa: PLC0415

    return k.forward(gates, w_ss, h0, c0)


def _triton_backward(dy, gates, w_ss, h0, c0, hs, cs, need_w):
    from gm.kernels import row_lstm as k  # noqa: PLC0415

    return k.backward(dy, gates, w_ss, h0, c0, hs, cs, need_w)


def _dims(gates: torch.Tensor, channels_last: bool) -> tuple[int, int, int, int]:
    """(N, h, H, W) of gates (or dgates): (N, 4h, H, W) NCHW, or (N, H, W, 4h) channels-last."""
    n, height, width, four_h = gates.shape if channels_last else (gates.shape[0], *gates.shape[2:], gates.shape[1])
    return n, four_h // 4, height, width


def _scan_forward(gates, w_ss, h0, c0, gate_stride: int):
    """(y, hs, cs) of the cuda forward scan (y is hs for float32). gate_stride 0: gates (N, 4h, H, W) contiguous, the
    outputs NCHW, as the op returns them; else gates (N, H, W, 4h) channels-last with pixels gate_stride apart, y and
    hs (N, H, W, h), cs (N, H, W, 5h). h0, c0 (N, h, W) contiguous in gates' dtype, or None."""
    prec = precision(gates.dtype, "row_lstm")  # refuses float64 first
    n, hid, height, width = _dims(gates, gate_stride > 0)

    def state(channels: int) -> torch.Tensor:
        shape = (n, height, width, channels) if gate_stride else (n, channels, height, width)
        return torch.empty(shape, dtype=torch.float32, device=gates.device)

    hs, cs = state(hid), state(5 * hid)
    y = torch.empty_like(hs, dtype=gates.dtype) if gates.dtype != torch.float32 else hs
    # held until the launch is queued; the backward's form is kept for the backward
    a_pack, _ = pack_weights(w_ss, gates.dtype, fresh=True)
    with device_guard(gates):  # launch (and set kernel attributes) on the tensors' GPU
        _cpu_call("row_lstm_forward_cuda")(
            gates.data_ptr(), a_pack.data_ptr(), _ptr(h0), _ptr(c0), y.data_ptr(), hs.data_ptr(), cs.data_ptr(),
            n, hid, height, width, w_ss.shape[2], gate_stride, dtype_code(gates), prec, stream_of(gates),
        )  # fmt: skip
    return y, hs, cs


def _scan_backward(dy, dgates, w_ss, h0, c0, hs, cs, need_w: bool, gate_stride: int):
    """Writes dgates from dy and the forward's saved state, and returns (dw_ss float32 or None, dh0 or None, dc0 or
    None), dh0 and dc0 (N, h, W) float32. gate_stride 0: dgates (N, 4h, H, W), dy, hs, cs NCHW (contiguous); else
    dgates (N, H, W, 4h) channels-last with pixels gate_stride apart, dy (N, H, W, h) contiguous and hs, cs as
    _scan_forward gave them; the weight gradient then reads dgates and hs channels-last."""
    prec = precision(dgates.dtype, "row_lstm")
    n, hid, height, width = _dims(dgates, gate_stride > 0)
    dw = torch.empty(w_ss.shape, dtype=torch.float32, device=dgates.device) if need_w else None
    dh0 = torch.empty_like(h0, dtype=torch.float32) if h0 is not None else None
    dc0 = torch.empty_like(c0, dtype=torch.float32) if c0 is not None else None
    _, a_pack = pack_weights(w_ss, dgates.dtype, fresh=False)  # the forward's pack, unless w_ss changed since
    with device_guard(dgates):
        _cpu_call("row_lstm_backward_cuda")(
            dy.data_ptr(), a_pack.data_ptr(), _ptr(h0), _ptr(c0), hs.data_ptr(), cs.data_ptr(),
            dgates.data_ptr(), _ptr(dw), _ptr(dh0), _ptr(dc0),
            n, hid, height, width, w_ss.shape[2], gate_stride, dtype_code(dgates), prec,
            torch.are_deterministic_algorithms_enabled(), stream_of(dgates),
        )  # fmt: skip
    return dw, dh0, dc0


def _cuda_forward(gates, w_ss, h0, c0):
    return _scan_forward(gates, w_ss, h0, c0, 0)


def _cuda_backward(dy, gates, w_ss, h0, c0, hs, cs, need_w):
    dgates = torch.empty_like(gates)
    return dgates, *_scan_backward(dy, dgates, w_ss, h0, c0, hs, cs, need_w, 0)


def cuda_forward_channels_last(gates: torch.Tensor, w_ss: torch.Tensor, h0=None, c0=None):
    """The cuda scan on channels-last gates (N, H, W, 4h), their pixels possibly further apart than 4h (a channel
    slice of a wider tensor): (y, hs, cs) with y, hs (N, H, W, h) (y in gates' dtype; y is hs for float32) and cs
    (N, H, W, 5h) float32, per pixel [c, sig(z_i), sig(z_f), sig(z_o), tanh(z_g)] of h units each. w_ss in gates'
    dtype; h0, c0 (N, h, W) contiguous in gates' dtype or None. No argument checks beyond the layout (the caller
    makes them: gm.nn.RowLSTM's one-node path, which passes its input conv's (N, H, W, 4h) output as it is and feeds
    y to its residual conv channels-last: no layout conversion)."""
    return _scan_forward(gates, w_ss, h0, c0, pixel_stride(gates, "gates"))


def cuda_backward_channels_last(
    dy: torch.Tensor, dgates: torch.Tensor, w_ss: torch.Tensor, h0, c0, hs, cs, need_w: bool
):
    """The backward of cuda_forward_channels_last: writes dgates (N, H, W, 4h) (channels-last, pixels possibly
    further apart) from dy (N, H, W, h) and the forward's hs and cs, and returns (dw_ss, dh0, dc0) in the dtypes of
    w_ss, h0 and c0 (None where not asked: need_w, or no initial state), as the op's backward returns them. The
    weight gradient reads dgates and hs channels-last (lstm_tc::lstm_wgrad_tc's kNhwc variant)."""
    dw, dh0, dc0 = _scan_backward(dy.contiguous(), dgates, w_ss, h0, c0, hs, cs, need_w,
                                  pixel_stride(dgates, "dgates"))  # fmt: skip
    return _in_dtypes((dw, dh0, dc0), (w_ss, h0, c0))


def _in_dtypes(grads: tuple, like: tuple) -> tuple:
    """Each gradient (or None) in the dtype of its tensor in `like`."""
    return tuple(g.to(t.dtype) if g is not None else None for g, t in zip(grads, like, strict=True))


def triton_forward_channels_last(gates: torch.Tensor, w_ss: torch.Tensor, h0=None, c0=None):
    """cuda_forward_channels_last on the triton scans (row_lstm_fwd_kernel's CL variant), the same layouts: gates
    (N, H, W, 4h), pixels possibly further apart than 4h; y, hs (N, H, W, h) and cs (N, H, W, 5h) in the state dtype
    (float32, float64 for float64 gates; y is hs then)."""
    from gm.kernels import row_lstm as k  # noqa: PLC0415

    return k.forward(gates, w_ss, h0, c0, gate_stride=pixel_stride(gates, "gates"))


def triton_backward_channels_last(
    dy: torch.Tensor, dgates: torch.Tensor, w_ss: torch.Tensor, h0, c0, hs, cs, need_w: bool
):
    """cuda_backward_channels_last on the triton scans: writes dgates (N, H, W, 4h) from dy (N, H, W, h) and the
    forward's hs and cs, and returns (dw_ss, dh0, dc0) in the dtypes of w_ss, h0 and c0 (None where not asked). The
    weight gradient reads dgates and hs channels-last (row_lstm_wgrad_kernel's CL variant)."""
    from gm.kernels import row_lstm as k  # noqa: PLC0415

    grads = k.backward_into(dy.contiguous(), dgates, w_ss, h0, c0, hs, cs, need_w, pixel_stride(dgates, "dgates"))
    return _in_dtypes(grads, (w_ss, h0, c0))


# The channels-last scans by backend, for gm.nn.RowLSTM's one-node path.
FORWARD_CHANNELS_LAST = {"cuda": cuda_forward_channels_last, "triton": triton_forward_channels_last}
BACKWARD_CHANNELS_LAST = {"cuda": cuda_backward_channels_last, "triton": triton_backward_channels_last}


_FORWARD = {"reference": _reference_forward, "cpu": _cpu_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {
    "reference": _reference_backward,
    "cpu": _cpu_backward,
    "triton": _triton_backward,
    "cuda": _cuda_backward,
}


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration. The op returns (y, hs, cs): hs and cs are the saved states (hs empty when y is the
# state itself, i.e. float32/float64 inputs; both empty for the reference backend), not differentiable.


def _row_lstm_impl(
    gates: torch.Tensor,
    w_ss: torch.Tensor,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, hs, cs = _FORWARD[backend](gates, w_ss, h0, c0)
    hs = hs.new_empty(0) if hs is y else hs.contiguous()  # outputs may not alias each other
    return y.contiguous(), hs, cs.contiguous()


_row_lstm_op = torch.library.custom_op(_OP, _row_lstm_impl, mutates_args=())


@_row_lstm_op.register_fake
def _(gates, w_ss, h0, c0, backend):
    n, four_h, height, width = gates.shape
    sdt = _state_dtype(gates.dtype)
    y = gates.new_empty(n, four_h // 4, height, width)
    if backend == "reference":
        return y, y.new_empty(0), y.new_empty(0)
    hs = y.new_empty(n, four_h // 4, height, width, dtype=sdt) if sdt != gates.dtype else y.new_empty(0, dtype=sdt)
    # triton's and cuda's cs also hold the four gate activations per pixel for their backwards
    c_channels = 5 * (four_h // 4) if backend in ("triton", "cuda") else four_h // 4
    return y, hs, y.new_empty(n, c_channels, height, width, dtype=sdt)


def _row_lstm_backward_impl(
    dy: torch.Tensor,
    gates: torch.Tensor,
    w_ss: torch.Tensor,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    hs: torch.Tensor,
    cs: torch.Tensor,
    backend: str,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dgates, dw, dh0, dc0 = _BACKWARD[backend](dy.contiguous(), gates, w_ss, h0, c0, hs, cs, need_w)
    return (
        dgates.contiguous(),
        dw.to(w_ss.dtype).contiguous() if dw is not None else w_ss.new_empty(0),
        dh0.to(h0.dtype).contiguous() if dh0 is not None else gates.new_empty(0),
        dc0.to(c0.dtype).contiguous() if dc0 is not None else gates.new_empty(0),
    )


_row_lstm_backward_op = torch.library.custom_op(_OP + "_backward", _row_lstm_backward_impl, mutates_args=())


@_row_lstm_backward_op.register_fake
def _(dy, gates, w_ss, h0, c0, hs, cs, backend, need_w):
    return (
        gates.new_empty(gates.shape),
        w_ss.new_empty(w_ss.shape) if need_w else w_ss.new_empty(0),
        h0.new_empty(h0.shape) if h0 is not None else gates.new_empty(0),
        c0.new_empty(c0.shape) if c0 is not None else gates.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    gates, w_ss, h0, c0, backend = inputs
    y, hs, cs = output
    ctx.mark_non_differentiable(hs, cs)
    ctx.hs_is_y = hs.numel() == 0
    ctx.save_for_backward(gates, w_ss, h0, c0, y if ctx.hs_is_y else hs, cs)
    ctx.backend = backend


def _backward(ctx, dy, _dhs, _dcs):
    gates, w_ss, h0, c0, hs, cs = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None
    need_g, need_w, need_h0, need_c0 = ctx.needs_input_grad[:4]
    dgates, dw, dh0, dc0 = backward_call(ctx, _row_lstm_backward_op, _row_lstm_backward_impl, dy, gates, w_ss, h0, c0,
                                         hs, cs, ctx.backend, need_w)  # fmt: skip
    return (
        dgates if need_g else None,
        dw if need_w else None,
        dh0 if need_h0 else None,
        dc0 if need_c0 else None,
        None,
    )


_row_lstm_op.register_autograd(_backward, setup_context=_setup_context)
_ROW_LSTM = EagerOp(_row_lstm_op, _row_lstm_impl, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------------------------
# Public function.


def check_row_lstm_args(gates, w_ss, h0, c0) -> None:
    check_tensor("gates", gates, ndim=4)
    check_tensor("w_ss", w_ss, ndim=3)
    check_same("gates", gates, w_ss=w_ss)
    n, four_h, height, width = gates.shape
    if four_h == 0 or four_h % 4 != 0:
        raise ValueError(f"gates must have 4*h channels (gates i, f, o, g), got {four_h} channels")
    hidden = four_h // 4
    if w_ss.shape[0] != four_h or w_ss.shape[1] != hidden:
        raise ValueError(
            f"w_ss must have shape (4h, h, k) = ({four_h}, {hidden}, k) for gates with {four_h} channels, "
            f"got {tuple(w_ss.shape)}"
        )
    k = w_ss.shape[2]
    if k % 2 == 0:
        raise ValueError(f"w_ss must have an odd kernel width k (padding k//2 keeps the width), got k={k}")
    for name, t in (("h0", h0), ("c0", c0)):
        if t is None:
            continue
        check_tensor(name, t, ndim=3)
        check_same("gates", gates, **{name: t})
        check_shape(name, t, (n, hidden, width), "(N, h, W) of gates")


def cuda_auto_ok(t: torch.Tensor, hid: int, taps: int) -> bool:
    """Whether auto may pick the cuda scans for gates like `t` (N, *, H, W) with `hid` units
    (gm.ops._lstm_cuda.cuda_scan_ok): hidden size and width within the kernels' shared memory on t's GPU."""
    width, elem = int(t.shape[3]), t.element_size()
    return cuda_scan_ok(t, hid, lambda index: row_fits(int(hid), width, int(taps), elem, index))


def scan_backend(backend: str | None, t: torch.Tensor, hid: int, taps: int) -> str:
    """The backend row_lstm runs on for gates like `t` (same device, dtype and image size; gm.nn.RowLSTM's one-node
    path passes its input, before the gates exist) with `hid` units and `taps` state-to-state taps. Auto: the backend
    a benchmark run measured fastest for row_lstm in that dtype on this GPU model (gm._backend.measured_pick), else
    triton: its scans measured 3-12x faster than the first cuda kernels (CUDA cores) on an H200
    (bench/results/2026-11-28_nvidia-h200.jsonl); the cuda scans are tensor-core kernels now, not yet timed against
    them. backend="cuda" runs them."""
    auto_cuda = backend is None and cuda_auto_ok(t, hid, taps)
    return resolve(backend, t.device, native_cpu=True, cuda_kernels=auto_cuda, prefer="triton", op="row_lstm",
                   dtype=t.dtype)  # fmt: skip


def row_lstm(
    gates: torch.Tensor,
    w_ss: torch.Tensor,
    *,
    h0: torch.Tensor | None = None,
    c0: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Row LSTM scan over the rows of an image (PixelRNN), with gradients for gates, w_ss, h0 and c0.

    Args:
        gates: (N, 4h, H, W) input-to-state pre-activations (bias included), gate blocks i, f, o, g.
            float16/bfloat16/float32/float64 (the cuda backend, on tensor cores: float16/bfloat16/float32); the
            state and accumulation are float32 (float64 for float64).
        w_ss: (4h, h, k) state-to-state kernel along the width, k odd; same dtype and device as gates.
        h0, c0: optional (N, h, W) initial hidden and cell state (zero when None).
        backend: None (auto: "triton" for CUDA tensors, "cpu" for CPU ones), "reference", "cpu", "triton" or
            "cuda".

    Returns:
        h of every row: (N, h, H, W), gates' dtype.

    Example:
        >>> gates = torch.randn(2, 4 * 8, 5, 6); w_ss = torch.randn(32, 8, 3)
        >>> row_lstm(gates, w_ss).shape
        torch.Size([2, 8, 5, 6])
    """
    check_row_lstm_args(gates, w_ss, h0, c0)
    chosen = scan_backend(backend, gates, w_ss.shape[1], w_ss.shape[2])
    gates, w_ss = gates.contiguous(), w_ss.contiguous()
    h0 = h0.contiguous() if h0 is not None else None
    c0 = c0.contiguous() if c0 is not None else None
    return _ROW_LSTM(gates, w_ss, h0, c0, chosen)[0]
