"""Triton kernels for row_lstm: the PixelRNN Row LSTM scan, one launch per pass.

Forward, per batch element n and row r = 0 .. H-1 (h_{-1} = h0 or 0, c_{-1} = c0 or 0):
    z_g[o, w] = gates[n, g*h + o, r, w] + sum_{t < k} sum_j w_ss[g*h + o, j, t] * h_{r-1}[j, w + t - k//2]
    c_r = sig(z_f) c_{r-1} + sig(z_i) tanh(z_g);   h_r = sig(z_o) tanh(c_r)
Shapes: gates (N, 4h, H, W), w_ss (4h, h, k), h0/c0 (N, h, W); states hs (N, h, H, W) and cs (N, 5h, H, W) in the
accumulation dtype (float32, float64 for float64 inputs): cs holds per pixel c and the four gate activations
[c, sig(z_i), sig(z_f), sig(z_o), tanh(z_g)], h channels each, for the backward; y (N, h, H, W) in the input dtype
(y is hs itself for float32/64).
The kernels take the weight packed as wp (k, 4h, h) = w_ss.permute(2, 0, 1): a tap's (BO x BK) tile is contiguous
along its input channels (vector loads), and read transposed for the backward it is contiguous along its rows.

One program per batch element owns the whole image: the state-to-state conv couples neighbouring columns and
every output channel needs every input channel of the previous row, so rows cannot be split across programs
without a grid-wide sync. Nothing of the state is carried in registers across rows: per row the program walks
blocks of BO output units x BW columns; for each block it accumulates the four gate pre-activations (BO x BW)
as k * ceil(h / BK) * 4 dots (BO x BK) @ (BK x BW) of weight tiles and shifted tiles of h_{r-1}, read back from
the row of hs this program stored before (L1/L2 hits), loads c_{r-1} from cs, and stores c_r, h_r. A program
reads only what it wrote, so there are no races between programs; one tl.debug_barrier() per row orders the
row's stores before the next row's shifted loads among the program's own threads (a no-op interpreted).
The live set is 4 accumulators (BO x BW) plus the operand tiles, whatever h and W are: no spills.

Backward walks rows bottom to top with the same blocking. For a block of row r: dh_r = dy_r + the transposed
conv of row r+1's dz, pulled from dgates row r+1 (this program wrote it in the previous step); the gate activations
are read from cs, where the forward stored them (recomputing them was a second weight stream and a second set of
dots per row, about half the backward's per-row latency); dc_r comes from row r+1 through a
per-program scratch dcs (N, 2, h, W) in the accumulation dtype, double-buffered by row parity so a block never
reads what another thread of the same step may already have overwritten; dz goes to dgates row r. After row 0,
dh0 is the transposed conv of dgates row 0 and dc0 is the scratch's parity-0 buffer.
dw_ss is a separate GEMM over all N*H*W pixels (row_lstm_wgrad_kernel): dw viewed as a (4h) x (h*k) matrix
(its memory layout) is dgates (4h x pixels) @ B (pixels x h*k), B[p, j*k + t] = h_{r-1}[j, w + t - k//2]
gathered on the fly; pixels are walked per image so both operands are contiguous along the pixel axis.

Channels-last (the CL constexpr; gm.nn.RowLSTM's one-node path on triton, whose convolutions read and write NHWC):
gates and dgates (N, H, W, 4h) with pixels GS apart (a channel slice of a wider tensor when GS > 4h), y, dy and hs
(N, H, W, h), cs (N, H, W, 5h); h0/c0 and the dc scratch keep their (N, h, W) layout. The same blocks and the same
arithmetic, only the addressing differs (_row_base, _tile), so both layouts give the same bits. The weight gradient's
CL variant reads dgates and hs as (pixel, channel) tiles contiguous along the channels.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from gm._ext import packed
from gm.kernels._common import (
    INTERPRETED,
    TL_DTYPES,
    acc_dtype,
    by_element_size,
    cdiv,
    dot_precision,
    int32_offsets,
    next_power_of_2,
    sigmoid,
    sm_slots,
    suits,
    tanh,
    tuned,
    wave_splits,
)  # fmt: skip
from gm.kernels._launch import fast
from gm.kernels._layout import sum_splits


@triton.jit
def _conv_prev(
    zi, zf, zo, zg, w_ptr, src, ch_stride, px_stride, o, col, HID, W,
    K: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr,
    IDX: tl.constexpr,
):  # fmt: skip
    """Add the state-to-state conv of the previous row to the gate accumulators (each (BO, BW)):
    z_g[o, w] += sum_t sum_j wp[t, g*h + o, j] * prev[j, w + t - k//2], prev[j, x] at src + j*ch_stride +
    x*px_stride."""
    o_ok = o < HID
    gate = HID * HID
    nkb = tl.cdiv(HID, BK)
    for it in range(0, K * nkb):  # one flat loop over (tap, channel chunk): what num_stages > 1 pipelines
        t = it // nkb
        j = (it - t * nkb) * BK + tl.arange(0, BK).to(IDX)
        j_ok = j < HID
        x = col + (t - K // 2)
        hp = tl.load(
            src + j[:, None] * ch_stride + x[None, :] * px_stride,
            mask=j_ok[:, None] & ((x >= 0) & (x < W))[None, :],
            other=0.0,
        ).to(DOT)
        wt = w_ptr + t * 4 * gate + o[:, None] * HID + j[None, :]
        w_ok = o_ok[:, None] & j_ok[None, :]
        zi = tl.dot(tl.load(wt, mask=w_ok, other=0.0).to(DOT), hp, zi, input_precision=PRECISION, out_dtype=ACC)
        zf = tl.dot(tl.load(wt + gate, mask=w_ok, other=0.0).to(DOT), hp, zf, input_precision=PRECISION, out_dtype=ACC)
        zo = tl.dot(
            tl.load(wt + 2 * gate, mask=w_ok, other=0.0).to(DOT), hp, zo, input_precision=PRECISION, out_dtype=ACC
        )
        zg = tl.dot(
            tl.load(wt + 3 * gate, mask=w_ok, other=0.0).to(DOT), hp, zg, input_precision=PRECISION, out_dtype=ACC
        )
    return zi, zf, zo, zg


@triton.jit
def _row_base(n, r, C, H, W, PIX, CL: tl.constexpr):
    """Offset of [n, 0, r, 0] (int64: n is) in a tensor of C channels: (N, C, H, W) contiguous, or CL (N, H, W, C)
    channels-last with pixels PIX apart (PIX >= C: a channel slice of a wider tensor)."""
    if CL:
        base = (n * H + r) * W * PIX
    else:
        base = (n * C * H + r) * W
    return base


@triton.jit
def _tile(o, col, plane, PIX, CL: tl.constexpr):
    """Offsets (BO, BW) of channels o, columns col from a row base (_row_base); plane = H*W in IDX."""
    if CL:
        tile = o[:, None] + col[None, :] * PIX
    else:
        tile = o[:, None] * plane + col[None, :]
    return tile


@triton.jit
def _gate_preacts(
    g_ptr, w_ptr, hs_ptr, h0_ptr, n, r, o, col, m2, HID, H, W, GS,
    K: tl.constexpr, HAS_H0: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BK: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    """z_i, z_f, z_o, z_g (each (BO, BW), ACC) of units o, columns col, row r: gates plus the conv of h_{r-1}; m2 the
    block's mask. Gates' pixels are GS apart when CL."""
    plane = (H * W).to(IDX)  # the gate-block offsets (g * HID * plane) need IDX's width
    if CL:
        chan = 1
        px = HID  # hs (N, H, W, h)
    else:
        chan = plane
        px = 1
    row = g_ptr + _row_base(n, r, 4 * HID, H, W, GS, CL) + _tile(o, col, plane, GS, CL)  # gates[n, o, r, col]
    zi = tl.load(row, mask=m2, other=0.0).to(ACC)
    zf = tl.load(row + HID * chan, mask=m2, other=0.0).to(ACC)
    zo = tl.load(row + 2 * HID * chan, mask=m2, other=0.0).to(ACC)
    zg = tl.load(row + 3 * HID * chan, mask=m2, other=0.0).to(ACC)
    if r > 0:
        src = hs_ptr + _row_base(n, r - 1, HID, H, W, HID, CL)  # hs[n, 0, r-1, 0]
        zi, zf, zo, zg = _conv_prev(
            zi, zf, zo, zg, w_ptr, src, chan, px, o, col, HID, W, K, ACC, DOT, PRECISION, BK, IDX
        )  # fmt: skip
    else:
        if HAS_H0:
            src0 = h0_ptr + n * HID * W  # h0[n, 0, 0]
            zi, zf, zo, zg = _conv_prev(
                zi, zf, zo, zg, w_ptr, src0, W, 1, o, col, HID, W, K, ACC, DOT, PRECISION, BK, IDX
            )  # fmt: skip
    return zi, zf, zo, zg


@triton.jit
def _conv_transpose_next(
    acc, dg_ptr, w_ptr, n, r, o, col, HID, H, W, GS,
    K: tl.constexpr, CL: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr,
    IDX: tl.constexpr,
):  # fmt: skip
    """acc (BO, BW) += the gradient that dgates row r sends to the state of the row above it:
    dh[o, w] += sum_t sum_c wp[t, c, o] * dz[c, w - (t - k//2)] over all 4h gate channels c (the four gates are
    one reduction: dgates and wp both keep them contiguous), in chunks of 4*BK channels (the operand tiles of an
    iteration are then about the size of _conv_prev's: one (BO, 4BK) weight tile instead of four (BO, BK)).
    dgates' pixels are GS apart when CL."""
    o_ok = o < HID
    plane = (H * W).to(IDX)  # the gate-block offsets (g * HID * plane) need IDX's width
    row = dg_ptr + _row_base(n, r, 4 * HID, H, W, GS, CL)  # dgates[n, 0, r, 0]
    ncb = tl.cdiv(4 * HID, 4 * BK)
    for it in range(0, K * ncb):  # one flat loop over (tap, channel chunk), as in _conv_prev
        t = it // ncb
        c = (it - t * ncb) * (4 * BK) + tl.arange(0, 4 * BK).to(IDX)
        c_ok = c < 4 * HID
        x = col - (t - K // 2)
        dz = tl.load(
            row + _tile(c, x, plane, GS, CL),
            mask=c_ok[:, None] & ((x >= 0) & (x < W))[None, :],
            other=0.0,
        ).to(DOT)
        # (BO, 4BK): wp[t, c, o], contiguous along o
        wt = tl.load(
            w_ptr + t * 4 * HID * HID + c[None, :] * HID + o[:, None], mask=o_ok[:, None] & c_ok[None, :], other=0.0
        ).to(DOT)
        acc = tl.dot(wt, dz, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def row_lstm_fwd_kernel(
    g_ptr, w_ptr, h0_ptr, c0_ptr, y_ptr, hs_ptr, cs_ptr,
    HID, H, W, GS,
    K: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, WRITE_Y: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BO: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    """Scalar image/row bases in int64; offsets inside an image in IDX (int32 unless an image is too large). CL:
    gates (N, H, W, 4h) with pixels GS apart, y and hs (N, H, W, h), cs (N, H, W, 5h); else all NCHW."""
    n = tl.program_id(0).to(tl.int64)
    plane = (H * W).to(IDX)  # the gate-block offsets (g * HID * plane) need IDX's width
    if CL:
        chan = 1
    else:
        chan = plane
    for r in range(H):
        row = _row_base(n, r, HID, H, W, HID, CL)  # hs/y[n, 0, r, 0]
        crow = _row_base(n, r, 5 * HID, H, W, 5 * HID, CL)  # cs[n, 0, r, 0]
        crow_prev = _row_base(n, r - 1, 5 * HID, H, W, 5 * HID, CL)  # cs[n, 0, r-1, 0]
        for ob in range(0, HID, BO):
            o = ob + tl.arange(0, BO).to(IDX)
            for wb in range(0, W, BW):
                col = wb + tl.arange(0, BW).to(IDX)
                m2 = (o < HID)[:, None] & (col < W)[None, :]
                tile = _tile(o, col, plane, HID, CL)
                ctile = _tile(o, col, plane, 5 * HID, CL)
                zi, zf, zo, zg = _gate_preacts(
                    g_ptr, w_ptr, hs_ptr, h0_ptr, n, r, o, col, m2, HID, H, W, GS,
                    K, HAS_H0, CL, ACC, DOT, PRECISION, BK, IDX,
                )  # fmt: skip
                if r > 0:
                    c = tl.load(cs_ptr + crow_prev + ctile, mask=m2, other=0.0).to(ACC)
                else:
                    if HAS_C0:
                        c = tl.load(c0_ptr + n * HID * W + o[:, None] * W + col[None, :], mask=m2, other=0.0).to(ACC)
                    else:
                        c = tl.zeros((BO, BW), dtype=ACC)
                si, sf, so, tg = sigmoid(zi), sigmoid(zf), sigmoid(zo), tanh(zg)
                c = sf * c + si * tg
                h = so * tanh(c)
                cs_tile = cs_ptr + crow + ctile
                tl.store(cs_tile, c, mask=m2)
                tl.store(cs_tile + HID * chan, si, mask=m2)
                tl.store(cs_tile + 2 * HID * chan, sf, mask=m2)
                tl.store(cs_tile + 3 * HID * chan, so, mask=m2)
                tl.store(cs_tile + 4 * HID * chan, tg, mask=m2)
                tl.store(hs_ptr + row + tile, h, mask=m2)
                if WRITE_Y:
                    tl.store(y_ptr + row + tile, h.to(y_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()  # row r of hs is read back shifted (and by other threads) in row r+1


@triton.jit
def row_lstm_bwd_kernel(
    dy_ptr, w_ptr, c0_ptr, cs_ptr, dg_ptr, dcs_ptr, dh0_ptr, dc0_ptr,
    HID, H, W, GS,
    K: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BO: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    """CL: dgates (N, H, W, 4h) with pixels GS apart, dy (N, H, W, h), cs (N, H, W, 5h); else all NCHW. The dc
    scratch dcs (N, 2, h, W) and the initial states (N, h, W) in either."""
    n = tl.program_id(0).to(tl.int64)
    plane = (H * W).to(IDX)  # the gate-block offsets (g * HID * plane) need IDX's width
    if CL:
        chan = 1
    else:
        chan = plane
    state0 = n * HID * W  # an (N, h, W) state's [n, 0, 0]
    for rr in range(H):
        r = H - 1 - rr
        row = _row_base(n, r, HID, H, W, HID, CL)  # dy[n, 0, r, 0]
        crow = _row_base(n, r, 5 * HID, H, W, 5 * HID, CL)  # cs[n, 0, r, 0]
        crow_prev = _row_base(n, r - 1, 5 * HID, H, W, 5 * HID, CL)  # cs[n, 0, r-1, 0]
        grow = _row_base(n, r, 4 * HID, H, W, GS, CL)  # dgates[n, 0, r, 0]
        scratch = (n * 2 + r % 2) * HID * W  # dcs[n, r % 2, 0, 0]: written in row r
        scratch_next = (n * 2 + (r + 1) % 2) * HID * W  # dcs[n, (r+1) % 2]: row r+1's dc_{r}
        for ob in range(0, HID, BO):
            o = ob + tl.arange(0, BO).to(IDX)
            for wb in range(0, W, BW):
                col = wb + tl.arange(0, BW).to(IDX)
                m2 = (o < HID)[:, None] & (col < W)[None, :]
                tile = _tile(o, col, plane, HID, CL)
                ctile = _tile(o, col, plane, 5 * HID, CL)
                stile = o[:, None] * W + col[None, :]
                dh = tl.load(dy_ptr + row + tile, mask=m2, other=0.0).to(ACC)
                if r + 1 < H:
                    dh = _conv_transpose_next(
                        dh, dg_ptr, w_ptr, n, r + 1, o, col, HID, H, W, GS, K, CL, DOT, PRECISION, BK, IDX
                    )
                    dc = tl.load(dcs_ptr + scratch_next + stile, mask=m2, other=0.0)
                else:
                    dc = tl.zeros((BO, BW), dtype=ACC)
                cs_tile = cs_ptr + crow + ctile
                c = tl.load(cs_tile, mask=m2, other=0.0).to(ACC)
                si = tl.load(cs_tile + HID * chan, mask=m2, other=0.0).to(ACC)
                sf = tl.load(cs_tile + 2 * HID * chan, mask=m2, other=0.0).to(ACC)
                so = tl.load(cs_tile + 3 * HID * chan, mask=m2, other=0.0).to(ACC)
                tg = tl.load(cs_tile + 4 * HID * chan, mask=m2, other=0.0).to(ACC)
                if r > 0:
                    c_prev = tl.load(cs_ptr + crow_prev + ctile, mask=m2, other=0.0).to(ACC)
                else:
                    if HAS_C0:
                        c_prev = tl.load(c0_ptr + state0 + stile, mask=m2, other=0.0).to(ACC)
                    else:
                        c_prev = tl.zeros((BO, BW), dtype=ACC)
                tc = tanh(c)
                dc += dh * so * (1.0 - tc * tc)
                dzi = dc * tg * si * (1.0 - si)
                dzf = dc * c_prev * sf * (1.0 - sf)
                dzo = dh * tc * so * (1.0 - so)
                dzg = dc * si * (1.0 - tg * tg)
                tl.store(dcs_ptr + scratch + stile, dc * sf, mask=m2)
                dg_row = dg_ptr + grow + _tile(o, col, plane, GS, CL)
                tl.store(dg_row, dzi.to(dg_ptr.dtype.element_ty), mask=m2)
                tl.store(dg_row + HID * chan, dzf.to(dg_ptr.dtype.element_ty), mask=m2)
                tl.store(dg_row + 2 * HID * chan, dzo.to(dg_ptr.dtype.element_ty), mask=m2)
                tl.store(dg_row + 3 * HID * chan, dzg.to(dg_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()  # dgates row r and dcs[r % 2] are read (shifted, by other threads) in row r-1
    if HAS_H0 or HAS_C0:
        for ob in range(0, HID, BO):
            o = ob + tl.arange(0, BO).to(IDX)
            for wb in range(0, W, BW):
                col = wb + tl.arange(0, BW).to(IDX)
                m2 = (o < HID)[:, None] & (col < W)[None, :]
                stile = o[:, None] * W + col[None, :]
                if HAS_H0:
                    dh0 = tl.zeros((BO, BW), dtype=ACC)
                    dh0 = _conv_transpose_next(
                        dh0, dg_ptr, w_ptr, n, 0, o, col, HID, H, W, GS, K, CL, DOT, PRECISION, BK, IDX
                    )  # fmt: skip
                    tl.store(dh0_ptr + state0 + stile, dh0, mask=m2)
                if HAS_C0:
                    dc0 = tl.load(dcs_ptr + n * 2 * HID * W + stile, mask=m2, other=0.0)  # dcs[n, 0]: row 0's
                    tl.store(dc0_ptr + state0 + stile, dc0, mask=m2)


@triton.jit
def row_lstm_wgrad_kernel(
    dg_ptr, hs_ptr, h0_ptr, dw_ptr,
    N, HID, H: tl.constexpr, W: tl.constexpr,
    K: tl.constexpr, HAS_H0: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, TAPS: tl.constexpr = 0,
    CL: tl.constexpr = False, GS=1,
):  # fmt: skip
    """partial[split] (4h, h, k): [o, j, t] = sum over the split's pixels of dz[o, p] * h[j] at tap t's neighbour of
    pixel p = (r, w), zero outside the image (or h0 above row 0 when HAS_H0):
      TAPS=0 (Row LSTM): the previous row, column w + t - k//2;
      TAPS=1 / 2 (Diagonal LSTM, k=2, forward / reverse scan): t=0 the pixel above, t=1 the pixel to the left
      (to the right for the reverse scan).
    A program owns one tap and BLOCK_J state units (grid y = K * cdiv(h, BLOCK_J)), so the neighbour is one shift of
    the pixel index for its whole tile: the B tile is a plain (pixel, unit) block of hs, contiguous along pixels, and
    only the in-image test depends on the pixel (H, W constexprs: multiply-shifts). The earlier tiles mixed taps
    along their columns, so every element had its own address and test: 563 SASS instructions per k-step of 2 MMAs
    (sm_90, Triton 3.6, bf16, k=3). An item is one image's block of BLOCK_P pixels; split s of the S = grid z splits
    takes items s, s + S, ... (the launcher picks S per config). Offsets within an image are int32 unless WIDE.
    CL: dgates (N, H, W, 4h) with pixels GS apart and hs (N, H, W, h), the channels-last scans' (the Row LSTM's, and
    the Diagonal LSTM's: each direction's half of the layer's (N, H, W, 8h) gate gradients, GS = 8h, and its y as hs;
    the tiles are then contiguous along their channels: o of dz, j of hs); else both NCHW."""
    pid_o = tl.program_id(0)
    pid_j = tl.program_id(1)
    split = tl.program_id(2)
    j_blocks = tl.cdiv(HID, BLOCK_J)
    t = pid_j // j_blocks
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    j = (pid_j - t * j_blocks) * BLOCK_J + tl.arange(0, BLOCK_J)
    o_ok = o < 4 * HID
    j_ok = j < HID
    if TAPS == 0:
        dr = -1
        dx = t - K // 2
    else:
        dr = tl.where(t == 0, -1, 0)
        dx = tl.where(t == 0, 0, -1 if TAPS == 1 else 1)
    plane: tl.constexpr = H * W
    chunks: tl.constexpr = (plane + BLOCK_P - 1) // BLOCK_P
    if WIDE:
        o_off = o.to(tl.int64) * plane
        j_off = j.to(tl.int64) * plane
    else:
        o_off = o * plane
        j_off = j * plane
    acc = tl.zeros((BLOCK_O, BLOCK_J), dtype=ACC)
    for item in range(split, N * chunks, tl.num_programs(2)):
        n = item // chunks
        p = (item - n * chunks) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < plane
        if CL:
            p_at = p.to(tl.int64) if WIDE else p
            dz_at = dg_ptr + n.to(tl.int64) * GS * plane + (o[:, None] + p_at[None, :] * GS)
        else:
            dz_at = dg_ptr + n.to(tl.int64) * 4 * HID * plane + (o_off[:, None] + p[None, :])
        dz = tl.load(dz_at, mask=o_ok[:, None] & p_ok[None, :], other=0.0).to(DOT)
        r = p // W
        x = p - r * W + dx
        ok = p_ok & (x.to(tl.uint32, bitcast=True) < W)
        src = p + (dr * W + dx)
        if CL:
            src_at = src.to(tl.int64) if WIDE else src
            hp_at = hs_ptr + n.to(tl.int64) * HID * plane + (j[None, :] + src_at[:, None] * HID)
        else:
            hp_at = hs_ptr + n.to(tl.int64) * HID * plane + (j_off[None, :] + src[:, None])
        hp = tl.load(hp_at, mask=(ok & (r + dr >= 0))[:, None] & j_ok[None, :], other=0.0).to(ACC)
        if HAS_H0:  # row -1 (TAPS=0): the initial state
            hp += tl.load(
                h0_ptr + n.to(tl.int64) * HID * W + (j[None, :] * W + x[:, None]),
                mask=(ok & (r == 0))[:, None] & j_ok[None, :],
                other=0.0,
            ).to(ACC)
        acc = tl.dot(dz, hp.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    out = dw_ptr + ((split * 4 * HID + o[:, None]).to(tl.int64) * HID + j[None, :]) * K + t
    tl.store(out, acc, mask=o_ok[:, None] & j_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers. Interpreted: fixed small blocks, smaller than the tests' hidden sizes and widths so every block loop
# runs more than once and ends on a partial block. On a GPU: the scans autotune (BO, BK, num_warps, num_stages) with
# BW fixed by the width, the weight-gradient GEMM its tile shape.


def _scan_configs(shapes):
    return [triton.Config(dict(BO=bo, BK=bk), num_warps=nw, num_stages=ns) for bo, bk, nw, ns in shapes]


# (BO, BK, num_warps, num_stages), each spill-free on sm_90 at W=32 in float32 and bfloat16 (python -m bench.aot
# --ops row_lstm, Triton 3.6 and 3.9; HID is not a constexpr, so h=64 and h=128 share one binary). The epilogues
# store (forward) or load (backward) the four gate activations beside c, so 128-unit blocks spill outside the
# 16-warp forward config; the backward's dh pull reads (BO, 4BK) weight tiles and it keeps 64-unit blocks or less. num_stages > 1 pipelines the flat
# (tap, channel chunk) loops through cp.async into shared memory; their prologue runs after the row's barrier, so the
# loads still see the previous row's stores. The first config is the one GM_TRITON_AUTOTUNE=0 runs.
_FWD_SHAPES = [(128, 64, 16, 1), (64, 64, 8, 1), (128, 32, 8, 1), (64, 32, 4, 1), (64, 32, 8, 3), (64, 64, 8, 2),
               (64, 32, 8, 2)]  # fmt: skip
_BWD_SHAPES = [(64, 32, 8, 1), (64, 16, 8, 1), (64, 64, 8, 1), (32, 32, 4, 1), (64, 16, 8, 2), (64, 16, 8, 3)]


def _wgrad_configs():
    # (BLOCK_O, BLOCK_J, BLOCK_P, num_warps, num_stages), spill-free and within shared memory in float32 and bfloat16.
    # (128, 64, 64) exceeds shared memory in float64 (sm_90, Triton 3.6): not a float64 candidate.
    shapes = [(128, 128, 32, 8, 3, (2, 4, 8)), (128, 64, 64, 8, 3, (2, 4)), (128, 64, 32, 4, 3, (2, 4, 8)),
              (64, 64, 64, 4, 3, (2, 4, 8))]  # fmt: skip
    return [
        suits(triton.Config(dict(BLOCK_O=bo, BLOCK_J=bj, BLOCK_P=bp), num_warps=nw, num_stages=ns), sizes)
        for bo, bj, bp, nw, ns, sizes in shapes
    ]


_SCAN_INTERP = dict(BO=4, BK=4)
_WGRAD_INTERP = dict(BLOCK_O=16, BLOCK_J=8, BLOCK_P=8)
_key = ["HID", "H", "W", "K"]
_fwd, _FWD_META = tuned(row_lstm_fwd_kernel, _scan_configs(_FWD_SHAPES), _key, _SCAN_INTERP)
_bwd, _BWD_META = tuned(row_lstm_bwd_kernel, _scan_configs(_BWD_SHAPES), _key, _SCAN_INTERP)
_wgrad, _WGRAD_META = tuned(row_lstm_wgrad_kernel, _wgrad_configs(), ["N", "HID", "H", "W", "K", "TAPS"],
                            _WGRAD_INTERP, prune=by_element_size)  # fmt: skip


def _types(dtype: torch.dtype):
    """(accumulation dtype, dot operand dtype, dot precision) for inputs of `dtype`."""
    if dtype not in TL_DTYPES:
        raise ValueError(f"the triton backend takes float16/bfloat16/float32/float64, got {dtype}")
    acc = acc_dtype(dtype)
    dot = TL_DTYPES[dtype] if dtype in (torch.float16, torch.bfloat16) else acc
    return acc, dot, dot_precision(dtype, conv=True)


def _block_w(width: int) -> int:
    """Columns per block: the whole row up to 64 (4 under the interpreter, to exercise the column loop)."""
    if INTERPRETED:
        return 4
    return max(16, min(64, next_power_of_2(width)))


def pack_weight(w_ss: torch.Tensor) -> torch.Tensor:
    """(4h, h, k) -> (k, 4h, h) contiguous: wp[t, g*h + o, j] = w_ss[g*h + o, j, t]."""
    return w_ss.permute(2, 0, 1).contiguous()


def packed_weight(w_ss: torch.Tensor, *, fresh: bool) -> torch.Tensor:
    """pack_weight(w_ss), made by the forward (fresh=True) and reused by its backward (gm._ext.packed: unless w_ss
    changed since)."""
    return packed(w_ss, "row_lstm_triton", lambda: pack_weight(w_ss), fresh=fresh)


def _index_dtype(four_h: int, height: int, width: int, k: int, gate_stride: int = 0):
    """Offsets inside one image (of cs, the largest: 5h channels, or of channels-last gates whose pixels are
    gate_stride apart) and into the packed weight as int32 when they fit, else int64."""
    hidden = four_h // 4
    image = max(5 * hidden, gate_stride) * height * width
    return tl.int32 if max(image, k * four_h * hidden) < 2**31 else tl.int64


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scan_dims(t: torch.Tensor, gate_stride: int) -> tuple[int, int, int, int]:
    """(N, h, H, W) of gates or dgates: (N, 4h, H, W) for gate_stride 0, else channels-last (N, H, W, 4h)."""
    n, height, width, four_h = t.shape if gate_stride else (t.shape[0], *t.shape[2:], t.shape[1])
    return n, four_h // 4, height, width


def _state(n: int, channels: int, height: int, width: int, dtype, device, channels_last: bool) -> torch.Tensor:
    shape = (n, height, width, channels) if channels_last else (n, channels, height, width)
    return torch.empty(shape, dtype=dtype, device=device)


def forward(gates, w_ss, h0, c0, gate_stride: int = 0):
    """(y, hs, cs): y in gates' dtype; hs (N, h, H, W) and cs (N, 5h, H, W: c and the gate activations) in the
    state dtype; y is hs for float32/64. gate_stride > 0: gates (N, H, W, 4h) channels-last with pixels gate_stride
    apart, and y, hs (N, H, W, h), cs (N, H, W, 5h)."""
    n, hidden, height, width = _scan_dims(gates, gate_stride)
    k, cl = w_ss.shape[2], gate_stride > 0
    acc, dot, precision = _types(gates.dtype)
    sdt = _state_dtype(gates.dtype)
    hs = _state(n, hidden, height, width, sdt, gates.device, cl)
    cs = _state(n, 5 * hidden, height, width, sdt, gates.device, cl)
    write_y = gates.dtype != sdt
    y = torch.empty_like(hs, dtype=gates.dtype) if write_y else hs
    fast(_fwd)[(n,)](
        gates, packed_weight(w_ss, fresh=True), h0 if h0 is not None else hs, c0 if c0 is not None else hs, y, hs, cs,
        hidden, height, width, gate_stride or 4 * hidden,
        K=k, HAS_H0=h0 is not None, HAS_C0=c0 is not None, WRITE_Y=write_y, CL=cl,
        ACC=acc, DOT=dot, PRECISION=precision, BW=_block_w(width), IDX=_index_dtype(4 * hidden, height, width, k,
                                                                                    gate_stride),
        **_FWD_META,
    )  # fmt: skip
    return y, hs, cs


def _num_splits(tiles: int, items: int, element_size: int) -> int:
    """Pixel splits of the weight-gradient GEMM: whole waves of programs (gm.kernels._common.wave_splits) over a
    config's tiles, at least 4 items (of BLOCK_P pixels) each."""
    if INTERPRETED:
        return 2 if items > 2 else 1  # exercise the split path in tests
    return wave_splits(tiles, items, element_size, min_steps=4)


# The block sizes any weight-gradient launch may take (sizing its split buffer).
_WGRAD_BLOCKS = [_WGRAD_INTERP] if INTERPRETED else [c.kwargs for c in _wgrad_configs()]


def _splits(four_h: int, hidden: int, k: int, n: int, pixels: int, elem: int, meta: dict) -> int:
    tiles = cdiv(four_h, meta["BLOCK_O"]) * k * cdiv(hidden, meta["BLOCK_J"])
    return _num_splits(tiles, n * cdiv(pixels, meta["BLOCK_P"]), elem)


@functools.lru_cache(maxsize=1024)
def _most_splits(four_h: int, hidden: int, k: int, n: int, pixels: int, elem: int, slots: int) -> int:
    """The most pixel splits any weight-gradient config asks for at this shape (slots: the SM count the splits
    follow, part of the key only), cached: the configs' split models per call cost more host time than a launch."""
    return max(_splits(four_h, hidden, k, n, pixels, elem, c) for c in _WGRAD_BLOCKS)


def weight_grad(dgates, hs, h0, k, taps: int = 0, gate_stride: int = 0):
    """dw_ss (4h, h, k) in the state dtype of dgates' dtype; taps as in
    row_lstm_wgrad_kernel (0: the Row LSTM's; 1, 2: the Diagonal LSTM's up/left taps, forward/reverse scan, k=2).
    gate_stride > 0 (any taps): dgates (N, H, W, 4h) channels-last with pixels gate_stride apart, hs (N, H, W, h)."""
    n, hidden, height, width = _scan_dims(dgates, gate_stride)
    four_h = 4 * hidden
    acc, dot, precision = _types(dgates.dtype)
    elem = dgates.element_size()

    def splits_for(meta):
        return _splits(four_h, hidden, k, n, height * width, elem, meta)

    # The split count follows the launched config (the autotuner calls grid() for every config it times, the chosen
    # one last): the buffer holds the most splits any config asks for, the sum reads the launched ones.
    partial = torch.empty(_most_splits(four_h, hidden, k, n, height * width, elem, sm_slots()), four_h, hidden, k,
                          dtype=_state_dtype(dgates.dtype), device=hs.device)  # fmt: skip
    launched = {}

    def grid(meta):
        launched["splits"] = splits_for(meta)
        return (cdiv(four_h, meta["BLOCK_O"]), k * cdiv(hidden, meta["BLOCK_J"]), launched["splits"])

    layout = dict(CL=True, GS=gate_stride) if gate_stride else {}  # the NCHW launch keeps the kernel's defaults
    fast(_wgrad)[grid](
        dgates, hs, h0 if h0 is not None else hs, partial,
        n, hidden, height, width,
        K=k, HAS_H0=h0 is not None, WIDE=not int32_offsets(dgates, hs), ACC=acc, DOT=dot, PRECISION=precision,
        TAPS=taps, **layout, **_WGRAD_META,
    )  # fmt: skip
    return sum_splits(partial[: launched["splits"]], partial.dtype)


def backward(dy, gates, w_ss, h0, c0, hs, cs, need_w):
    """(dgates in gates' dtype, dw_ss or None, dh0 or None, dc0 or None); dh0/dc0 in the state dtype; hs and cs as
    forward() returned them."""
    dgates = torch.empty_like(gates)
    return dgates, *backward_into(dy, dgates, w_ss, h0, c0, hs, cs, need_w)


def backward_into(dy, dgates, w_ss, h0, c0, hs, cs, need_w, gate_stride: int = 0):
    """Writes dgates (in the forward's gates' dtype and layout) and returns (dw_ss or None, dh0 or None, dc0 or
    None), dh0/dc0 in the state dtype; hs and cs as forward() returned them. gate_stride 0: dgates (N, 4h, H, W) and
    dy (N, h, H, W) contiguous; else dgates (N, H, W, 4h) channels-last with pixels gate_stride apart and dy
    (N, H, W, h) contiguous; the weight gradient then reads dgates and hs channels-last."""
    n, hidden, height, width = _scan_dims(dgates, gate_stride)
    k = w_ss.shape[2]
    acc, dot, precision = _types(dgates.dtype)
    dcs = torch.empty(n, 2, hidden, width, dtype=hs.dtype, device=hs.device)
    dh0 = torch.empty_like(h0, dtype=hs.dtype) if h0 is not None else None
    dc0 = torch.empty_like(c0, dtype=hs.dtype) if c0 is not None else None
    fast(_bwd)[(n,)](
        dy, packed_weight(w_ss, fresh=False), c0 if c0 is not None else hs, cs,
        dgates, dcs, dh0 if dh0 is not None else hs, dc0 if dc0 is not None else hs,
        hidden, height, width, gate_stride or 4 * hidden,
        K=k, HAS_H0=h0 is not None, HAS_C0=c0 is not None, CL=gate_stride > 0,
        ACC=acc, DOT=dot, PRECISION=precision, BW=_block_w(width),
        IDX=_index_dtype(4 * hidden, height, width, k, gate_stride), **_BWD_META,
    )  # fmt: skip
    dw = weight_grad(dgates, hs, h0, k, gate_stride=gate_stride) if need_w else None
    return dw, dh0, dc0
