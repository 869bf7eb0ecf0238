"""Launching gm's Triton kernels with less host time than `kernel[grid](...)`: `fast(kernel)[grid](...)`.

Triton's own launch path (JITFunction.run, and Autotuner.run above it) does per call: option parsing, a device and a
stream query, the pre-run hooks, the argument binder (each argument's type, alignment and value specialisation),
a string cache key, a check of the globals the kernel read, launch metadata for the profiling hooks, and at last the
compiled kernel's C launcher. On the development machine that is ~4.6 us for a 7-argument kernel and ~8 us for
masked_conv's 20 (~10.5 us through the autotuner), measured with the C launcher stubbed; on the H200 machine's host,
which ran every op ~10-14x slower, it came to most of the Triton PixelRNN layers' eager time (bench/NOTES.md).

fast(kernel) keeps, per launch signature, the kernel Triton compiled and launched for it and afterwards calls that
kernel's launcher directly. The signature is a key at least as fine as Triton's specialisation: the device; each
tensor argument's dtype and whether its address is 16-byte aligned; every other argument by value (ints are what
Triton specialises on: ==1, divisibility by 16, 32- or 64-bit; floats by type, which Triton does not specialise);
the keyword arguments (constexprs and options) by value. For an autotuned kernel the key also fixes the autotuner's
key (its key arguments' values and the tensors' dtypes), so the config it chose is the config of the entry. The
first call of every signature, and every call that the fast path cannot prove equivalent, goes through Triton:
a tensor passed by keyword, a profiling launch hook installed (Triton's launch_enter/exit hooks), a JIT function
with pre-run hooks, an autotuner with hooks, anything but a compiled kernel coming back (bench.aot's compile-only
runs). GM_TRITON_FAST_LAUNCH=0 turns it off; under the interpreter (TRITON_INTERPRET=1) fast(kernel) is kernel.
tests/test_fast_launch.py checks, with a recording stand-in for the C launcher, that a fast launch passes the
launcher exactly what Triton's own path passes, under Triton 3.6 and 3.9.
"""

from __future__ import annotations

import inspect
import os

import torch
from gm.kernels._common import INTERPRETED
from triton import knobs
from triton.runtime import driver

FAST_LAUNCH = os.environ.get("GM_TRITON_FAST_LAUNCH", "1") != "0" and not INTERPRETED

# Launch signatures kept per kernel; past this the table is cleared (a caller whose scalar arguments change every
# call would otherwise grow it without bound; it then pays Triton's path plus a lookup).
MAX_ENTRIES = 512


_PLAIN = frozenset({int, bool, str, type(None)})  # arguments that are their own part of the signature


def _spec(a):
    """One argument's part of the launch signature (see the module docstring)."""
    if type(a) in _PLAIN:
        return a
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if type(a) is float:
        return float
    return a


def _key(device: int, args: tuple, kwargs: dict) -> tuple:
    tensor = torch.Tensor
    return (
        device,
        *[
            a if type(a) in _PLAIN else (a.dtype, a.data_ptr() & 15 == 0) if type(a) is tensor else _spec(a)
            for a in args
        ],
        *kwargs.items(),
    )


def _jit_of(kernel):
    """The JITFunction under an Autotuner, a gm.kernels._common._FirstSuitable or a JITFunction itself."""
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    inner = kernel
    for _ in range(4):
        if isinstance(inner, JITFunction):
            return inner
        inner = getattr(inner, "fn", None) or getattr(inner, "kernel", None)
    return None


def _hooks_free(kernel, jit) -> bool:
    """Whether launching `kernel` runs no user hook that the fast path would skip."""
    if jit is None or getattr(jit, "pre_run_hooks", None):
        return False
    if kernel is jit:
        return True
    if getattr(kernel, "reset_to_zero", None) or getattr(kernel, "restore_value", None):
        return False
    if getattr(kernel, "user_defined_pre_hook", False) or getattr(kernel, "user_defined_post_hook", False):
        return False
    return all(getattr(c, "pre_hook", None) is None for c in getattr(kernel, "configs", ()))


