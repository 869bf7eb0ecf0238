"""DiagonalLSTM and DiagonalBiLSTM: PixelRNN's diagonal layers (van den Oord et al. 2016, Sec. 3.2) on gm's ops."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from gm._checks import check_choice
from gm._memory_format import format_of, nhwc
from gm.nn.masked_conv import MaskedConv2d
from gm.ops._eager import eager_ok, needs_grad
from gm.ops.diagonal_lstm import BACKWARD_CHANNELS_LAST, FORWARD_CHANNELS_LAST, diagonal_lstm, scan_backend
from gm.ops.masked_conv import check_masked_conv_args, conv_backend


def _check_sizes(in_ch: int, hidden: int, colors: int) -> None:
    check_choice("colors", colors, (1, 3))
    if in_ch < 1 or hidden < 1:
        raise ValueError(f"in_ch and hidden must be >= 1, got in_ch={in_ch}, hidden={hidden}")
    if in_ch % colors or hidden % colors:
        raise ValueError(f"in_ch and hidden must be multiples of colors={colors}, got in_ch={in_ch}, hidden={hidden}")


# On a GPU the two directions of a DiagonalBiLSTM run on two CUDA streams: each scan is one program per image (N of
# the SMs: 32 of 132 at the benchmark's N = 32), so two at once take about the time of one. Autograd runs each
# backward on its forward's stream, so the backward scans overlap too. False: one after the other.
CONCURRENT_DIRECTIONS = True
_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def _two_streams(device: torch.device, main_fn, side_fn, side_inputs):
    """(main_fn(), side_fn()), side_fn on the device's side stream at the same time: the side stream first waits for
    the main one (its inputs are ready), the main one then waits for it. `side_inputs` (allocated on main, read on the
    side stream) and side_fn's output tensors (allocated on the side stream, used on main from here on) are recorded
    on the stream that reads them, so the caching allocator reuses none before that stream is done with it."""
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        side_out = side_fn()
    main_out = main_fn()
    main.wait_stream(side)
    for t in side_inputs:
        t.record_stream(side)
    for t in side_out if isinstance(side_out, tuple) else (side_out,):
        t.record_stream(main)
    return main_out, side_out


def both_directions(gates, w_ss, gates_rev, w_ss_rev, backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(diagonal_lstm(gates, w_ss), diagonal_lstm(gates_rev, w_ss_rev, reverse=True)), the reverse scan on a side
    stream when on a GPU outside torch.compile (CONCURRENT_DIRECTIONS)."""
    forward = partial(diagonal_lstm, gates, w_ss, backend=backend)
    reverse = partial(diagonal_lstm, gates_rev, w_ss_rev, reverse=True, backend=backend)
    if not (CONCURRENT_DIRECTIONS and gates.is_cuda) or torch.compiler.is_compiling():
        return forward(), reverse()
    return _two_streams(gates.device, forward, reverse, (gates_rev, w_ss_rev))


# ----------------------------------------------------------------------------------------------------------------
# The whole DiagonalBiLSTM layer as one autograd node (plain eager mode). Composed, a forward+backward is ~8 autograd
# nodes (input conv, chunk, two scans, shift, add, residual conv, add), each an op call with its checks, backend choice
# and backward call: ~415 us of host time per forward+backward on the dev machine with the kernels stubbed
# (python -m bench.host), which a GPU's host pays before the kernels run. The node below runs the same implementations
# (the registered ops' own) in the same order with the same operands, so its results are bit-identical
# (tests/nn/test_diagonal_lstm.py); torch.compile, fake tensors, modes and autocast take the composed path.

# False: always the composed path.
FUSED_LAYER = True
# False: the one-node path on cuda or triton converts layouts around each scan as the composed ops do (_FusedBiLSTM).
CHANNELS_LAST = True


def _conv_impl():
    from gm.ops.masked_conv import _masked_conv2d_impl, conv_grads  # noqa: PLC0415

    return _masked_conv2d_impl, conv_grads


def _scan_impl():
    from gm.ops.diagonal_lstm import _diagonal_lstm_backward_impl, _diagonal_lstm_impl  # noqa: PLC0415

    return _diagonal_lstm_impl, _diagonal_lstm_backward_impl


def _directions(t: torch.Tensor, forward, reverse, side_inputs):
    """(forward(), reverse()) of the one-node paths: the reverse on the side stream where `t` is on a GPU, as
    both_directions runs it (so the backward's reverse scan finds the forward's y_r and state on its own stream),
    else one after the other."""
    if CONCURRENT_DIRECTIONS and t.is_cuda:
        return _two_streams(t.device, forward, reverse, side_inputs)
    return forward(), reverse()


