"""Plain-PyTorch references, written for clarity: the tests' oracle and the benchmarks' baseline.

The fast paths never import this package.
"""

from gm.reference.diagonal_lstm import diagonal_bilstm, diagonal_lstm
from gm.reference.iaf import iaf_made_output, iaf_step, masked_linear
from gm.reference.masked_conv import conv_mask, masked_conv2d
from gm.reference.minibatch import minibatch_discrimination, minibatch_discrimination_layer
from gm.reference.row_lstm import row_lstm

__all__ = [
    "conv_mask",
    "diagonal_bilstm",
    "diagonal_lstm",
    "iaf_made_output",
    "iaf_step",
    "masked_conv2d",
    "masked_linear",
    "minibatch_discrimination",
    "minibatch_discrimination_layer",
    "row_lstm",
]
