"""Lazy access to the compiled extension gm._C, with an error that says how to build it."""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
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
    if not t.is_cuda:  # is_cuda and get_device(): a tenth of the host time of t.device.type / t.device.index
        return 0
    if _RAW_STREAM is not None:
        return _RAW_STREAM(t.get_device())
    return torch.cuda.current_stream(t.device).cuda_stream


_NO_GUARD = contextlib.nullcontext()


@functools.cache
def _single_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() == 1


def device_guard(t: torch.Tensor):
    """`with device_guard(t):` launches on t's GPU: torch.cuda.device(t.device), or nothing where one GPU is visible
    (t's is then the current device; the guard's enter and exit cost a few microseconds of host time per launch)."""
    return _NO_GUARD if _single_gpu() else torch.cuda.device(t.device)


# ----------------------------------------------------------------------------------------------------------------
# Packed weight operands: a forward's pack reused by its backward.

# False: the backward launchers repack their weights too (see packed()).
PACK_CACHE = True
# id(weight) -> [weakref to weight, version, data_ptr, {key: packed form}]: a plain dict keyed by id with a weak
# reference that removes its entry (torch's WeakIdKeyDictionary costs ~1.5 us a lookup, on every launcher's call).
_PACKS: dict[int, list] = {}


def _forget(ref, key: int) -> None:
    entry = _PACKS.get(key)
    if entry is not None and entry[0] is ref:
        del _PACKS[key]


def _cacheable(weight: torch.Tensor) -> bool:
    """A plain tensor with a version counter, not read during a CUDA graph capture (a capture must record the pack,
    or its replays would use the pack of the weight as it was at capture, whatever the weight holds then)."""
    if not PACK_CACHE or type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.is_inference():
        return False
    return not (weight.is_cuda and torch.cuda.is_current_stream_capturing())


def packed(weight: torch.Tensor, key, pack, *, fresh: bool):
    """pack(): a form of `weight` that a launcher reads (a gathered, padded or transposed copy; `key` names the form,
    e.g. its layout and dtype). fresh=True (a forward) always packs, and keeps the form for the backward;
    fresh=False (a backward) reuses the form kept for `weight` as it is now, else packs. So a training step packs
    each weight once, not twice, and nothing outlives the next forward: a write that autograd's version counter does
    not see (through `weight.data`, as EMA and weight-clipping code often does; a CUDA graph replay; a fused optimizer
    outside torch writing through the raw pointer) can at worst reach a backward whose forward saw the old value,
    where autograd's own saved tensors are stale too. The kept form is dropped when `weight` changes through torch
    (its _version moves) or gets new storage (its data_ptr moves, as in module.half()), and lives no longer than
    `weight` (weak keys); the current stream is part of the key, so a form is only read on the stream that made it.
    pack() runs without autograd, so the form holds no reference to `weight`."""
    if not _cacheable(weight):
        return no_grad_call(pack)
    version, address, wid = weight._version, weight.data_ptr(), id(weight)
    entry = _PACKS.get(wid)
    if entry is None or entry[0]() is not weight:
        entry = _PACKS[wid] = [weakref.ref(weight, functools.partial(_forget, key=wid)), version, address, {}]
    elif entry[1] != version or entry[2] != address:
        entry[1], entry[2], entry[3] = version, address, {}
    key = (key, stream_of(weight))
    forms = entry[3]
    form = None if fresh else forms.get(key)
    if form is None:
        form = forms[key] = no_grad_call(pack)
    return form


# torch.no_grad()'s enter and exit cost ~1.1 us of host time together (a launcher's pack runs under it on every
# training forward); the switch it flips costs ~0.1. The public context manager where torch lacks it.
_SET_GRAD_ENABLED = getattr(torch._C, "_set_grad_enabled", None)


def no_grad_call(fn):
    """fn() with gradient recording off, as under torch.no_grad()."""
    if not torch.is_grad_enabled():
        return fn()
    if _SET_GRAD_ENABLED is None:
        with torch.no_grad():
            return fn()
    _SET_GRAD_ENABLED(False)
    try:
        return fn()
    finally:
        _SET_GRAD_ENABLED(True)


def gather(src: torch.Tensor, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One launch of csrc/layout's gather: out[i] = src.view(-1)[index[i]] as `dtype` (default src's), 0 where
    index[i] >= src.numel(), for an int32 `index` on src's device (built once per layout and cached by the caller).
    It packs a weight for a GEMM, where torch needs a concatenation with a zero, a take and a cast."""
    src = src.contiguous()
    out = torch.empty(index.shape, dtype=src.dtype if dtype is None else dtype, device=src.device)
    with device_guard(src):
        ext().layout_gather_cuda(src.data_ptr(), index.data_ptr(), out.data_ptr(), out.numel(), src.numel(),
                                 DTYPE_CODES[src.dtype], DTYPE_CODES[out.dtype], stream_of(src))  # fmt: skip
    return out


_SM_COUNTS: dict = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of the CUDA `device` (an index or torch.device): the split models' wave size.
    Asked once per device (a weight-gradient launcher asks on every call; torch's query is a few microseconds of
    host time), keyed with the query function too, so a stand-in for it (the CUDA emulator's) gets its own answer."""
    query = torch.cuda.get_device_properties
    key = (device, query)
    count = _SM_COUNTS.get(key)
    if count is None:
        count = _SM_COUNTS[key] = query(device).multi_processor_count
    return count


def reduction_splits(tiles: int, work: int, device, blocks_per_sm: int) -> int:
    """How many ways a CUDA GEMM splits its reduction (pixels or rows, `work` of them) into partial sums: the split
    count s (1 to 64, at least 256 reduction steps a block) that minimises the modelled time
    waves(tiles * s) * (work / s + 128), where waves counts rounds of `blocks_per_sm` resident blocks per SM and 128
    steps stand for a block's fixed cost (pipeline fill, partial-sum epilogue, its share of the split sum). Ties go
    to fewer splits. A handful of output tiles thus spreads its reduction over the whole GPU (the earlier score,
    which charged each split a flat penalty, left a single output tile to one block: on an H200 the weight gradient of
    the DiagonalBiLSTM layer's 64->128 1x1 convolution, 32768 pixels on one SM, took about 1 ms)."""
    slots = sm_count(device) * blocks_per_sm
    return _reduction_splits(tiles, work, slots)


@functools.lru_cache(maxsize=4096)
def _reduction_splits(
    tiles: int, work: int, slots: int, granule: int = 1, min_steps: int = 256, fixed: int = 128, cap: int = 64
) -> int:
    """The split count of the model above: parts of whole `granule`s of the reduction (the kernels round a part up
    to them), at least `min_steps` each unless unsplit, at most `cap`; the count the kernel will launch (no empty
    part). `fixed`: a block's fixed cost in units of `work` (128 for the CUDA kernels, whose unit is one pixel or
    row; the Triton GEMMs count k-steps of 32-64 pixels or rows and pass their own)."""
    best, best_cost = 1, float("inf")
    for s in range(1, cap + 1):
        if s > 1 and work // s < min_steps:
            break
        per_part = -(-work // s)
        chunk = -(-per_part // granule) * granule
        parts = -(-work // chunk)
        cost = -(-tiles * parts // slots) * (chunk + fixed)
        if cost < best_cost:
            best, best_cost = parts, cost
    return best
