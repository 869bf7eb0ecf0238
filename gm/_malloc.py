"""glibc malloc settings for `gm train | eval | sample` and `python -m bench` on the CPU (their processes only: a
library call never changes them).

A training step on the CPU allocates and frees the same large activation tensors every step. glibc serves an
allocation above its mmap threshold with a fresh mmap (128 KiB at first; the threshold adapts upwards to the largest
such block freed so far) and trims freed memory at the top of its heap back to the system, so until something large
has been freed, every step's tensors fault their pages in again on first touch. Measured on the 2-core dev machine
(bench/NOTES.md "Session 18"): `gm train rowlstm --preset mnist --data synthetic:512:28`, one thread, 170 -> 198
training images/s; on the embedded digits no difference beyond noise (loading them frees arrays of a few MB first,
which raises the adaptive threshold before training starts); the CPU models bench (`python -m bench --ops models
--device cpu`, which calls this too) RowLSTM fwd+bwd 52.7 -> 38-40 ms and PixelCNN 17.2-17.7 -> 14.0-14.3 ms, the
reference rows steadier. Fixing the mmap threshold at glibc's largest (32 MiB) and never trimming keeps freed blocks
in the heap for reuse. Only the two together help: a fixed trim threshold alone stops the adaptation and makes every
block over 128 KiB an mmap (a PixelCNN step 2.8x slower), so the mmap threshold is set first and the trim threshold
only if that succeeded. The process keeps its peak heap for its lifetime, which a training run reaches anyway.
GM_MALLOC_TUNE=0 leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**31 - 1  # never trim (an int)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds as the module docstring says, once per process. True when they are set
    (now or before); False where GM_MALLOC_TUNE=0, or the C library is not glibc, or mallopt refused."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("GM_MALLOC_TUNE", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
