"""gm.data: the embedded digits, the IDX and CIFAR-10 readers, the synthetic source, and `download` against a
local HTTP server on 127.0.0.1 (fake files, checksums given by the test)."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import pickle
import socket
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch

import gm.data as D


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_fake_mnist(directory, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,)),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return arrays


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, n))}


def write_fake_cifar(directory):
    root = directory / "cifar-10-batches-py"
    root.mkdir()
    batches = {f"data_batch_{i}": _cifar_batch(4, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, 9)
    for name, d in batches.items():
        (root / name).write_bytes(pickle.dumps(d))
    return batches


def test_embedded_digits_split_is_fixed_and_disjoint():
    d = D.load_digits()
    assert d["train"].shape == (4000, 1, 28, 28) and d["test"].shape == (1000, 1, 28, 28)
    assert d["train"].dtype == torch.uint8 and d["train"].max() > 200
    assert set(d["test_labels"].tolist()) == set(range(10))
    again = D.load_digits()
    assert torch.equal(d["test"], again["test"])
    flat_train = {bytes(x.numpy().tobytes()) for x in d["train"][:500]}
    assert not any(bytes(x.numpy().tobytes()) in flat_train for x in d["test"])


def test_binarization_threshold_and_dynamic():
    grey = torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8).reshape(1, 1, 2, 2)
    assert D.to_levels(grey, 2).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    many = torch.full((20000, 1, 1, 1), 64, dtype=torch.uint8)
    draw = D.to_levels(many, 2, "dynamic", generator=torch.Generator().manual_seed(0))
    assert set(draw.unique().tolist()) <= {0.0, 1.0}
    assert abs(draw.mean().item() - 64 / 255) < 0.01
    again = D.to_levels(many, 2, "dynamic", generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)
    assert torch.equal(D.to_levels(grey, 256), grey.float())


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_mnist_idx_directory(tmp_path, gz):
    arrays = write_fake_mnist(tmp_path, gz=gz)
    data = D.resolve(str(tmp_path))
    assert data.name.startswith("mnist:")
    assert data.train.shape == (12, 1, 28, 28) and data.test.shape == (5, 1, 28, 28)
    assert np.array_equal(data.train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert D.resolve(f"mnist:{tmp_path}").train.shape == (12, 1, 28, 28)
    assert np.array_equal(data.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(data.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_cifar10_directory(tmp_path):
    batches = write_fake_cifar(tmp_path)
    data = D.resolve(str(tmp_path))
    assert data.train.shape == (20, 3, 32, 32) and data.test.shape == (3, 3, 32, 32)
    assert np.array_equal(data.test.reshape(3, -1).numpy(), batches["test_batch"][b"data"])
    assert data.test_labels.tolist() == list(batches["test_batch"][b"labels"])
    assert data.train_labels.shape == (20,) and data.train_labels.dtype == torch.int64


def test_synthetic_any_size():
    d = D.resolve("synthetic:50:9", channels=3)
    assert d.train.shape == (50, 3, 9, 9) and d.test.shape[1:] == (3, 9, 9)
    assert D.resolve("synthetic", channels=1).shape == (1, 28, 28)
    assert d.train_labels.shape == (50,) and d.test_labels.shape == (d.test.shape[0],)
    assert 0 <= d.train_labels.min() and d.train_labels.max() <= 9
    again = D.resolve("synthetic:50:9", channels=3)
    assert torch.equal(d.train_labels, again.train_labels) and torch.equal(d.train, again.train)


def test_embedded_digits_carry_their_labels():
    data, d = D.resolve("digits"), D.load_digits()
    assert torch.equal(data.train_labels, d["train_labels"]) and torch.equal(data.test_labels, d["test_labels"])
    assert data.train_labels.shape == (4000,) and set(data.train_labels.tolist()) == set(range(10))


def test_missing_and_corrupt_data_directories(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.resolve(str(tmp_path / "nowhere"))
    with pytest.raises(D.DataError, match="neither MNIST IDX files"):
        D.resolve(str(tmp_path))
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 7))
    with pytest.raises(D.DataError, match="truncated"):
        D.resolve(str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(D.DataError, match="cannot read IDX"):
        D.resolve(str(tmp_path))
    cifar = tmp_path / "c"
    cifar.mkdir()
    write_fake_cifar(cifar)
    (cifar / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="not a CIFAR-10 python batch"):
        D.resolve(f"cifar10:{cifar}")
    with pytest.raises(D.DataError, match="synthetic"):
        D.resolve("synthetic:many")


# ---- download, against a local server -------------------------------------------------------------------------


@contextlib.contextmanager
def serve(directory):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_verifies_checksums(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    write_fake_mnist(served)
    sums = {}
    for i, f in enumerate(sorted(served.iterdir())):
        algo = "sha256" if i % 2 else "md5"
        sums[f.name] = (algo, hashlib.new(algo, f.read_bytes()).hexdigest())
    dest = tmp_path / "mnist"
    with serve(served) as url:
        D.download("mnist", dest, base_url=url, checksums=sums, log=lambda *_: None)
        assert D.resolve(str(dest)).train.shape == (12, 1, 28, 28)
        # present with the right checksum: not fetched again (the server is gone after this block)
    D.download("mnist", dest, base_url="http://127.0.0.1:1/", checksums=sums, log=lambda *_: None)

    bad = dict(sums)
    name = "train-labels-idx1-ubyte.gz"
    bad[name] = ("sha256", "0" * 64)
    dest2 = tmp_path / "mnist2"
    with serve(served) as url, pytest.raises(D.DataError, match="checksum mismatch"):
        D.download("mnist", dest2, base_url=url, checksums=bad, log=lambda *_: None)
    assert not (dest2 / name).exists() and not list(dest2.glob("*.part"))


def test_download_cifar_archive_is_unpacked(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_fake_cifar(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    served = tmp_path / "served"
    served.mkdir()
    (served / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    sums = {"cifar-10-python.tar.gz": ("sha256", hashlib.sha256(buf.getvalue()).hexdigest())}
    with serve(served) as url:
        D.download("cifar10", tmp_path / "cifar", base_url=url, checksums=sums, log=lambda *_: None)
    assert D.resolve(str(tmp_path / "cifar")).test.shape == (3, 3, 32, 32)


def test_download_offline_is_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/"  # nothing listens there
    with pytest.raises(D.DataError, match="Are you offline"):
        D.download("mnist", tmp_path, base_url=url, timeout_s=5, log=lambda *_: None)
    assert not list(tmp_path.iterdir())
    with pytest.raises(D.DataError, match="unknown dataset"):
        D.download("imagenet", tmp_path)
