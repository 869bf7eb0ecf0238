"""Plain-PyTorch references, written for clarity: the tests' oracle and the benchmarks' baseline.

The fast paths never import this package.
"""

from gm.reference.masked_conv import conv_mask, masked_conv2d

__all__ = ["conv_mask", "masked_conv2d"]
