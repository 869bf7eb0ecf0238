"""A synthetic source of any size for throughput runs: deterministic random images (no meaning, right shape)."""

from __future__ import annotations

import torch


def synthetic(n_train: int, n_test: int, channels: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """{"train", "test"}: uint8 (N, channels, size, size) uniform grey levels 0..255 from a fixed seed;
    {"train_labels", "test_labels"}: int64 (N,) uniform classes 0..9 (meaningless, for the GANs' metrics)."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(0, 256, (n_train, channels, size, size), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (n_test, channels, size, size), generator=g, dtype=torch.uint8)
    train_labels = torch.randint(0, 10, (n_train,), generator=g)
    test_labels = torch.randint(0, 10, (n_test,), generator=g)
    return {"train": train, "test": test, "train_labels": train_labels, "test_labels": test_labels}
