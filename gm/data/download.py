"""`gm download mnist|cifar10 DIR`: fetch the standard files, verify their checksums, never keep a bad file.

Each file is streamed to DIR/<name>.part while its digest is computed, checked against the expected MD5 or
SHA-256, then renamed into place; a file already present with the right checksum is not fetched again.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from gm.data.errors import DataError
from gm.data.formats import CIFAR_SUBDIR

# name -> (base URL, {file: (algorithm, hex digest)}, archive to unpack or None)
SOURCES: dict[str, tuple[str, dict[str, tuple[str, str]], str | None]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train-labels-idx1-ubyte.gz": ("md5", "d53e105ee54ea40749a09fcbcd1e9432"),
            "t10k-images-idx3-ubyte.gz": ("md5", "9fb629c4189551a2d022fa330f9573f3"),
            "t10k-labels-idx1-ubyte.gz": ("md5", "ec29112dd5afa0611ce80d1b7f02629c"),
        },
        None,
    ),
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": ("md5", "c58f30108f718f92721af3b95e74349a")},
        "cifar-10-python.tar.gz",
    ),
}
CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, dest: Path, algorithm: str, expected: str, timeout_s: float) -> None:
    part = dest.with_name(dest.name + ".part")
    h = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, part.open("wb") as f:  # noqa: S310
            for block in iter(lambda: resp.read(CHUNK), b""):
                h.update(block)
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise DataError(
            f"could not download {url}: {reason}. Are you offline? Fetch the file by other means into {dest.parent}, "
            "or train on the embedded digits (the default --data)"
        ) from err
    got = h.hexdigest()
    if got != expected.lower():
        part.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: {algorithm} {got}, expected {expected}; the file was not kept")
    os.replace(part, dest)


def download(
    name: str,
    directory: str | Path,
    *,
    base_url: str | None = None,
    checksums: dict[str, tuple[str, str]] | None = None,
    timeout_s: float = 60.0,
    log=print,
) -> Path:
    """Download dataset `name` ("mnist" or "cifar10") into `directory`, verified, and return the directory.

    base_url and checksums replace the defaults (a mirror, or tests serving their own files): checksums maps each
    file name to (algorithm, hex digest), algorithm "md5" or "sha256".
    """
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(SOURCES)}")
    default_url, default_sums, archive = SOURCES[name]
    base_url = base_url or default_url
    if not base_url.endswith("/"):
        base_url += "/"
    files = checksums or default_sums
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for fname, (algorithm, expected) in files.items():
        if algorithm not in ("md5", "sha256"):
            raise DataError(f"checksum algorithm for {fname} must be 'md5' or 'sha256', got {algorithm!r}")
        dest = directory / fname
        if dest.is_file() and file_digest(dest, algorithm) == expected.lower():
            log(f"{dest}: present, checksum ok")
            continue
        log(f"downloading {base_url + fname} -> {dest}")
        _fetch(base_url + fname, dest, algorithm, expected, timeout_s)
        log(f"{dest}: {algorithm} ok")
    if archive is not None:
        _unpack(directory / archive, directory)
    return directory


def _unpack(archive: Path, directory: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(CIFAR_SUBDIR + "/")]
            tar.extractall(directory, members=members, filter="data")
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"cannot unpack {archive}: {err}") from err
