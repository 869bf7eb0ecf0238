"""Triton kernels for diagonal_lstm: the whole diagonal scan in one launch per pass.

For skewed column t and image row i (pixel (i, j = t - i), column j counted right to left when REVERSE):
    a[g*h + o, i] = gates[n, g*h + o, i, j] + sum_k w_up[g, o, k] * h[k, (i-1, j)] + w_left[g, o, k] * h[k, (i, j-1)]
    c = sigmoid(a_f) * c_left + sigmoid(a_i) * tanh(a_g);   h = sigmoid(o) * tanh(c)
with gate order i, f, o, g; state zero outside the image (see gm.reference.diagonal_lstm).

Shapes: gates (N, 4h, H, W) channels-last (memory (N, H, W, 4h), pixels GS >= 4h elements apart: GS = 8h for a
direction's half of gm.nn.DiagonalBiLSTM's (N, H, W, 8h) input conv output, read in place); packed weight
(2, 4, h, h) = [tap (up, left), gate, out, in] in the input dtype; y (N, h, H, W) in the input dtype; the saved state
(N, 5h, H, W) float32 (float64 for float64): per pixel [c, sigmoid(a_i), sigmoid(a_f), sigmoid(a_o), tanh(a_g)],
each h channels; all three channels-last. The gate gradients have the gates' layout (pixels GS apart). Channels-last
because the scan's tiles are (channels x image rows) at one skewed column: in NCHW every element of such a tile lies
in its own 128-byte line (rows W elements apart), in NHWC each row's channels are one contiguous run. forward() /
backward() take and return NCHW tensors, converting with tiled transposes (gm.kernels._layout);
forward_channels_last() / backward_into() take channels-last ones as they are.

One program per batch element loops over the W+H-1 skewed columns (the whole diagonal is coupled, so no grid
sync: one barrier per step). The skew is addressing: gates and outputs are read and written at (i, t - i) directly.
Inside a step the program loops over blocks of BO hidden units: for each, the four gate pre-activations
(BO x BLOCK_H, image rows on the second axis) = gates + w[up, g][block, :] @ y(above) + w[left, g][block, :] @
y(left), a loop over both taps' input channels in BK chunks on tensor cores. Nothing is carried in registers
across steps: the previous diagonal's h is read back from y (this program wrote it in the previous step; L1/L2
hits) and c_left from c, so the live set is four (BO x BLOCK_H) accumulators plus one chunk of operands, which
keeps the kernels spill-free at h = 128 (a register-resident (h x H) state with full (h x h) weight tiles spilled
kilobytes). The dot operands are the input dtype (h rounded as y stores it), accumulation and state are float32.

Backward walks the steps in reverse, in pull form, from what the forward saved: c and the four gate activations of
every pixel (5h values, the forward's only extra stores), so no gate pre-activation is recomputed (that was a second
weight stream and a second set of dots per step, doubling the backward's per-step latency). Per step t and block of
units: dh = dy + sum_g w[up, g]^T @ da_g(pixel below) + sum_g w[left, g]^T @ da_g(pixel right), both da on diagonal
t+1, read back from dgates (written by this program in the previous step; a transposed copy of the weight makes those
tiles contiguous); dc(i, j+1) * sigmoid(f(i, j+1)) comes through a small per-program float32 scratch (hidden x rows,
double-buffered by step parity). dw_ss = sum over pixels of da (x) (y above, y left) is one GEMM over dgates and y
after the kernel, on their NCHW or channels-last layouts (gm.kernels.row_lstm.weight_grad with the diagonal taps).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from gm._ext import packed
from gm.kernels._common import (
    TL_DTYPES,
    acc_dtype,
    by_element_size,
    dot_precision,
    next_power_of_2,
    sigmoid,
    suits,
    tanh,
    tuned,
)
from gm.kernels._launch import fast
from gm.kernels._layout import channels_last, gather, nchw


@triton.jit
def _cell_geometry(t, rr, H, W, REVERSE: tl.constexpr):
    """At skewed step t, for each tile column rr (an image row): (j, inside, offset of the pixel, of its left
    neighbour, of its right neighbour), left/right in scan order (mirrored in memory when REVERSE)."""
    j = t - rr
    inside = (rr < H) & (j >= 0) & (j < W)
    if REVERSE:
        pix = rr * W + (W - 1 - j)
        left = pix + 1
        right = pix - 1
    else:
        pix = rr * W + j
        left = pix - 1
        right = pix + 1
    return j, inside, pix, left, right


@triton.jit
def _gate_preacts(g_base, w_ptr, y_base, o, o_ok, m, pix, up, left, has_up, has_left, HID, GS,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """The four gate pre-activations of output units o, a (BO, BLOCK_H) tile each in ACC:
    gates[g, o] + w[up, g][o, :] @ y(pixel above) + w[left, g][o, :] @ y(pixel left), the state read back from y.

    One loop over both taps' input channels in BK chunks (each tap padded to a multiple of BK): an iteration holds
    four (BO, BK) weight tiles and one (BK, BLOCK_H) state tile."""
    g_at = g_base + pix * GS + o  # channels-last: a pixel's 4h gate values are contiguous
    a_i = tl.load(g_at, mask=m, other=0.0).to(ACC)
    a_f = tl.load(g_at + HID, mask=m, other=0.0).to(ACC)
    a_o = tl.load(g_at + 2 * HID, mask=m, other=0.0).to(ACC)
    a_g = tl.load(g_at + 3 * HID, mask=m, other=0.0).to(ACC)
    kr = tl.arange(0, BK)[:, None]
    kc = tl.arange(0, BK)[None, :]
    kp = tl.cdiv(HID, BK) * BK
    gs = HID * HID  # one (gate, tap) block of the packed weight
    for kk in range(0, 2 * kp, BK):
        tap = kk // kp
        k0 = kk - tap * kp
        k = k0 + kr
        src = tl.where(tap == 0, up, left)
        ok = tl.where(tap == 0, has_up, has_left)
        h = tl.load(y_base + src * HID + k, mask=(k < HID) & ok, other=0.0)
        w_tap = w_ptr + tap * 4 * gs + o * HID + (k0 + kc)
        w_mask = o_ok & ((k0 + kc) < HID)
        a_i = tl.dot(tl.load(w_tap, mask=w_mask, other=0.0), h, a_i, input_precision=PRECISION, out_dtype=ACC)
        a_f = tl.dot(tl.load(w_tap + gs, mask=w_mask, other=0.0), h, a_f, input_precision=PRECISION, out_dtype=ACC)
        a_o = tl.dot(tl.load(w_tap + 2 * gs, mask=w_mask, other=0.0), h, a_o, input_precision=PRECISION,
                     out_dtype=ACC)  # fmt: skip
        a_g = tl.dot(tl.load(w_tap + 3 * gs, mask=w_mask, other=0.0), h, a_g, input_precision=PRECISION,
                     out_dtype=ACC)  # fmt: skip
    return a_i, a_f, a_o, a_g


@triton.jit
def diagonal_lstm_fwd_kernel(
    g_ptr, w_ptr, y_ptr, s_ptr,
    HID, H, W, GS,
    REVERSE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    HW = H * W
    oo = tl.arange(0, BO)[:, None]
    rr = tl.arange(0, BLOCK_H)[None, :]
    g_base = g_ptr + n * GS * HW
    y_base = y_ptr + n * HID * HW
    s_base = s_ptr + n * 5 * HID * HW  # per pixel [c, s_i, s_f, s_o, t_g]
    for t in range(0, W + H - 1):
        j, inside, pix, left, right = _cell_geometry(t, rr, H, W, REVERSE)
        has_up = inside & (rr >= 1)
        has_left = inside & (j >= 1)
        # Step t reads only diagonal t-1 of y and c (complete: barrier at the end of step t-1) and writes diagonal t.
        for o0 in range(0, HID, BO):
            o = o0 + oo
            o_ok = o < HID
            m = o_ok & inside
            a_i, a_f, a_o, a_g = _gate_preacts(g_base, w_ptr, y_base, o, o_ok, m, pix, pix - W, left, has_up,
                                               has_left, HID, GS, ACC, PRECISION, BK)  # fmt: skip
            c_left = tl.load(s_base + left * (5 * HID) + o, mask=o_ok & has_left, other=0.0).to(ACC)
            s_i = sigmoid(a_i)
            s_f = sigmoid(a_f)
            s_o = sigmoid(a_o)
            t_g = tanh(a_g)
            c = s_f * c_left + s_i * t_g
            h = s_o * tanh(c)
            tl.store(y_base + pix * HID + o, h.to(y_ptr.dtype.element_ty), mask=m)
            st = s_base + pix * (5 * HID) + o
            tl.store(st, c, mask=m)
            tl.store(st + HID, s_i, mask=m)
            tl.store(st + 2 * HID, s_f, mask=m)
            tl.store(st + 3 * HID, s_o, mask=m)
            tl.store(st + 4 * HID, t_g, mask=m)
        tl.debug_barrier()


@triton.jit
def _state_grad(dy_base, dg_base, wt_ptr, o, o_ok, m, pix, down, right, has_down, has_right, HID, GS,
                ACC: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """dL/dh for units o, a (BO, BLOCK_H) tile in ACC: dy + sum_g w[up, g]^T @ da_g(pixel below)
    + sum_g w[left, g]^T @ da_g(pixel right), the da read back from dgates (written in the previous backward step).
    wt is the packed weight transposed per (tap, gate): wt[tap, g][o, k] = w[tap, g][k, o]."""
    dh = tl.load(dy_base + pix * HID + o, mask=m, other=0.0).to(ACC)
    kr = tl.arange(0, BK)[:, None]
    kc = tl.arange(0, BK)[None, :]
    kp = tl.cdiv(HID, BK) * BK
    gs = HID * HID
    for kk in range(0, 2 * kp, BK):
        tap = kk // kp
        k0 = kk - tap * kp
        k = k0 + kr
        src = tl.where(tap == 0, down, right)
        ok = (k < HID) & tl.where(tap == 0, has_down, has_right)
        da = dg_base + src * GS + k
        w_tap = wt_ptr + tap * 4 * gs + o * HID + (k0 + kc)
        w_mask = o_ok & ((k0 + kc) < HID)
        dh = tl.dot(tl.load(w_tap, mask=w_mask, other=0.0), tl.load(da, mask=ok, other=0.0), dh,
                    input_precision=PRECISION, out_dtype=ACC)  # fmt: skip
        dh = tl.dot(tl.load(w_tap + gs, mask=w_mask, other=0.0), tl.load(da + HID, mask=ok, other=0.0), dh,
                    input_precision=PRECISION, out_dtype=ACC)  # fmt: skip
        dh = tl.dot(tl.load(w_tap + 2 * gs, mask=w_mask, other=0.0), tl.load(da + 2 * HID, mask=ok, other=0.0),
                    dh, input_precision=PRECISION, out_dtype=ACC)  # fmt: skip
        dh = tl.dot(tl.load(w_tap + 3 * gs, mask=w_mask, other=0.0), tl.load(da + 3 * HID, mask=ok, other=0.0),
                    dh, input_precision=PRECISION, out_dtype=ACC)  # fmt: skip
    return dh


@triton.jit
def diagonal_lstm_bwd_kernel(
    dy_ptr, wt_ptr, s_ptr, dg_ptr, scratch_ptr,
    HID, H, W, GS,
    REVERSE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    HW = H * W
    oo = tl.arange(0, BO)[:, None]
    rr = tl.arange(0, BLOCK_H)[None, :]
    dg_base = dg_ptr + n * GS * HW
    s_base = s_ptr + n * 5 * HID * HW
    dy_base = dy_ptr + n * HID * HW
    # dc(i, j+1) * sigmoid(f(i, j+1)) per (unit, row), double-buffered by step parity.
    scratch = scratch_ptr + n * 2 * HID * BLOCK_H
    dt = dg_ptr.dtype.element_ty
    for step in range(0, W + H - 1):
        t = W + H - 2 - step
        j, inside, pix, left, right = _cell_geometry(t, rr, H, W, REVERSE)
        has_left = inside & (j >= 1)
        has_down = inside & (rr + 1 < H)
        has_right = inside & (j + 1 < W)
        dc_in = scratch + ((step + 1) % 2) * HID * BLOCK_H  # written in step - 1 (diagonal t + 1)
        dc_out = scratch + (step % 2) * HID * BLOCK_H
        # Step t reads diagonal t+1 of dgates and dc_in (complete: barrier at the end of the previous step) and
        # writes diagonal t.
        for o0 in range(0, HID, BO):
            o = o0 + oo
            o_ok = o < HID
            m = o_ok & inside
            dh = _state_grad(dy_base, dg_base, wt_ptr, o, o_ok, m, pix, pix + W, right, has_down, has_right, HID,
                             GS, ACC, PRECISION, BK)  # fmt: skip
            st = s_base + pix * (5 * HID) + o
            c = tl.load(st, mask=m, other=0.0).to(ACC)
            s_i = tl.load(st + HID, mask=m, other=0.0).to(ACC)
            s_f = tl.load(st + 2 * HID, mask=m, other=0.0).to(ACC)
            s_o = tl.load(st + 3 * HID, mask=m, other=0.0).to(ACC)
            t_g = tl.load(st + 4 * HID, mask=m, other=0.0).to(ACC)
            c_left = tl.load(s_base + left * (5 * HID) + o, mask=o_ok & has_left, other=0.0).to(ACC)
            tile = o * BLOCK_H + rr
            dc_right = tl.load(dc_in + tile, mask=o_ok & has_right, other=0.0)
            t_c = tanh(c)
            dc = dc_right + dh * s_o * (1.0 - t_c * t_c)
            dg_off = pix * GS + o
            tl.store(dg_base + dg_off, (dc * t_g * s_i * (1.0 - s_i)).to(dt), mask=m)
            tl.store(dg_base + HID + dg_off, (dc * c_left * s_f * (1.0 - s_f)).to(dt), mask=m)
            tl.store(dg_base + 2 * HID + dg_off, (dh * t_c * s_o * (1.0 - s_o)).to(dt), mask=m)
            tl.store(dg_base + 3 * HID + dg_off, (dc * s_i * (1.0 - t_g * t_g)).to(dt), mask=m)
            tl.store(dc_out + tile, dc * s_f, mask=m)
        tl.debug_barrier()


# Launch configuration: one program per batch element, a barrier at the end of every step. Triton pipelines only
# innermost loops (here the channel loops inside a block), and their prologue runs inside the step, after the
# previous step's barrier, so num_stages > 1 never prefetches y, c or dgates across a step: it only streams the
# weight chunks (and the previous diagonal's tiles) through shared memory with cp.async. num_stages=1 loads the
# weights with ordinary (L1-cached) loads instead, which may win where they fit in L1 (h = 64). Every config is
# spill-free on sm_90 in float32 and bfloat16 and fits in shared memory in float32 (python -m bench.aot --ops
# diagonal_lstm; numbers in bench/NOTES.md); the first (also used when autotuning is off) fits float64 too.
# (BO output units, BK input channels per chunk, warps, stages).
_FWD_CONFIGS = [(64, 32, 4, 1), (64, 64, 8, 1), (64, 32, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3)]
_BWD_CONFIGS = [(64, 32, 8, 1), (32, 32, 8, 1), (64, 16, 8, 2), (64, 64, 8, 1), (64, 16, 8, 3)]


def _configs(table):
    """Configs from (BO, BK, warps, stages); those whose pipelined float64 tiles exceed shared memory (sm_90, Triton
    3.6) are left out for float64."""
    no_fp64 = {(64, 64, 8, 3), (128, 32, 8, 3)}
    return [suits(triton.Config({"BO": bo, "BK": bk}, num_warps=w, num_stages=s),
                  (2, 4) if (bo, bk, w, s) in no_fp64 else (2, 4, 8))
            for bo, bk, w, s in table]  # fmt: skip


_KEY = ["HID", "H", "W", "REVERSE"]
# Under the interpreter: 16-wide blocks, so hidden sizes above 16 run several output blocks and channel chunks.
_INTERPRETED_META = {"BO": 16, "BK": 16}
_fwd, _FWD_META = tuned(diagonal_lstm_fwd_kernel, _configs(_FWD_CONFIGS), _KEY, _INTERPRETED_META,
                        prune=by_element_size)  # fmt: skip
_bwd, _BWD_META = tuned(diagonal_lstm_bwd_kernel, _configs(_BWD_CONFIGS), _KEY, _INTERPRETED_META,
                        prune=by_element_size)  # fmt: skip


def _block_h(height: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, next_power_of_2(height))


def pack_weight(w_ss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(4h, h, 2) -> (2, 4, h, h): [tap (up, left), gate, out, in], contiguous in the dot dtype."""
    g4, hid, _ = w_ss.shape
    return w_ss.to(dtype).permute(2, 0, 1).reshape(2, 4, hid, hid).contiguous()


