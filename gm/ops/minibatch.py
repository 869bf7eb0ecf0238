"""minibatch_discrimination: Salimans et al. 2016's pairwise L1-kernel feature, fused (no N x N tensor).

    c_b(i, j) = exp(-sum_c |m[i, b, c] - m[j, b, c]|),   o[i, b] = sum_{j != i} c_b(i, j)
    dL/dm[i, b, c] = -sum_j (g[i, b] + g[j, b]) c_b(i, j) sign(m[i, b, c] - m[j, b, c])

(j = i kept when exclude_self=False; its term in the gradient is zero: sign(0) = 0, as abs' in autograd.)
The fast backends loop over j in tiles and recompute c_b(i, j) in the backward: extra memory O(N B C).
"""

from __future__ import annotations

import functools
import os

import torch

from gm import _ext
from gm._backend import resolve
from gm._checks import check_tensor
from gm.ops._eager import EagerOp, backward_call

_OP = "gm::minibatch_discrimination"


# ----------------------------------------------------------------------------------------------------------------
# Backends. Each forward takes m (N, B, C) contiguous; each backward (grad (N, B) contiguous, m) -> dm.


def _reference_forward(m, exclude_self):
    from gm.reference.minibatch import minibatch_discrimination as ref  # noqa: PLC0415

    return ref(m, exclude_self=exclude_self)


def _reference_backward(grad, m, exclude_self):
    from gm.reference.minibatch import minibatch_discrimination_backward as ref  # noqa: PLC0415

    return ref(grad, m, exclude_self=exclude_self)


def _native_dtype(m: torch.Tensor) -> torch.dtype:
    """The C++ CPU kernels take float32 and float64; half types run in float32."""
    return torch.float64 if m.dtype == torch.float64 else torch.float32


def _cpu_forward(m, exclude_self):
    x = m.to(_native_dtype(m)).contiguous()
    n, b, c = x.shape
    o = torch.empty(n, b, dtype=x.dtype)
    _ext.ext().minibatch_fwd_cpu(x.data_ptr(), o.data_ptr(), n, b, c, exclude_self, _ext.dtype_code(x))
    return o.to(m.dtype)


def _cpu_backward(grad, m, exclude_self):
    x = m.to(_native_dtype(m)).contiguous()
    g = grad.to(x.dtype).contiguous()
    n, b, c = x.shape
    dm = torch.empty(n, b, c, dtype=x.dtype)
    _ext.ext().minibatch_bwd_cpu(g.data_ptr(), x.data_ptr(), dm.data_ptr(), n, b, c, exclude_self, _ext.dtype_code(x))
    return dm.to(m.dtype)


def _triton_forward(m, exclude_self):
    from gm.kernels import minibatch as k  # noqa: PLC0415

    return k.forward(m, exclude_self)


def _triton_backward(grad, m, exclude_self):
    from gm.kernels import minibatch as k  # noqa: PLC0415

    return k.backward(grad, m, exclude_self)


# Blocks of 8 warps that keep an SM's issue busy: two (16 warps). The kernels are issue-bound (sm_90 SASS: ~13
# instructions per pair and kernel at C = 5), so blocks beyond two on an SM share its issue slots and count as
# further waves in the split model, whatever the occupancy limit (4 forward blocks fit at C <= 5, 2 backward).
_SATURATING_BLOCKS_PER_SM = 2


