"""gm's operations: argument checks, backend choice, autograd and torch.library registration (one file each)."""

from gm.ops.masked_conv import masked_conv2d

__all__ = ["masked_conv2d"]
