"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from gm._backend import device_slug  # noqa: F401 (the bench and gm info name tables by it through this module)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in host code. triton.cdiv (and triton.next_power_of_2) are constexpr functions since Triton 3.x:
    ~1.5 us a call from the host (3.6 and 3.9), and a masked_conv forward+backward asked ~35 of them (bench/NOTES.md,
    session 9)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1), in host code; see cdiv."""
    return 1 << max(n - 1, 0).bit_length()


def dot_precision(dtype: torch.dtype, *, conv: bool) -> str:
    """Triton's input_precision for a float32 dot: tf32 only where torch itself would use it (cudnn.allow_tf32 for
    the convolution-like ops, cuda.matmul.allow_tf32 for the GEMMs), else tf32x3: three tf32 tensor-core products
    on hi/lo splits of the operands (fp32-level error, as the cuda backend's 3xTF32) instead of "ieee", which Triton
    runs on CUDA cores (no tensor cores: ~5 TFLOP/s measured for the IAF step's fp32 GEMMs on an H200)."""
    if dtype != torch.float32 or INTERPRETED:
        return "ieee"
    allowed = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allowed else "tf32x3"


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# GM_TRITON_AUTOTUNE=0 launches the first config instead of autotuning (the GPU tests use it: one compile per variant);
# GM_TRITON_AUTOTUNE=picks launches the shipped pick of the GPU (tuned_table) where one is recorded for the launch's
# key and the first suitable config elsewhere, timing nothing: a time-boxed GPU run over shapes with no pick (the
# models bench's dozens of convolution shapes) compiles one config per kernel variant instead of every config.
AUTOTUNE_MODE = os.environ.get("GM_TRITON_AUTOTUNE", "1")
AUTOTUNE = not INTERPRETED and AUTOTUNE_MODE != "0"
PICKS_ONLY = AUTOTUNE and AUTOTUNE_MODE == "picks"
# Each config's timing when autotuning: warmup and repetition milliseconds for triton.testing.do_bench (Triton's
# default, 25 and 100, spends ~0.15 s a config: ~3-5 s per kernel and launch shape over the config lists here, and
# minutes for a benchmark run's new shapes, most of a 15-minute GPU session). GM_TRITON_AUTOTUNE_MS="25,100" restores
# it.
AUTOTUNE_MS = tuple(float(v) for v in os.environ.get("GM_TRITON_AUTOTUNE_MS", "10,40").split(","))


def autotune_bench(kernel_call, quantiles):
    """The autotuner's timing of one config (Autotuner's do_bench): triton.testing.do_bench with AUTOTUNE_MS."""
    import triton.testing  # noqa: PLC0415

    warmup, rep = AUTOTUNE_MS
    return triton.testing.do_bench(kernel_call, warmup=warmup, rep=rep, quantiles=quantiles)


# GM_TRITON_TUNED=0 ignores the shipped tables of autotuner picks (TUNED_DIR/<device slug>.json): every launch shape
# is autotuned again (how a GPU run measures fresh picks for `python -m bench.tuned`).
TUNED = os.environ.get("GM_TRITON_TUNED", "1") != "0"
TUNED_DIR = Path(__file__).resolve().parent / "tuned"

# Every tuned() kernel's (config list, key names) by kernel name, in any mode: what a shipped pick is checked against.
CONFIG_LISTS: dict[str, tuple[list, list[str]]] = {}


def tuned(kernel, configs: list, key: list[str], interpreted_meta: dict, prune=None):
    """(launchable kernel, extra launch kwargs): small fixed blocks under the interpreter, the first config that
    suits the call when autotuning is off, else triton.autotune over `configs` keyed on `key`, which launches the
    shipped pick of the current GPU (tuned_table) without timing where one is recorded for the launch's key.
    `prune(configs, named_args)` drops configs that cannot suit the call (by dtype, shared memory) before timing."""
    import triton  # noqa: PLC0415

    CONFIG_LISTS[kernel_name(kernel)] = (configs, list(key))
    if INTERPRETED:
        return kernel, dict(interpreted_meta)
    if not AUTOTUNE:
        if prune is not None:
            return _FirstSuitable(kernel, configs, prune), {}
        return kernel, _launch_meta(configs[0])
    by = None
    if prune is not None:

        def early_prune(configs, named_args, **kwargs):
            return prune(configs, named_args) or configs[:1]

        by = {"early_config_prune": early_prune}
    if not TUNED and not PICKS_ONLY:
        return triton.autotune(configs, key=key, prune_configs_by=by, do_bench=autotune_bench)(kernel), {}
    return _table_autotuner()(kernel, kernel.arg_names, configs, key, None, None, prune_configs_by=by,
                              do_bench=autotune_bench), {}  # fmt: skip


def kernel_name(kernel) -> str:
    """The name the autotuner picks are recorded under: the Python function's (as Autotuner.base_fn)."""
    fn = kernel
    while not inspect.isfunction(fn) and hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", type(kernel).__name__)


def config_fields(config) -> tuple:
    """A triton.Config, or the str() of one, as sorted (name, value string) pairs without the None-valued fields:
    equal across Triton versions whose str() differ (3.9 appends "ir_override: None", 3.6 does not)."""
    pairs = (field.partition(": ") for field in str(config).split(", "))
    return tuple(sorted((name, value) for name, _, value in pairs if value != "None"))


@functools.cache
def tuned_table(slug: str) -> dict:
    """The shipped table TUNED_DIR/<slug>.json ({"device", "picks": {kernel: [{"key", "config", provenance}]}}), or
    {} where none ships."""
    path = TUNED_DIR / f"{slug}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def shipped_tables() -> dict[str, int]:
    """{device slug: number of picks} of every shipped table."""
    slugs = [p.stem for p in sorted(TUNED_DIR.glob("*.json"))]
    return {slug: sum(len(v) for v in tuned_table(slug).get("picks", {}).values()) for slug in slugs}


def current_device_slug() -> str | None:
    try:
        return device_slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    except (RuntimeError, AssertionError):
        return None


def table_picks(name: str, configs: list, slug: str | None) -> dict:
    """{key strings: config of `configs`} recorded for kernel `name` in the table of `slug`; a pick whose config is
    not in `configs` (a changed config list) is left out."""
    by_fields = {config_fields(c): c for c in configs}
    picks = tuned_table(slug).get("picks", {}).get(name, []) if slug else []
    return {tuple(p["key"]): by_fields[f] for p in picks if (f := config_fields(p["config"])) in by_fields}


def launch_key(autotuner, kwargs: dict) -> tuple:
    """Triton's autotune key of the launch in progress (autotuner.nargs set), as str: the key arguments' values, then
    every tensor argument's dtype, as Autotuner.run computes it in Triton 3.6 and 3.9 (and the tables record it)."""
    named = {k: v for k, v in {**autotuner.nargs, **kwargs}.items() if k in autotuner.arg_names}
    key = [named[k] for k in autotuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(str(k) for k in key)


def picks_choice(autotuner, configs: list, kwargs: dict, slug: str) -> list:
    """The config that GM_TRITON_AUTOTUNE=picks launches for this call on the GPU `slug` (TableAutotuner.enter_pick),
    as a one-element list (what bench.aot --picks compiles): the table's pick for the launch's key (launch_key) when
    `configs` (the call's pruned list) holds it, else the first of `configs`."""
    config = table_picks(autotuner.base_fn.__name__, autotuner.configs, slug).get(launch_key(autotuner, kwargs))
    return [config] if config is not None and config in configs else configs[:1]


@functools.cache
def _table_autotuner():
    from triton.runtime.autotuner import Autotuner  # noqa: PLC0415

    class TableAutotuner(Autotuner):
        """triton.autotune that launches the current GPU's recorded pick for a launch's key, when the call's prune keeps
        it, without timing: the pick enters Triton's own cache (so best_config and the bench's export see it) the
        first time Triton finds the key missing there; any other launch is autotuned as usual."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.picks = None  # {key strings: config}, loaded at the first cache miss (the GPU is known by then)
            self.cache = _PickCache(self)

        def enter_pick(self, key: tuple) -> bool:
            """Whether the recorded pick for `key` (Triton's own key of the launch in progress) was entered; with
            PICKS_ONLY, else the first config the call's prune keeps (nothing is timed)."""
            if self.picks is None:
                slug = current_device_slug() if TUNED else None
                self.picks = table_picks(self.base_fn.__name__, self.configs, slug)
            config = self.picks.get(tuple(str(k) for k in key))
            # run() has set nargs (the positional arguments, which Triton passes to early_config_prune) by now.
            if getattr(self, "nargs", None) is None:
                return False
            suitable = self.prune_configs({})
            if config is None or config not in suitable:
                if not PICKS_ONLY:
                    return False
                config = suitable[0]
            self.cache[key] = config
            return True

    return TableAutotuner


class _PickCache(dict):
    """Autotuner.cache ({key: config}) that, asked for a key it lacks (Autotuner.run's `key not in self.cache` before it
    times the configs, the same in Triton 3.6 and 3.9), first takes the recorded pick for the key. Keys are the ones
    Triton computes, so a pick matches exactly when the key the bench exported (str of each element) does."""

    def __init__(self, autotuner):
        super().__init__()
        self.autotuner = autotuner

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or self.autotuner.enter_pick(key)


def _launch_meta(config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


class _FirstSuitable:
    """With autotuning off: `kernel[grid](...)` launches the first config that `prune` keeps for the call (e.g. the
    first that fits shared memory in the call's dtype), the first config when it keeps none."""

    def __init__(self, kernel, configs, prune):
        self.kernel, self.configs, self.prune = kernel, configs, prune
        self.arg_names = kernel.arg_names
        self.last_meta = None  # the meta of the latest launch (gm.kernels._launch reads it)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
            meta = _launch_meta((self.prune(self.configs, named) or self.configs)[0])
            self.last_meta = meta
            g = grid({**named, **meta}) if callable(grid) else grid
            return self.kernel[g](*args, **kwargs, **meta)

        return launch


# The Triton kernels address operands with int32 offsets (their WIDE / IDX constexprs: about half the address
# arithmetic of a k-loop) while every operand spans fewer elements than this, int64 from there on. Half of 2**31, so
# a block's overhang past a tensor's end and a tap's shift stay representable. Tests lower it to run the int64 paths.
INT32_LIMIT = 2**30


def int32_offsets(*tensors: torch.Tensor) -> bool:
    """Whether every element of `tensors` (from storage offset to the farthest one its strides reach) lies below
    INT32_LIMIT. A tensor whose whole storage is shorter passes at once (every element it reaches lies in it: ~0.1
    us against ~1 us for the span; launchers ask this on every call)."""
    limit = INT32_LIMIT
    for t in tensors:
        if t.untyped_storage().nbytes() < limit * t.element_size():
            continue
        span = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1
        if t.numel() > 0 and span >= limit:
            return False
    return True


def element_size(named_args: dict) -> int:
    """Bytes per element of the first tensor argument of a launch (for config pruning)."""
    return next(v for v in named_args.values() if hasattr(v, "element_size")).element_size()


# A Triton split-reduction program's fixed cost in k-steps: pipeline fill, the store of its fp32 partial tile and its
# share of the split sum, ~2-3 us, against ~0.3-0.4 us per k-step of a 128x128x64 16-bit wgmma tile (H100/H200).
SPLIT_FIXED_STEPS = 8


def wave_splits(tiles: int, steps: int, element_size: int, min_steps: int) -> int:
    """How many ways a Triton GEMM splits a reduction of `steps` k-steps over `tiles` output tiles: the count that
    minimises gm._ext's time model, waves x (k-steps per split + SPLIT_FIXED_STEPS), with waves of two programs per
    SM for 16-bit operands and one for wider ones (whose pipelined stages take most of an SM's shared memory), each
    split at least `min_steps` k-steps, at most two waves' worth of splits (a single output tile spreads over the
    whole GPU). The waves are the point: the earlier rule, "enough splits for two programs
    per SM", launched 288 programs on 264 slots (7x7 mask-A weight gradient, C=256, bf16) or 265 (3x3 mask B,
    C=128): a second wave of 24 or 1 programs that took as long as the first."""
    from gm._ext import _reduction_splits, sm_count  # noqa: PLC0415  (_reduction_splits is cached)

    slots = sm_count(torch.cuda.current_device()) * (2 if element_size <= 2 else 1)
    return _reduction_splits(tiles, steps, slots, 1, min_steps, SPLIT_FIXED_STEPS, cap=2 * slots)


def sm_slots() -> int:
    """The current GPU's SM count (what wave_splits sizes its waves by; 0 under the interpreter): a cache key for
    split counts computed from it."""
    if INTERPRETED:
        return 0
    from gm._ext import sm_count  # noqa: PLC0415

    return sm_count(torch.cuda.current_device())


def smem_limit() -> int:
    """Shared memory one block may use on the current GPU (opt-in maximum)."""
    return _smem_limit(torch.cuda.current_device())


@functools.cache
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024)


def fits_smem(elements_per_stage):
    """A `prune` for tuned(): keeps configs whose pipelined operand tiles, elements_per_stage(config.kwargs)
    elements of the first tensor's dtype per stage, fit in shared memory."""

    def prune(configs, named_args):
        budget = smem_limit() // element_size(named_args)
        return [c for c in configs if elements_per_stage(c.kwargs) * max(c.num_stages, 1) <= budget]

    return prune


def suits(config, element_sizes: tuple[int, ...]):
    """Tag a triton.Config with the element sizes (bytes) of the inputs it suits, for by_element_size."""
    config.element_sizes = element_sizes
    return config


def all_of(*prunes):
    """A `prune` for tuned() that applies each of `prunes` in turn."""

    def prune(configs, named_args):
        for p in prunes:
            configs = p(configs, named_args)
        return configs

    return prune


def by_element_size(configs, named_args):
    """A `prune` for tuned(): the configs tagged (suits()) for the first tensor's element size; untagged ones suit
    every size."""
    size = element_size(named_args)
    return [c for c in configs if size in getattr(c, "element_sizes", (size,))]


@triton.jit
def sigmoid(v):
    """1 / (1 + exp(-v)) without overflow for large |v|."""
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def tanh(x):
    """2 sigmoid(2x) - 1 (tl has no tanh in every Triton version); exp(-2x) overflowing to inf gives -1 exactly."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def dot_acc(a, b, acc, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. float64 operands computed in registers (a masked weight tile, an activation's gradient) make
    Triton 3.6's sm_90 backend abort ("Currently fp64 don't support largeK MMA"), so float64 takes a broadcast
    product instead of tl.dot: FMA work on small float64 tiles (float64 is the checking dtype, not a fast one)."""
    if ACC == tl.float64:
        return acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
