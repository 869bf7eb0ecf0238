"""gm's operations: argument checks, backend choice, autograd and torch.library registration (one file each)."""

from gm.ops.masked_conv import masked_conv2d
from gm.ops.diagonal_lstm import diagonal_lstm
from gm.ops.iaf import iaf_made_output, iaf_step
from gm.ops.masked_linear import masked_linear
from gm.ops.minibatch import minibatch_discrimination

__all__ = ["diagonal_lstm", "masked_conv2d", "iaf_made_output", "iaf_step", "masked_linear"]
__all__ += ["minibatch_discrimination"]
