"""RowLSTM: the Row LSTM layer of PixelRNN (van den Oord et al. 2016, section 3.1), backed by gm.ops.row_lstm."""

from __future__ import annotations

import math

import torch
from torch import nn

from gm.nn.masked_conv import MaskedConv2d
from gm.ops.row_lstm import row_lstm


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
        gates = self.input_to_state(x)
        h0 = c0 = None
        if self.h0 is not None:
            n, _, _, width = gates.shape
            h0 = self.h0.to(gates.dtype).view(1, -1, 1).expand(n, -1, width)
            c0 = self.c0.to(gates.dtype).view(1, -1, 1).expand(n, -1, width)
        h = row_lstm(gates, self.w_ss.to(gates.dtype), h0=h0, c0=c0, backend=self.backend)
        return x + self.out(h) if self.out is not None else h

    def extra_repr(self) -> str:
        return (
            f"{self.in_ch}, {self.hidden}, kernel_size={self.kernel_size}, colors={self.colors}, "
            f"residual={self.residual}, learn_init={self.h0 is not None}"
        )
