"""Thin nn.Modules over gm.ops."""

from gm.nn.masked_conv import MaskedConv2d, color_groups

__all__ = ["MaskedConv2d", "color_groups"]
