"""Plain-PyTorch minibatch discrimination (Salimans et al. 2016), exactly as users write it: the oracle and the
baseline. It builds the N x N x B x C difference tensor, so it needs O(N^2 B C) memory.

    c_b(i, j) = exp(-sum_c |m[i, b, c] - m[j, b, c]|)
    o[i, b]   = sum_{j != i} c_b(i, j)      (exclude_self=True; j = i kept when False)

The layer: m = f @ T viewed as (N, B, C); output cat([f, o + bias], dim=1), o computed per group when given.
(A bias on m would do nothing: o depends on differences of rows of m only.)
"""

from __future__ import annotations

import torch


def minibatch_discrimination(m: torch.Tensor, *, exclude_self: bool = True) -> torch.Tensor:
    """m (N, B, C) -> o (N, B). The j = i term is masked out (not subtracted), so exclude_self is exact; its
    gradient is zero there as well (and abs'(0) = 0 in autograd, so tied rows contribute no gradient)."""
    diff = m.unsqueeze(1) - m.unsqueeze(0)  # (N, N, B, C): the tensor the fused kernels never build
    c = torch.exp(-diff.abs().sum(-1))  # (N, N, B)
    if exclude_self:
        eye = torch.eye(m.shape[0], dtype=torch.bool, device=m.device).unsqueeze(-1)
        c = c.masked_fill(eye, 0.0)
    return c.sum(1)


def minibatch_discrimination_cdist(m: torch.Tensor, *, exclude_self: bool = True) -> torch.Tensor:
    """The torch.cdist(p=1) formulation: per kernel b, the (N, N) L1 distances of the rows of m[:, b, :]."""
    x = m.transpose(0, 1)  # (B, N, C)
    c = torch.exp(-torch.cdist(x, x, p=1))  # (B, N, N)
    if exclude_self:
        eye = torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
        c = c.masked_fill(eye, 0.0)
    return c.sum(2).transpose(0, 1)


def group_slices(groups, n: int, device=None) -> list[torch.Tensor] | list[slice]:
    """Rows of each group: a list of split sizes -> slices; an int tensor of group ids (N,) -> index tensors."""
    if groups is None:
        return [slice(0, n)]
    if isinstance(groups, torch.Tensor):
        return [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]
    out, start = [], 0
    for size in groups:
        out.append(slice(start, start + int(size)))
        start += int(size)
    return out


def minibatch_discrimination_layer(
    f: torch.Tensor,
    T: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernels: int,
    dim: int,
    exclude_self: bool = True,
    groups=None,
) -> torch.Tensor:
    """f (N, A), T (A, kernels*dim), bias (kernels,) -> cat([f, o + bias], 1) of shape (N, A + kernels); o is
    computed separately within each group (split sizes or a group-id tensor), e.g. real and generated samples."""
    m = (f @ T).view(f.shape[0], kernels, dim)
    o = m.new_zeros(f.shape[0], kernels)
    for rows in group_slices(groups, f.shape[0], f.device):
        o[rows] = minibatch_discrimination(m[rows], exclude_self=exclude_self)
    if bias is not None:
        o = o + bias
    return torch.cat([f, o], dim=1)


def minibatch_discrimination_backward(
    grad: torch.Tensor, m: torch.Tensor, *, exclude_self: bool = True
) -> torch.Tensor:
    """dL/dm[i,b,c] = -sum_j (g[i,b] + g[j,b]) c_b(i,j) sign(m[i,b,c] - m[j,b,c]), broadcast over N x N x B x C."""
    diff = m.unsqueeze(1) - m.unsqueeze(0)
    c = torch.exp(-diff.abs().sum(-1))
    if exclude_self:
        eye = torch.eye(m.shape[0], dtype=torch.bool, device=m.device).unsqueeze(-1)
        c = c.masked_fill(eye, 0.0)
    w = (grad.unsqueeze(1) + grad.unsqueeze(0)) * c  # (N, N, B)
    return -(w.unsqueeze(-1) * torch.sign(diff)).sum(1)
