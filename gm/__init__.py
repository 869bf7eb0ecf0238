"""gm: Triton and CUDA kernels for the generative models of 2016, as torch ops, modules and models."""

from __future__ import annotations

__version__ = "0.1.0"

from gm import nn, ops  # noqa: E402
from gm._backend import BACKENDS, BackendUnavailable  # noqa: E402
from gm.info import info  # noqa: E402

__all__ = ["BACKENDS", "BackendUnavailable", "info", "nn", "ops", "__version__"]
