"""Triton kernels for minibatch discrimination, without the N x N x B x C tensor.

    c_b(i, j) = exp(-sum_c |m[i, b, c] - m[j, b, c]|)                      m: (N, B, C), any strides
    forward:   o[i, b] = sum_{j (!= i)} c_b(i, j)                           o: (N, B) contiguous
    backward: dm[i, b, c] = -sum_j (g[i, b] + g[j, b]) c_b(i, j) sign(m[i, b, c] - m[j, b, c])

A program owns BLOCK_I rows i and BLOCK_B kernels b and loops over j in tiles of BLOCK_J, holding the
(BLOCK_I, BLOCK_J, BLOCK_B) pair terms in registers; c_b(i, j) is recomputed in the backward. The backward's C
accumulators live in one (BLOCK_I, BLOCK_B, BLOCK_C) tensor (C padded to a power of two), each c's tile sum added
through a one-hot select: about BLOCK_C / (5 BLOCK_J) extra work. Accumulation in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gm.kernels._common import TL_DTYPES, acc_dtype, cdiv, next_power_of_2, tuned
from gm.kernels._launch import fast


@triton.jit
def _pair_distance(
    m_ptr, i, j, b, i_ok, j_ok, b_ok, smn, smb, smc,
    C: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """(BLOCK_I, BLOCK_J, BLOCK_B): sum_c |m[i, b, c] - m[j, b, c]|."""
    mask_i = i_ok[:, None] & b_ok[None, :]
    mask_j = j_ok[:, None] & b_ok[None, :]
    dist = tl.zeros((BLOCK_I, BLOCK_J, BLOCK_B), dtype=ACC)
    for c in tl.static_range(C):
        xi = tl.load(m_ptr + i[:, None] * smn + b[None, :] * smb + c * smc, mask=mask_i, other=0.0).to(ACC)
        xj = tl.load(m_ptr + j[:, None] * smn + b[None, :] * smb + c * smc, mask=mask_j, other=0.0).to(ACC)
        dist += tl.abs(xi[:, None, :] - xj[None, :, :])
    return dist


@triton.jit
def _pair_keep(i, j, j_ok, EXCLUDE_SELF: tl.constexpr):
    """(BLOCK_I, BLOCK_J, 1): which pairs count: j inside the batch, and j != i under exclude_self."""
    keep = j_ok[None, :, None] & (i[:, None, None] >= 0)
    if EXCLUDE_SELF:
        keep = keep & (i[:, None, None] != j[None, :, None])
    return keep


@triton.jit
def minibatch_fwd_kernel(
    m_ptr, o_ptr,
    N, B, smn, smb, smc,
    C: tl.constexpr, EXCLUDE_SELF: tl.constexpr, ACC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    b = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    i_ok = i < N
    b_ok = b < B
    acc = tl.zeros((BLOCK_I, BLOCK_B), dtype=ACC)  # reduced over each j tile: a 3-D accumulator would spill
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        j_ok = j < N
        dist = _pair_distance(m_ptr, i, j, b, i_ok, j_ok, b_ok, smn, smb, smc, C, ACC, BLOCK_I, BLOCK_J, BLOCK_B)
        acc += tl.sum(tl.where(_pair_keep(i, j, j_ok, EXCLUDE_SELF), tl.exp(-dist), 0.0), axis=1)
    tl.store(o_ptr + i[:, None] * B + b[None, :], acc.to(o_ptr.dtype.element_ty), mask=i_ok[:, None] & b_ok[None, :])


@triton.jit
def minibatch_bwd_kernel(
    g_ptr, m_ptr, dm_ptr,
    N, B, smn, smb, smc,
    C: tl.constexpr, EXCLUDE_SELF: tl.constexpr, ACC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    b = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    i_ok = i < N
    b_ok = b < B
    mask_i = i_ok[:, None] & b_ok[None, :]
    gi = tl.load(g_ptr + i[:, None] * B + b[None, :], mask=mask_i, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_I, BLOCK_B, BLOCK_C), dtype=ACC)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        j_ok = j < N
        mask_j = j_ok[:, None] & b_ok[None, :]
        gj = tl.load(g_ptr + j[:, None] * B + b[None, :], mask=mask_j, other=0.0).to(ACC)
        dist = _pair_distance(m_ptr, i, j, b, i_ok, j_ok, b_ok, smn, smb, smc, C, ACC, BLOCK_I, BLOCK_J, BLOCK_B)
        w = (gi[:, None, :] + gj[None, :, :]) * tl.exp(-dist)
        w = tl.where(_pair_keep(i, j, j_ok, EXCLUDE_SELF), w, 0.0)
        for c in tl.static_range(C):
            xi = tl.load(m_ptr + i[:, None] * smn + b[None, :] * smb + c * smc, mask=mask_i, other=0.0).to(ACC)
            xj = tl.load(m_ptr + j[:, None] * smn + b[None, :] * smb + c * smc, mask=mask_j, other=0.0).to(ACC)
            d = xi[:, None, :] - xj[None, :, :]
            sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(ACC)
            part = tl.sum(w * sign, axis=1)  # (BLOCK_I, BLOCK_B)
            acc += tl.where(cc[None, None, :] == c, part[:, :, None], 0.0)
    out = dm_ptr + i[:, None, None] * smn + b[None, :, None] * smb + cc[None, None, :] * smc
    mask = mask_i[:, :, None] & (cc[None, None, :] < C)
    tl.store(out, (-acc).to(dm_ptr.dtype.element_ty), mask=mask)


# Launch configurations: interpreted, small fixed blocks; on a GPU, autotuned over a short list.
_INTERP = dict(BLOCK_I=4, BLOCK_J=4, BLOCK_B=4)


def _configs(backward: bool):
    # (BLOCK_I, BLOCK_J, BLOCK_B, warps): 32-64 pair terms per thread; python -m bench.aot (sm_90, Triton 3.6 and 3.9)
    # compiles them spill-free in float32/bfloat16/float16 (float64, the checking dtype, spills).
    shapes = [(32, 16, 16, 8), (16, 16, 16, 4), (32, 16, 8, 4), (16, 16, 32, 4), (64, 8, 8, 8), (32, 32, 8, 8)]
    if backward:
        shapes = [(16, 16, 16, 4), (16, 16, 16, 8), (32, 8, 8, 8), (16, 8, 16, 4), (64, 8, 4, 8)]
    return [
        triton.Config(dict(BLOCK_I=bi, BLOCK_J=bj, BLOCK_B=bb), num_warps=nw, num_stages=2) for bi, bj, bb, nw in shapes
    ]


_KEY = ["N", "B", "C", "EXCLUDE_SELF"]
_fwd, _FWD_META = tuned(minibatch_fwd_kernel, _configs(False), _KEY, _INTERP)
_bwd, _BWD_META = tuned(minibatch_bwd_kernel, _configs(True), _KEY, _INTERP)


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in TL_DTYPES:
        raise ValueError(f"the triton backend takes float16/bfloat16/float32/float64, got {t.dtype}")


def forward(m: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """o (N, B) in m's dtype."""
    _check_dtype(m)
    n, b, c = m.shape
    o = torch.empty(n, b, dtype=m.dtype, device=m.device)

    def grid(meta):
        return (cdiv(n, meta["BLOCK_I"]), cdiv(b, meta["BLOCK_B"]))

    fast(_fwd)[grid](
        m, o, n, b, *m.stride(),
        C=c, EXCLUDE_SELF=exclude_self, ACC=acc_dtype(m.dtype), **_FWD_META,
    )  # fmt: skip
    return o


def backward(grad: torch.Tensor, m: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """dm (N, B, C) contiguous in m's dtype; grad (N, B) contiguous."""
    _check_dtype(m)
    m = m.contiguous()
    grad = grad.contiguous()
    n, b, c = m.shape
    dm = torch.empty(n, b, c, dtype=m.dtype, device=m.device)

    def grid(meta):
        return (cdiv(n, meta["BLOCK_I"]), cdiv(b, meta["BLOCK_B"]))

    fast(_bwd)[grid](
        grad, m, dm, n, b, *m.stride(),
        C=c, EXCLUDE_SELF=exclude_self, ACC=acc_dtype(m.dtype), BLOCK_C=next_power_of_2(c), **_BWD_META,
    )  # fmt: skip
    return dm
