"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def dot_precision(dtype: torch.dtype, *, conv: bool) -> str:
    """Triton's input_precision for a float32 dot: tf32 only where torch itself would use it."""
    if dtype != torch.float32 or INTERPRETED:
        return "ieee"
    allowed = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allowed else "ieee"


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# GM_TRITON_AUTOTUNE=0 launches the first config instead of autotuning (the GPU tests use it: one compile per variant).
AUTOTUNE = not INTERPRETED and os.environ.get("GM_TRITON_AUTOTUNE", "1") != "0"


def tuned(kernel, configs: list, key: list[str], interpreted_meta: dict):
    """(launchable kernel, extra launch kwargs): small fixed blocks under the interpreter, the first config when
    autotuning is off, else triton.autotune over `configs` keyed on `key`."""
    import triton  # noqa: PLC0415

    if INTERPRETED:
        return kernel, dict(interpreted_meta)
    if not AUTOTUNE:
        c = configs[0]
        return kernel, {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    return triton.autotune(configs, key=key)(kernel), {}


@triton.jit
def sigmoid(v):
    """1 / (1 + exp(-v)) without overflow for large |v|."""
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def tanh(x):
    """2 sigmoid(2x) - 1 (tl has no tanh in every Triton version); exp(-2x) overflowing to inf gives -1 exactly."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0
