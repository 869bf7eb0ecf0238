"""Thin nn.Modules over gm.ops."""

from gm.nn.diagonal_lstm import DiagonalBiLSTM, DiagonalLSTM
from gm.nn.iaf import ARConv2d, ARMultiConv2d, IAFConvFlow, IAFConvStep, IAFFlow, IAFStep
from gm.nn.made import MADE, MaskedLinear
from gm.nn.masked_conv import MaskedConv2d, color_groups
from gm.nn.minibatch import MinibatchDiscrimination
from gm.nn.row_lstm import RowLSTM

__all__ = [
    "MADE",
    "ARConv2d",
    "ARMultiConv2d",
    "DiagonalBiLSTM",
    "DiagonalLSTM",
    "IAFConvFlow",
    "IAFConvStep",
    "IAFFlow",
    "IAFStep",
    "MaskedConv2d",
    "MaskedLinear",
    "MinibatchDiscrimination",
    "RowLSTM",
    "color_groups",
]
