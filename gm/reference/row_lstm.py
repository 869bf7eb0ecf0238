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
