"""Triton kernels for masked_linear: GEMMs that visit only the non-zero tiles of a 0/1 weight mask.

Forward, x (R, K), weight and mask (O, K), bias (O,):
    y[r, o] = act(b[o] + sum_k x[r, k] * W[o, k] * M[o, k]),  act in {none, ELU(alpha=1), ReLU}
Input gradient, with g = dL/dy and gp = g * act'(y) (computed from the saved output y, fused into the A loads):
    dx[r, k] = sum_o gp[r, o] * W[o, k] * M[o, k]
Weight and bias gradient:
    dW[o, k] = M[o, k] * sum_r gp[r, o] * x[r, k],   db[o] = sum_r gp[r, o]

Both GEMMs over the weight are one kernel, `masked_gemm_kernel`: C[r, j] = epi(sum_i A'[r, i] * Wm(i, j)) with the
weight addressed through strides (forward: j = o, i = k; input gradient: j = k, i = o). Each program owns a
BLOCK_J slice of output columns and loops only over the inner tiles listed for it in a compressed tile map
(gm.ops.masked_linear.TileMap: offsets + tile indices, the all-ones tiles of each slice listed before the
partly-zero ones; the input gradient uses the transposed map), so all-zero tiles of the mask are never loaded or
multiplied, and the mask itself is read only for tiles that are partly zero, in a second branch-free loop. The weight-gradient kernel runs one program per (o, k) tile (and split of the rows):
empty tiles store zeros without a loop. Offsets are int64; fp32 accumulation (fp64 for fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gm.kernels._common import (
    INTERPRETED,
    TL_DTYPES,
    acc_dtype,
    by_element_size,
    cdiv,
    dot_acc,
    dot_precision,
    int32_offsets,
    suits,
    tuned,
    wave_splits,
)  # fmt: skip
from gm.kernels._launch import fast
from gm.kernels._layout import sum_splits

ACT_CODES = {None: 0, "elu": 1, "relu": 2}


@triton.jit
def apply_act(v, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.where(v > 0, v, tl.exp(tl.minimum(v, 0)) - 1)
    elif ACT == 2:
        v = tl.where(v > 0, v, tl.zeros_like(v))
    return v


@triton.jit
def act_grad(g, y, ACT: tl.constexpr):
    """g * act'(x) written through the output y = act(x): ELU' = 1 or y + 1, ReLU' = [y > 0]."""
    if ACT == 1:
        g = tl.where(y > 0, g, g * (y + 1))
    elif ACT == 2:
        g = tl.where(y > 0, g, tl.zeros_like(g))
    return g


@triton.jit
def masked_w_tile(w_ptr, m_ptr, ri, rj, I, J, sw_i, sw_j, sm_i, sm_j, USE_MASK: tl.constexpr):
    """The (BLOCK_I, BLOCK_J) tile Wm(i, j) = W * M; the mask is read only for tiles that are partly zero."""
    ok = (ri[:, None] < I) & (rj[None, :] < J)
    w = tl.load(w_ptr + ri[:, None] * sw_i + rj[None, :] * sw_j, mask=ok, other=0.0)
    if USE_MASK:
        mv = tl.load(m_ptr + ri[:, None] * sm_i + rj[None, :] * sm_j, mask=ok, other=0)
        w = tl.where(mv != 0, w, tl.zeros_like(w))
    return w


