"""gm's operations: argument checks, backend choice, autograd and torch.library registration (one file each)."""

from gm.ops.diagonal_lstm import diagonal_lstm
from gm.ops.iaf import iaf_made_output, iaf_step
from gm.ops.made_iaf import made_iaf_step
from gm.ops.masked_conv import masked_conv2d
from gm.ops.masked_linear import masked_linear
from gm.ops.minibatch import minibatch_discrimination
from gm.ops.row_lstm import row_lstm

__all__ = [
    "diagonal_lstm",
    "iaf_made_output",
    "iaf_step",
    "made_iaf_step",
    "masked_conv2d",
    "masked_linear",
    "minibatch_discrimination",
    "row_lstm",
]
