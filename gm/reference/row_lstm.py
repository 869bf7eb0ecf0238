"""Plain-PyTorch Row LSTM scan (PixelRNN, van den Oord et al. 2016, section 3.1): the oracle and the baseline.

gates (N, 4h, H, W) is the input-to-state result (bias included), gate order i, f, o, g; w_ss (4h, h, k), k odd.
For each row r, top to bottom:
    s = conv1d(h_{r-1}, w_ss, padding=k // 2)          (along the width)
    [i, f, o, g] = gates[:, :, r] + s
    c_r = sigmoid(f) * c_{r-1} + sigmoid(i) * tanh(g)
    h_r = sigmoid(o) * tanh(c_r)
with h_{-1} = h0 (or 0) and c_{-1} = c0 (or 0), both (N, h, W). Returns h (N, h, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_lstm(
    gates: torch.Tensor,
    w_ss: torch.Tensor,
    *,
    h0: torch.Tensor | None = None,
    c0: torch.Tensor | None = None,
) -> torch.Tensor:
    n, four_h, height, width = gates.shape
    hidden = four_h // 4
    k = w_ss.shape[2]
    h = h0 if h0 is not None else gates.new_zeros(n, hidden, width)
    c = c0 if c0 is not None else gates.new_zeros(n, hidden, width)
    rows = []
    for r in range(height):
        z = gates[:, :, r] + F.conv1d(h, w_ss, padding=k // 2)
        i, f, o, g = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        rows.append(h)
    return torch.stack(rows, dim=2)


def row_lstm_backward(
    dy: torch.Tensor,
    gates: torch.Tensor,
    w_ss: torch.Tensor,
    h0: torch.Tensor | None = None,
    c0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of row_lstm written out (the math every fast backend implements), without autograd.

    Returns (dgates, dw_ss, dh0, dc0); dh0/dc0 are the gradients of the initial state (zero initial state
    when h0/c0 are None). Rows run bottom to top with dh, dc carried from row r+1:
        dh_r += dy_r;  dc_r += dh_r sig(o)(1 - tanh(c_r)^2)
        dz_i = dc_r tanh(g) sig'(i),  dz_f = dc_r c_{r-1} sig'(f),  dz_o = dh_r tanh(c_r) sig'(o),
        dz_g = dc_r sig(i)(1 - tanh(g)^2)
        dc_{r-1} = dc_r sig(f);  dh_{r-1} = conv_transpose1d(dz, w_ss);  dw_ss += dz (x) h_{r-1}
    """
    n, four_h, height, width = gates.shape
    hidden, k = four_h // 4, w_ss.shape[2]
    h_prev = h0 if h0 is not None else gates.new_zeros(n, hidden, width)
    c_prev = c0 if c0 is not None else gates.new_zeros(n, hidden, width)
    hs, cs, acts = [h_prev], [c_prev], []
    for r in range(height):  # the forward again, keeping every row's state and activations
        z = gates[:, :, r] + F.conv1d(hs[-1], w_ss, padding=k // 2)
        i, f, o, g = z.chunk(4, dim=1)
        i, f, o, g = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
        cs.append(f * cs[-1] + i * g)
        hs.append(o * torch.tanh(cs[-1]))
        acts.append((i, f, o, g))
    dgates = torch.empty_like(gates)
    dw = torch.zeros_like(w_ss)
    dh = torch.zeros_like(h_prev)
    dc = torch.zeros_like(c_prev)
    for r in reversed(range(height)):
        i, f, o, g = acts[r]
        tc = torch.tanh(cs[r + 1])
        dh = dh + dy[:, :, r]
        dc = dc + dh * o * (1 - tc * tc)
        dz = torch.cat([dc * g * i * (1 - i), dc * cs[r] * f * (1 - f), dh * tc * o * (1 - o), dc * i * (1 - g * g)], 1)
        dgates[:, :, r] = dz
        dc = dc * f
        dh = F.conv_transpose1d(dz, w_ss, padding=k // 2)
        dw += F.conv1d(hs[r].transpose(0, 1), dz.transpose(0, 1), padding=k // 2).transpose(0, 1)
    return dgates, dw, dh, dc
