"""Plain-PyTorch masked convolution (PixelCNN masks A/B with channel groups): the oracle and the baseline.

mask[o, c, ky, kx] = 1 for taps above the centre row, and for taps left of the centre in the centre row;
at the centre tap it is 1 iff out_groups[o] > in_groups[c] (mask "A") or >= (mask "B"); 0 elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_mask(
    weight_shape: tuple[int, int, int, int],
    mask: str,
    in_groups: torch.Tensor | None = None,
    out_groups: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    cout, cin, kh, kw = weight_shape
    m = torch.zeros(cout, cin, kh, kw, device=device)
    cy, cx = kh // 2, kw // 2
    m[:, :, :cy, :] = 1
    m[:, :, cy, :cx] = 1
    gin = torch.zeros(cin, dtype=torch.long, device=device) if in_groups is None else in_groups.to(device).long()
    gout = torch.zeros(cout, dtype=torch.long, device=device) if out_groups is None else out_groups.to(device).long()
    allowed = gout[:, None] > gin[None, :] if mask == "A" else gout[:, None] >= gin[None, :]
    m[:, :, cy, cx] = allowed.float()
    return m


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mask: str = "B",
    in_groups: torch.Tensor | None = None,
    out_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    m = conv_mask(tuple(weight.shape), mask, in_groups, out_groups, weight.device).to(weight.dtype)
    kh, kw = weight.shape[-2:]
    return F.conv2d(x, weight * m, bias, padding=(kh // 2, kw // 2))
