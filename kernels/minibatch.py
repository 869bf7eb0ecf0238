"""Triton kernels for minibatch discrimination, without the N x N x B x C tensor.

    c_b(i, j) = exp(-sum_c |m[i, b, c] - m[j, b, c]|)                      m: (N, B, C), any strides
    forward:   o[i, b] = sum_{j (!= i)} c_b(i, j)                           o: (N, B) contiguous
    backward: dm[i, b, c] = -sum_j (g[i, b] + g[j, b]) c_b(i, j) sign(m[i, b, c] - m[j, b, c])

C <= 8 (the papers' sizes): a program owns one kernel b and BLOCK_I rows i, its rows' m (scaled by log2 e, so c =
2^-sum|x_i - x_j|) in registers, one variable per c; it walks j in tiles of BLOCK_J laid out as a (BLOCK_J, BLOCK_I)
tile whose j axis stays within each thread (BLOCK_I spans the warps' lanes), so the sums over j are a thread's own
additions, never a shuffle. Rows outside the batch read as FAR (their distance to a real row overflows to +inf: c
is exactly 0), so only the tiles that meet the program's own rows test j != i. c_b(i, j) is recomputed in the
backward, and so is each difference there (one subtraction) rather than holding C tiles of them.
C > 8: the generic kernels below hold (BLOCK_I, BLOCK_J, BLOCK_B) pair terms in registers and reduce each j tile
across threads; the backward's C accumulators live in one (BLOCK_I, BLOCK_B, BLOCK_C) tensor (C padded to a power of
two), each c's tile sum added through a one-hot select. Accumulation in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from gm.kernels._common import INT32_LIMIT, INTERPRETED, TL_DTYPES, acc_dtype, cdiv, next_power_of_2, tuned
from gm.kernels._launch import fast

# ---------------------------------------------------------------------------------------------------------- C <= 8
LOG2E = tl.constexpr(1.4426950408889634)
FAR = tl.constexpr(3.0e38)  # rows outside the batch: any real row's distance to them overflows (c = 0)
MAX_C = 8


@triton.jit
def _x(m_ptr, r, r_ok, b, smn, smb, smc, c: tl.constexpr, ACC: tl.constexpr):
    """log2(e) m[r, b, c] in ACC for the program's rows r (FAR outside the batch); b is 64-bit where offsets need it
    (WIDE), and the rows' offsets with it."""
    x = tl.load(m_ptr + (r.to(b.dtype) * smn + b * smb + c * smc), mask=r_ok, other=0.0).to(ACC)
    return tl.where(r_ok, x * LOG2E, FAR)


