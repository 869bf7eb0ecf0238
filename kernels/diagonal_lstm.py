"""Triton kernels for diagonal_lstm: the whole diagonal scan in one launch per pass.

For skewed column t and image row i (pixel (i, j = t - i), column j counted right to left when REVERSE):
    a[g*h + o, i] = gates[n, g*h + o, i, j] + sum_k w_up[g, o, k] * h[k, (i-1, j)] + w_left[g, o, k] * h[k, (i, j-1)]
    c = sigmoid(a_f) * c_left + sigmoid(a_i) * tanh(a_g);   h = sigmoid(o) * tanh(c)
with gate order i, f, o, g; state zero outside the image (see gm.reference.diagonal_lstm).

Shapes: gates (N, 4h, H, W) contiguous; packed weight (2, 4, h, h) = [tap (up, left), gate, out, in] in the input
dtype; y (N, h, H, W) in the input dtype; c (N, h, H, W) float32 (float64 for float64).

One program per batch element owns the whole diagonal state, a (h x H) register tile (rows of the image on the
second axis), and loops over the W+H-1 skewed columns. Per step the state-to-state product is four gate blocks
of (h x h) @ (h x H) per tap on tensor cores. The skew is addressing: gates and outputs are read and written at
(i, t - i) directly. The row shift h[:, i-1] needs data from another lane: the forward reads it back from y
(the pixel directly above, written in the previous step; one barrier per step), so y itself is the scratch.
The dot operands are the input dtype (h rounded as y stores it), accumulation and state are float32.

Backward walks the steps in reverse. It needs c at each cell: the forward saves c (float32, the size of y)
rather than recomputing the scan, so each backward step is independent of the forward chain; the gate
pre-activations are recomputed from gates + w @ (y above, y left), the exact operands the forward used, which
costs one step's product and saves storing 4h values per pixel. The gradient for the cell above,
w_up^T @ da, is shifted up one row through a per-program float32 scratch (double-buffered by step parity, so
one barrier per step). dw_ss = sum over pixels of da (x) (y above, y left) is one GEMM over dgates and y after
the kernel (gm.ops.diagonal_lstm): a per-program (4h x 2h) accumulator does not fit in registers at h = 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gm.kernels._common import TL_DTYPES, acc_dtype, dot_precision, sigmoid, tanh, tuned


@triton.jit
def _preact(g_base, w_ptr, gate, kk, pix, m, HID, HW, w_off, w_mask, h_up, h_left, ACC: tl.constexpr,
            PRECISION: tl.constexpr):  # fmt: skip
    """gates[gate] + w_up[gate] @ h_up + w_left[gate] @ h_left, a (BLOCK_K, BLOCK_H) tile in ACC."""
    a = tl.load(g_base + (gate * HID + kk) * HW + pix, mask=m, other=0.0).to(ACC)
    w_up = tl.load(w_ptr + gate * HID * HID + w_off, mask=w_mask, other=0.0)
    w_left = tl.load(w_ptr + (4 + gate) * HID * HID + w_off, mask=w_mask, other=0.0)
    a = tl.dot(w_up, h_up, a, input_precision=PRECISION, out_dtype=ACC)
    return tl.dot(w_left, h_left, a, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _cell_geometry(t, rr, H, W, REVERSE: tl.constexpr):
    """Image row/column of each register row at skewed step t: (inside, pixel offset, offset of the left pixel)."""
    j = t - rr
    inside = (rr < H) & (j >= 0) & (j < W)
    if REVERSE:
        pix = rr * W + (W - 1 - j)
        left = pix + 1
    else:
        pix = rr * W + j
        left = pix - 1
    return j, inside, pix, left


@triton.jit
def diagonal_lstm_fwd_kernel(
    g_ptr, w_ptr, y_ptr, c_ptr,
    HID, H, W,
    REVERSE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    HW = H * W
    kk = tl.arange(0, BLOCK_K)[:, None]
    rr = tl.arange(0, BLOCK_H)[None, :]
    k_ok = kk < HID
    wc = tl.arange(0, BLOCK_K)[None, :]
    w_off = kk * HID + wc
    w_mask = k_ok & (wc < HID)
    g_base = g_ptr + n * 4 * HID * HW
    y_base = y_ptr + n * HID * HW
    c_base = c_ptr + n * HID * HW
    h = tl.zeros((BLOCK_K, BLOCK_H), dtype=ACC)
    c = tl.zeros((BLOCK_K, BLOCK_H), dtype=ACC)
    for t in range(0, W + H - 1):
        j, inside, pix, left = _cell_geometry(t, rr, H, W, REVERSE)
        m = k_ok & inside
        # The pixel above was written to y in the previous step (barrier at the end of that step).
        h_up = tl.load(y_base + kk * HW + pix - W, mask=m & (rr >= 1), other=0.0)
        h_left = h.to(y_ptr.dtype.element_ty)
        a_i = _preact(g_base, w_ptr, 0, kk, pix, m, HID, HW, w_off, w_mask, h_up, h_left, ACC, PRECISION)
        a_f = _preact(g_base, w_ptr, 1, kk, pix, m, HID, HW, w_off, w_mask, h_up, h_left, ACC, PRECISION)
        a_o = _preact(g_base, w_ptr, 2, kk, pix, m, HID, HW, w_off, w_mask, h_up, h_left, ACC, PRECISION)
        a_g = _preact(g_base, w_ptr, 3, kk, pix, m, HID, HW, w_off, w_mask, h_up, h_left, ACC, PRECISION)
        c = sigmoid(a_f) * c + sigmoid(a_i) * tanh(a_g)
        c = tl.where(inside, c, 0.0)
        h = tl.where(inside, sigmoid(a_o) * tanh(c), 0.0)
        tl.store(y_base + kk * HW + pix, h.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(c_base + kk * HW + pix, c, mask=m)
        tl.debug_barrier()


@triton.jit
def _input_grad_dot(w_ptr, tap, wt_off, w_mask, HID, da_i, da_f, da_o, da_g, ACC: tl.constexpr,
                    PRECISION: tl.constexpr):  # fmt: skip
    """sum over the four gates of w[tap, gate]^T @ da_gate: (BLOCK_K, BLOCK_H)."""
    base = w_ptr + tap * 4 * HID * HID
    acc = tl.dot(tl.load(base + wt_off, mask=w_mask, other=0.0), da_i, input_precision=PRECISION, out_dtype=ACC)
    acc = tl.dot(tl.load(base + HID * HID + wt_off, mask=w_mask, other=0.0), da_f, acc,
                 input_precision=PRECISION, out_dtype=ACC)  # fmt: skip
    acc = tl.dot(tl.load(base + 2 * HID * HID + wt_off, mask=w_mask, other=0.0), da_o, acc,
                 input_precision=PRECISION, out_dtype=ACC)  # fmt: skip
    return tl.dot(tl.load(base + 3 * HID * HID + wt_off, mask=w_mask, other=0.0), da_g, acc,
                  input_precision=PRECISION, out_dtype=ACC)  # fmt: skip


@triton.jit
def diagonal_lstm_bwd_kernel(
    dy_ptr, g_ptr, w_ptr, y_ptr, c_ptr, dg_ptr, scratch_ptr,
    HID, H, W,
    REVERSE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    HW = H * W
    kk = tl.arange(0, BLOCK_K)[:, None]
    rr = tl.arange(0, BLOCK_H)[None, :]
    k_ok = kk < HID
    wc = tl.arange(0, BLOCK_K)[None, :]
    w_off = kk * HID + wc
    wt_off = wc * HID + kk  # element [k, o] of w[o, k]: the transposed tile
    w_mask = k_ok & (wc < HID)
    g_base = g_ptr + n * 4 * HID * HW
    dg_base = dg_ptr + n * 4 * HID * HW
    y_base = y_ptr + n * HID * HW
    c_base = c_ptr + n * HID * HW
    dy_base = dy_ptr + n * HID * HW
    tile = kk * BLOCK_H + rr
    scratch = scratch_ptr + n * 2 * BLOCK_K * BLOCK_H
    dt = y_ptr.dtype.element_ty
    dh_next = tl.zeros((BLOCK_K, BLOCK_H), dtype=ACC)  # dL/dh(t) from step t+1
    dc_next = tl.zeros((BLOCK_K, BLOCK_H), dtype=ACC)  # dL/dc(t) from step t+1
    for step in range(0, W + H - 1):
        t = W + H - 2 - step
        j, inside, pix, left = _cell_geometry(t, rr, H, W, REVERSE)
        m = k_ok & inside
        has_left = m & (j >= 1)
        y_up = tl.load(y_base + kk * HW + pix - W, mask=m & (rr >= 1), other=0.0)
        y_left = tl.load(y_base + kk * HW + left, mask=has_left, other=0.0)
        a_i = _preact(g_base, w_ptr, 0, kk, pix, m, HID, HW, w_off, w_mask, y_up, y_left, ACC, PRECISION)
        a_f = _preact(g_base, w_ptr, 1, kk, pix, m, HID, HW, w_off, w_mask, y_up, y_left, ACC, PRECISION)
        a_o = _preact(g_base, w_ptr, 2, kk, pix, m, HID, HW, w_off, w_mask, y_up, y_left, ACC, PRECISION)
        a_g = _preact(g_base, w_ptr, 3, kk, pix, m, HID, HW, w_off, w_mask, y_up, y_left, ACC, PRECISION)
        c = tl.load(c_base + kk * HW + pix, mask=m, other=0.0).to(ACC)
        c_left = tl.load(c_base + kk * HW + left, mask=has_left, other=0.0).to(ACC)
        dh = tl.where(m, dh_next + tl.load(dy_base + kk * HW + pix, mask=m, other=0.0).to(ACC), 0.0)
        s_i = sigmoid(a_i)
        s_f = sigmoid(a_f)
        s_o = sigmoid(a_o)
        t_g = tanh(a_g)
        t_c = tanh(c)
        dc = tl.where(m, dc_next + dh * s_o * (1.0 - t_c * t_c), 0.0)
        da_i = dc * t_g * s_i * (1.0 - s_i)
        da_f = dc * c_left * s_f * (1.0 - s_f)
        da_o = dh * t_c * s_o * (1.0 - s_o)
        da_g = dc * s_i * (1.0 - t_g * t_g)
        dg_off = kk * HW + pix
        tl.store(dg_base + dg_off, da_i.to(dt), mask=m)
        tl.store(dg_base + HID * HW + dg_off, da_f.to(dt), mask=m)
        tl.store(dg_base + 2 * HID * HW + dg_off, da_o.to(dt), mask=m)
        tl.store(dg_base + 3 * HID * HW + dg_off, da_g.to(dt), mask=m)
        dc_next = dc * s_f
        da_i = da_i.to(dt)
        da_f = da_f.to(dt)
        da_o = da_o.to(dt)
        da_g = da_g.to(dt)
        # Row i's gradient for the cell above goes to row i-1: shift the tile up one row through scratch.
        up = _input_grad_dot(w_ptr, 0, wt_off, w_mask, HID, da_i, da_f, da_o, da_g, ACC, PRECISION)
        buf = scratch + (step % 2) * BLOCK_K * BLOCK_H
        tl.store(buf + tile, up)
        tl.debug_barrier()
        up_shifted = tl.load(buf + tile + 1, mask=(rr + 1) < BLOCK_H, other=0.0)
        dh_next = _input_grad_dot(w_ptr, 1, wt_off, w_mask, HID, da_i, da_f, da_o, da_g, ACC, PRECISION)
        dh_next += up_shifted


# Launch configuration: one program per batch element; the step loop carries a barrier, so no software
# pipelining (num_stages=1: a prefetched load of y would race with the previous step's store).
def _configs():
    return [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


_KEY = ["HID", "H", "W", "REVERSE"]
_fwd, _FWD_META = tuned(diagonal_lstm_fwd_kernel, _configs(), _KEY, {})
_bwd, _BWD_META = tuned(diagonal_lstm_bwd_kernel, _configs(), _KEY, {})


def _blocks(hid: int, height: int) -> tuple[int, int]:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(hid)), max(16, triton.next_power_of_2(height))


def pack_weight(w_ss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(4h, h, 2) -> (2, 4, h, h): [tap (up, left), gate, out, in], contiguous in the dot dtype."""
    g4, hid, _ = w_ss.shape
    return w_ss.to(dtype).permute(2, 0, 1).reshape(2, 4, hid, hid).contiguous()


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(gates: torch.Tensor, w_ss: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, c) for contiguous gates (N, 4h, H, W) and w_ss (4h, h, 2)."""
    if gates.dtype not in TL_DTYPES:
        raise ValueError(f"the triton backend takes float16/bfloat16/float32/float64, got {gates.dtype}")
    n, g4, height, width = gates.shape
    hid = g4 // 4
    y = torch.empty(n, hid, height, width, dtype=gates.dtype, device=gates.device)
    c = torch.empty(n, hid, height, width, dtype=_state_dtype(gates.dtype), device=gates.device)
    block_k, block_h = _blocks(hid, height)
    _fwd[(n,)](
        gates, pack_weight(w_ss, gates.dtype), y, c,
        hid, height, width,
        REVERSE=reverse, ACC=acc_dtype(gates.dtype), PRECISION=dot_precision(gates.dtype, conv=True),
        BLOCK_K=block_k, BLOCK_H=block_h, **_FWD_META,
    )  # fmt: skip
    return y, c


def backward(
    grad: torch.Tensor, gates: torch.Tensor, w_ss: torch.Tensor, y: torch.Tensor, c: torch.Tensor, reverse: bool
) -> torch.Tensor:
    """dgates (N, 4h, H, W) in gates' dtype; every input contiguous."""
    n, g4, height, width = gates.shape
    hid = g4 // 4
    block_k, block_h = _blocks(hid, height)
    dgates = torch.empty_like(gates)
    scratch = torch.empty(n, 2, block_k, block_h, dtype=_state_dtype(gates.dtype), device=gates.device)
    _bwd[(n,)](
        grad, gates, pack_weight(w_ss, gates.dtype), y, c, dgates, scratch,
        hid, height, width,
        REVERSE=reverse, ACC=acc_dtype(gates.dtype), PRECISION=dot_precision(gates.dtype, conv=True),
        BLOCK_K=block_k, BLOCK_H=block_h, **_BWD_META,
    )  # fmt: skip
    return dgates
