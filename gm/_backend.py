"""Backend choice shared by every op.

backend=None means auto: the environment variable GM_BACKEND if set, else `cuda` for CUDA tensors when gm._C
was built with CUDA (`triton` otherwise), and `cpu` for CPU tensors. A named backend that cannot run raises
BackendUnavailable with the reason and the fix.
"""

from __future__ import annotations

import functools
import os

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


# Under torch.compile the choice is made once, eagerly, at trace time (it reads the environment and loads gm._C,
# which Dynamo cannot trace), and baked into the graph as a constant.
@torch.compiler.assume_constant_result
def resolve(backend: str | None, device: torch.device, *, native_cpu: bool = True, cuda_kernels: bool = True) -> str:
    """The backend an op call runs on. `native_cpu` says whether the op's cpu backend needs gm._C; `cuda_kernels`
    False says the op has no CUDA C++ kernels yet, so auto picks triton for CUDA tensors (a named "cuda" still goes
    to the op, which raises NotImplementedError)."""
    if backend is None:
        backend = os.environ.get("GM_BACKEND") or None
        if backend is None and device.type == "cuda":
            backend = "cuda" if cuda_kernels and cuda_status()[0] else "triton"
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
