"""Lazy access to the compiled extension gm._C, with an error that says how to build it."""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType

import torch

# Codes shared with csrc/common/tensor_args.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the gm checkout "
    "(needs a C++ compiler, CMake and pybind11; the CUDA kernels also need nvcc on PATH)"
)


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    # gm._C links the system libgomp while torch ships its own: two OpenMP pools that, with the default active wait,
    # spin against each other on few cores (a 1x1 conv went from 2.3 ms to 40 ms on 2 cores). torch has read its
    # environment already, so this only makes gm's pool sleep when idle. A user's explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from gm import _C  # noqa: PLC0415
    except ImportError as err:
        return None, f"the extension gm._C is not built ({err}); {BUILD_HINT}"
    return _C, ""


def ext() -> ModuleType:
    """The compiled module; raises RuntimeError naming the fix when it is missing."""
    module, why = _load()
    if module is None:
        raise RuntimeError(why)
    return module


def ext_status() -> tuple[bool, str]:
    module, why = _load()
    return module is not None, why


def cuda_status() -> tuple[bool, str]:
    module, why = _load()
    if module is None:
        return False, why
    if not module.with_cuda:
        return False, "gm was built without CUDA: reinstall with a CUDA compiler (nvcc) on PATH, or GM_CUDA=1 to require it"
    return True, ""


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


# torch's raw-handle query (what Triton's launcher uses): an int, where torch.cuda.current_stream() builds a Stream
# object per call (a few microseconds of host time per kernel launch, on hosts where launches are the bottleneck).
# Absent in CPU-only builds and perhaps in a future torch: then the public call.
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_of(t: torch.Tensor) -> int:
    """Raw handle of the current CUDA stream on t's device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    if _RAW_STREAM is not None:
        return _RAW_STREAM(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


_NO_GUARD = contextlib.nullcontext()


@functools.cache
def _single_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() == 1


def device_guard(t: torch.Tensor):
    """`with device_guard(t):` launches on t's GPU: torch.cuda.device(t.device), or nothing where one GPU is visible
    (t's is then the current device; the guard's enter and exit cost a few microseconds of host time per launch)."""
    return _NO_GUARD if _single_gpu() else torch.cuda.device(t.device)


def reduction_splits(tiles: int, work: int, device, blocks_per_sm: int) -> int:
    """How many ways a CUDA GEMM splits its reduction (pixels or rows, `work` of them) into partial sums: the split
    count s (1 to 64, at least 256 reduction steps a block) that minimises the modelled time
    waves(tiles * s) * (work / s + 128), where waves counts rounds of `blocks_per_sm` resident blocks per SM and 128
    steps stand for a block's fixed cost (pipeline fill, partial-sum epilogue, its share of the split sum). Ties go
    to fewer splits. A handful of output tiles thus spreads its reduction over the whole GPU (the earlier score,
    which charged each split a flat penalty, left a single output tile to one block: on an H200 the weight gradient of
    the DiagonalBiLSTM layer's 64->128 1x1 convolution, 32768 pixels on one SM, took about 1 ms)."""
    slots = torch.cuda.get_device_properties(device).multi_processor_count * blocks_per_sm
    return _reduction_splits(tiles, work, slots)


@functools.lru_cache(maxsize=4096)
def _reduction_splits(tiles: int, work: int, slots: int, granule: int = 1, min_steps: int = 256) -> int:
    """The split count of the model above: parts of whole `granule`s of the reduction (the kernels round a part up
    to them), at least `min_steps` each unless unsplit, at most 64; the count the kernel will launch (no empty
    part)."""
    best, best_cost = 1, float("inf")
    for s in range(1, 65):
        if s > 1 and work // s < min_steps:
            break
        per_part = -(-work // s)
        chunk = -(-per_part // granule) * granule
        parts = -(-work // chunk)
        cost = -(-tiles * parts // slots) * (chunk + 128)
        if cost < best_cost:
            best, best_cost = parts, cost
    return best
