"""Run gm's CUDA kernels on the host: build an emulated gm._C (see README.md) and route gm's cuda backend to it.

from tools.cuda_emu import build, load, emulated
module = load(build())
with emulated(module):
    y = gm.ops.row_lstm(gates, w, backend="cuda")   # CPU tensors, the real launcher, the emulated kernel
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import pkgutil
import sys
import types
from pathlib import Path
from types import ModuleType

from .build import BuildUnavailable, build, default_cache, unavailable_reason

__all__ = ["BuildUnavailable", "build", "default_cache", "emulated", "load", "patches", "unavailable_reason"]

_loaded: dict[Path, ModuleType] = {}


def load(path: Path) -> ModuleType:
    """Import a module built by build() (each distinct library once per process, under its own name)."""
    path = Path(path).resolve()
    if path not in _loaded:
        # The init function is PyInit__C, so the last name component must be _C; the package part keeps it apart
        # from the real gm._C and from other emulated builds.
        name = f"gm_cuda_emu_{len(_loaded)}._C"
        loader = importlib.machinery.ExtensionFileLoader(name, str(path))
        spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        _loaded[path] = module
    return _loaded[path]


def patches(module: ModuleType) -> list[tuple[object, str, object]]:
    """(object, attribute, value) settings that send gm's cuda backend, on CPU tensors, to `module`:
    gm._ext.ext (and every gm module holding a reference to it), the backend check for cuda on CPU tensors, and the
    torch.cuda calls the launchers make (device guard, SM count)."""
    import torch  # noqa: PLC0415

    import gm  # noqa: F401, PLC0415
    import gm._backend  # noqa: PLC0415
    import gm._ext  # noqa: PLC0415
    import gm.ops  # noqa: F401, PLC0415

    real_ext = gm._ext.ext
    real_availability = gm._backend.availability

    def ext() -> ModuleType:
        return module

    def availability(backend: str, device: torch.device) -> tuple[bool, str]:
        if backend == "cuda" and device.type == "cpu":
            return True, ""
        return real_availability(backend, device)

    out: list[tuple[object, str, object]] = [(gm._ext, "ext", ext), (gm._backend, "availability", availability)]
    for info in pkgutil.iter_modules(gm.ops.__path__, "gm.ops."):  # launchers imported lazily hold `ext` too
        importlib.import_module(info.name)
    for name, mod in list(sys.modules.items()):
        if name.startswith("gm.") and mod is not None and getattr(mod, "ext", None) is real_ext and mod is not gm._ext:
            out.append((mod, "ext", ext))
    # masked_conv's launcher checks the device itself (the others rely on resolve()).
    conv = importlib.import_module("gm.ops._masked_conv_cuda")
    if hasattr(conv, "_check_cuda"):
        out.append((conv, "_check_cuda", lambda name, t: None))
    props = types.SimpleNamespace(name="gm CUDA emulator", multi_processor_count=132, major=9, minor=0)
    out.append((torch.cuda, "device", lambda device=None: contextlib.nullcontext()))
    out.append((torch.cuda, "get_device_properties", lambda device=None: props))
    return out


@contextlib.contextmanager
def emulated(module: ModuleType):
    """Apply patches(module) for the duration of the block."""
    saved = []
    try:
        for obj, attr, value in patches(module):
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)
        yield module
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
