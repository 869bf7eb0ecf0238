"""Plain-PyTorch references, written for clarity: the tests' oracle and the benchmarks' baseline.

The fast paths never import this package.
"""

from gm.reference.masked_conv import conv_mask, masked_conv2d
from gm.reference.diagonal_lstm import diagonal_bilstm, diagonal_lstm
from gm.reference.iaf import iaf_made_output, iaf_step, masked_linear
from gm.reference.minibatch import minibatch_discrimination, minibatch_discrimination_layer

__all__ = [
    "diagonal_bilstm", "diagonal_lstm", "conv_mask", "masked_conv2d", "iaf_made_output", "iaf_step", "masked_linear",
]
__all__ += ["minibatch_discrimination", "minibatch_discrimination_layer"]
