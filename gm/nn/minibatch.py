"""MinibatchDiscrimination: the Improved-GAN discriminator feature (Salimans et al. 2016, section 3.2)."""

from __future__ import annotations

import torch
from torch import nn

from gm._checks import check_count, check_same, check_tensor
from gm.ops.minibatch import minibatch_discrimination


def _group_rows(groups, n: int, device) -> tuple[list[int], torch.Tensor | None]:
    """(split sizes, row order or None) for `groups`: a list of sizes summing to N, or an int tensor of group ids."""
    if isinstance(groups, torch.Tensor):
        check_tensor("groups", groups, ndim=1, dtypes=(torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8))
        if groups.shape[0] != n:
            raise ValueError(f"groups must have one group id per row of f ({n}), got {groups.shape[0]}")
        if groups.device != device:
            raise ValueError(f"groups is on {groups.device} but f is on {device}: put them on one device")
        order = torch.argsort(groups, stable=True)
        sizes = [int(s) for s in torch.unique(groups, return_counts=True)[1].tolist()]
        return sizes, order
    sizes = [int(s) for s in groups]
    if any(s < 1 for s in sizes) or sum(sizes) != n:
        raise ValueError(f"groups as split sizes must be positive and sum to the batch size {n}, got {sizes}")
    return sizes, None


class MinibatchDiscrimination(nn.Module):
    """y = cat([f, o + bias], 1) with m = f @ T viewed as (N, kernels, dim) and
    o[i, b] = sum_{j != i} exp(-||m[i, b] - m[j, b]||_1), computed by gm.ops.minibatch_discrimination
    (no N x N x kernels x dim tensor).

    The bias (kernels,) is added to o, as in the paper's code: a bias on m would be a no-op, since o depends only
    on differences between rows of m (its gradient would be exactly zero).

    forward(f, groups=None): `groups` computes o separately within each group in one call, as the paper does for
    real and generated samples: a list of split sizes (e.g. [n_real, n_fake]) or an int tensor of group ids (N,).
    T is initialised normal with std 0.05 as in the paper's code; the bias starts at zero.

    >>> layer = MinibatchDiscrimination(256, kernels=100, dim=5)
    >>> layer(torch.randn(64, 256), groups=[32, 32]).shape
    torch.Size([64, 356])
    """

    def __init__(
        self,
        in_features: int,
        kernels: int = 100,
        dim: int = 5,
        bias: bool = True,
        exclude_self: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_count(in_features=in_features, kernels=kernels, dim=dim)
        self.in_features, self.kernels, self.dim = in_features, kernels, dim
        self.exclude_self, self.backend = exclude_self, backend
        self.T = nn.Parameter(torch.empty(in_features, kernels * dim))
        self.bias = nn.Parameter(torch.empty(kernels)) if bias else None
        self.reset_parameters()

    @property
    def out_features(self) -> int:
        return self.in_features + self.kernels

    def reset_parameters(self) -> None:
        nn.init.normal_(self.T, std=0.05)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, f: torch.Tensor, groups=None) -> torch.Tensor:
        check_tensor("f", f, ndim=2)
        check_same("f", f, T=self.T)
        if f.shape[1] != self.in_features:
            raise ValueError(f"f must have in_features={self.in_features} columns, got shape {tuple(f.shape)}")
        m = (f @ self.T).view(f.shape[0], self.kernels, self.dim)
        o = self._features(m, groups)
        if self.bias is not None:
            o = o + self.bias
        return torch.cat([f, o], dim=1)

    def _features(self, m: torch.Tensor, groups) -> torch.Tensor:
        def op(x):
            return minibatch_discrimination(x, exclude_self=self.exclude_self, backend=self.backend)

        if groups is None:
            return op(m)
        sizes, order = _group_rows(groups, m.shape[0], m.device)
        if order is None:
            return torch.cat([op(part) for part in torch.split(m, sizes)], dim=0)
        parts = torch.cat([op(part) for part in torch.split(m[order], sizes)], dim=0)
        return torch.empty_like(parts).index_copy(0, order, parts)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, kernels={self.kernels}, dim={self.dim}, "
            f"bias={self.bias is not None}, exclude_self={self.exclude_self}"
        )