def _channels_last(conv_b: str, scan_b: str) -> bool:
    """Whether DiagonalBiLSTM's one-node path runs channels-last for these (convs, scans) backends: both cuda or both
    triton (channels-last scans, and convolutions that take channels-last operands as they are)."""
    return CHANNELS_LAST and conv_b == scan_b and scan_b in FORWARD_CHANNELS_LAST


class _FusedBiLSTM(torch.autograd.Function):
    """apply(spec, x, w_in, b_in, w_ss, w_ss_rev, w_out, b_out) -> the layer's output; spec = (groups of the two
    convs (in_groups, out_groups, out_in_groups, out_out_groups), conv backend, scan backend)."""

    @staticmethod
    def forward(ctx, spec, x, w_in, b_in, w_ss, w_ss_rev, w_out, b_out):
        (gi, go, ogi, ogo), conv_b, scan_b = spec
        conv, _ = _conv_impl()
        scan, _ = _scan_impl()
        gates = conv(x, w_in, b_in, "B", gi, go, conv_b)
        g_f, g_r = gates.chunk(2, dim=1)
        forward = partial(scan, g_f, w_ss, False, scan_b)
        reverse = partial(scan, g_r, w_ss_rev, True, scan_b)
        (y_f, s_f), (y_r, s_r) = _directions(x, forward, reverse, (g_r, w_ss_rev))
        h = y_f + shift_down(y_r)
        out = h if w_out is None else x + conv(h, w_out, b_out, "B", ogi, ogo, conv_b)
        ctx.spec = spec
        ctx.has_bias = (b_in is not None, b_out is not None)
        ctx.save_for_backward(x, w_in, gates, w_ss, w_ss_rev, y_f, s_f, y_r, s_r, h, w_out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (gi, go, ogi, ogo), conv_b, scan_b = ctx.spec
        _, conv_bwd = _conv_impl()
        _, scan_bwd = _scan_impl()
        x, w_in, gates, w_ss, w_ss_rev, y_f, s_f, y_r, s_r, h, w_out = ctx.saved_tensors
        _, need_x, need_w_in, need_b_in, need_ss, need_ss_rev, need_w_out, need_b_out = ctx.needs_input_grad
        need_b_in, need_b_out = need_b_in and ctx.has_bias[0], need_b_out and ctx.has_bias[1]
        dx = dw_in = db_in = dw_ss = dw_ss_rev = dw_out = db_out = None
        if w_out is None:
            dh = grad
        else:
            dh, dw_out, db_out = conv_bwd(grad, h, w_out, "B", ogi, ogo, conv_b, True, need_w_out, need_b_out)
        dy_r = torch.nn.functional.pad(dh, (0, 0, -1, 1)) if dh.shape[2] > 0 else dh  # shift_down's backward
        g_f, g_r = gates.chunk(2, dim=1)
        forward = partial(scan_bwd, dh, g_f, w_ss, y_f, s_f, False, scan_b)
        reverse = partial(scan_bwd, dy_r, g_r, w_ss_rev, y_r, s_r, True, scan_b)
        (dg_f, dw_ss), (dg_r, dw_ss_rev) = _directions(x, forward, reverse, (dy_r,))
        dgates = torch.cat([dg_f, dg_r], dim=1)
        dx_in, dw_in, db_in = conv_bwd(dgates, x, w_in, "B", gi, go, conv_b, need_x, need_w_in, need_b_in)
        if need_x:
            dx = dx_in if w_out is None else grad + dx_in
        return (None, dx, dw_in, db_in, dw_ss if need_ss else None,
                dw_ss_rev if need_ss_rev else None, dw_out, db_out)  # fmt: skip


class _FusedBiLSTMChannelsLast(torch.autograd.Function):
    """_FusedBiLSTM where both convs and both scans run on cuda, or all on triton, channels-last throughout (the scans
    gm.ops.diagonal_lstm.FORWARD_CHANNELS_LAST / BACKWARD_CHANNELS_LAST of the backend): the input conv writes
    (N, H, W, 8h) gates, each scan reads its half of them in place (the kernels take the pixel stride 8h) and writes
    y as (N, H, W, h); the backward scans write their halves of one (N, H, W, 8h) gate gradient, which the weight
    gradient reads as it is and the input conv's backward takes as a channels-last tensor. The composed path
    converts each scan's gates, y, dy and dgates between layouts (eight transposes per layer and pass pair) and
    concatenates the two directions' gate gradients; here x (when NCHW) and the incoming gradient are converted
    once each. The same kernels on the same values: bit-identical to the composed ops (tests/test_cuda_emulated.py on
    cuda, tests/nn/test_diagonal_lstm.py on triton), the bias gradients included (the convs' weight-gradient kernels
    sum them on both paths); outputs and gradients in the composed ops' memory formats."""

    @staticmethod
    def forward(ctx, spec, x, w_in, b_in, w_ss, w_ss_rev, w_out, b_out):
        (gi, go, ogi, ogo), conv_b, scan_b = spec
        conv, _ = _conv_impl()
        scan = FORWARD_CHANNELS_LAST[scan_b]
        xc = nhwc(x, conv_b).permute(0, 3, 1, 2)  # x as a channels-last (N, C, H, W) tensor
        g8 = conv(xc, w_in, b_in, "B", gi, go, conv_b).permute(0, 2, 3, 1)  # (N, H, W, 8h)
        g4 = g8.shape[3] // 2
        forward = partial(scan, g8[..., :g4], w_ss, False)
        reverse = partial(scan, g8[..., g4:], w_ss_rev, True)
        (y_f, s_f), (y_r, s_r) = _directions(x, forward, reverse, (g8, w_ss_rev))
        h = y_f + F.pad(y_r, (0, 0, 0, 0, 1, -1))  # (N, H, W, h): shift_down of the reverse output
        hv = h.permute(0, 3, 1, 2)
        if w_out is None:  # NCHW, as the composed ops return h (their scans' outputs are NCHW)
            out = hv.contiguous()
        else:
            out = x + conv(hv, w_out, b_out, "B", ogi, ogo, conv_b)
        ctx.spec = spec
        ctx.has_bias = (b_in is not None, b_out is not None)
        ctx.x_format = format_of(x)
        ctx.save_for_backward(xc, w_in, w_ss, w_ss_rev, y_f, s_f, y_r, s_r, h, w_out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (gi, go, ogi, ogo), conv_b, scan_b = ctx.spec
        _, conv_bwd = _conv_impl()
        scan_bwd = BACKWARD_CHANNELS_LAST[scan_b]
        xc, w_in, w_ss, w_ss_rev, y_f, s_f, y_r, s_r, h, w_out = ctx.saved_tensors
        _, need_x, need_w_in, need_b_in, need_ss, need_ss_rev, need_w_out, need_b_out = ctx.needs_input_grad
        need_b_in, need_b_out = need_b_in and ctx.has_bias[0], need_b_out and ctx.has_bias[1]
        dx = dw_in = db_in = dw_out = db_out = None
        grad_nhwc = nhwc(grad.to(h.dtype), conv_b)
        if w_out is None:
            dh = grad_nhwc
        else:
            dhv, dw_out, db_out = conv_bwd(grad_nhwc.permute(0, 3, 1, 2), h.permute(0, 3, 1, 2), w_out, "B", ogi, ogo,
                                           conv_b, True, need_w_out, need_b_out)  # fmt: skip
            dh = dhv.permute(0, 2, 3, 1)  # channels-last, as its input h
        dy_r = F.pad(dh, (0, 0, 0, 0, -1, 1))  # shift_down's backward
        n, height, width, hid = h.shape
        dg8 = torch.empty(n, height, width, 8 * hid, dtype=h.dtype, device=h.device)
        forward = partial(scan_bwd, dh, dg8[..., : 4 * hid], w_ss, y_f, s_f, False)
        reverse = partial(scan_bwd, dy_r, dg8[..., 4 * hid :], w_ss_rev, y_r, s_r, True)
        dw_ss, dw_ss_rev = _directions(xc, forward, reverse, (dy_r, dg8))
        dgv = dg8.permute(0, 3, 1, 2)  # (N, 8h, H, W) channels-last
        dx_in, dw_in, db_in = conv_bwd(dgv, xc, w_in, "B", gi, go, conv_b, need_x, need_w_in, need_b_in)
        if need_x:
            dx = dx_in.contiguous(memory_format=ctx.x_format) if w_out is None else grad + dx_in
        return (None, dx, dw_in, db_in, dw_ss if need_ss else None,
                dw_ss_rev if need_ss_rev else None, dw_out, db_out)  # fmt: skip


def _state_weight(hidden: int) -> nn.Parameter:
    w = torch.empty(4 * hidden, hidden, 2)
    bound = 1.0 / math.sqrt(2 * hidden)  # fan-in of the 2-tap state-to-state convolution
    nn.init.uniform_(w, -bound, bound)
    return nn.Parameter(w)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Row i takes row i-1, row 0 is zero: the right-to-left scan then only sees rows above. One pad that adds the
    top row and drops the bottom one (its backward is one pad too, where pad-then-slice costs a slice's backward
    besides: zeros and a copy); an image of no rows is returned as it is (pad cannot drop a row it lacks)."""
    return F.pad(x, (0, 0, 1, -1)) if x.shape[2] > 0 else x


class DiagonalLSTM(nn.Module):
    """One diagonal scan: 1x1 mask-B input-to-state conv (colour groups per gate block), then gm.ops.diagonal_lstm.

    Input (N, in_ch, H, W) -> h (N, hidden, H, W). With colors=3 the channels of x and of each gate block are
    ordered R, G, B, and the hidden channel of colour k at a pixel sees colours <= k of x there. reverse=True scans
    right to left: its output at (i, j) depends on pixels to the right in row i (see DiagonalBiLSTM).
    """

    def __init__(self, in_ch: int, hidden: int, colors: int = 1, reverse: bool = False, backend: str | None = None):
        super().__init__()
        _check_sizes(in_ch, hidden, colors)
        self.hidden, self.reverse, self.backend = hidden, reverse, backend
        self.input_to_state = MaskedConv2d(in_ch, 4 * hidden, 1, mask="B", colors=colors, blocks=4, backend=backend)
        self.w_ss = _state_weight(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return diagonal_lstm(self.input_to_state(x), self.w_ss, reverse=self.reverse, backend=self.backend)


class DiagonalBiLSTM(nn.Module):
    """The Diagonal BiLSTM layer: a left-to-right and a right-to-left diagonal scan with their own weights; the
    right-to-left output is shifted down one row (row 0 zero) and added, so every output pixel sees only earlier
    pixels (and, with colors=3, earlier or equal colours at itself). residual=True adds the paper's residual:
    x + conv1x1_maskB(h) (output (N, in_ch, H, W)); else the output is h (N, hidden, H, W).

    Both directions' input-to-state convolutions run as one 1x1 mask-B conv to 8*hidden channels (the first 4h
    for the left-to-right scan, the last 4h for the right-to-left one).
    """

    def __init__(
        self, in_ch: int, hidden: int, colors: int = 1, residual: bool = True, backend: str | None = None
    ) -> None:
        super().__init__()
        _check_sizes(in_ch, hidden, colors)
        self.in_ch, self.hidden, self.colors, self.backend = in_ch, hidden, colors, backend
        self.input_to_state = MaskedConv2d(in_ch, 8 * hidden, 1, mask="B", colors=colors, blocks=8, backend=backend)
        self.w_ss = _state_weight(hidden)
        self.w_ss_rev = _state_weight(hidden)
        self.output = MaskedConv2d(hidden, in_ch, 1, mask="B", colors=colors, backend=backend) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused(x)
        if fused is not None:
            return fused
        gates, gates_rev = self.input_to_state(x).chunk(2, dim=1)
        h, h_rev = both_directions(gates, self.w_ss, gates_rev, self.w_ss_rev, backend=self.backend)
        h = h + shift_down(h_rev)
        if self.output is None:
            return h
        return x + self.output(h)

    def _fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer as one autograd node (FUSED_LAYER), or None where the composed path runs: under torch.compile,
        fake tensors, modes and autocast (gm.ops._eager.eager_ok), and without a gradient to record."""
        conv_in, conv_out = self.input_to_state, self.output
        params = (conv_in.weight, conv_in.bias, self.w_ss, self.w_ss_rev)
        if conv_out is not None:
            params += (conv_out.weight, conv_out.bias)
        if not (FUSED_LAYER and eager_ok(x, *params) and needs_grad(x, *params)):
            return None
        check_masked_conv_args(x, conv_in.weight, conv_in.bias, "B", conv_in.in_groups, conv_in.out_groups)
        conv_b, scan_b = self.backends(x)
        groups = (conv_in.in_groups, conv_in.out_groups, None, None)
        w_out = b_out = None
        if conv_out is not None:
            groups = groups[:2] + (conv_out.in_groups, conv_out.out_groups)
            w_out, b_out = conv_out.weight, conv_out.bias
        # An image to scan: the channels-last node where runs_channels_last, else the one that calls the ops'
        # implementations.
        channels_last = _channels_last(conv_b, scan_b) and x.numel() > 0
        node = _FusedBiLSTMChannelsLast if channels_last else _FusedBiLSTM
        return node.apply((groups, conv_b, scan_b), x, conv_in.weight, conv_in.bias, self.w_ss, self.w_ss_rev, w_out,
                          b_out)  # fmt: skip

    def backends(self, x: torch.Tensor) -> tuple[str, str]:
        """(conv backend, scan backend) for input like x, each as its op's public function resolves it (the scan's
        from the gates' shape, dtype and device, which x shares but for the channels)."""
        return conv_backend(self.backend, x), scan_backend(self.backend, x, self.hidden)

    def runs_channels_last(self, x: torch.Tensor) -> bool:
        """Whether the one-node path takes its channels-last node for input like x (device, dtype, image size; a
        (0, 0, 0, 0) stand-in asks without an image): then a channels-last x and output gradient cost it no layout
        conversion, where an NCHW one costs a transpose each (gm.models.DiagonalBiLSTMModel.channels_last asks
        this)."""
        return _channels_last(*self.backends(x))

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.hidden}, colors={self.colors}, residual={self.output is not None}"
