"""Inverse autoregressive flow modules (Kingma, Salimans et al. 2016).

IAFStep: a MADE produces (m, s) from z (and context h); z' = σ z + (1 − σ) m with σ = sigmoid(s) ("gated",
eq. 14) or z' = (z − m) exp(−s) ("affine"); the last MADE layer is fused with the update
(gm.ops.iaf_made_output), so m and s never go to memory, and the whole step is one op (gm.ops.made_iaf_step).
IAFFlow chains steps, reversing the variable order between steps, and sums the log-determinants.

ARConv2d / ARMultiConv2d: the convolutional autoregressive network of the paper for latent maps (N, C, H, W),
on gm.nn.MaskedConv2d. The order is raster over pixels and channel order within a pixel: taps above and left
of the centre see every channel; at the centre, a unit of channel group g sees input groups ≤ g (hidden
layers, mask "B") or < g (output layer, strict, mask "A"). Hidden channel j belongs to group ⌊j·C/hidden⌋.
IAFConvStep applies the step to a latent map with an ARMultiConv2d; with reverse=True it follows the exact reverse
of that order (pixels bottom-right first, channels C−1..0 within a pixel): the map is flipped in H and W around a
net whose channel groups are reversed. IAFConvFlow chains conv steps, alternating the two orders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gm._checks import check_choice, check_count, check_tensor
from gm.nn.made import MADE
from gm.nn.masked_conv import MaskedConv2d
from gm.ops.iaf import MODES, iaf_step
from gm.ops.made_iaf import made_iaf_step

# Initial bias of s in gated mode: σ ≈ sigmoid(1) ≈ 0.73, so a fresh step stays close to the identity
# (the paper's "forget gate bias" advice, section 4).
GATE_BIAS = 1.0


class IAFStep(nn.Module):
    """forward(z (N, D), h=None (N, context)) -> (z' (N, D), logdet (N,))."""

    def __init__(
        self,
        features: int,
        hidden: int,
        n_hidden: int = 2,
        context: int = 0,
        mode: str = "gated",
        order: str | torch.Tensor = "natural",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("mode", mode, MODES)
        self.mode, self.backend = mode, backend
        self.made = MADE(features, hidden, n_hidden, context, order, heads=2, backend=backend)
        if mode == "gated":
            with torch.no_grad():
                self.made.output.bias[features:].fill_(GATE_BIAS)

    def forward(self, z: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        made = self.made
        check_tensor("z", z, ndim=2)
        if z.shape[1] != made.features:
            raise ValueError(f"z must have features={made.features} columns, got shape {tuple(z.shape)}")
        if (h is None) != (made.context == 0):
            raise ValueError(f"h must be given exactly when context > 0 (context={made.context}), got "
                             f"{'None' if h is None else tuple(h.shape)}")  # fmt: skip
        layers = [*made.layers, made.output]
        # One op for the whole step (one autograd node in eager mode: gm.ops.made_iaf).
        return made_iaf_step(
            z, [layer.weight for layer in layers], [layer.mask for layer in layers], [layer.bias for layer in layers],
            context=None if h is None else h.to(z.dtype), mode=self.mode, activation=made.layers[0].activation,
            backend=self.backend,
        )  # fmt: skip


class _StepChain(nn.Module):
    """Runs `self.steps` in turn; forward(z, h=None) -> (z after the last step, Σ logdet (N,))."""

    steps: nn.ModuleList

    def forward(self, z: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        total = z.new_zeros(z.shape[0])
        for step in self.steps:
            z, logdet = step(z, h)
            total = total + logdet
        return z, total


class IAFFlow(_StepChain):
    """`steps` IAFSteps, the order reversed between consecutive steps; forward(z, h=None) -> (z, Σ logdet)."""

    def __init__(
        self,
        features: int,
        hidden: int,
        steps: int,
        n_hidden: int = 2,
        context: int = 0,
        mode: str = "gated",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_count(steps=steps)
        orders = ["natural" if i % 2 == 0 else "reversed" for i in range(steps)]
        self.steps = nn.ModuleList(
            IAFStep(features, hidden, n_hidden, context, mode, order, backend) for order in orders
        )


def channel_groups(channels: int, order_size: int, reverse: bool = False) -> torch.Tensor:
    """Autoregressive group of each of `channels` channels for an order over `order_size` variables."""
    g = (torch.arange(channels) * order_size) // channels
    return (order_size - 1 - g) if reverse else g


class ARConv2d(MaskedConv2d):
    """Masked convolution whose centre tap follows a per-channel autoregressive order over `order_size` channels
    (strict=True: output group g sees input groups < g, mask "A"; else ≤ g, mask "B")."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        order_size: int,
        kernel_size: int = 3,
        strict: bool = False,
        out_blocks: int = 1,
        reverse: bool = False,
        backend: str | None = None,
    ) -> None:
        check_count(order_size=order_size, out_blocks=out_blocks)
        super().__init__(in_channels, out_channels, kernel_size, mask="A" if strict else "B", backend=backend)
        if out_channels % out_blocks:
            raise ValueError(f"out_channels must be a multiple of out_blocks={out_blocks}, got {out_channels}")
        del self.in_groups, self.out_groups
        self.register_buffer("in_groups", channel_groups(in_channels, order_size, reverse), persistent=False)
        out_g = channel_groups(out_channels // out_blocks, order_size, reverse).repeat(out_blocks)
        self.register_buffer("out_groups", out_g, persistent=False)


class ARMultiConv2d(nn.Module):
    """The IAF paper's autoregressive convnet: ELU(ARConv(z)) (+ 1×1 conv of the context h), n_hidden − 1 more
    ELU(ARConv) layers, then a strict ARConv giving `heads` maps of `channels` channels.

    forward(z (N, C, H, W), h=None (N, context, H, W)) -> tuple of `heads` tensors (N, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        n_hidden: int = 2,
        context: int = 0,
        kernel_size: int = 3,
        heads: int = 2,
        reverse: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_count(channels=channels, hidden=hidden, n_hidden=n_hidden, heads=heads)
        check_count(0, context=context)
        self.channels, self.heads, self.context = channels, heads, context
        kw = dict(order_size=channels, kernel_size=kernel_size, reverse=reverse, backend=backend)
        self.hidden = nn.ModuleList(
            [ARConv2d(channels, hidden, **kw)] + [ARConv2d(hidden, hidden, **kw) for _ in range(n_hidden - 1)]
        )
        self.context_proj = nn.Conv2d(context, hidden, 1) if context else None
        self.output = ARConv2d(hidden, heads * channels, strict=True, out_blocks=heads, **kw)

    def forward(self, z: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if (h is None) != (self.context_proj is None):
            raise ValueError(f"h must be given exactly when context > 0 (context={self.context})")
        x = self.hidden[0](z)
        if h is not None:
            x = x + self.context_proj(h)
        x = F.elu(x)
        for layer in self.hidden[1:]:
            x = F.elu(layer(x))
        return tuple(self.output(x).chunk(self.heads, dim=1))


class IAFConvStep(nn.Module):
    """IAF step on a latent map: (m, s) = ARMultiConv2d(z, h); forward -> (z' (N, C, H, W), logdet (N,)).

    The order is raster over pixels, channels 0..C−1 within a pixel; reverse=True takes its exact reverse.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        n_hidden: int = 2,
        context: int = 0,
        kernel_size: int = 3,
        mode: str = "gated",
        reverse: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("mode", mode, MODES)
        self.mode, self.reverse, self.backend = mode, reverse, backend
        self.net = ARMultiConv2d(channels, hidden, n_hidden, context, kernel_size, 2, reverse, backend)
        if mode == "gated" and self.net.output.bias is not None:
            with torch.no_grad():
                self.net.output.bias[channels:].fill_(GATE_BIAS)

    def forward(self, z: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reverse:
            m, s = self.net(z, h)
            return iaf_step(z, m, s, mode=self.mode, backend=self.backend)
        # The masked convolutions only look up and left: the reversed raster order is the natural one on the map
        # flipped in H and W (the logdet, a sum over the map, does not change).
        spatial = (-2, -1)
        z_flipped = z.flip(spatial)
        m, s = self.net(z_flipped, None if h is None else h.flip(spatial))
        z_new, logdet = iaf_step(z_flipped, m, s, mode=self.mode, backend=self.backend)
        return z_new.flip(spatial), logdet


class IAFConvFlow(_StepChain):
    """`steps` IAFConvSteps on latent maps, the (pixel, channel) order reversed between consecutive steps;
    forward(z (N, C, H, W), h=None (N, context, H, W)) -> (z, Σ logdet (N,))."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        steps: int,
        n_hidden: int = 2,
        context: int = 0,
        kernel_size: int = 3,
        mode: str = "gated",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_count(steps=steps)
        self.steps = nn.ModuleList(
            IAFConvStep(channels, hidden, n_hidden, context, kernel_size, mode, i % 2 == 1, backend)
            for i in range(steps)
        )
