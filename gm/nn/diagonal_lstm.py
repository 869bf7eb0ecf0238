"""DiagonalLSTM and DiagonalBiLSTM: PixelRNN's diagonal layers (van den Oord et al. 2016, Sec. 3.2) on gm's ops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gm._checks import check_choice
from gm.nn.masked_conv import MaskedConv2d
from gm.ops.diagonal_lstm import diagonal_lstm


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


def both_directions(gates, w_ss, gates_rev, w_ss_rev, backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(diagonal_lstm(gates, w_ss), diagonal_lstm(gates_rev, w_ss_rev, reverse=True)), the reverse scan on a side
    stream when on a GPU outside torch.compile (CONCURRENT_DIRECTIONS)."""
    if not (CONCURRENT_DIRECTIONS and gates.is_cuda) or torch.compiler.is_compiling():
        return (diagonal_lstm(gates, w_ss, backend=backend),
                diagonal_lstm(gates_rev, w_ss_rev, reverse=True, backend=backend))  # fmt: skip
    main = torch.cuda.current_stream(gates.device)
    side = _side_stream(gates.device)
    side.wait_stream(main)  # gates_rev and the weights are ready
    with torch.cuda.stream(side):
        h_rev = diagonal_lstm(gates_rev, w_ss_rev, reverse=True, backend=backend)
    h = diagonal_lstm(gates, w_ss, backend=backend)
    main.wait_stream(side)
    for t in (gates_rev, w_ss_rev):  # allocated on main, read on side: not reusable before side is done with them
        t.record_stream(side)
    h_rev.record_stream(main)  # allocated on side, used on main from here on
    return h, h_rev


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
        gates, gates_rev = self.input_to_state(x).chunk(2, dim=1)
        h, h_rev = both_directions(gates, self.w_ss, gates_rev, self.w_ss_rev, backend=self.backend)
        h = h + shift_down(h_rev)
        if self.output is None:
            return h
        return x + self.output(h)

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.hidden}, colors={self.colors}, residual={self.output is not None}"
