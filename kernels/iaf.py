"""Triton kernels for the IAF step (Kingma, Salimans et al. 2016, eq. 10-14) and the fused MADE output layer.

iaf_step, z, m, s (R, F):
    gated:  σ = sigmoid(s), z' = σ z + (1 − σ) m,  logdet[r] = Σ_f log σ
            (log σ = min(s, 0) − log1p(exp(−|s|)))
    affine: z' = (z − m) exp(−s),                  logdet[r] = −Σ_f s
Backward with gz = dL/dz', gl = dL/dlogdet:
    gated:  dz = gz σ, dm = gz (1 − σ), ds = gz (z − m) σ (1 − σ) + gl (1 − σ)
            (1 − σ computed as sigmoid(−s))
    affine: dz = gz e^{−s}, dm = −dz, ds = −gz z' − gl

made_iaf_output, hidden (R, H), weight and mask (2D, H), bias (2D,), z (R, D):
    [m, s] = hidden (W ⊙ M)^T + b  (weight rows 0..D−1 give m, rows D..2D−1 give s),  then the step above.
Each program computes the m and the s columns of one BLOCK_D slice in two accumulators over the non-empty K
tiles of both heads (the tile map of gm.ops.iaf) and applies the step in the epilogue: m and s never reach
memory. The backward recomputes them the same way and writes dz and d[m, s] (R, 2D); the GEMMs for dhidden and
dW then run through kernels/masked_linear.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gm.kernels._common import INTERPRETED, acc_dtype, by_element_size, cdiv, dot_acc, dot_precision, sigmoid, tuned
from gm.kernels._launch import fast
from gm.kernels._layout import sum_splits
from gm.kernels.masked_linear import masked_w_tile, row_configs

from gm._ext import sm_count

MODE_CODES = {"gated": 0, "affine": 1}


@triton.jit
def _log_sigmoid(s):
    """min(s, 0) − log1p(exp(−|s|)), with log1p(e) = log(u) e / (u − 1), u = 1 + e (exact where u rounds to 1)."""
    e = tl.exp(-tl.abs(s))
    u = 1.0 + e
    exact = u == 1.0
    log1p_e = tl.where(exact, e, tl.log(u) * e / tl.where(exact, 1.0, u - 1.0))
    return tl.minimum(s, tl.zeros_like(s)) - log1p_e


@triton.jit
def iaf_fwd_math(z, m, s, MODE: tl.constexpr):
    """(z', per-element log-det term), all in the accumulation dtype."""
    if MODE == 0:
        sig = sigmoid(s)
        z_new = sig * z + sigmoid(-s) * m
        ld = _log_sigmoid(s)
    else:
        z_new = (z - m) * tl.exp(-s)
        ld = -s
    return z_new, ld


@triton.jit
def iaf_bwd_math(z, m, s, gz, gl, MODE: tl.constexpr):
    """(dz, dm, ds) for upstream gradients gz (of z') and gl (of logdet, broadcast over the row)."""
    if MODE == 0:
        sig = sigmoid(s)
        one_minus = sigmoid(-s)
        dz = gz * sig
        dm = gz * one_minus
        ds = (gz * (z - m) * sig + gl) * one_minus
    else:
        e = tl.exp(-s)
        dz = gz * e
        dm = -dz
        ds = -gz * ((z - m) * e) - gl
    return dz, dm, ds


@triton.jit
def iaf_step_fwd_kernel(
    z_ptr, m_ptr, s_ptr, zn_ptr, ld_ptr,
    R, F, cols_per_split,
    MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_ok = rr < R
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, F)
    ld = tl.zeros((BLOCK_R,), dtype=ACC)
    for f0 in range(start, stop, BLOCK_F):
        rf = f0 + tl.arange(0, BLOCK_F).to(tl.int64)
        ok = r_ok[:, None] & (rf[None, :] < stop)
        off = rr[:, None] * F + rf[None, :]
        z = tl.load(z_ptr + off, mask=ok, other=0.0).to(ACC)
        m = tl.load(m_ptr + off, mask=ok, other=0.0).to(ACC)
        s = tl.load(s_ptr + off, mask=ok, other=0.0).to(ACC)
        z_new, ld_el = iaf_fwd_math(z, m, s, MODE)
        tl.store(zn_ptr + off, z_new.to(zn_ptr.dtype.element_ty), mask=ok)
        ld += tl.sum(tl.where(ok, ld_el, tl.zeros_like(ld_el)), axis=1)
    tl.store(ld_ptr + split * R + rr, ld.to(ld_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def iaf_step_bwd_kernel(
    z_ptr, m_ptr, s_ptr, gz_ptr, gl_ptr, dz_ptr, dm_ptr, ds_ptr,
    TOTAL, F,
    MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = i < TOTAL
    z = tl.load(z_ptr + i, mask=ok, other=0.0).to(ACC)
    m = tl.load(m_ptr + i, mask=ok, other=0.0).to(ACC)
    s = tl.load(s_ptr + i, mask=ok, other=0.0).to(ACC)
    gz = tl.load(gz_ptr + i, mask=ok, other=0.0).to(ACC)
    gl = tl.load(gl_ptr + i // F, mask=ok, other=0.0).to(ACC)
    dz, dm, ds = iaf_bwd_math(z, m, s, gz, gl, MODE)
    tl.store(dz_ptr + i, dz.to(dz_ptr.dtype.element_ty), mask=ok)
    tl.store(dm_ptr + i, dm.to(dm_ptr.dtype.element_ty), mask=ok)
    tl.store(ds_ptr + i, ds.to(ds_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _two_head_tiles(
    acc_m, acc_s, h_ptr, w_ptr, m_ptr, tile_idx_ptr, t_start, t_stop,
    rr, rd, R, D, H, sh_r, sh_k, sw_o, sw_k, sm_o, sm_k,
    USE_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    r_ok = rr < R
    for t in range(t_start, t_stop):  # branch-free: pipelinable
        kt = tl.load(tile_idx_ptr + t).to(tl.int64)
        rk = kt * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(h_ptr + rr[:, None] * sh_r + rk[None, :] * sh_k, mask=r_ok[:, None] & (rk[None, :] < H), other=0.0)
        w_m = masked_w_tile(w_ptr, m_ptr, rk, rd, H, D, sw_k, sw_o, sm_k, sm_o, USE_MASK)
        acc_m = dot_acc(a, w_m, acc_m, ACC, PRECISION)
        w_s = masked_w_tile(w_ptr + D * sw_o, m_ptr + D * sm_o, rk, rd, H, D, sw_k, sw_o, sm_k, sm_o, USE_MASK)
        acc_s = dot_acc(a, w_s, acc_s, ACC, PRECISION)
    return acc_m, acc_s


@triton.jit
def _two_head_gemm(
    h_ptr, w_ptr, m_ptr, b_ptr, tile_off_ptr, tile_idx_ptr, tile_mid_ptr,
    rr, rd, pid_d, R, D, H, sh_r, sh_k, sw_o, sw_k, sm_o, sm_k,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """(m, s) tiles (BLOCK_R, BLOCK_D) = hidden (W ⊙ M)^T + b for the rows of both heads, over the listed K tiles
    (all-ones tiles first, then partly-zero ones with the mask applied)."""
    acc_m = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    acc_s = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    start = tl.load(tile_off_ptr + pid_d)
    mid = tl.load(tile_mid_ptr + pid_d)
    end = tl.load(tile_off_ptr + pid_d + 1)
    acc_m, acc_s = _two_head_tiles(
        acc_m, acc_s, h_ptr, w_ptr, m_ptr, tile_idx_ptr, start, mid, rr, rd, R, D, H,
        sh_r, sh_k, sw_o, sw_k, sm_o, sm_k, False, ACC, PRECISION, BLOCK_K,
    )  # fmt: skip
    acc_m, acc_s = _two_head_tiles(
        acc_m, acc_s, h_ptr, w_ptr, m_ptr, tile_idx_ptr, mid, end, rr, rd, R, D, H,
        sh_r, sh_k, sw_o, sw_k, sm_o, sm_k, True, ACC, PRECISION, BLOCK_K,
    )  # fmt: skip
    if HAS_BIAS:
        d_ok = rd < D
        acc_m += tl.load(b_ptr + rd, mask=d_ok, other=0.0).to(ACC)[None, :]
        acc_s += tl.load(b_ptr + D + rd, mask=d_ok, other=0.0).to(ACC)[None, :]
    return acc_m, acc_s


@triton.jit
def made_iaf_fwd_kernel(
    h_ptr, w_ptr, m_ptr, b_ptr, z_ptr, zn_ptr, ld_ptr,
    tile_off_ptr, tile_idx_ptr, tile_mid_ptr,
    R, D, H, sh_r, sh_k, sw_o, sw_k, sm_o, sm_k,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    num_d = tl.cdiv(D, BLOCK_D)
    pid_r = pid // num_d
    pid_d = pid % num_d
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    m, s = _two_head_gemm(
        h_ptr, w_ptr, m_ptr, b_ptr, tile_off_ptr, tile_idx_ptr, tile_mid_ptr,
        rr, rd, pid_d, R, D, H, sh_r, sh_k, sw_o, sw_k, sm_o, sm_k,
        HAS_BIAS, ACC, PRECISION, BLOCK_R, BLOCK_D, BLOCK_K,
    )  # fmt: skip
    ok = (rr[:, None] < R) & (rd[None, :] < D)
    off = rr[:, None] * D + rd[None, :]
    z = tl.load(z_ptr + off, mask=ok, other=0.0).to(ACC)
    z_new, ld_el = iaf_fwd_math(z, m, s, MODE)
    tl.store(zn_ptr + off, z_new.to(zn_ptr.dtype.element_ty), mask=ok)
    ld = tl.sum(tl.where(ok, ld_el, tl.zeros_like(ld_el)), axis=1)
    tl.store(ld_ptr + pid_d * R + rr, ld.to(ld_ptr.dtype.element_ty), mask=rr < R)


@triton.jit
def made_iaf_bwd_kernel(
    h_ptr, w_ptr, m_ptr, b_ptr, z_ptr, gz_ptr, gl_ptr, dz_ptr, dout_ptr,
    tile_off_ptr, tile_idx_ptr, tile_mid_ptr,
    R, D, H, sh_r, sh_k, sw_o, sw_k, sm_o, sm_k,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    num_d = tl.cdiv(D, BLOCK_D)
    pid_r = pid // num_d
    pid_d = pid % num_d
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    m, s = _two_head_gemm(
        h_ptr, w_ptr, m_ptr, b_ptr, tile_off_ptr, tile_idx_ptr, tile_mid_ptr,
        rr, rd, pid_d, R, D, H, sh_r, sh_k, sw_o, sw_k, sm_o, sm_k,
        HAS_BIAS, ACC, PRECISION, BLOCK_R, BLOCK_D, BLOCK_K,
    )  # fmt: skip
    r_ok = rr < R
    ok = r_ok[:, None] & (rd[None, :] < D)
    off = rr[:, None] * D + rd[None, :]
    z = tl.load(z_ptr + off, mask=ok, other=0.0).to(ACC)
    gz = tl.load(gz_ptr + off, mask=ok, other=0.0).to(ACC)
    gl = tl.load(gl_ptr + rr, mask=r_ok, other=0.0).to(ACC)
    dz, dm, ds = iaf_bwd_math(z, m, s, gz, gl[:, None], MODE)
    tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=ok)
    out_off = rr[:, None] * (2 * D) + rd[None, :]
    tl.store(dout_ptr + out_off, dm.to(dout_ptr.dtype.element_ty), mask=ok)
    tl.store(dout_ptr + out_off + D, ds.to(dout_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Launchers.

_INTERP_ELEMENTWISE = dict(BLOCK_R=8, BLOCK_F=16)
_INTERP_FUSED_ROWS = 16


def fused_tile_sizes(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_K) of the fused output layer's tile map."""
    if INTERPRETED:
        return (16, 16)
    if dtype == torch.float64:
        return (32, 16)  # dot_acc's broadcast product on float64
    return (64, 64) if dtype in (torch.float16, torch.bfloat16) else (64, 32)


def _fused_configs():
    half, fp32, f32 = (2,), (4, 8), (4,)
    return row_configs([(64, 8, 3, half), (64, 4, 3, f32), (128, 8, 3, f32), (32, 8, 3, (2, 4, 8)), (64, 4, 3, half),
                        (128, 8, 3, half), (32, 4, 4, half), (16, 4, 3, fp32), (16, 8, 3, fp32)])  # fmt: skip


_FUSED_KEY = ["R", "D", "H", "MODE", "BLOCK_D", "BLOCK_K"]
_fused_fwd, _FUSED_FWD_META = tuned(
    made_iaf_fwd_kernel, _fused_configs(), _FUSED_KEY, dict(BLOCK_R=_INTERP_FUSED_ROWS),
    prune=by_element_size,
)  # fmt: skip
_fused_bwd, _FUSED_BWD_META = tuned(
    made_iaf_bwd_kernel, _fused_configs(), _FUSED_KEY, dict(BLOCK_R=_INTERP_FUSED_ROWS),
    prune=by_element_size,
)  # fmt: skip


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_forward(z, m, s, mode):
    """z, m, s contiguous (R, F) -> (z' (R, F), logdet (R,)) in z's dtype (logdet summed in fp32/fp64)."""
    r, f = z.shape
    z_new = torch.empty_like(z)
    if INTERPRETED:
        blocks = _INTERP_ELEMENTWISE
        splits = 2 if f > 2 * blocks["BLOCK_F"] else 1
    else:
        blocks = dict(BLOCK_R=16, BLOCK_F=128)
        sms = sm_count(z.device)
        row_programs = cdiv(r, blocks["BLOCK_R"])
        splits = max(1, min(cdiv(4 * sms, row_programs), cdiv(f, 4 * blocks["BLOCK_F"])))
    per_split = cdiv(cdiv(f, splits), blocks["BLOCK_F"]) * blocks["BLOCK_F"]
    splits = cdiv(f, per_split) if f > 0 else 1
    ld = torch.empty(splits, r, dtype=_sum_dtype(z.dtype), device=z.device)
    grid = (cdiv(r, blocks["BLOCK_R"]), splits)
    fast(iaf_step_fwd_kernel)[grid](
        z, m, s, z_new, ld, r, f, per_split, MODE=MODE_CODES[mode], ACC=acc_dtype(z.dtype), **blocks,
    )  # fmt: skip
    return z_new, sum_splits(ld, z.dtype)


def step_backward(z, m, s, gz, gl, mode):
    r, f = z.shape
    dz, dm, ds = torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)
    total = r * f
    block = 256 if INTERPRETED else 1024
    fast(iaf_step_bwd_kernel)[(cdiv(total, block),)](
        z, m, s, gz, gl, dz, dm, ds, total, f, MODE=MODE_CODES[mode], ACC=acc_dtype(z.dtype), BLOCK=block,
        num_warps=4,
    )  # fmt: skip
    return dz, dm, ds


def _fused_launch(kernel, meta, hidden, weight, mask_u8, bias, rows_map, block_d, block_k, tensors, mode):
    r, h = hidden.shape
    d = weight.shape[0] // 2
    def grid(meta):
        return (cdiv(r, meta["BLOCK_R"]) * cdiv(d, block_d),)

    fast(kernel)[grid](
        hidden, weight, mask_u8, bias if bias is not None else weight, *tensors,
        *rows_map,
        r, d, h, *hidden.stride(), *weight.stride(), *mask_u8.stride(),
        MODE=MODE_CODES[mode], HAS_BIAS=bias is not None,
        ACC=acc_dtype(hidden.dtype), PRECISION=dot_precision(hidden.dtype, conv=False),
        BLOCK_D=block_d, BLOCK_K=block_k, **meta,
    )  # fmt: skip


def made_output_forward(hidden, weight, mask_u8, bias, z, rows_map, block_d, block_k, mode):
    """(z' (R, D), logdet (R,)) with [m, s] computed in registers."""
    r, d = z.shape
    z_new = torch.empty_like(z)
    n_d = cdiv(d, block_d)
    ld = torch.empty(n_d, r, dtype=_sum_dtype(z.dtype), device=z.device)
    _fused_launch(_fused_fwd, _FUSED_FWD_META, hidden, weight, mask_u8, bias, rows_map,
                  block_d, block_k, (z, z_new, ld), mode)  # fmt: skip
    return z_new, sum_splits(ld, z.dtype)


def made_output_backward(hidden, weight, mask_u8, bias, z, gz, gl, rows_map, block_d, block_k, mode):
    """(dz (R, D), d[m, s] (R, 2D)) with [m, s] recomputed in registers."""
    r, d = z.shape
    dz = torch.empty_like(z)
    dout = torch.empty(r, 2 * d, dtype=z.dtype, device=z.device)
    _fused_launch(_fused_bwd, _FUSED_BWD_META, hidden, weight, mask_u8, bias, rows_map,
                  block_d, block_k, (z, gz, gl, dz, dout), mode)  # fmt: skip
    return dz, dout
