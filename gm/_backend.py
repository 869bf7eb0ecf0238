"""Backend choice shared by every op.

backend=None means auto: the environment variable GM_BACKEND if set; else, for CUDA tensors, the backend measured
fastest for the op and dtype on this GPU model where a benchmark run recorded one (measured_pick), otherwise `cuda`
when gm._C was built with CUDA and the op's kernels take the call (`triton` otherwise, or where the op prefers it
until measured); `cpu` for CPU tensors. A named backend that cannot run raises BackendUnavailable with the reason
and the fix.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import torch

from gm._ext import cuda_status, ext_status

BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    pass


@functools.cache
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError as err:
        return False, f"triton is not installed ({err}): `pip install triton`"
    return True, ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether `backend` can run tensors on `device`, and if not, why."""
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        if device.type != "cpu":
            return False, f"the cpu backend takes CPU tensors, got tensors on {device}"
        return True, ""
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return ok, why
        if device.type == "cuda":
            if triton_interpreted():
                return False, "TRITON_INTERPRET=1 is set, so Triton cannot launch on CUDA tensors: unset it"
            return True, ""
        if device.type == "cpu":
            if not triton_interpreted():
                return False, (
                    "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before triton is imported"
                )
            return True, ""
        return False, f"the triton backend takes CUDA tensors (or CPU ones interpreted), got {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend takes CUDA tensors, got tensors on {device}"
        return cuda_status()
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def _tuned_dir() -> Path | None:
    """kernels/tuned (installed as gm/kernels/tuned), found without importing gm.kernels."""
    spec = importlib.util.find_spec("gm.kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tuned"


@functools.cache
def backend_picks(slug: str) -> dict:
    """{op: {dtype name: {"backend", "ms", "cases", provenance}}}: the "backends" section of the table shipped for the
    GPU `slug` (kernels/tuned/<slug>.json), which `python -m bench.tuned --backends RUN.jsonl` fills from a benchmark
    run's rows: per op and dtype, the backend whose forward+backward summed over the run's cases was least."""
    folder = _tuned_dir()
    path = folder / f"{slug}.json" if folder is not None else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text()).get("backends", {})


def device_slug(device_name: str) -> str:
    """The device part of bench result names and of the tuned tables' file names: "NVIDIA H200" -> "nvidia-h200"."""
    return "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()


@functools.cache
def _slug_of(index: int) -> str:
    return device_slug(torch.cuda.get_device_name(index))


def measured_pick(op: str | None, dtype: torch.dtype | None, device: torch.device) -> str | None:
    """The backend ("cuda" or "triton") measured fastest for `op` in `dtype` on the GPU model of `device`, or None:
    no record for it, no op named, or GM_BACKEND_PICKS=0 (auto by the rules alone)."""
    if op is None or dtype is None or device.type != "cuda" or os.environ.get("GM_BACKEND_PICKS", "1") == "0":
        return None
    try:
        slug = _slug_of(device.index if device.index is not None else torch.cuda.current_device())
    except (RuntimeError, AssertionError):
        return None
    entry = backend_picks(slug).get(op, {}).get(str(dtype).removeprefix("torch."))
    return entry.get("backend") if entry else None


# Under torch.compile the choice is made once, eagerly, at trace time (it reads the environment and loads gm._C,
# which Dynamo cannot trace), and baked into the graph as a constant.
@torch.compiler.assume_constant_result
def resolve(
    backend: str | None,
    device: torch.device,
    *,
    native_cpu: bool = True,
    cuda_kernels: bool = True,
    prefer: str = "cuda",
    op: str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """The backend an op call runs on. `native_cpu` says whether the op's cpu backend needs gm._C; `cuda_kernels`
    False says the op's CUDA C++ kernels cannot take this call (none yet, or a dtype or size they refuse), so auto
    picks triton for CUDA tensors (a named "cuda" still goes to the op, which raises). For CUDA tensors auto takes
    the backend recorded as fastest for (`op`, `dtype`) on this GPU model (measured_pick) where the kernels can run,
    else `prefer` ("triton": an op whose cuda kernels are not yet measured ahead)."""
    if backend is None:
        backend = os.environ.get("GM_BACKEND") or None
        if backend is None and device.type == "cuda":
            cuda_ok = cuda_kernels and cuda_status()[0]
            pick = measured_pick(op, dtype, device)
            if pick == "cuda" and cuda_ok or pick == "triton" and triton_status()[0]:
                backend = pick
            else:
                backend = "cuda" if cuda_ok and (prefer == "cuda" or not triton_status()[0]) else "triton"
    if backend is None:
        if device.type == "cuda":
            backend = "triton"
        else:
            backend = "cpu"
    ok, why = availability(backend, device)
    if ok and backend == "cpu" and native_cpu:
        ok, why = ext_status()
    if not ok:
        raise BackendUnavailable(f"backend {backend!r} is not available: {why}")
    return backend
