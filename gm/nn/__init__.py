"""Thin nn.Modules over gm.ops."""

from gm.nn.masked_conv import MaskedConv2d, color_groups
from gm.nn.diagonal_lstm import DiagonalBiLSTM, DiagonalLSTM
from gm.nn.iaf import ARConv2d, ARMultiConv2d, IAFConvStep, IAFFlow, IAFStep
from gm.nn.made import MADE, MaskedLinear
from gm.nn.minibatch import MinibatchDiscrimination
from gm.nn.row_lstm import RowLSTM

__all__ = [
    "DiagonalBiLSTM", "DiagonalLSTM",
    "MaskedConv2d", "color_groups",
    "ARConv2d", "ARMultiConv2d", "IAFConvStep", "IAFFlow", "IAFStep", "MADE", "MaskedLinear",
]  # fmt: skip
__all__ += ["MinibatchDiscrimination"]
__all__ += ["RowLSTM"]
