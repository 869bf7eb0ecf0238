"""MaskedConv2d and the colour-group helper."""

from __future__ import annotations

import math

import torch
from torch import nn

from gm._checks import check_choice, check_count
from gm.ops.masked_conv import masked_conv2d


def color_groups(channels: int, colors: int = 3, blocks: int = 1) -> torch.Tensor:
    """Colour index of each of `channels` channels, split into `blocks` equal blocks (e.g. the 4 gates of an
    LSTM), each block split into `colors` contiguous parts: R channels, then G, then B.

    >>> color_groups(6, colors=3)
    tensor([0, 0, 1, 1, 2, 2])
    """
    if colors < 1 or blocks < 1:
        raise ValueError(f"colors and blocks must be >= 1, got colors={colors}, blocks={blocks}")
    if channels % (colors * blocks) != 0:
        raise ValueError(f"channels must be a multiple of colors*blocks={colors * blocks}, got {channels}")
    per = channels // (colors * blocks)
    return torch.arange(colors).repeat_interleave(per).repeat(blocks)


class MaskedConv2d(nn.Module):
    """PixelCNN masked convolution ('same' padding) backed by gm.ops.masked_conv2d.

    colors=3 orders channels R, G, B within each of `blocks` blocks of input and output channels: with mask "A"
    an output colour sees strictly earlier input colours at the centre pixel, with "B" also its own.
    Input channels are grouped with blocks=1 unless `in_blocks` says otherwise.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        mask: str = "B",
        colors: int = 1,
        blocks: int = 1,
        in_blocks: int = 1,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_count(in_channels=in_channels, out_channels=out_channels, colors=colors, blocks=blocks,
                    in_blocks=in_blocks)  # fmt: skip
        check_choice("mask", mask, ("A", "B"))
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if not all(isinstance(k, int) and k >= 1 and k % 2 == 1 for k in (kh, kw)):
            raise ValueError(f"kernel_size must be odd and >= 1, got ({kh}, {kw})")
        for name, channels, per, per_name in (("in_channels", in_channels, in_blocks, "in_blocks"),
                                              ("out_channels", out_channels, blocks, "blocks")):  # fmt: skip
            if colors > 1 and channels % (colors * per):
                raise ValueError(f"{name} must be a multiple of colors*{per_name}={colors * per}, got {channels}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.mask, self.colors, self.backend = mask, colors, backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        if colors > 1:
            self.register_buffer("in_groups", color_groups(in_channels, colors, in_blocks), persistent=False)
            self.register_buffer("out_groups", color_groups(out_channels, colors, blocks), persistent=False)
        else:
            self.in_groups = self.out_groups = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-uniform over the kept fan-in (about half the taps), like nn.Conv2d over its full fan-in.
        kh, kw = self.kernel_size
        kept = (kh // 2) * kw + kw // 2 + 1
        bound = 1.0 / math.sqrt(self.in_channels * kept)
        nn.init.uniform_(self.weight, -math.sqrt(3) * bound, math.sqrt(3) * bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_conv2d(
            x, self.weight, self.bias, mask=self.mask, in_groups=self.in_groups, out_groups=self.out_groups,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, mask={self.mask!r}, "
            f"colors={self.colors}, bias={self.bias is not None}"
        )