def _launch_hooks_idle() -> bool:
    """Whether Triton's profiling launch hooks (knobs.runtime.launch_enter_hook / launch_exit_hook) are unset or
    empty: then Triton passes its launcher nothing that a hook would see, and neither does the fast path."""
    runtime = knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class _Entry:
    __slots__ = ("compiled", "tail", "meta_extra")

    def __init__(self, compiled, tail: tuple, meta_extra: dict):
        self.compiled, self.tail, self.meta_extra = compiled, tail, meta_extra


class FastKernel:
    """`FastKernel(kernel)[grid](*args, **kwargs)` launches as `kernel[grid](*args, **kwargs)` does (see the module
    docstring); `kernel` is a triton.jit function, a triton.autotune one or gm's _FirstSuitable."""

    def __init__(self, kernel):
        self.kernel = kernel
        jit = _jit_of(kernel)
        self.enabled = _hooks_free(kernel, jit)
        params = list(jit.params) if jit is not None else []
        self.names = tuple(p.name for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.entries: dict[tuple, _Entry] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args: tuple, kwargs: dict):
        if not self.enabled or not self.entries:
            return self._first(grid, args, kwargs)
        active = driver.active
        device = active.get_current_device()
        key = _key(device, args, kwargs)
        try:
            entry = self.entries.get(key)
        except TypeError:  # an unhashable argument: Triton's path
            return self.kernel[grid](*args, **kwargs)
        if entry is None or not _launch_hooks_idle():
            return self._first(grid, args, kwargs)
        values = (*args, *entry.tail)
        if callable(grid):
            meta = dict(zip(self.names, values, strict=True))
            if entry.meta_extra:
                meta.update(entry.meta_extra)
            grid = grid(meta)
        k = entry.compiled
        k.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
              active.get_current_stream(device), k.function, k.packed_metadata, None, None, None,
              *values)  # fmt: skip
        return k

    def _first(self, grid, args: tuple, kwargs: dict):
        """Triton's own launch; then, where it launched a compiled kernel, the entry for this launch signature."""
        compiled = self.kernel[grid](*args, **kwargs)
        if not self.enabled or compiled is None or getattr(compiled, "function", None) is None:
            return compiled
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return compiled
        options = self._config_kwargs()
        if options is None:
            return compiled
        named = {**kwargs, **options}
        try:
            tail = tuple(named[n] if n in named else self.defaults[n] for n in self.names[len(args) :])
            key = _key(driver.active.get_current_device(), args, kwargs)
            hash(key)
        except (KeyError, TypeError):
            return compiled
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = _Entry(compiled, tail, options)
        return compiled

    def _config_kwargs(self) -> dict | None:
        """The keyword arguments the wrapped launcher added to the call it just made: the autotuner's chosen config
        (kernel params and options), _FirstSuitable's meta, nothing for a plain JIT function; None when unknown."""
        kernel = self.kernel
        if kernel is _jit_of(kernel):
            return {}
        if hasattr(kernel, "best_config"):
            config = kernel.best_config
            return dict(config.all_kwargs()) if config is not None else None
        return getattr(kernel, "last_meta", None)


_WRAPPERS: dict[int, FastKernel] = {}


def fast(kernel):
    """The fast launcher of `kernel` (one per kernel object), or `kernel` itself under the interpreter or with
    GM_TRITON_FAST_LAUNCH=0. Use as kernel[grid]: fast(kernel)[grid](*args, **kwargs)."""
    if not FAST_LAUNCH:
        return kernel
    wrapper = _WRAPPERS.get(id(kernel))
    if wrapper is None or wrapper.kernel is not kernel:
        wrapper = _WRAPPERS[id(kernel)] = FastKernel(kernel)
    return wrapper