@triton.jit
def _xj(pj, j_ok, smc, c: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    """(BLOCK_J,): log2(e) m[j, b, c] through the tile's row pointers pj; FAR for j outside the batch if MASKED (the
    last tile only: the others load without a mask or a select)."""
    if MASKED:
        return tl.where(j_ok, tl.load(pj + c * smc, mask=j_ok, other=0.0).to(ACC) * LOG2E, FAR)
    return tl.load(pj + c * smc).to(ACC) * LOG2E


@triton.jit
def _c_tile(pj, j_ok, smc, x0, x1, x2, x3, x4, x5, x6, x7,
            C: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """(BLOCK_J, BLOCK_I): c(i, j) = 2^-sum_c |x_i[c] - x_j[c]|."""
    d = tl.abs(x0[None, :] - _xj(pj, j_ok, smc, 0, ACC, MASKED)[:, None])
    if C > 1:
        d += tl.abs(x1[None, :] - _xj(pj, j_ok, smc, 1, ACC, MASKED)[:, None])
    if C > 2:
        d += tl.abs(x2[None, :] - _xj(pj, j_ok, smc, 2, ACC, MASKED)[:, None])
    if C > 3:
        d += tl.abs(x3[None, :] - _xj(pj, j_ok, smc, 3, ACC, MASKED)[:, None])
    if C > 4:
        d += tl.abs(x4[None, :] - _xj(pj, j_ok, smc, 4, ACC, MASKED)[:, None])
    if C > 5:
        d += tl.abs(x5[None, :] - _xj(pj, j_ok, smc, 5, ACC, MASKED)[:, None])
    if C > 6:
        d += tl.abs(x6[None, :] - _xj(pj, j_ok, smc, 6, ACC, MASKED)[:, None])
    if C > 7:
        d += tl.abs(x7[None, :] - _xj(pj, j_ok, smc, 7, ACC, MASKED)[:, None])
    return tl.exp2(-d)


@triton.jit
def _fwd_span(acc, m_ptr, i, start, stop, N, b, smn, smb, smc, x0, x1, x2, x3, x4, x5, x6, x7,
              C: tl.constexpr, CHECK: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
              BLOCK_J: tl.constexpr):  # fmt: skip
    """acc[i] + sum over j in [start, stop) (whole tiles from start) of c(i, j); j != i where CHECK; j >= N masked
    where MASKED."""
    jr = start + tl.arange(0, BLOCK_J)
    pj = m_ptr + (jr.to(b.dtype) * smn + b * smb)  # the tile's row pointers, advanced by a tile each step
    for j0 in range(start, stop, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        e = _c_tile(pj, j < N, smc, x0, x1, x2, x3, x4, x5, x6, x7, C, ACC, MASKED)
        if CHECK:
            e = tl.where(j[:, None] == i[None, :], 0.0, e)
        acc += tl.sum(e, axis=0)
        pj += BLOCK_J * smn
    return acc


@triton.jit
def _sign_sum(acc, w, pj, j_ok, smc, xi, c: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    """acc[i] + sum_j w[j, i] sign(x_i[c] - x_j[c]) (sign(0) = 0)."""
    d = xi[None, :] - _xj(pj, j_ok, smc, c, ACC, MASKED)[:, None]
    return acc + tl.sum(w * ((d > 0).to(ACC) - (d < 0).to(ACC)), axis=0)


@triton.jit
def _bwd_span(a0, a1, a2, a3, a4, a5, a6, a7, g_ptr, m_ptr, i, gi, start, stop, N, B, b, smn, smb, smc,
              x0, x1, x2, x3, x4, x5, x6, x7,
              C: tl.constexpr, CHECK: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
              BLOCK_J: tl.constexpr):  # fmt: skip
    """a_c[i] + sum over j in [start, stop) of (g_i + g_j) c(i, j) sign(x_i[c] - x_j[c])."""
    jr = start + tl.arange(0, BLOCK_J)
    pj = m_ptr + (jr.to(b.dtype) * smn + b * smb)
    pg = g_ptr + (jr.to(b.dtype) * B + b)
    for j0 in range(start, stop, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < N
        if MASKED:
            gj = tl.load(pg, mask=j_ok, other=0.0).to(ACC)
        else:
            gj = tl.load(pg).to(ACC)
        w = (gi[None, :] + gj[:, None]) * _c_tile(pj, j_ok, smc, x0, x1, x2, x3, x4, x5, x6, x7, C, ACC, MASKED)
        if CHECK:  # (the j = i term is 0 anyway, sign(0) = 0, but for a NaN row: kept out as the reference does)
            w = tl.where(j[:, None] == i[None, :], 0.0, w)
        a0 = _sign_sum(a0, w, pj, j_ok, smc, x0, 0, ACC, MASKED)
        if C > 1:
            a1 = _sign_sum(a1, w, pj, j_ok, smc, x1, 1, ACC, MASKED)
        if C > 2:
            a2 = _sign_sum(a2, w, pj, j_ok, smc, x2, 2, ACC, MASKED)
        if C > 3:
            a3 = _sign_sum(a3, w, pj, j_ok, smc, x3, 3, ACC, MASKED)
        if C > 4:
            a4 = _sign_sum(a4, w, pj, j_ok, smc, x4, 4, ACC, MASKED)
        if C > 5:
            a5 = _sign_sum(a5, w, pj, j_ok, smc, x5, 5, ACC, MASKED)
        if C > 6:
            a6 = _sign_sum(a6, w, pj, j_ok, smc, x6, 6, ACC, MASKED)
        if C > 7:
            a7 = _sign_sum(a7, w, pj, j_ok, smc, x7, 7, ACC, MASKED)
        pj += BLOCK_J * smn
        pg += BLOCK_J * B
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _store_c(dm_ptr, i, i_ok, b, smn, smb, smc, a, c: tl.constexpr):
    tl.store(dm_ptr + (i.to(b.dtype) * smn + b * smb + c * smc), (-a).to(dm_ptr.dtype.element_ty), mask=i_ok)


@triton.jit
def _spans(i0, N, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """The j spans of a program: [0, i0) and [i0 + BLOCK_I, full) in whole tiles without masks, the program's own
    rows [i0, i0 + BLOCK_I) (with the j != i test; masked where they pass N) and the ragged tail [tail, N)."""
    own_end = i0 + BLOCK_I
    full = N - N % BLOCK_J
    tail = tl.maximum(full, own_end)
    return own_end, full, tail


@triton.jit
def _program(N, WIDE: tl.constexpr, BLOCK_I: tl.constexpr):
    """The program's kernel b (grid axis 0) and rows i0 .. i0 + BLOCK_I (axis 1); 64-bit where WIDE (b, and through
    it every row offset)."""
    b = tl.program_id(0)
    i0 = tl.program_id(1) * BLOCK_I
    if WIDE:
        b = b.to(tl.int64)
        i0 = i0.to(tl.int64)
    i = i0 + tl.arange(0, BLOCK_I)
    return b, i0, i, i < N


@triton.jit
def _rows_x(m_ptr, i, i_ok, b, smn, smb, smc, C: tl.constexpr, ACC: tl.constexpr):
    """The program's rows of m, one (BLOCK_I,) tensor per c (those past C repeat a real one and go unused)."""
    return (
        _x(m_ptr, i, i_ok, b, smn, smb, smc, 0, ACC),
        _x(m_ptr, i, i_ok, b, smn, smb, smc, 1 % C, ACC),
        _x(m_ptr, i, i_ok, b, smn, smb, smc, 2 % C, ACC),
        _x(m_ptr, i, i_ok, b, smn, smb, smc, 3 % C, ACC),
        _x(m_ptr, i, i_ok, b, smn, smb, smc, 4 % C, ACC),
        _x(m_ptr, i, i_ok, b, smn, smb, smc, 5 % C, ACC),
        _x(m_ptr, i, i_ok, b, smn, smb, smc, 6 % C, ACC),
        _x(m_ptr, i, i_ok, b, smn, smb, smc, 7 % C, ACC),
    )


@triton.jit
def minibatch_rows_fwd_kernel(
    m_ptr, o_ptr,
    N, B, smn, smb, smc,
    C: tl.constexpr, EXCLUDE_SELF: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    b, i0, i, i_ok = _program(N, WIDE, BLOCK_I)
    x0, x1, x2, x3, x4, x5, x6, x7 = _rows_x(m_ptr, i, i_ok, b, smn, smb, smc, C, ACC)
    own_end, full, tail = _spans(i0, N, BLOCK_I, BLOCK_J)
    acc = tl.zeros((BLOCK_I,), dtype=ACC)
    acc = _fwd_span(acc, m_ptr, i, 0, i0, N, b, smn, smb, smc,
                    x0, x1, x2, x3, x4, x5, x6, x7, C, False, False, ACC, BLOCK_J)  # fmt: skip
    acc = _fwd_span(acc, m_ptr, i, i0, own_end, N, b, smn, smb, smc,
                    x0, x1, x2, x3, x4, x5, x6, x7, C, EXCLUDE_SELF, True, ACC, BLOCK_J)  # fmt: skip
    acc = _fwd_span(acc, m_ptr, i, own_end, full, N, b, smn, smb, smc,
                    x0, x1, x2, x3, x4, x5, x6, x7, C, False, False, ACC, BLOCK_J)  # fmt: skip
    acc = _fwd_span(acc, m_ptr, i, tail, N, N, b, smn, smb, smc,
                    x0, x1, x2, x3, x4, x5, x6, x7, C, False, True, ACC, BLOCK_J)  # fmt: skip
    tl.store(o_ptr + (i.to(b.dtype) * B + b), acc.to(o_ptr.dtype.element_ty), mask=i_ok)


@triton.jit
def minibatch_rows_bwd_kernel(
    g_ptr, m_ptr, dm_ptr,
    N, B, smn, smb, smc,
    C: tl.constexpr, EXCLUDE_SELF: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    b, i0, i, i_ok = _program(N, WIDE, BLOCK_I)
    gi = tl.load(g_ptr + (i.to(b.dtype) * B + b), mask=i_ok, other=0.0).to(ACC)
    x0, x1, x2, x3, x4, x5, x6, x7 = _rows_x(m_ptr, i, i_ok, b, smn, smb, smc, C, ACC)
    own_end, full, tail = _spans(i0, N, BLOCK_I, BLOCK_J)
    a0 = tl.zeros((BLOCK_I,), dtype=ACC)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    a0, a1, a2, a3, a4, a5, a6, a7 = _bwd_span(
        a0, a1, a2, a3, a4, a5, a6, a7, g_ptr, m_ptr, i, gi, 0, i0, N, B, b, smn, smb, smc,
        x0, x1, x2, x3, x4, x5, x6, x7, C, False, False, ACC, BLOCK_J,
    )  # fmt: skip
    a0, a1, a2, a3, a4, a5, a6, a7 = _bwd_span(
        a0, a1, a2, a3, a4, a5, a6, a7, g_ptr, m_ptr, i, gi, i0, own_end, N, B, b, smn, smb, smc,
        x0, x1, x2, x3, x4, x5, x6, x7, C, EXCLUDE_SELF, True, ACC, BLOCK_J,
    )  # fmt: skip
    a0, a1, a2, a3, a4, a5, a6, a7 = _bwd_span(
        a0, a1, a2, a3, a4, a5, a6, a7, g_ptr, m_ptr, i, gi, own_end, full, N, B, b, smn, smb, smc,
        x0, x1, x2, x3, x4, x5, x6, x7, C, False, False, ACC, BLOCK_J,
    )  # fmt: skip
    a0, a1, a2, a3, a4, a5, a6, a7 = _bwd_span(
        a0, a1, a2, a3, a4, a5, a6, a7, g_ptr, m_ptr, i, gi, tail, N, N, B, b, smn, smb, smc,
        x0, x1, x2, x3, x4, x5, x6, x7, C, False, True, ACC, BLOCK_J,
    )  # fmt: skip
    _store_c(dm_ptr, i, i_ok, b, smn, smb, smc, a0, 0)
    if C > 1:
        _store_c(dm_ptr, i, i_ok, b, smn, smb, smc, a1, 1)
    if C > 2:
        _store_c(dm_ptr, i, i_ok, b, smn, smb, smc, a2, 2)
    if C > 3:
        _store_c(dm_ptr, i, i_ok, b, smn, smb, smc, a3, 3)
    if C > 4:
        _store_c(dm_ptr, i, i_ok, b, smn, smb, smc, a4, 4)
    if C > 5:
        _store_c(dm_ptr, i, i_ok, b, smn, smb, smc, a5, 5)
    if C > 6:
        _store_c(dm_ptr, i, i_ok, b, smn, smb, smc, a6, 6)
    if C > 7:
        _store_c(dm_ptr, i, i_ok, b, smn, smb, smc, a7, 7)


# ----------------------------------------------------------------------------------------------------------- C > 8


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
_ROWS_INTERP = dict(BLOCK_I=8, BLOCK_J=4)


def _configs(backward: bool):
    # (BLOCK_I, BLOCK_J, BLOCK_B, warps): 32-64 pair terms per thread; python -m bench.aot (sm_90, Triton 3.6 and 3.9)
    # compiles them spill-free in float32/bfloat16/float16 (float64, the checking dtype, spills).
    shapes = [(32, 16, 16, 8), (16, 16, 16, 4), (32, 16, 8, 4), (16, 16, 32, 4), (64, 8, 8, 8), (32, 32, 8, 8)]
    if backward:
        shapes = [(16, 16, 16, 4), (16, 16, 16, 8), (32, 8, 8, 8), (16, 8, 16, 4), (64, 8, 4, 8)]
    return [
        triton.Config(dict(BLOCK_I=bi, BLOCK_J=bj, BLOCK_B=bb), num_warps=nw, num_stages=2) for bi, bj, bb, nw in shapes
    ]


def _rows_configs(backward: bool):
    # (BLOCK_I, BLOCK_J, warps): BLOCK_I at least the block's threads, so its lanes span i and each thread holds a
    # tile's BLOCK_J j (the sums over j stay in-thread); BLOCK_I / (32 warps) rows a thread share each j row's loads.
    # sm_90 SASS per pair (C = 5 fp32, Triton 3.9 / 3.6): forward 13.0 / 13.9 at (512, 8, 4) against 23-29 for the
    # C > 8 kernels' configs; backward 36.9 / 36.8 at (512, 4, 4) against 79-105 (the CUDA kernels: 12.25 and 34.5).
    shapes = [(512, 8, 4), (1024, 8, 8), (256, 8, 4), (256, 16, 4), (128, 8, 4), (512, 16, 8)]
    if backward:
        shapes = [(512, 4, 4), (256, 4, 4), (256, 8, 4), (128, 4, 4), (512, 8, 8)]
    return [triton.Config(dict(BLOCK_I=bi, BLOCK_J=bj), num_warps=nw, num_stages=1) for bi, bj, nw in shapes]


_KEY = ["N", "B", "C", "EXCLUDE_SELF"]
_fwd, _FWD_META = tuned(minibatch_fwd_kernel, _configs(False), _KEY, _INTERP)
_bwd, _BWD_META = tuned(minibatch_bwd_kernel, _configs(True), _KEY, _INTERP)


def _rows_prune(configs, named_args):
    """Row tiles at most a quarter of the batch (rounded up to a power of two; 128 at least): taller ones leave too
    few programs (B x N / BLOCK_I) to fill the GPU, or mask out most of their rows."""
    tallest = max(128, next_power_of_2(named_args["N"]) // 4)
    return [c for c in configs if c.kwargs["BLOCK_I"] <= tallest]


_rows_fwd, _ROWS_FWD_META = tuned(minibatch_rows_fwd_kernel, _rows_configs(False), _KEY, _ROWS_INTERP, _rows_prune)
_rows_bwd, _ROWS_BWD_META = tuned(minibatch_rows_bwd_kernel, _rows_configs(True), _KEY, _ROWS_INTERP, _rows_prune)


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in TL_DTYPES:
        raise ValueError(f"the triton backend takes float16/bfloat16/float32/float64, got {t.dtype}")


def _overflow_by_design():
    """The padded rows' distances overflow to +inf on purpose (c = 2^-inf = 0); under the interpreter, numpy would
    warn about each one."""
    if INTERPRETED:
        import numpy as np  # noqa: PLC0415

        return np.errstate(over="ignore")
    return contextlib.nullcontext()


def _wide(m: torch.Tensor) -> bool:
    """Whether m's element offsets (or o's) reach INT32_LIMIT: the row kernels' offsets are then 64-bit."""
    n, b, c = m.shape
    return (n - 1) * m.stride(0) + (b - 1) * m.stride(1) + (c - 1) * m.stride(2) >= INT32_LIMIT or n * b >= INT32_LIMIT


def forward(m: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """o (N, B) in m's dtype."""
    _check_dtype(m)
    n, b, c = m.shape
    o = torch.empty(n, b, dtype=m.dtype, device=m.device)
    if c <= MAX_C:

        def rows_grid(meta):
            return (b, cdiv(n, meta["BLOCK_I"]))

        with _overflow_by_design():
            fast(_rows_fwd)[rows_grid](
                m, o, n, b, *m.stride(),
                C=c, EXCLUDE_SELF=exclude_self, ACC=acc_dtype(m.dtype), WIDE=_wide(m), **_ROWS_FWD_META,
            )  # fmt: skip
        return o

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
    if c <= MAX_C:

        def rows_grid(meta):
            return (b, cdiv(n, meta["BLOCK_I"]))

        with _overflow_by_design():
            fast(_rows_bwd)[rows_grid](
                grad, m, dm, n, b, *m.stride(),
                C=c, EXCLUDE_SELF=exclude_self, ACC=acc_dtype(m.dtype), WIDE=_wide(m), **_ROWS_BWD_META,
            )  # fmt: skip
        return dm

    def grid(meta):
        return (cdiv(n, meta["BLOCK_I"]), cdiv(b, meta["BLOCK_B"]))

    fast(_bwd)[grid](
        grad, m, dm, n, b, *m.stride(),
        C=c, EXCLUDE_SELF=exclude_self, ACC=acc_dtype(m.dtype), BLOCK_C=next_power_of_2(c), **_BWD_META,
    )  # fmt: skip
    return dm
