"""PixelCNN (van den Oord, Kalchbrenner, Kavukcuoglu 2016, "Pixel Recurrent Neural Networks", section 3.5, table 1).

    x -> 7x7 conv mask A (-> 2h maps) -> `layers` residual blocks -> head -> logits
    residual block: ReLU, 1x1 mask B (2h -> h), ReLU, 3x3 mask B (h -> h), ReLU, 1x1 mask B (h -> 2h), + input
    head: two (ReLU, 1x1 mask B) layers of `head` maps, then (ReLU, 1x1 mask B) to the logits

Every convolution is gm.nn.MaskedConv2d, so the kernels run with the backend the model was built with. With 3
colours each layer's maps are split R, G, B (colour groups), which gives the paper's R -> G -> B ordering.
"""

from __future__ import annotations

import torch
from torch import nn

from gm.models.common import OutputHead, PixelModel
from gm.nn import MaskedConv2d
from gm.nn.relu_conv import relu_conv_chain

# h is a multiple of 3 in the colour presets: colour groups split every layer's maps evenly into R, G, B
# (the paper's h=128 and 1024 head maps become 129 and 1026).
PRESETS = {
    "mnist": dict(channels=1, levels=2, hidden=16, layers=7, head=32),
    "cifar10": dict(channels=3, levels=256, hidden=129, layers=15, head=1026),
    "tiny": dict(channels=1, levels=2, hidden=4, layers=2, head=8),
    "tiny-rgb": dict(channels=3, levels=256, hidden=6, layers=1, head=12),
}


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int, colors: int, backend: str | None) -> None:
        super().__init__()
        self.reduce = MaskedConv2d(2 * hidden, hidden, 1, "B", colors=colors, backend=backend)
        self.conv = MaskedConv2d(hidden, hidden, 3, "B", colors=colors, backend=backend)
        self.expand = MaskedConv2d(hidden, 2 * hidden, 1, "B", colors=colors, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x + expand(relu(conv(relu(reduce(relu(x)))))): one fused node where the convs run on triton
        return relu_conv_chain(x, (self.reduce, self.conv, self.expand), residual=True)


class PixelCNN(PixelModel):
    name = "pixelcnn"
    channels_last = True

    def __init__(
        self,
        channels: int = 1,
        levels: int = 2,
        hidden: int = 16,
        layers: int = 7,
        head: int = 32,
        backend: str | None = None,
    ) -> None:
        super().__init__(channels, levels, backend)
        self.config = dict(channels=channels, levels=levels, hidden=hidden, layers=layers, head=head)
        self.stem = MaskedConv2d(channels, 2 * hidden, 7, "A", colors=self.colors, backend=backend)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, self.colors, backend) for _ in range(layers))
        self.head = OutputHead(2 * hidden, head, self.out_channels, self.colors, backend)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return h

    def layers_at(self, n: int, width: int, dtype: torch.dtype) -> list:
        from gm.models.incremental import ChainAt  # noqa: PLC0415

        return [ChainAt((b.reduce, b.conv, b.expand), True, n, width, dtype) for b in self.blocks]
