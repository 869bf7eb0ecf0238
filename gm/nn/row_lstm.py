"""RowLSTM: the Row LSTM layer of PixelRNN (van den Oord et al. 2016, section 3.1), backed by gm.ops.row_lstm."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from gm._memory_format import format_of, nhwc
from gm.nn.masked_conv import MaskedConv2d
from gm.ops._eager import eager_ok, needs_grad
from gm.ops.masked_conv import _masked_conv2d_impl, check_masked_conv_args, conv_backend, conv_grads
from gm.ops.row_lstm import (
    BACKWARD_CHANNELS_LAST,
    FORWARD_CHANNELS_LAST,
    _row_lstm_backward_impl,
    _row_lstm_impl,
    check_row_lstm_args,
    row_lstm,
    scan_backend,
)

# ----------------------------------------------------------------------------------------------------------------
# The whole RowLSTM layer as one autograd node in plain eager mode, as gm.nn.diagonal_lstm does for DiagonalBiLSTM.
# Composed, a forward+backward is the input conv, the scan, the residual conv and add, and with learn_init the casts,
# views and expands of h0 and c0: each an op call with its checks, backend choice and autograd node, ~300 us of host
# time per forward+backward with the kernels stubbed (python -m bench.host; ~250 as one node), which a GPU's host
# pays before the kernels run. The node runs the registered ops' own implementations in the same order on the same
# operands, so its results are bit-identical (tests/nn/test_row_lstm.py); torch.compile, fake tensors, modes and
# autocast take the composed path.

# False: always the composed path.
FUSED_LAYER = True
# False: the one-node path on cuda or triton runs the ops' implementations as _FusedRowLSTM does, converting layouts
# around the scan as the composed ops do, instead of _FusedRowLSTMChannelsLast.
CHANNELS_LAST = True


def _scan_operands(gates, w_ss, h0, c0):
    """(w_ss, h0, c0) as the scan takes them: w_ss in the gates' dtype, the learned initial state (hidden,) cast and
    broadcast to (N, hidden, W). Shared by both paths, so they feed the scan the same tensors."""
    if h0 is not None:
        n, _, _, width = gates.shape
        h0 = h0.to(gates.dtype).view(1, -1, 1).expand(n, -1, width)
        c0 = c0.to(gates.dtype).view(1, -1, 1).expand(n, -1, width)
    return w_ss.to(gates.dtype), h0, c0


def _init_grad(grad: torch.Tensor, param: tuple[torch.Size, torch.dtype]) -> torch.Tensor:
    """The scan's (N, hidden, W) initial-state gradient as the composed path's autograd hands it to the (hidden,)
    parameter of `param` = (shape, dtype): expand's backward (sum_to_size), view's (reshape), the cast's (to)."""
    shape, dtype = param
    return grad.sum_to_size(1, grad.shape[1], 1).reshape(shape).to(dtype)


def _channels_last(backends: tuple[str, str, str | None]) -> bool:
    """Whether RowLSTM's one-node path runs channels-last for (input conv, scan, output conv) backends: all cuda or
    all triton (channels-last scans, and convolutions that take channels-last operands as they are)."""
    conv_b, scan_b, out_b = backends
    return CHANNELS_LAST and conv_b == scan_b and scan_b in FORWARD_CHANNELS_LAST and out_b in (None, conv_b)


def _conv_spec(conv: MaskedConv2d, backend: str) -> tuple:
    """What the conv's forward passes to masked_conv2d besides the tensors: (mask, in_groups, out_groups, backend),
    the backend as resolved."""
    return conv.mask, conv.in_groups, conv.out_groups, backend


def _needs(ctx) -> tuple[bool, ...]:
    """The nodes' needs_input_grad past spec (x, w_in, b_in, w_ss, h0, c0, w_out, b_out), then need_h: whether the
    scan's output requires grad (anything before the output conv does)."""
    _, need_x, need_w_in, need_b_in, need_ss, need_h0, need_c0, need_w_out, need_b_out = ctx.needs_input_grad
    need_h = need_x or need_w_in or need_b_in or need_ss or need_h0 or need_c0
    return need_x, need_w_in, need_b_in, need_ss, need_h0, need_c0, need_w_out, need_b_out, need_h


def _save_scan_context(ctx, spec, w_ss, h0, c0) -> None:
    ctx.spec = spec
    ctx.ss_dtype = w_ss.dtype
    ctx.init = ((h0.shape, h0.dtype), (c0.shape, c0.dtype)) if h0 is not None else None


