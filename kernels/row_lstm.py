"""Triton kernels for row_lstm: the PixelRNN Row LSTM scan, one launch per pass.

Forward, per batch element n and row r = 0 .. H-1 (h_{-1} = h0 or 0, c_{-1} = c0 or 0):
    z_g[o, w] = gates[n, g*h + o, r, w] + sum_{t < k} sum_j w_ss[g*h + o, j, t] * h_{r-1}[j, w + t - k//2]
    c_r = sig(z_f) c_{r-1} + sig(z_i) tanh(z_g);   h_r = sig(z_o) tanh(c_r)
Shapes: gates (N, 4h, H, W), w_ss (4h, h, k), h0/c0 (N, h, W); states hs, cs (N, h, H, W) in the accumulation
dtype (float32, float64 for float64 inputs); y (N, h, H, W) in the input dtype (y is hs itself for float32/64).

One program per batch element owns the whole row: the state-to-state conv couples neighbouring columns and
every output channel needs every input channel of the previous row, so rows cannot be split across programs
without a grid-wide sync. Per row, the conv is k * 4 dots (h x h) @ (h x W), one per tap and gate block;
the shifted h_{r-1} is re-read from the row the program just stored in hs (the output doubles as the
scratch: a program reads only what it wrote, so there are no races between programs, and tl.debug_barrier()
orders the store before the load among the program's own threads on a GPU; it is a no-op interpreted).

Backward walks rows bottom to top with dh, dc carried in registers; it recomputes z from the saved h_{r-1}
(one dot per tap and gate, cheaper than storing 4h activations per pixel), writes dz into dgates, and takes
dh_{r-1} = sum_t w_t^T @ shift(dz) by re-reading dgates shifted (again its own writes, after a barrier).
dw_ss is a separate GEMM over all N*H*W pixels (row_lstm_wgrad_kernel): accumulating k*4 (h x h) tiles in
the registers of N scan programs would not fit for h >= 64 and would use only N SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gm.kernels._common import INTERPRETED, TL_DTYPES, acc_dtype, dot_precision, sigmoid, tanh


@triton.jit
def _load_prev_h(hs_ptr, h0_ptr, n, r, ch, col, dx, HID, H, W, HAS_H0: tl.constexpr, ACC: tl.constexpr):
    """h_{r-1}[ch, col + dx] (zero outside the row): row r-1 of hs, or h0 (or zero) for r = 0."""
    src = col + dx
    r_vec = src * 0 + r  # row tests as blocks: a scalar test in a mask trips triton 3.9's interpreter
    ok = (ch[:, None] < HID) & ((src >= 0) & (src < W))[None, :]
    prev = tl.maximum(r - 1, 0)
    off = ((n * HID + ch[:, None]) * H + prev) * W + src[None, :]
    hp = tl.load(hs_ptr + off, mask=ok & (r_vec > 0)[None, :], other=0.0).to(ACC)
    if HAS_H0:
        h0_off = (n * HID + ch[:, None]) * W + src[None, :]
        hp += tl.load(h0_ptr + h0_off, mask=ok & (r_vec == 0)[None, :], other=0.0).to(ACC)
    return hp


@triton.jit
def _load_w_tile(w_ptr, gate, t, o, j, HID, K: tl.constexpr, TRANSPOSE: tl.constexpr):
    """w_ss[gate*h + o, j, t] as (o, j), or as (j, o) when TRANSPOSE."""
    if TRANSPOSE:
        off = ((gate * HID + o[None, :]) * HID + j[:, None]) * K + t
        ok = (o[None, :] < HID) & (j[:, None] < HID)
    else:
        off = ((gate * HID + o[:, None]) * HID + j[None, :]) * K + t
        ok = (o[:, None] < HID) & (j[None, :] < HID)
    return tl.load(w_ptr + off.to(tl.int64), mask=ok, other=0.0)


@triton.jit
def _gate_preacts(
    g_ptr, w_ptr, hs_ptr, h0_ptr, n, r, ch, col, HID, H, W,
    K: tl.constexpr, HAS_H0: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """z_i, z_f, z_o, z_g (each (BH, BW), ACC) of row r: gates plus the conv of h_{r-1}."""
    m2 = (ch[:, None] < HID) & (col[None, :] < W)
    row = (ch[:, None] * H + r) * W + col[None, :]
    base = g_ptr + n * 4 * HID * H * W
    zi = tl.load(base + row, mask=m2, other=0.0).to(ACC)
    zf = tl.load(base + row + HID * H * W, mask=m2, other=0.0).to(ACC)
    zo = tl.load(base + row + 2 * HID * H * W, mask=m2, other=0.0).to(ACC)
    zg = tl.load(base + row + 3 * HID * H * W, mask=m2, other=0.0).to(ACC)
    for t in tl.static_range(K):
        hp = _load_prev_h(hs_ptr, h0_ptr, n, r, ch, col, t - K // 2, HID, H, W, HAS_H0, ACC).to(DOT)
        zi = tl.dot(_load_w_tile(w_ptr, 0, t, ch, ch, HID, K, False).to(DOT), hp, zi, input_precision=PRECISION)
        zf = tl.dot(_load_w_tile(w_ptr, 1, t, ch, ch, HID, K, False).to(DOT), hp, zf, input_precision=PRECISION)
        zo = tl.dot(_load_w_tile(w_ptr, 2, t, ch, ch, HID, K, False).to(DOT), hp, zo, input_precision=PRECISION)
        zg = tl.dot(_load_w_tile(w_ptr, 3, t, ch, ch, HID, K, False).to(DOT), hp, zg, input_precision=PRECISION)
    return zi, zf, zo, zg


@triton.jit
def row_lstm_fwd_kernel(
    g_ptr, w_ptr, h0_ptr, c0_ptr, y_ptr, hs_ptr, cs_ptr,
    HID, H, W,
    K: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, WRITE_Y: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    ch = tl.arange(0, BH).to(tl.int64)
    col = tl.arange(0, BW).to(tl.int64)
    m2 = (ch[:, None] < HID) & (col[None, :] < W)
    if HAS_C0:
        c = tl.load(c0_ptr + (n * HID + ch[:, None]) * W + col[None, :], mask=m2, other=0.0).to(ACC)
    else:
        c = tl.zeros((BH, BW), dtype=ACC)
    for r in range(H):
        zi, zf, zo, zg = _gate_preacts(
            g_ptr, w_ptr, hs_ptr, h0_ptr, n, r, ch, col, HID, H, W, K, HAS_H0, ACC, DOT, PRECISION
        )
        c = sigmoid(zf) * c + sigmoid(zi) * tanh(zg)
        h = sigmoid(zo) * tanh(c)
        off = ((n * HID + ch[:, None]) * H + r) * W + col[None, :]
        tl.store(cs_ptr + off, c, mask=m2)
        tl.store(hs_ptr + off, h, mask=m2)
        if WRITE_Y:
            tl.store(y_ptr + off, h.to(y_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()  # row r of hs is read back shifted by other threads of this program


@triton.jit
def row_lstm_bwd_kernel(
    dy_ptr, g_ptr, w_ptr, h0_ptr, c0_ptr, hs_ptr, cs_ptr, dg_ptr, dh0_ptr, dc0_ptr,
    HID, H, W,
    K: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    ch = tl.arange(0, BH).to(tl.int64)
    col = tl.arange(0, BW).to(tl.int64)
    m2 = (ch[:, None] < HID) & (col[None, :] < W)
    state0 = (n * HID + ch[:, None]) * W + col[None, :]
    dh = tl.zeros((BH, BW), dtype=ACC)  # dL/dh_r through row r+1's state-to-state conv
    dc = tl.zeros((BH, BW), dtype=ACC)  # dL/dc_r through row r+1's cell
    for rr in range(H):
        r = H - 1 - rr
        zi, zf, zo, zg = _gate_preacts(
            g_ptr, w_ptr, hs_ptr, h0_ptr, n, r, ch, col, HID, H, W, K, HAS_H0, ACC, DOT, PRECISION
        )
        off = ((n * HID + ch[:, None]) * H + r) * W + col[None, :]
        c = tl.load(cs_ptr + off, mask=m2, other=0.0).to(ACC)
        prev = tl.maximum(r - 1, 0)
        r_vec = col * 0 + r  # row tests as blocks (see _load_prev_h)
        c_prev = tl.load(cs_ptr + off + (prev - r) * W, mask=m2 & (r_vec > 0)[None, :], other=0.0).to(ACC)
        if HAS_C0:
            c_prev += tl.load(c0_ptr + state0, mask=m2 & (r_vec == 0)[None, :], other=0.0).to(ACC)
        dh += tl.load(dy_ptr + off, mask=m2, other=0.0).to(ACC)
        si, sf, so = sigmoid(zi), sigmoid(zf), sigmoid(zo)
        tg, tc = tanh(zg), tanh(c)
        dc += dh * so * (1.0 - tc * tc)
        dzi = dc * tg * si * (1.0 - si)
        dzf = dc * c_prev * sf * (1.0 - sf)
        dzo = dh * tc * so * (1.0 - so)
        dzg = dc * si * (1.0 - tg * tg)
        dc = dc * sf
        dg_row = dg_ptr + n * 4 * HID * H * W + (ch[:, None] * H + r) * W + col[None, :]
        tl.store(dg_row, dzi.to(dg_ptr.dtype.element_ty), mask=m2)
        tl.store(dg_row + HID * H * W, dzf.to(dg_ptr.dtype.element_ty), mask=m2)
        tl.store(dg_row + 2 * HID * H * W, dzo.to(dg_ptr.dtype.element_ty), mask=m2)
        tl.store(dg_row + 3 * HID * H * W, dzg.to(dg_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()  # dgates row r is read back shifted by other threads of this program
        dh = tl.zeros((BH, BW), dtype=ACC)
        for t in tl.static_range(K):
            src = col - (t - K // 2)  # dh_{r-1}[j, w] gets w_ss[o, j, t] * dz[o, w - (t - k//2)]
            ok = (ch[:, None] < HID) & ((src >= 0) & (src < W))[None, :]
            for gate in tl.static_range(4):
                dz = tl.load(
                    dg_ptr + n * 4 * HID * H * W + ((gate * HID + ch[:, None]) * H + r) * W + src[None, :],
                    mask=ok,
                    other=0.0,
                )
                wt = _load_w_tile(w_ptr, gate, t, ch, ch, HID, K, True)
                dh = tl.dot(wt.to(DOT), dz.to(DOT), dh, input_precision=PRECISION)
    if HAS_H0:
        tl.store(dh0_ptr + state0, dh, mask=m2)
    if HAS_C0:
        tl.store(dc0_ptr + state0, dc, mask=m2)


@triton.jit
def row_lstm_wgrad_kernel(
    dg_ptr, hs_ptr, h0_ptr, dw_ptr,
    N, HID, H, W, pixels_per_split,
    K: tl.constexpr, HAS_H0: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """partial[split, o, j, t] = sum over the split's pixels (n, r, w) of dz[n, o, r, w] * h_{r-1}[n, j, w + t - k//2]."""
    pid_ot = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    num_o = tl.cdiv(4 * HID, BLOCK_O)
    t = pid_ot // num_o
    o = (pid_ot % num_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    dx = t - K // 2
    start = split * pixels_per_split
    end = tl.minimum(start + pixels_per_split, N * H * W)
    acc = tl.zeros((BLOCK_O, BLOCK_J), dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        p_ok = p < end
        n = p // (H * W)
        r = (p // W) % H
        w = p % W
        dz = tl.load(
            dg_ptr + ((n * 4 * HID)[None, :] + o[:, None]) * H * W + (r * W + w)[None, :],
            mask=(o[:, None] < 4 * HID) & p_ok[None, :],
            other=0.0,
        )
        src = w + dx
        ok = p_ok & (src >= 0) & (src < W)
        hj = (n[:, None] * HID + j[None, :]) * H
        hp = tl.load(
            hs_ptr + (hj + tl.maximum(r - 1, 0)[:, None]) * W + src[:, None],
            mask=(ok & (r > 0))[:, None] & (j[None, :] < HID),
            other=0.0,
        ).to(ACC)
        if HAS_H0:
            hp += tl.load(
                h0_ptr + (n[:, None] * HID + j[None, :]) * W + src[:, None],
                mask=(ok & (r == 0))[:, None] & (j[None, :] < HID),
                other=0.0,
            ).to(ACC)
        acc = tl.dot(dz.to(DOT), hp.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    out = dw_ptr + ((split * 4 * HID + o[:, None]) * HID + j[None, :]) * K + t
    tl.store(out, acc, mask=(o[:, None] < 4 * HID) & (j[None, :] < HID))


# ----------------------------------------------------------------------------------------------------------------
# Launchers. Interpreted: fixed small blocks. On a GPU: the scans autotune num_warps only (their blocks are the
# whole row), the weight-gradient GEMM its tile shape.


def _scan_configs():
    return [triton.Config({}, num_warps=nw, num_stages=1) for nw in (4, 8, 16)]


def _wgrad_configs():
    shapes = [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 32, 128, 4, 3), (128, 128, 32, 8, 3)]
    return [
        triton.Config(dict(BLOCK_O=bo, BLOCK_J=bj, BLOCK_P=bp), num_warps=nw, num_stages=ns)
        for bo, bj, bp, nw, ns in shapes
    ]


_WGRAD_INTERP = dict(BLOCK_O=16, BLOCK_J=16, BLOCK_P=32)

if INTERPRETED:
    _fwd, _bwd, _wgrad = row_lstm_fwd_kernel, row_lstm_bwd_kernel, row_lstm_wgrad_kernel
else:
    _key = ["HID", "H", "W", "K"]
    _fwd = triton.autotune(_scan_configs(), key=_key)(row_lstm_fwd_kernel)
    _bwd = triton.autotune(_scan_configs(), key=_key)(row_lstm_bwd_kernel)
    _wgrad = triton.autotune(_wgrad_configs(), key=["HID", "H", "W", "K", "N"])(row_lstm_wgrad_kernel)


def _types(dtype: torch.dtype):
    """(accumulation dtype, dot operand dtype, dot precision) for inputs of `dtype`."""
    if dtype not in TL_DTYPES:
        raise ValueError(f"the triton backend takes float16/bfloat16/float32/float64, got {dtype}")
    acc = acc_dtype(dtype)
    dot = TL_DTYPES[dtype] if dtype in (torch.float16, torch.bfloat16) else acc
    return acc, dot, dot_precision(dtype, conv=True)


def _blocks(hidden: int, width: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(hidden)), max(16, triton.next_power_of_2(width))


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(gates, w_ss, h0, c0):
    """(y, hs, cs): y in gates' dtype; hs, cs (N, h, H, W) in the state dtype; y is hs for float32/64."""
    n, four_h, height, width = gates.shape
    hidden, k = four_h // 4, w_ss.shape[2]
    acc, dot, precision = _types(gates.dtype)
    sdt = _state_dtype(gates.dtype)
    hs = torch.empty(n, hidden, height, width, dtype=sdt, device=gates.device)
    cs = torch.empty_like(hs)
    write_y = gates.dtype != sdt
    y = torch.empty(n, hidden, height, width, dtype=gates.dtype, device=gates.device) if write_y else hs
    bh, bw = _blocks(hidden, width)
    _fwd[(n,)](
        gates, w_ss, h0 if h0 is not None else hs, c0 if c0 is not None else hs, y, hs, cs,
        hidden, height, width,
        K=k, HAS_H0=h0 is not None, HAS_C0=c0 is not None, WRITE_Y=write_y,
        ACC=acc, DOT=dot, PRECISION=precision, BH=bh, BW=bw,
    )  # fmt: skip
    return y, hs, cs


def _num_splits(tiles: int, pixels: int, block_p: int) -> int:
    if INTERPRETED:
        return 2 if pixels > 2 * block_p else 1  # exercise the split path in tests
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = max(1, (2 * sms + tiles - 1) // tiles)
    return max(1, min(want, pixels // 512))


def weight_grad(dgates, hs, h0, k):
    """dw_ss (4h, h, k) in the state dtype."""
    n, four_h, height, width = dgates.shape
    hidden = four_h // 4
    acc, dot, precision = _types(dgates.dtype)
    pixels = n * height * width
    splits = _num_splits(k * triton.cdiv(four_h, 64) * triton.cdiv(hidden, 64), pixels, _WGRAD_INTERP["BLOCK_P"])
    per_split = triton.cdiv(pixels, splits)
    partial = torch.empty(splits, four_h, hidden, k, dtype=hs.dtype, device=hs.device)
    extra = _WGRAD_INTERP if INTERPRETED else {}

    def grid(meta):
        return (k * triton.cdiv(four_h, meta["BLOCK_O"]), triton.cdiv(hidden, meta["BLOCK_J"]), splits)

    _wgrad[grid](
        dgates, hs, h0 if h0 is not None else hs, partial,
        n, hidden, height, width, per_split,
        K=k, HAS_H0=h0 is not None, ACC=acc, DOT=dot, PRECISION=precision, **extra,
    )  # fmt: skip
    return partial.sum(0) if splits > 1 else partial[0]


def backward(dy, gates, w_ss, h0, c0, hs, cs, need_w):
    """(dgates in gates' dtype, dw_ss or None, dh0 or None, dc0 or None); dh0/dc0 in the state dtype."""
    n, four_h, height, width = gates.shape
    hidden, k = four_h // 4, w_ss.shape[2]
    acc, dot, precision = _types(gates.dtype)
    dgates = torch.empty_like(gates)
    dh0 = torch.empty_like(h0, dtype=hs.dtype) if h0 is not None else None
    dc0 = torch.empty_like(c0, dtype=hs.dtype) if c0 is not None else None
    bh, bw = _blocks(hidden, width)
    _bwd[(n,)](
        dy, gates, w_ss, h0 if h0 is not None else hs, c0 if c0 is not None else hs, hs, cs,
        dgates, dh0 if dh0 is not None else hs, dc0 if dc0 is not None else hs,
        hidden, height, width,
        K=k, HAS_H0=h0 is not None, HAS_C0=c0 is not None,
        ACC=acc, DOT=dot, PRECISION=precision, BH=bh, BW=bw,
    )  # fmt: skip
    dw = weight_grad(dgates, hs, h0, k) if need_w else None
    return dgates, dw, dh0, dc0
