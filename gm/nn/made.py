"""MADE (Germain et al. 2015): an autoregressive MLP through masked weights, on gm.ops.masked_linear.

Degrees. Input d gets degree order_pos(d) + 1 in 1..D (its position in the chosen order). Hidden units get degrees
in 1..max(D−1, 1), spread evenly and sorted ascending, so hidden-to-hidden masks are block-triangular and the
tile-skipping GEMM does about half the work. Hidden unit k sees unit j of the layer below iff deg(k) ≥ deg(j);
output d (every head) sees hidden unit k iff order_pos(d) + 1 > deg(k) (strict), so output d depends only on
inputs before d in the order. An optional context vector h is concatenated to the input with mask columns of
ones: every hidden unit sees it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gm._checks import check_choice, check_count, check_tensor
from gm.ops.masked_linear import ACTIVATIONS, check_binary, masked_linear


def input_degrees(features: int, order: str | torch.Tensor = "natural") -> torch.Tensor:
    """Degree (1..D) of each input: its position in the order, plus one. `order` is "natural", "reversed" or a
    permutation tensor whose entry d is the position of input d."""
    if isinstance(order, torch.Tensor):
        pos = order.to(torch.long).flatten().cpu()
        if pos.numel() != features or not torch.equal(pos.sort().values, torch.arange(features)):
            raise ValueError(f"order must be a permutation of 0..{features - 1}, got {order.tolist()}")
        return pos + 1
    if order == "natural":
        return torch.arange(1, features + 1)
    if order == "reversed":
        return torch.arange(features, 0, -1)
    raise ValueError(f"order must be 'natural', 'reversed' or a permutation tensor, got {order!r}")


def hidden_degrees(hidden: int, features: int) -> torch.Tensor:
    """Degrees in 1..max(D−1, 1), spread evenly over `hidden` units and sorted ascending."""
    top = max(features - 1, 1)
    return 1 + (torch.arange(hidden) * top) // hidden


def made_masks(
    features: int, hidden: int, n_hidden: int, order: str | torch.Tensor = "natural", heads: int = 2, context: int = 0
) -> list[torch.Tensor]:
    """The float 0/1 masks of each layer: (hidden, D + context), (hidden, hidden) × (n_hidden − 1),
    (heads·D, hidden)."""
    d_in = input_degrees(features, order)
    d_h = hidden_degrees(hidden, features)
    first = (d_h[:, None] >= d_in[None, :]).float()
    if context:
        first = torch.cat([first, torch.ones(hidden, context)], dim=1)
    masks = [first]
    masks += [(d_h[:, None] >= d_h[None, :]).float() for _ in range(n_hidden - 1)]
    out = (d_in[:, None] > d_h[None, :]).float()
    masks.append(out.repeat(heads, 1))
    return masks


class MaskedLinear(nn.Module):
    """y = act(x (W ⊙ M)^T + b) with a fixed 0/1 mask buffer (gm.ops.masked_linear)."""

    def __init__(self, mask: torch.Tensor, bias: bool = True, activation: str | None = None, backend=None) -> None:
        super().__init__()
        check_tensor("mask", mask, ndim=2, dtypes=None)
        check_choice("activation", activation, ACTIVATIONS)
        if mask.numel() == 0:
            raise ValueError(f"mask must have at least one row and column, got shape {tuple(mask.shape)}")
        check_binary("mask", mask)
        out_features, in_features = mask.shape
        self.in_features, self.out_features = in_features, out_features
        self.activation, self.backend = activation, backend
        self.register_buffer("mask", mask.clone().float())
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Uniform over the mean kept fan-in, like nn.Linear over its full fan-in.
        fan_in = max(1.0, float(self.mask.sum(dim=1).mean()))
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _apply(self, fn, recurse=True):
        # Keep the mask in float32 whatever dtype the module is cast to (it is 0/1; masked_linear casts it).
        out = super()._apply(fn, recurse)
        if self.mask.dtype != torch.float32:
            self.mask = self.mask.float()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.mask, self.bias, activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, activation={self.activation!r}, kept={int(self.mask.sum())}"


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: outputs `heads` blocks of D values, block j's entry d
    depending only on inputs before d in `order` (and on the context h, if any).

    forward(x (N, D), h=None (N, context)) -> (N, heads·D): [head 0 (D) | head 1 (D) | ...].
    """

    def __init__(
        self,
        features: int,
        hidden: int,
        n_hidden: int = 2,
        context: int = 0,
        order: str | torch.Tensor = "natural",
        heads: int = 2,
        activation: str = "elu",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_count(features=features, hidden=hidden, n_hidden=n_hidden, heads=heads)
        check_count(0, context=context)
        self.features, self.hidden, self.context, self.heads = features, hidden, context, heads
        masks = made_masks(features, hidden, n_hidden, order, heads, context)
        self.register_buffer("degrees", input_degrees(features, order), persistent=False)
        self.layers = nn.ModuleList(MaskedLinear(mk, activation=activation, backend=backend) for mk in masks[:-1])
        self.output = MaskedLinear(masks[-1], backend=backend)

    def trunk(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer's activations (N, hidden)."""
        if (h is None) != (self.context == 0):
            raise ValueError(f"h must be given exactly when context > 0 (context={self.context}), got "
                             f"{'None' if h is None else tuple(h.shape)}")  # fmt: skip
        out = x if h is None else torch.cat([x, h.to(x.dtype)], dim=1)
        for layer in self.layers:
            out = layer(out)
        return out

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.trunk(x, h))
