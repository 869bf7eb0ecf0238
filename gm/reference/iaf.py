"""Plain-PyTorch IAF pieces (Kingma, Salimans et al. 2016): the oracle of the tests and the benchmark baseline.

masked_linear:      y = act(x (W ⊙ M)^T + b), act in {None, "elu", "relu"}.
iaf_step (gated):   σ = sigmoid(s), z' = σ z + (1 − σ) m, logdet = Σ log σ over all non-batch dims.
iaf_step (affine):  z' = (z − m) exp(−s), logdet = −Σ s.
iaf_made_output:    [m, s] = hidden (W ⊙ M)^T + b with weight rows 0..D−1 giving m and rows D..2D−1 giving s,
                    then iaf_step(z, m, s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "elu", "relu")
MODES = ("gated", "affine")


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "elu":
        return F.elu(y)
    if activation == "relu":
        return F.relu(y)
    raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> torch.Tensor:
    return activate(F.linear(x, weight * mask.to(weight.dtype), bias), activation)


def iaf_step(z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, *, mode: str = "gated"):
    dims = tuple(range(1, z.dim()))
    if mode == "gated":
        sig = torch.sigmoid(s)
        z_new = sig * z + (1 - sig) * m
        logdet = F.logsigmoid(s).sum(dim=dims) if dims else F.logsigmoid(s)
    elif mode == "affine":
        z_new = (z - m) * torch.exp(-s)
        logdet = -s.sum(dim=dims) if dims else -s
    else:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return z_new, logdet


def iaf_made_output(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    *,
    mode: str = "gated",
):
    out = masked_linear(hidden, weight, mask, bias)
    d = z.shape[1]
    return iaf_step(z, out[:, :d], out[:, d:], mode=mode)