def cuda_splits(n: int, b: int, device) -> int:
    """How many parts the CUDA rows walk splits the j range into: the count whose blocks ((N/128) x (B/8) x parts)
    fill whole waves of two blocks per SM best, by the time model waves x (j per part + 128), with parts of whole
    64-j tiles, at least 128 j each, at most 64 parts. (The earlier rule, enough blocks for two per SM, could spill
    into a second, mostly empty wave: 312 blocks on 264 slots at N = 1024, B = 100.)"""
    slots = _SATURATING_BLOCKS_PER_SM * _ext.sm_count(device)
    return _splits_for(-(-n // 128) * -(-b // 8), n, slots)


def _splits_for(tiles: int, n: int, slots: int) -> int:
    # gm._ext's split model over the j range: parts of whole 64-j tiles (the kernels' j_chunk), 128 j at least.
    return _ext._reduction_splits(tiles, n, slots, granule=64, min_steps=128)


# The pair walk (csrc/minibatch/minibatch_cuda.cu) visits each unordered pair of 128-row tiles once and credits both
# sides, at a higher cost per pair than the rows walk: the tile's share summed across the warp and added atomically.
# Its cost per j relative to the rows walk's, from the sm_90 SASS of the C = 5 float32 loops (tools/sass_loops.py,
# bench/NOTES.md "Session 15"): forward, backward.
_PAIR_COST = {False: 1.16, True: 1.36}
_BLOCK_FIXED = 128  # a block's fixed cost in j, as in the rows walk's split model
# None: the time model below picks; an int forces the pair walk with that many tile pairs a block (0: the rows walk).
FORCE_PAIR_STEPS: int | None = None


# GM_MBD_ROWS=1 (the CPU backend's switch to its rows walk) also keeps the CUDA kernels on theirs; read at import.
_ROWS_ONLY = os.environ.get("GM_MBD_ROWS") == "1"


def cuda_plan(n: int, b: int, c: int, device, backward: bool) -> tuple[int, int]:
    """(splits, pair_steps) of one CUDA minibatch call: the rows walk with `splits` parts (pair_steps = 0), or the
    pair walk with `pair_steps` tile pairs a block, whichever the time model says is faster. The rows walk where
    torch.use_deterministic_algorithms is on (the pair walk's atomic adds change the last bits from run to run),
    under GM_MBD_ROWS=1, and for C > 8 (the generic kernel)."""
    if c > 8:
        return 1, 0  # the generic kernel: one pass over j, no splits
    forced = FORCE_PAIR_STEPS
    if forced is None:
        rows_only = _ROWS_ONLY or torch.are_deterministic_algorithms_enabled()
        return _auto_plan(n, b, device, backward, rows_only)
    return (cuda_splits(n, b, device), 0) if forced == 0 else (1, forced)


@functools.lru_cache(maxsize=1024)
def _auto_plan(n: int, b: int, device, backward: bool, rows_only: bool) -> tuple[int, int]:
    splits = cuda_splits(n, b, device)
    if rows_only:
        return splits, 0
    return _plan(n, _cdiv(b, 8), _SATURATING_BLOCKS_PER_SM * _ext.sm_count(device), splits, backward)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=1024)
def _plan(n: int, groups: int, slots: int, splits: int, backward: bool) -> tuple[int, int]:
    """The time model of both walks in waves x (j per block + _BLOCK_FIXED), the pair walk's j weighted by
    _PAIR_COST; returns (splits, 0) or (1, steps)."""
    tiles = _cdiv(n, 128)
    chunk = _cdiv(_cdiv(n, splits), 64) * 64  # the rows walk's j per block (whole 64-j tiles)
    best, best_cost = 0, _cdiv(tiles * groups * splits, slots) * (chunk + _BLOCK_FIXED)
    partners = tiles // 2 + 1
    for steps in range(1, partners + 1):
        blocks = tiles * _cdiv(partners, steps) * groups
        cost = _cdiv(blocks, slots) * (steps * 128 * _PAIR_COST[backward] + _BLOCK_FIXED)
        if cost < best_cost:
            best, best_cost = steps, cost
    return (splits, 0) if best == 0 else (1, best)


def _cuda_call(entry, grad, m, out, exclude_self, plan=None):
    n, b, c = m.shape
    # (splits, pair_steps): the time model's, or the caller's (the bench's rows-walk row)
    splits, pair_steps = plan if plan is not None else cuda_plan(n, b, c, m.device, grad is not None)
    part = None
    acc = torch.float64 if m.dtype == torch.float64 else torch.float32
    if splits > 1:
        part = torch.empty(splits, *out.shape, dtype=acc, device=m.device)
    elif pair_steps > 0 and m.dtype != acc:  # the 16-bit types' float32 sums
        part = torch.empty(out.shape, dtype=acc, device=m.device)
    with _ext.device_guard(m):  # launch on the tensors' GPU
        args = (grad.data_ptr(),) if grad is not None else ()
        entry(*args, m.data_ptr(), out.data_ptr(), n, b, c, exclude_self, _ext.dtype_code(m), splits, pair_steps,
              part.data_ptr() if part is not None else 0, _ext.stream_of(m))  # fmt: skip
    return out


def _cuda_forward(m, exclude_self, plan=None):
    n, b, _ = m.shape
    o = torch.empty(n, b, dtype=m.dtype, device=m.device)
    return _cuda_call(_ext.ext().minibatch_fwd_cuda, None, m, o, exclude_self, plan)


def _cuda_backward(grad, m, exclude_self, plan=None):
    return _cuda_call(_ext.ext().minibatch_bwd_cuda, grad, m, torch.empty_like(m), exclude_self, plan)


_FORWARD = {"reference": _reference_forward, "cpu": _cpu_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {
    "reference": _reference_backward,
    "cpu": _cpu_backward,
    "triton": _triton_backward,
    "cuda": _cuda_backward,
}


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration.


def _minibatch_impl(m: torch.Tensor, exclude_self: bool, backend: str) -> torch.Tensor:
    return _FORWARD[backend](m.contiguous(), exclude_self).contiguous()


_minibatch_op = torch.library.custom_op(_OP, _minibatch_impl, mutates_args=())


@_minibatch_op.register_fake
def _(m, exclude_self, backend):
    return m.new_empty(m.shape[0], m.shape[1])


def _minibatch_backward_impl(grad: torch.Tensor, m: torch.Tensor, exclude_self: bool, backend: str) -> torch.Tensor:
    return _BACKWARD[backend](grad.contiguous(), m.contiguous(), exclude_self).contiguous()


_minibatch_backward_op = torch.library.custom_op(_OP + "_backward", _minibatch_backward_impl, mutates_args=())


@_minibatch_backward_op.register_fake
def _(grad, m, exclude_self, backend):
    return m.new_empty(m.shape)


def _setup_context(ctx, inputs, output):
    m, exclude_self, backend = inputs
    ctx.save_for_backward(m)
    ctx.exclude_self, ctx.backend = exclude_self, backend


def _backward(ctx, grad):
    (m,) = ctx.saved_tensors
    dm = (
        backward_call(ctx, _minibatch_backward_op, _minibatch_backward_impl, grad, m, ctx.exclude_self, ctx.backend)
        if ctx.needs_input_grad[0]
        else None
    )
    return dm, None, None


_minibatch_op.register_autograd(_backward, setup_context=_setup_context)
_MINIBATCH = EagerOp(_minibatch_op, _minibatch_impl, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------------------------
# Public function.


def check_minibatch_args(m) -> None:
    check_tensor("m", m, ndim=3)
    if m.shape[0] < 1:
        raise ValueError(f"m must have at least one row (N >= 1), got shape {tuple(m.shape)}")


def minibatch_discrimination(m: torch.Tensor, *, exclude_self: bool = True, backend: str | None = None) -> torch.Tensor:
    """Minibatch discrimination features (Salimans et al. 2016, section 3.2), without the N x N x B x C tensor.

    Args:
        m: (N, B, C) float16/bfloat16/float32/float64: M_i = f(x_i) T for N samples, B kernels of C dims.
        exclude_self: leave the j = i term (exactly 1) out, as the paper's code does; False keeps it (eq. in the paper).
        backend: None (auto), "reference", "cpu", "triton" or "cuda".

    Returns:
        o (N, B), same dtype as m: o[i, b] = sum_j exp(-||m[i, b] - m[j, b]||_1).

    On the cuda backend, from about N = 1024 (float32/16-bit, C <= 8), the kernels visit each unordered pair once
    and add both rows' shares atomically: the last bits of o and of the gradient can then differ from run to run.
    Under torch.use_deterministic_algorithms(True) they walk every ordered pair instead (bit-reproducible, slower
    at large N). The other backends are deterministic.

    Example:
        >>> m = torch.randn(64, 100, 5)
        >>> minibatch_discrimination(m).shape
        torch.Size([64, 100])
    """
    check_minibatch_args(m)
    chosen = resolve(backend, m.device, native_cpu=True, op="minibatch_discrimination", dtype=m.dtype)
    return _MINIBATCH(m, exclude_self, chosen)