@functools.lru_cache(maxsize=64)
def _pack_index(hid: int, device: torch.device) -> torch.Tensor:
    """int32 positions in w_ss.view(-1) of both passes' operands: the forward's pack_weight layout [tap, gate, out,
    in], then the backward's [tap, gate, in, out]."""
    flat = torch.arange(4 * hid * hid * 2, dtype=torch.int32).view(4, hid, hid, 2)  # [gate, out, in, tap]
    fwd, bwd = flat.permute(3, 0, 1, 2), flat.permute(3, 0, 2, 1)
    return torch.cat((fwd.reshape(-1), bwd.reshape(-1))).to(device)


def packed_weights(w_ss: torch.Tensor, dtype: torch.dtype, *, fresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward operand in `dtype`, backward operand in w_ss' dtype), each (2, 4, h, h), the backward's with its
    last two dims swapped: one gather launch for both where the dtypes agree (gm.kernels._layout.gather), made by
    the forward (fresh=True) and reused by its backward (gm._ext.packed: unless w_ss changed since)."""

    def pack():
        hid = w_ss.shape[1]
        idx = _pack_index(hid, w_ss.device)
        if dtype == w_ss.dtype:
            both = gather(w_ss, idx).view(2, 2, 4, hid, hid)
            return both[0], both[1]
        half = idx.numel() // 2
        return (gather(w_ss.to(dtype), idx[:half]).view(2, 4, hid, hid),
                gather(w_ss, idx[half:]).view(2, 4, hid, hid))  # fmt: skip

    return packed(w_ss, ("diagonal_lstm_triton", dtype), pack, fresh=fresh)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launcher(tuned_kernel, raw_kernel, meta: dict, config: tuple | None):
    """The tuned launch, or with config = (BO, BK, warps, stages) that one config (tests check every config)."""
    if config is None:
        return tuned_kernel, meta
    bo, bk, warps, stages = config
    return raw_kernel, {"BO": bo, "BK": bk, "num_warps": warps, "num_stages": stages}


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C) contiguous: a view when t is channels_last already, else a tiled copy."""
    return channels_last(t).permute(0, 2, 3, 1)


def _check_dtype(gates: torch.Tensor) -> None:
    if gates.dtype not in TL_DTYPES:
        raise ValueError(f"the triton backend takes float16/bfloat16/float32/float64, got {gates.dtype}")


def forward(
    gates: torch.Tensor, w_ss: torch.Tensor, reverse: bool, config: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (N, h, H, W) NCHW-contiguous, state (N, 5h, H, W) channels-last: [c, sigmoid(i), sigmoid(f), sigmoid(o),
    tanh(g)] for backward()) for gates (N, 4h, H, W) and w_ss (4h, h, 2); config: one of _FWD_CONFIGS (None:
    tuned). The kernel writes channels-last; y's layout copy is a tiled transpose."""
    _check_dtype(gates)  # before the layout copy
    y, state = forward_channels_last(_nhwc(gates), w_ss, reverse, gates.shape[1], config)
    return nchw(y.permute(0, 3, 1, 2)), state.permute(0, 3, 1, 2)


def forward_channels_last(
    gates: torch.Tensor, w_ss: torch.Tensor, reverse: bool, gate_stride: int, config: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (N, H, W, h) in gates' dtype, state (N, H, W, 5h) in the state dtype) for channels-last gates (N, H, W, 4h)
    whose pixels lie gate_stride elements apart (images gate_stride * H * W apart: a channel slice of a wider
    channels-last tensor too), read as they are; w_ss and config as forward()'s."""
    _check_dtype(gates)
    n, height, width, g4 = gates.shape
    hid = g4 // 4
    if max(5 * hid, gate_stride) * height * width >= 2**31:  # in-image offsets are int32 (state: 5h channels)
        raise ValueError(f"the triton backend takes max(5h, gate pixel stride {gate_stride})*H*W < 2**31 per image, "
                         f"got channels-last gates of shape {tuple(gates.shape)}")  # fmt: skip
    y = torch.empty(n, height, width, hid, dtype=gates.dtype, device=gates.device)
    state = torch.empty(n, height, width, 5 * hid, dtype=_state_dtype(gates.dtype), device=gates.device)
    kernel, meta = _launcher(_fwd, diagonal_lstm_fwd_kernel, _FWD_META, config)
    fast(kernel)[(n,)](
        gates, packed_weights(w_ss, gates.dtype, fresh=True)[0], y, state,
        hid, height, width, gate_stride,
        REVERSE=reverse, ACC=acc_dtype(gates.dtype), PRECISION=dot_precision(gates.dtype, conv=True),
        BLOCK_H=_block_h(height), **meta,
    )  # fmt: skip
    return y, state


def backward(
    grad: torch.Tensor, w_ss: torch.Tensor, state: torch.Tensor, reverse: bool, config: tuple | None = None
) -> torch.Tensor:
    """dgates (N, 4h, H, W) in w_ss' dtype, NCHW-contiguous, from grad (N, h, H, W) in any layout and forward()'s
    state; config: one of _BWD_CONFIGS (None: tuned)."""
    n, h5, height, width = state.shape
    dgates = torch.empty(n, height, width, 4 * (h5 // 5), dtype=w_ss.dtype, device=w_ss.device)
    backward_into(_nhwc(grad.to(w_ss.dtype)), dgates, w_ss, _nhwc(state), reverse, dgates.shape[3], config)
    return nchw(dgates.permute(0, 3, 1, 2))


def backward_into(
    dy: torch.Tensor, dgates: torch.Tensor, w_ss: torch.Tensor, state: torch.Tensor, reverse: bool, gate_stride: int,
    config: tuple | None = None,
) -> None:  # fmt: skip
    """Writes dgates (N, H, W, 4h) in w_ss' dtype, channels-last with pixels gate_stride elements apart (as
    forward_channels_last's gates), from dy (N, H, W, h) contiguous in w_ss' dtype and forward_channels_last's state
    (N, H, W, 5h); config as backward()'s."""
    n, height, width, g4 = dgates.shape
    hid = g4 // 4
    block_h = _block_h(height)
    w = packed_weights(w_ss, w_ss.dtype, fresh=False)[1]  # the forward's, unless w_ss changed since
    # Per program: dc * sigmoid(f) of the last diagonal, (hidden, image row), two buffers (step parity).
    scratch = torch.empty(n, 2, hid, block_h, dtype=state.dtype, device=state.device)
    kernel, meta = _launcher(_bwd, diagonal_lstm_bwd_kernel, _BWD_META, config)
    fast(kernel)[(n,)](
        dy, w, state, dgates, scratch,
        hid, height, width, gate_stride,
        REVERSE=reverse, ACC=acc_dtype(w_ss.dtype), PRECISION=dot_precision(w_ss.dtype, conv=True),
        BLOCK_H=block_h, **meta,
    )  # fmt: skip