@triton.jit
def _gemm_over_tiles(
    acc, a_ptr, y_ptr, w_ptr, m_ptr, tile_idx_ptr, t_start, t_stop, rr, rj, R, I, J,
    sa_r, sa_i, sy_r, sy_i, sw_i, sw_j, sm_i, sm_j,
    PRO_ACT: tl.constexpr, USE_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    """acc += A'[rr, tiles] Wm[tiles, rj] over the listed inner tiles t_start..t_stop: a branch-free loop, so
    Triton can software-pipeline it (full tiles and partly-zero tiles are listed apart and run in two loops)."""
    r_ok = rr < R
    for t in range(t_start, t_stop):
        it = tl.load(tile_idx_ptr + t).to(IDX)
        ri = it * BLOCK_I + tl.arange(0, BLOCK_I).to(IDX)
        a_ok = r_ok[:, None] & (ri[None, :] < I)
        a = tl.load(a_ptr + rr[:, None] * sa_r + ri[None, :] * sa_i, mask=a_ok, other=0.0)
        if PRO_ACT != 0:
            yv = tl.load(y_ptr + rr[:, None] * sy_r + ri[None, :] * sy_i, mask=a_ok, other=0.0)
            a = act_grad(a.to(ACC), yv.to(ACC), PRO_ACT).to(a_ptr.dtype.element_ty)
        w = masked_w_tile(w_ptr, m_ptr, ri, rj, I, J, sw_i, sw_j, sm_i, sm_j, USE_MASK)
        acc = dot_acc(a, w, acc, ACC, PRECISION)
    return acc


@triton.jit
def masked_gemm_kernel(
    a_ptr, y_ptr, w_ptr, m_ptr, b_ptr, c_ptr,
    tile_off_ptr, tile_idx_ptr, tile_mid_ptr,
    R, I, J,
    sa_r, sa_i, sy_r, sy_i,
    sw_i, sw_j, sm_i, sm_j,
    sc_r, sc_j,
    PRO_ACT: tl.constexpr, EPI_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, PREMASKED: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, IDX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    # IDX: the index type of every offset, int32 where each operand's elements are addressable in it (the launcher's
    # choice), else int64.
    pid = tl.program_id(0).to(IDX)
    num_j = tl.cdiv(J, BLOCK_J)
    pid_r = pid // num_j  # consecutive programs share the same rows of A
    pid_j = pid % num_j
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(IDX)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J).to(IDX)
    start = tl.load(tile_off_ptr + pid_j)
    mid = tl.load(tile_mid_ptr + pid_j)  # tiles start..mid are all ones, mid..end partly zero
    end = tl.load(tile_off_ptr + pid_j + 1)
    acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=ACC)
    acc = _gemm_over_tiles(
        acc, a_ptr, y_ptr, w_ptr, m_ptr, tile_idx_ptr, start, mid, rr, rj, R, I, J,
        sa_r, sa_i, sy_r, sy_i, sw_i, sw_j, sm_i, sm_j, PRO_ACT, False, ACC, PRECISION, BLOCK_I, IDX,
    )  # fmt: skip
    acc = _gemm_over_tiles(
        acc, a_ptr, y_ptr, w_ptr, m_ptr, tile_idx_ptr, mid, end, rr, rj, R, I, J,
        sa_r, sa_i, sy_r, sy_i, sw_i, sw_j, sm_i, sm_j, PRO_ACT, not PREMASKED, ACC, PRECISION, BLOCK_I, IDX,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + rj, mask=rj < J, other=0.0).to(ACC)[None, :]
    acc = apply_act(acc, EPI_ACT)
    c_off = rr[:, None] * sc_r + rj[None, :] * sc_j
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=(rr[:, None] < R) & (rj[None, :] < J))