class _FusedRowLSTM(torch.autograd.Function):
    """apply(spec, x, w_in, b_in, w_ss, h0, c0, w_out, b_out) -> the layer's output; spec = (input conv, scan
    backend, output conv or None), each conv as (mask, in_groups, out_groups, backend), the backends resolved by
    RowLSTM._fused (which also checks the input conv's arguments first). The other checks run here in the composed
    path's order, so bad arguments raise its errors."""

    @staticmethod
    def forward(ctx, spec, x, w_in, b_in, w_ss, h0, c0, w_out, b_out):
        (mask, gi, go, conv_b), scan_b, out_spec = spec
        gates = _masked_conv2d_impl(x, w_in, b_in, mask, gi, go, conv_b)
        w, h0e, c0e = _scan_operands(gates, w_ss, h0, c0)
        check_row_lstm_args(gates, w, h0e, c0e)
        gates, w = gates.contiguous(), w.contiguous()
        h0e = h0e.contiguous() if h0e is not None else None
        c0e = c0e.contiguous() if c0e is not None else None
        y, hs, cs = _row_lstm_impl(gates, w, h0e, c0e, scan_b)
        out = y
        if out_spec is not None:
            out_mask, ogi, ogo, out_b = out_spec
            check_masked_conv_args(y, w_out, b_out, out_mask, ogi, ogo)
            out = x + _masked_conv2d_impl(y, w_out, b_out, out_mask, ogi, ogo, out_b)
        _save_scan_context(ctx, spec, w_ss, h0, c0)
        # as the scan op saves its state: y itself when hs is empty (float32/float64)
        ctx.save_for_backward(x, w_in, gates, w, h0e, c0e, y if hs.numel() == 0 else hs, cs, y, w_out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (mask, gi, go, conv_b), scan_b, out_spec = ctx.spec
        x, w_in, gates, w, h0e, c0e, hs, cs, y, w_out = ctx.saved_tensors
        need_x, need_w_in, need_b_in, need_ss, need_h0, need_c0, need_w_out, need_b_out, need_h = _needs(ctx)
        dx = dw_in = db_in = dw_ss = dh0 = dc0 = dw_out = db_out = None
        dh = grad
        if out_spec is not None:
            out_mask, ogi, ogo, out_b = out_spec
            dh, dw_out, db_out = conv_grads(grad, y, w_out, out_mask, ogi, ogo, out_b, need_h, need_w_out, need_b_out)
        if need_h:
            dgates, dw, dh0e, dc0e = _row_lstm_backward_impl(dh, gates, w, h0e, c0e, hs, cs, scan_b, need_ss)
            dw_ss = dw.to(ctx.ss_dtype) if need_ss else None
            dh0 = _init_grad(dh0e, ctx.init[0]) if need_h0 else None
            dc0 = _init_grad(dc0e, ctx.init[1]) if need_c0 else None
            dx_in, dw_in, db_in = conv_grads(dgates, x, w_in, mask, gi, go, conv_b, need_x, need_w_in, need_b_in)
            if need_x:
                dx = dx_in if out_spec is None else grad + dx_in
        return None, dx, dw_in, db_in, dw_ss, dh0, dc0, dw_out, db_out


class _FusedRowLSTMChannelsLast(torch.autograd.Function):
    """_FusedRowLSTM where both convs and the scan run on cuda, or all on triton, channels-last throughout: the input
    conv writes (N, H, W, 4h) gates, which the scan reads in place (gm.ops.row_lstm.FORWARD_CHANNELS_LAST), writing
    y and its saved state channels-last (y, hs (N, H, W, h), cs (N, H, W, 5h)); y goes to the residual conv as it
    is. The backward scan reads the residual conv's input gradient (N, H, W, h) as it is and writes one
    (N, H, W, 4h) gate gradient, which its weight gradient and the input conv's backward read channels-last. The
    composed path converts the gates, y, dy and dgates between layouts (the row_lstm op is NCHW; the cuda and triton
    convs work on NHWC): here x (when NCHW) and the incoming gradient are converted once each. The same kernels on
    the same values: bit-identical to the composed ops (tests/test_cuda_emulated.py on cuda, tests/nn/test_row_lstm.py
    on triton), the bias gradients included (the convs' weight-gradient kernels sum them on both paths); outputs and
    gradients in the composed ops' memory formats."""

    @staticmethod
    def forward(ctx, spec, x, w_in, b_in, w_ss, h0, c0, w_out, b_out):
        (mask, gi, go, backend), _, out_spec = spec
        xc = nhwc(x, backend).permute(0, 3, 1, 2)  # x as a channels-last (N, C, H, W) tensor
        gates = _masked_conv2d_impl(xc, w_in, b_in, mask, gi, go, backend)  # channels-last (N, 4h, H, W)
        w, h0e, c0e = _scan_operands(gates, w_ss, h0, c0)
        check_row_lstm_args(gates, w, h0e, c0e)
        w = w.contiguous()
        h0e = h0e.contiguous() if h0e is not None else None
        c0e = c0e.contiguous() if c0e is not None else None
        y, hs, cs = FORWARD_CHANNELS_LAST[backend](gates.permute(0, 2, 3, 1), w, h0e, c0e)
        yv = y.permute(0, 3, 1, 2)  # (N, h, H, W) channels-last
        if out_spec is None:  # NCHW, as the composed ops return y (the scan op's output is NCHW)
            out = yv.contiguous()
        else:
            out_mask, ogi, ogo, _ = out_spec
            check_masked_conv_args(yv, w_out, b_out, out_mask, ogi, ogo)
            out = x + _masked_conv2d_impl(yv, w_out, b_out, out_mask, ogi, ogo, backend)
        _save_scan_context(ctx, spec, w_ss, h0, c0)
        ctx.x_format = format_of(x)
        ctx.save_for_backward(xc, w_in, w, h0e, c0e, hs, cs, y, w_out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (mask, gi, go, backend), _, out_spec = ctx.spec
        xc, w_in, w, h0e, c0e, hs, cs, y, w_out = ctx.saved_tensors
        need_x, need_w_in, need_b_in, need_ss, need_h0, need_c0, need_w_out, need_b_out, need_h = _needs(ctx)
        dx = dw_in = db_in = dw_ss = dh0 = dc0 = dw_out = db_out = None
        dh = nhwc(grad.to(y.dtype), backend)  # (N, H, W, C)
        if out_spec is not None:
            out_mask, ogi, ogo, _ = out_spec
            dhv, dw_out, db_out = conv_grads(dh.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2), w_out, out_mask, ogi, ogo,
                                             backend, need_h, need_w_out, need_b_out)  # fmt: skip
            dh = dhv.permute(0, 2, 3, 1) if need_h else None  # channels-last, as its input y
        if need_h:
            n, height, width, hid = y.shape
            dgates = torch.empty(n, height, width, 4 * hid, dtype=y.dtype, device=y.device)
            dw, dh0e, dc0e = BACKWARD_CHANNELS_LAST[backend](dh, dgates, w, h0e, c0e, hs, cs, need_ss)
            dw_ss = dw.to(ctx.ss_dtype) if need_ss else None
            dh0 = _init_grad(dh0e, ctx.init[0]) if need_h0 else None
            dc0 = _init_grad(dc0e, ctx.init[1]) if need_c0 else None
            dgv = dgates.permute(0, 3, 1, 2)  # (N, 4h, H, W) channels-last
            dx_in, dw_in, db_in = conv_grads(dgv, xc, w_in, mask, gi, go, backend, need_x, need_w_in, need_b_in)
            if need_x:
                dx = dx_in.contiguous(memory_format=ctx.x_format) if out_spec is None else grad + dx_in
        return None, dx, dw_in, db_in, dw_ss, dh0, dc0, dw_out, db_out


class RowLSTM(nn.Module):
    """Row LSTM: input-to-state masked (1, k) conv (mask "B", colour groups per gate block), then the row scan.

    The state-to-state conv (w_ss, (4h, h, k)) reads the previous row only, so it needs no mask: with colors=3
    every hidden colour of row r-1 precedes every pixel of row r. Hidden unit j has the colour of its gates
    (gm.nn.color_groups(hidden, colors)), so at pixel p an output colour sees only input colours <= its own.
    residual=True adds the paper's 1x1 mask "B" conv from the hidden state back to in_ch channels (colour groups)
    plus the input, so the output has in_ch channels; otherwise the output is the hidden state (hidden channels).
    learn_init=True learns the initial state (h_{-1}, c_{-1}) as one vector each of `hidden` values, shared by all
    columns and images (zero-initialised, so a fresh layer equals one without it); False starts from zeros.

    Shapes: x (N, in_ch, H, W) -> (N, in_ch or hidden, H, W).
    """

    def __init__(
        self,
        in_ch: int,
        hidden: int,
        kernel_size: int = 3,
        colors: int = 1,
        residual: bool = True,
        learn_init: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if colors not in (1, 3):
            raise ValueError(f"colors must be 1 or 3, got {colors}")
        for name, value in (("in_ch", in_ch), ("hidden", hidden)):
            if value < 1 or value % colors != 0:
                raise ValueError(f"{name} must be a positive multiple of colors={colors}, got {value}")
        self.in_ch, self.hidden, self.kernel_size, self.colors = in_ch, hidden, kernel_size, colors
        self.residual, self.backend = residual, backend
        self.input_to_state = MaskedConv2d(
            in_ch, 4 * hidden, (1, kernel_size), mask="B", colors=colors, blocks=4, backend=backend
        )
        self.w_ss = nn.Parameter(torch.empty(4 * hidden, hidden, kernel_size))
        self.out = MaskedConv2d(hidden, in_ch, 1, mask="B", colors=colors, backend=backend) if residual else None
        self.h0 = nn.Parameter(torch.zeros(hidden)) if learn_init else None
        self.c0 = nn.Parameter(torch.zeros(hidden)) if learn_init else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden * self.kernel_size)
        nn.init.uniform_(self.w_ss, -bound, bound)
        if self.input_to_state.bias is not None:  # forget gate bias 1: remember by default (Gers et al. 2000)
            with torch.no_grad():
                self.input_to_state.bias[self.hidden : 2 * self.hidden].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused(x)
        if fused is not None:
            return fused
        gates = self.input_to_state(x)
        w_ss, h0, c0 = _scan_operands(gates, self.w_ss, self.h0, self.c0)
        h = row_lstm(gates, w_ss, h0=h0, c0=c0, backend=self.backend)
        return x + self.out(h) if self.out is not None else h

    def _fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer as one autograd node (FUSED_LAYER), or None where the composed path runs: under torch.compile,
        fake tensors, modes and autocast (gm.ops._eager.eager_ok), and without a gradient to record. Where the
        convs and the scan all run on cuda or all on triton (and there is an image to scan), the channels-last node
        (CHANNELS_LAST), else the one that calls the ops' implementations."""
        conv_in, conv_out = self.input_to_state, self.out
        w_out, b_out = (conv_out.weight, conv_out.bias) if conv_out is not None else (None, None)
        params = (conv_in.weight, conv_in.bias, self.w_ss, self.h0, self.c0, w_out, b_out)
        if not (FUSED_LAYER and eager_ok(x, *params) and needs_grad(x, *params)):
            return None
        # the composed path's first check, before any backend choice
        check_masked_conv_args(x, conv_in.weight, conv_in.bias, conv_in.mask, conv_in.in_groups, conv_in.out_groups)
        conv_b, scan_b, out_b = backends = self.backends(x)
        spec = (_conv_spec(conv_in, conv_b), scan_b, _conv_spec(conv_out, out_b) if conv_out is not None else None)
        node = _FusedRowLSTMChannelsLast if _channels_last(backends) and x.numel() > 0 else _FusedRowLSTM
        return node.apply(spec, x, *params)

    def backends(self, x: torch.Tensor) -> tuple[str, str, str | None]:
        """(input conv, scan, output conv or None): each op's backend as its public function resolves it for input
        x, in the composed order; the scan's from the gates' shape, dtype and device, the output conv's from y's,
        which x shares but for the channels."""
        conv_in, conv_out = self.input_to_state, self.out
        conv_b = conv_backend(conv_in.backend, x)
        scan_b = scan_backend(self.backend, x, conv_in.weight.shape[0] // 4, self.w_ss.shape[-1])
        return conv_b, scan_b, conv_backend(conv_out.backend, x) if conv_out is not None else None

    def runs_channels_last(self, x: torch.Tensor) -> bool:
        """Whether the one-node path takes its channels-last node for input like x (device, dtype, image size; a
        (0, 0, 0, 0) stand-in asks without an image): then a channels-last x and output gradient cost it no layout
        conversion, where an NCHW one costs a transpose each (gm.models.RowLSTMModel.channels_last asks this)."""
        return _channels_last(self.backends(x))

    def extra_repr(self) -> str:
        return (
            f"{self.in_ch}, {self.hidden}, kernel_size={self.kernel_size}, colors={self.colors}, "
            f"residual={self.residual}, learn_init={self.h0 is not None}"
        )
