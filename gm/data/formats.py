"""Readers for the standard on-disk formats, given a directory.

MNIST: the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte), each either plain or gzipped (.gz). IDX: 2 zero bytes, a type byte (0x08 = uint8), a
dimension count, big-endian uint32 sizes, then the data.
CIFAR-10: the python batches (data_batch_1..5, test_batch; pickled dicts with b"data" uint8 (N, 3072) in
R, G, B planes of 32x32 and b"labels"), in DIR or in DIR/cifar-10-batches-py.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from gm.data.errors import DataError

MNIST_FILES = {
    "train": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_SUBDIR = "cifar-10-batches-py"


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (plain or .gz) as a uint8 array of its declared shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number): re-download it (`gm download mnist DIR`)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not supported (expected 0x08, unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header of {ndim} dimensions does not fit)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape)) if shape else 0
    if len(raw) - header != count:
        raise DataError(f"{path} is truncated or corrupt: shape {shape} needs {count} bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def is_mnist_dir(directory: str | Path) -> bool:
    return _find(Path(directory), MNIST_FILES["train"]) is not None


def load_mnist_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """MNIST from its IDX files: {"train", "test"} uint8 (N, 1, 28, 28), {"train_labels", "test_labels"} int64."""
    directory = Path(directory)
    out = {}
    for key, stem in MNIST_FILES.items():
        path = _find(directory, stem)
        if path is None:
            raise DataError(
                f"{directory} has no {stem} (or {stem}.gz): expected the four MNIST IDX files "
                f"({', '.join(MNIST_FILES.values())}); get them with `gm download mnist {directory}`"
            )
        arr = read_idx(path)
        if key.endswith("labels"):
            out[key] = torch.from_numpy(arr.astype(np.int64))
        else:
            if arr.ndim != 3:
                raise DataError(f"{path}: expected images of shape (N, H, W), got {arr.shape}")
            out[key] = torch.from_numpy(arr.copy()).unsqueeze(1)
    for split in ("train", "test"):
        if out[split].shape[0] != out[split + "_labels"].shape[0]:
            n_images, n_labels = out[split].shape[0], out[split + "_labels"].shape[0]
            raise DataError(f"{directory}: {split} has {n_images} images but {n_labels} labels")
    return out


def _cifar_root(directory: Path) -> Path | None:
    for d in (directory, directory / CIFAR_SUBDIR):
        if (d / CIFAR_TEST).is_file():
            return d
    return None


def is_cifar_dir(directory: str | Path) -> bool:
    return _cifar_root(Path(directory)) is not None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(err).__name__}: {err}): re-download it") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """CIFAR-10 python batches: {"train", "test"} uint8 (N, 3, 32, 32), labels int64."""
    directory = Path(directory)
    root = _cifar_root(directory)
    if root is None:
        raise DataError(
            f"{directory} has no CIFAR-10 python batches ({CIFAR_TEST}, {CIFAR_TRAIN[0]}, ... in it or in "
            f"{CIFAR_SUBDIR}/): get them with `gm download cifar10 {directory}`"
        )
    missing = [n for n in CIFAR_TRAIN if not (root / n).is_file()]
    if missing:
        raise DataError(f"{root} lacks {', '.join(missing)}: re-download CIFAR-10 (`gm download cifar10 {directory}`)")
    train = [_read_cifar_batch(root / n) for n in CIFAR_TRAIN]
    test = _read_cifar_batch(root / CIFAR_TEST)
    return {
        "train": torch.from_numpy(np.concatenate([t[0] for t in train])),
        "train_labels": torch.from_numpy(np.concatenate([t[1] for t in train])),
        "test": torch.from_numpy(test[0].copy()),
        "test_labels": torch.from_numpy(test[1]),
    }
