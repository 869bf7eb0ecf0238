"""Plain-PyTorch Diagonal LSTM (PixelRNN, van den Oord et al. 2016, Sec. 3.2): the oracle and the baseline.

Written for clarity: the gates are skewed into a materialised (N, 4h, H, W+H-1) tensor (row i shifted right by i,
zero fill), a Python loop runs the LSTM over the W+H-1 skewed columns, and the states are unskewed. For skewed
column t, row i (original pixel (i, j = t - i)):

    s[:, :, i] = w_ss[..., 0] @ h_{t-1}[:, :, i-1] + w_ss[..., 1] @ h_{t-1}[:, :, i]      (row -1 is zero)
    [i, f, o, g] = gates_skewed[:, :, i, t] + s
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g);   h_t = sigmoid(o) * tanh(c_t)

In image coordinates h_{t-1}[:, :, i-1] is the pixel directly above (i-1, j) and h_{t-1}[:, :, i] the pixel to the
left (i, j-1): the diagonal LSTM is an LSTM whose state-to-state term is a 2-tap convolution over (above, left).

Zero state outside the image: after every step h and c are set to zero at cells with j outside [0, W). This is
exactly what running the recurrence literally on the zero-filled skewed gates gives for every pixel of the image:
cells left of a row's start (j < 0) only see zero gates and zero neighbours, and (c, h) = (0, 0) is a fixed point
of the cell (sigmoid(0)*0 + sigmoid(0)*tanh(0) = 0, bit for bit); cells right of a row's end (j >= W) do get
non-zero state literally, but they only feed cells further right or below-right, never a pixel of the image, and
are dropped by the unskew. So zeroing them changes no output and no gradient; it lets kernels skip them.
`diagonal_lstm_literal` runs the recurrence without the zeroing, so tests can prove that claim.

reverse=True scans right to left: diagonal_lstm(gates.flip(-1), w_ss).flip(-1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gm.reference.masked_conv import masked_conv2d


def skew(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W+H-1): row i shifted right by i, zero fill."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, h, w + h - 1)
    for i in range(h):
        out[:, :, i, i : i + w] = x[:, :, i]
    return out


def unskew(x: torch.Tensor, width: int) -> torch.Tensor:
    """(N, C, H, W+H-1) -> (N, C, H, W): inverse of skew."""
    return torch.stack([x[:, :, i, i : i + width] for i in range(x.shape[2])], dim=2)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scan(gates: torch.Tensor, w_ss: torch.Tensor, zero_outside: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, g4, height, width = gates.shape
    hid = g4 // 4
    acc = _state_dtype(gates.dtype)
    gs = skew(gates.to(acc))
    w_up, w_left = w_ss.to(acc).unbind(-1)
    h = gs.new_zeros(n, hid, height)
    c = gs.new_zeros(n, hid, height)
    rows = torch.arange(height, device=gates.device)
    hs, cs = [], []
    for t in range(width + height - 1):
        h_up = F.pad(h, (1, 0))[:, :, :height]  # row i reads row i-1 of the previous column; row -1 is zero
        s = torch.einsum("ok,nki->noi", w_up, h_up) + torch.einsum("ok,nki->noi", w_left, h)
        a_i, a_f, a_o, a_g = (gs[:, :, :, t] + s).chunk(4, dim=1)
        c = torch.sigmoid(a_f) * c + torch.sigmoid(a_i) * torch.tanh(a_g)
        h = torch.sigmoid(a_o) * torch.tanh(c)
        if zero_outside:
            inside = ((t - rows) >= 0) & ((t - rows) < width)
            c = torch.where(inside, c, 0.0)
            h = torch.where(inside, h, 0.0)
        hs.append(h)
        cs.append(c)
    y = unskew(torch.stack(hs, dim=-1), width)
    c_all = unskew(torch.stack(cs, dim=-1), width)
    return y.to(gates.dtype), c_all


def diagonal_lstm_with_cell(
    gates: torch.Tensor, w_ss: torch.Tensor, *, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, c): h (N, h, H, W) in gates' dtype, c (N, h, H, W) in float32 (float64 for float64)."""
    if reverse:
        y, c = _scan(gates.flip(-1), w_ss, zero_outside=True)
        return y.flip(-1), c.flip(-1)
    return _scan(gates, w_ss, zero_outside=True)


def diagonal_lstm(gates: torch.Tensor, w_ss: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """gates (N, 4h, H, W) (input-to-state result, gate order i, f, o, g), w_ss (4h, h, 2) -> h (N, h, H, W)."""
    return diagonal_lstm_with_cell(gates, w_ss, reverse=reverse)[0]


def diagonal_lstm_literal(gates: torch.Tensor, w_ss: torch.Tensor) -> torch.Tensor:
    """The recurrence run literally on the zero-filled skewed gates, no state zeroing (see the module docstring)."""
    return _scan(gates, w_ss, zero_outside=False)[0]


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Row i takes row i-1; row 0 is zero."""
    return F.pad(x, (0, 0, 1, 0))[:, :, : x.shape[2]]


def diagonal_bilstm(
    x: torch.Tensor,
    w_is: torch.Tensor,
    b_is: torch.Tensor | None,
    w_ss: torch.Tensor,
    w_is_rev: torch.Tensor,
    b_is_rev: torch.Tensor | None,
    w_ss_rev: torch.Tensor,
    w_out: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    *,
    in_groups: torch.Tensor | None = None,
    gate_groups: torch.Tensor | None = None,
    hidden_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Diagonal BiLSTM layer: per direction a 1x1 mask-B input-to-state conv (colour groups per gate block)
    and a diagonal scan; the right-to-left output is shifted down one row (so a pixel never sees its own row to
    the right) and added. With w_out: the paper's residual, x + conv1x1_maskB(h)."""
    gates = masked_conv2d(x, w_is, b_is, mask="B", in_groups=in_groups, out_groups=gate_groups)
    gates_rev = masked_conv2d(x, w_is_rev, b_is_rev, mask="B", in_groups=in_groups, out_groups=gate_groups)
    h = diagonal_lstm(gates, w_ss) + shift_down(diagonal_lstm(gates_rev, w_ss_rev, reverse=True))
    if w_out is None:
        return h
    return x + masked_conv2d(h, w_out, b_out, mask="B", in_groups=hidden_groups, out_groups=in_groups)