@triton.jit
def _load_grad_t(g_ptr, y_ptr, ro, rr, o_ok, r_ok, sg_r, sg_o, sy_r, sy_o, PRO_ACT: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_O, BLOCK_R) tile of gp^T = (g * act'(y))^T."""
    g_ok = o_ok[:, None] & r_ok[None, :]
    g = tl.load(g_ptr + ro[:, None] * sg_o + rr[None, :] * sg_r, mask=g_ok, other=0.0)
    if PRO_ACT != 0:
        yv = tl.load(y_ptr + ro[:, None] * sy_o + rr[None, :] * sy_r, mask=g_ok, other=0.0)
        g = act_grad(g.to(ACC), yv.to(ACC), PRO_ACT).to(g_ptr.dtype.element_ty)
    return g


@triton.jit
def _wgrad_rows(
    acc, g_ptr, y_ptr, x_ptr, ro, rk, o_ok, k_ok, start, stop, sg_r, sg_o, sy_r, sy_o, sx_r, sx_k,
    PRO_ACT: tl.constexpr, BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, IDX: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """(acc + gp^T x over rows start..stop, and with BIAS the elementwise sum of the gp^T tiles, (BLOCK_O, BLOCK_R),
    for the bias gradient's one reduction after the loop)."""
    gsum = tl.zeros((BLOCK_O, BLOCK_R), dtype=ACC)
    for r0 in range(start, stop, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R).to(IDX)
        r_ok = rr < stop
        g = _load_grad_t(g_ptr, y_ptr, ro, rr, o_ok, r_ok, sg_r, sg_o, sy_r, sy_o, PRO_ACT, ACC)
        if BIAS:
            gsum += g.to(ACC)
        xv = tl.load(x_ptr + rr[:, None] * sx_r + rk[None, :] * sx_k, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(g, xv, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc, gsum


@triton.jit
def masked_wgrad_kernel(
    g_ptr, y_ptr, x_ptr, m_ptr, flags_ptr, dw_ptr, db_ptr,
    R, O, K, rows_per_split,
    sg_r, sg_o, sy_r, sy_o, sx_r, sx_k, sm_o, sm_k,
    PRO_ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, IDX: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # IDX as masked_gemm_kernel's. The bias gradient is owed by the first column of tiles only (kt == 0): those
    # programs add gp elementwise in the row loop and reduce once after it (a reduction across threads per k-step
    # was ~20 shuffles of the loop's 826 SASS instructions, and every program paid it; sm_90, bf16, PRO_ACT).
    pid_t = tl.program_id(0).to(IDX)
    split = tl.program_id(1).to(IDX)
    num_k = tl.cdiv(K, BLOCK_K)
    ot = pid_t // num_k
    kt = pid_t % num_k
    flag = tl.load(flags_ptr + pid_t)  # 0 empty, 1 partly zero, 2 full
    ro = ot * BLOCK_O + tl.arange(0, BLOCK_O).to(IDX)
    rk = kt * BLOCK_K + tl.arange(0, BLOCK_K).to(IDX)
    o_ok = ro < O
    k_ok = rk < K
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, R)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=ACC)
    bacc = tl.zeros((BLOCK_O,), dtype=ACC)
    # Branches outside the loops only, so each loop stays pipelinable.
    if flag > 0:
        if HAS_BIAS and kt == 0:
            acc, gsum = _wgrad_rows(
                acc, g_ptr, y_ptr, x_ptr, ro, rk, o_ok, k_ok, start, stop, sg_r, sg_o, sy_r, sy_o, sx_r, sx_k,
                PRO_ACT, True, ACC, PRECISION, IDX, BLOCK_O, BLOCK_R,
            )  # fmt: skip
            bacc = tl.sum(gsum, axis=1)
        else:
            acc, gsum = _wgrad_rows(
                acc, g_ptr, y_ptr, x_ptr, ro, rk, o_ok, k_ok, start, stop, sg_r, sg_o, sy_r, sy_o, sx_r, sx_k,
                PRO_ACT, False, ACC, PRECISION, IDX, BLOCK_O, BLOCK_R,
            )  # fmt: skip
    elif HAS_BIAS:
        if kt == 0:  # an empty tile in the first column still owes the bias gradient
            for r0 in range(start, stop, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R).to(IDX)
                g = _load_grad_t(g_ptr, y_ptr, ro, rr, o_ok, rr < stop, sg_r, sg_o, sy_r, sy_o, PRO_ACT, ACC)
                bacc += tl.sum(g.to(ACC), axis=1)
    ok = o_ok[:, None] & k_ok[None, :]
    if flag == 1:
        mv = tl.load(m_ptr + ro[:, None] * sm_o + rk[None, :] * sm_k, mask=ok, other=0)
        acc = tl.where(mv != 0, acc, tl.zeros_like(acc))
    tl.store(dw_ptr + split * O * K + ro[:, None] * K + rk[None, :], acc.to(dw_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        tl.store(db_ptr + split * O + ro, bacc.to(db_ptr.dtype.element_ty), mask=o_ok & ((tl.zeros_like(ro) + kt) == 0))


# ----------------------------------------------------------------------------------------------------------------
# Tile sizes. The tile map is built for (BLOCK_O, BLOCK_K), so those are fixed per dtype; autotuning on the GPU
# covers the row block, warps and stages only.

_INTERP_TILES = (16, 16)
_INTERP_ROWS = 16


def tile_sizes(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_O, BLOCK_K): the mask tile granularity for `dtype`."""
    if INTERPRETED:
        return _INTERP_TILES
    if dtype == torch.float64:
        return (32, 16)  # dot_acc's broadcast product: (BLOCK_R, 16, 32) float64 registers
    return (128, 64) if dtype in (torch.float16, torch.bfloat16) else (64, 32)


def wgrad_tile_sizes(dtype: torch.dtype) -> tuple[int, int]:
    if INTERPRETED:
        return _INTERP_TILES
    return (64, 64) if dtype in (torch.float16, torch.bfloat16) else (64, 32)


def row_configs(shapes) -> list:
    """Configs over BLOCK_R from (BLOCK_R, warps, stages, element sizes); with autotuning off each dtype runs
    the first that suits it (16-bit: 128-row wgmma tiles; float32: 64/128-row tf32 mma.sync tiles, its dots being
    tf32 or tf32x3 on tensor cores; float64: broadcast FMA products on small tiles). python -m bench.aot checked
    them spill-free on sm_90."""
    return [suits(triton.Config(dict(BLOCK_R=br), num_warps=nw, num_stages=ns), sizes) for br, nw, ns, sizes in shapes]


_ANY, _HALF, _FP32, _F32 = (2, 4, 8), (2,), (4, 8), (4,)
_NOT_FP64 = (2, 4)  # float64 tiles of these exceed shared memory with the activation-gradient prologue (sm_90)
_gemm, _GEMM_META = tuned(
    masked_gemm_kernel,
    row_configs([(128, 8, 3, _HALF), (128, 8, 3, _F32), (64, 4, 3, _F32), (32, 8, 3, _ANY), (64, 4, 4, _HALF),
                 (64, 4, 3, _HALF), (32, 4, 4, _HALF), (16, 4, 3, _FP32)]),
    ["R", "I", "J", "BLOCK_J", "BLOCK_I", "PRO_ACT", "EPI_ACT"],
    dict(BLOCK_R=_INTERP_ROWS),
    prune=by_element_size,
)  # fmt: skip
_wgrad, _WGRAD_META = tuned(
    masked_wgrad_kernel,
    row_configs([(64, 4, 3, _ANY), (64, 4, 4, _NOT_FP64), (128, 8, 3, _NOT_FP64), (32, 4, 4, _ANY)]),
    ["R", "O", "K", "BLOCK_O", "BLOCK_K", "PRO_ACT"],
    dict(BLOCK_R=_INTERP_ROWS),
    prune=by_element_size,
)  # fmt: skip


def _index_type(*tensors: torch.Tensor):
    return tl.int32 if int32_offsets(*tensors) else tl.int64


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in TL_DTYPES:
        raise ValueError(f"the triton backend takes float16/bfloat16/float32/float64, got {t.dtype}")


def masked_gemm(a, y, weight, mask_u8, bias, tiles, *, transpose, pro_act, epi_act, block_i, block_j,
                premasked=False):  # fmt: skip
    """C (R, J) = epi_act(A' Wm + bias) with A' = act_grad(A, y) when pro_act; Wm = (W ⊙ M)^T (forward,
    transpose=False: J = O) or W ⊙ M (input gradient, transpose=True: J = K). `tiles` = (offsets, idx, mids)
    of the tile map along J. premasked: `weight` already holds W ⊙ M (any strides), so the mask is never read."""
    _check_dtype(a)
    r = a.shape[0]
    o, k = weight.shape
    if transpose:
        i_dim, j_dim = o, k
        sw_i, sw_j, sm_i, sm_j = weight.stride(0), weight.stride(1), mask_u8.stride(0), mask_u8.stride(1)
    else:
        i_dim, j_dim = k, o
        sw_i, sw_j, sm_i, sm_j = weight.stride(1), weight.stride(0), mask_u8.stride(1), mask_u8.stride(0)
    c = torch.empty(r, j_dim, dtype=a.dtype, device=a.device)
    offsets, idx, mids = tiles
    yy = y if y is not None else a

    def grid(meta):
        return (cdiv(r, meta["BLOCK_R"]) * cdiv(j_dim, block_j),)

    fast(_gemm)[grid](
        a, yy, weight, mask_u8, bias if bias is not None else weight, c,
        offsets, idx, mids,
        r, i_dim, j_dim,
        *a.stride(), *yy.stride(),
        sw_i, sw_j, sm_i, sm_j,
        *c.stride(),
        PRO_ACT=ACT_CODES[pro_act], EPI_ACT=ACT_CODES[epi_act], HAS_BIAS=bias is not None, PREMASKED=premasked,
        ACC=acc_dtype(a.dtype), PRECISION=dot_precision(a.dtype, conv=False),
        IDX=_index_type(a, yy, weight, mask_u8, c),
        BLOCK_J=block_j, BLOCK_I=block_i, **_GEMM_META,
    )  # fmt: skip
    return c


def _num_splits(nonempty_tiles: int, rows: int, element_size: int) -> int:
    """Row splits of the weight gradient: whole waves of programs (gm.kernels._common.wave_splits) over the non-empty
    tiles, k-steps of 64 rows (the configs take 32-128), each split at least 512 rows."""
    if INTERPRETED:
        return 2 if rows > 2 * _INTERP_ROWS else 1  # exercise the split path in tests
    return wave_splits(max(1, nonempty_tiles), cdiv(rows, 64), element_size, min_steps=8)


def masked_wgrad(g, y, x, mask_u8, flags, nonempty, *, act, need_bias, block_o, block_k):
    """(dW (O, K) in g's dtype, exactly zero where masked; db (O,) or None)."""
    _check_dtype(g)
    r, o = g.shape
    k = x.shape[1]
    splits = _num_splits(nonempty, r, g.element_size())
    out_dtype = g.dtype if splits == 1 else (torch.float64 if g.dtype == torch.float64 else torch.float32)
    dw = torch.empty(splits, o, k, dtype=out_dtype, device=g.device)
    db = torch.empty(splits, o, dtype=out_dtype, device=g.device) if need_bias else dw
    per_split = cdiv(r, splits)
    yy = y if y is not None else g
    grid = (cdiv(o, block_o) * cdiv(k, block_k), splits)
    fast(_wgrad)[grid](
        g, yy, x, mask_u8, flags, dw, db,
        r, o, k, per_split,
        *g.stride(), *yy.stride(), *x.stride(), *mask_u8.stride(),
        PRO_ACT=ACT_CODES[act], HAS_BIAS=need_bias,
        ACC=acc_dtype(g.dtype), PRECISION=dot_precision(g.dtype, conv=False), IDX=_index_type(g, yy, x, mask_u8, dw),
        BLOCK_O=block_o, BLOCK_K=block_k, **_WGRAD_META,
    )  # fmt: skip
    return sum_splits(dw, g.dtype), (sum_splits(db, g.dtype) if need_bias else None)
