"""Triton kernels for masked_conv2d: implicit GEMM over the kept taps only.

Forward, for each output pixel p = (n, h, w) and output channel o:
    y[n, o, h, w] = bias[o] + sum_{t < T} sum_c x[n, c, h + dy_t, w + dx_t] * Wp[t, c, o]
where (dy_t, dx_t) are the kept taps in row-major order (rows above the centre, then the centre row left of the
centre, then the centre tap when it has connections) and Wp (T, C_in, C_out) is the packed weight
(gm.ops.masked_conv.pack_weight). Out-of-image taps read zero ('same' padding). A GEMM of M = N*H*W rows,
N = C_out columns and K = T*C_in: the masked-out taps are never loaded or multiplied.

Input gradient: the same kernel with the taps negated (FLIP) on grad (N, C_out, H, W) and Wp transposed
(T, C_out, C_in). Weight gradient: dWp[t, c, o] = sum_p x[p + off_t, c] * grad[p, o], split over pixels into
fp32 partial sums; one more pass adds them and scatters them into the (C_out, C_in, kh, kw) weight layout in the
weight's dtype (zeros at masked taps).

The launchers hand the kernels channels_last (NHWC) inputs, converting NCHW ones (gm.kernels._layout), so the
channel dimension is contiguous: 16-byte loads along K of the implicit GEMM. Outputs keep the input's memory format
(gm._memory_format): channels-last in, channels-last out, so a channels-last model converts nothing.
Both GEMMs address the dense channels-last operands linearly in the pixel index (the tap's input pixel of p sits at
(p + dy*W + dx)*C), with H and W constexprs, so only the in-image test needs (h, w); offsets are int32 unless a
tensor reaches 2**31 elements (WIDE, int64). sm_90 SASS per warp and k-step (7x7 A, C=256, bf16, 128x128x64, Triton
3.6): weight gradient 360 -> 158, forward 211 -> 167 (session 8; tests/test_triton_sass_budgets.py).

Measured on an H200 (bench/results/2026-11-27_h200_run1_masked_conv.log, NCHW-strided version): forward 7x7 mask A
N=128 C=256 bf16 1.755 ms vs cuDNN on the masked weight 1.836 ms; the weight gradient with int64 index math in its
pixel loop made forward+backward 37 ms (cuDNN 4.5 ms), hence the int32 pixel math and NHWC operands now.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from gm.kernels._common import (
    INTERPRETED,
    TL_DTYPES,
    acc_dtype,
    all_of,
    by_element_size,
    cdiv,
    dot_precision,
    fits_smem,
    int32_offsets,
    sm_slots,
    suits,
    tuned,
    wave_splits,
)  # fmt: skip
from gm.kernels._launch import fast
from gm.kernels._layout import channels_last

from gm._memory_format import format_of


@triton.jit
def _tap_offset(t, KH: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr):
    rows_above: tl.constexpr = KH // 2
    full: tl.constexpr = rows_above * KW
    is_full = t < full
    dy = tl.where(is_full, t // KW - rows_above, 0)
    dx = tl.where(is_full, t % KW - KW // 2, t - full - KW // 2)
    if FLIP:
        dy = -dy
        dx = -dx
    return dy, dx


@triton.jit
def _centre_span(centre_ptr, o, o_ok, ROWS):
    """The union [lo, hi) of the centre ranges (gm.ops.masked_conv.CentreRanges rows) of channels o; lo >= hi when
    none of them connects anything at the centre."""
    lo = tl.min(tl.load(centre_ptr + 2 * o, mask=o_ok, other=ROWS), axis=0)
    hi = tl.max(tl.load(centre_ptr + 2 * o + 1, mask=o_ok, other=0), axis=0)
    return lo, hi


@triton.jit
def masked_conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, gate_ptr, centre_ptr,
    N, H: tl.constexpr, W: tl.constexpr, CIN, COUT, T,
    syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RELU_IN: tl.constexpr = False, GATE: tl.constexpr = False, RES: tl.constexpr = False,
    CENTRE: tl.constexpr = False,
):  # fmt: skip
    # Fusions for a residual block of ReLU -> conv layers (constexprs, off by default): RELU_IN applies ReLU to x as
    # the A tile is loaded (conv(relu(x))); GATE zeroes the output where gate (at the output's offsets) is not
    # positive (the input gradient of relu(h) -> conv: ReLU's derivative in the epilogue); RES adds r (at the
    # output's offsets) before the store (the residual: x + conv(...), or the residual's gradient in dx).
    # x is dense channels-last (the launcher makes it so): pixel m = (n*H + h)*W + w sits at m*C_in, and the tap's
    # input pixel at (m + dy*W + dx)*C_in wherever it lies inside the image, so the A tile's addresses are linear in
    # m and only the in-image test needs (h, w), computed once (H and W constexprs: multiply-shifts). The tap and
    # channel block advance as loop-carried counters, not a division per k-step. Offsets in int32 unless WIDE (the
    # launcher's choice for tensors of 2**31 elements). sm_90 SASS per warp and k-step (7x7 A, C=256, bf16,
    # 128x128x64 tiles): 211 instructions before (int64 per-row bases, strided offsets, i // n_kc), see bench/NOTES.md.
    # CENTRE (colour groups): centre_ptr holds, per output channel, the range [lo, hi) of reduction channels that the
    # centre tap (the last kept tap) connects; the program reduces the centre over its channels' joint range alone, so
    # the forbidden colour pairs' zeros (about a quarter of a 1x1 mask-B layer's products) are not multiplied.
    pid = tl.program_id(0)
    num_n = tl.cdiv(COUT, BLOCK_N)
    pid_m = pid // num_n  # consecutive programs share the input tile
    pid_n = pid % num_n
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < N * H * W
    o_ok = o < COUT
    h = (m // W) % H
    w = m % W
    # Rows past the last pixel get a row index that fails every tap's in-image test (|dy| <= KH // 2), so the test
    # is two unsigned compares a row: (h + dy) and (w + dx) below H and W.
    h_test = tl.where(m_ok, h, H + KH)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    n_kc = tl.cdiv(CIN, BLOCK_K)
    t = 0
    c0 = 0
    steps = T * n_kc
    if CENTRE:
        lo, hi = _centre_span(centre_ptr, o, o_ok, CIN)
        kc_lo = lo // BLOCK_K
        kc_hi = tl.maximum(tl.cdiv(hi, BLOCK_K), kc_lo)
        c_centre = kc_lo * BLOCK_K
        steps = (T - 1) * n_kc + kc_hi - kc_lo
        c0 = tl.where(T == 1, c_centre, 0)
    for _ in range(0, steps):
        dy, dx = _tap_offset(t, KH, KW, FLIP)
        c = c0 + k
        c_ok = c < CIN
        row_ok = ((h_test + dy).to(tl.uint32, bitcast=True) < H) & ((w + dx).to(tl.uint32, bitcast=True) < W)
        q = m + (dy * W + dx)
        if WIDE:
            q = q.to(tl.int64)
        a = tl.load(x_ptr + q[:, None] * CIN + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        if RELU_IN:
            a = tl.where(a < 0, 0.0, a).to(a.dtype)  # NaN stays NaN, as torch's relu
        b = tl.load(w_ptr + (t * CIN + c)[:, None] * COUT + o[None, :], mask=c_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        wrap = c0 + BLOCK_K >= CIN
        t = tl.where(wrap, t + 1, t)
        if CENTRE:
            c0 = tl.where(wrap, tl.where(t == T - 1, c_centre, 0), c0 + BLOCK_K)
        else:
            c0 = tl.where(wrap, 0, c0 + BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(ACC)[None, :]
    n = m // (H * W)
    y_off = (n.to(tl.int64) * syn + h * syh + w * syw)[:, None] + o[None, :] * syc
    y_ok = m_ok[:, None] & o_ok[None, :]
    if GATE:
        acc = tl.where(tl.load(gate_ptr + y_off, mask=y_ok, other=0.0) > 0, acc, 0.0)
    if RES:
        acc += tl.load(r_ptr + y_off, mask=y_ok, other=0.0).to(ACC)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_ok)


@triton.jit
def masked_conv_wgrad_kernel(
    x_ptr, g_ptr, dw_ptr, db_ptr, centre_ptr,
    N, H: tl.constexpr, W: tl.constexpr, CIN, COUT, T,
    KH: tl.constexpr, KW: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
    RELU_IN: tl.constexpr = False, HAS_DB: tl.constexpr = False, CENTRE: tl.constexpr = False,
):  # fmt: skip
    # RELU_IN: the gradient of conv(relu(x)), ReLU applied to x as its tile is loaded (off by default). HAS_DB: the
    # programs of the first tap and channel block also sum the grad tiles they load over the pixels, the bias
    # gradient's partial sum of their split (db_ptr: (splits, C_out)), so no separate reduction reads grad again.
    # x and grad are dense channels-last (the launcher makes them so): pixel p = (n*H + h)*W + w sits at p*C, and the
    # tap's input pixel at (p + dy*W + dx)*C_in wherever it lies inside the image. So both tiles' addresses are linear
    # in p; only the in-image test needs (h, w), and with H and W constexprs that is multiply-shifts, not the runtime
    # divisions of the earlier version (17 div.s32 in its sm_90 PTX, 360 SASS instructions per warp and k-step
    # against the forward's 211). Offsets in int32 unless WIDE (the launcher's choice: a tensor of 2**31 elements).
    pid_tc = tl.program_id(0)
    pid_o = tl.program_id(1)
    split = tl.program_id(2)
    num_c = tl.cdiv(CIN, BLOCK_C)
    t = pid_tc // num_c
    c = (pid_tc % num_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    c_ok = c < CIN
    o_ok = o < COUT
    dy, dx = _tap_offset(t, KH, KW, False)
    shift = dy * W + dx
    total = N * H * W
    # The launcher picks the number of splits (grid z) per config: each takes an equal, BLOCK_P-aligned range.
    pixels_per_split = tl.cdiv(tl.cdiv(total, tl.num_programs(2)), BLOCK_P) * BLOCK_P
    start = split * pixels_per_split
    end = tl.minimum(start + pixels_per_split, total)
    if CENTRE:  # the forward's ranges: a centre-tap tile whose C_in block lies outside its C_out block's range is zero
        lo, hi = _centre_span(centre_ptr, o, o_ok, CIN)
        c_first = (pid_tc % num_c) * BLOCK_C
        outside = (t == T - 1) & ((c_first >= hi) | (c_first + BLOCK_C <= lo))
        if HAS_DB:
            outside = outside & (pid_tc != 0)  # the bias gradient's programs sum every pixel
        end = tl.where(outside, start, end)
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=ACC)
    db = tl.zeros((BLOCK_O,), dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < end
        h = (p // W) % H
        w = p % W
        in_ok = p_ok & ((h + dy).to(tl.uint32, bitcast=True) < H) & ((w + dx).to(tl.uint32, bitcast=True) < W)
        q = p + shift
        if WIDE:
            q = q.to(tl.int64)
            p = p.to(tl.int64)
        a = tl.load(x_ptr + q[None, :] * CIN + c[:, None], mask=c_ok[:, None] & in_ok[None, :], other=0.0)
        if RELU_IN:
            a = tl.where(a < 0, 0.0, a).to(a.dtype)
        b = tl.load(g_ptr + p[:, None] * COUT + o[None, :], mask=p_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        if HAS_DB:
            if pid_tc == 0:
                db += tl.sum(b.to(ACC), axis=0)
    if HAS_DB:
        if pid_tc == 0:
            tl.store(db_ptr + split * COUT + o, db, mask=o_ok)
    out = dw_ptr + ((split * T + t).to(tl.int64) * CIN + c[:, None]) * COUT + o[None, :]
    tl.store(out, acc, mask=c_ok[:, None] & o_ok[None, :])


@triton.jit
def masked_conv_wgrad_unpack_kernel(
    part_ptr, tap_ptr, keep_ptr, dw_ptr, dbp_ptr, db_ptr,
    S, T, CIN, COUT, KK,
    HAS_KEEP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, HAS_DB: tl.constexpr = False,
):  # fmt: skip
    """dw[o, c, pos] (C_out, C_in, kh*kw) in the weight's dtype = sum over the S splits of partial[s, t, c, o] for
    the kept tap t = tap[pos] (times keep[t, c, o] at the centre tap's forbidden channel pairs), exactly zero at
    masked-out positions (tap[pos] = -1): the split sum, the scatter to the weight layout and the cast in one pass."""
    pos = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    ok = (c[:, None] < CIN) & (o[None, :] < COUT)
    t = tl.load(tap_ptr + pos)
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=part_ptr.dtype.element_ty)
    if t >= 0:
        off = (t * CIN + c[:, None]).to(tl.int64) * COUT + o[None, :]
        for s in range(0, S):
            acc += tl.load(part_ptr + s * T * CIN * COUT + off, mask=ok, other=0.0)
        if HAS_KEEP:
            acc = tl.where(tl.load(keep_ptr + off, mask=ok, other=0) != 0, acc, 0.0)
    dst = dw_ptr + (o[None, :].to(tl.int64) * CIN + c[:, None]) * KK + pos
    tl.store(dst, acc.to(dw_ptr.dtype.element_ty), mask=ok)
    if HAS_DB:  # the bias gradient: the weight-gradient programs' split partial sums (HAS_DB there), added here
        if (pos == 0) & (tl.program_id(1) == 0):
            o_ok = o < COUT
            db = tl.zeros((BLOCK_O,), dtype=dbp_ptr.dtype.element_ty)
            for s in range(0, S):
                db += tl.load(dbp_ptr + s * COUT + o, mask=o_ok, other=0.0)
            tl.store(db_ptr + o, db.to(db_ptr.dtype.element_ty), mask=o_ok)


# Launch configurations. Interpreted: small blocks (each program is a numpy loop). On a GPU: chosen by
# autotuning over a short list keyed on the problem shape.
_FWD_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
_WGRAD_INTERP = dict(BLOCK_C=16, BLOCK_O=16, BLOCK_P=32)


# The last config of each list is float64's alone: none of the others fits its 8-byte tiles in shared memory.
_NOT_FP64, _FP64 = (2, 4), (8,)


def _fwd_configs():
    shapes = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3)]
    return [
        suits(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=nw, num_stages=ns), sizes)
        for bm, bn, bk, nw, ns, sizes in [(*s, _NOT_FP64) for s in shapes] + [(64, 64, 32, 4, 2, _FP64)]
    ]


def _wgrad_configs():
    # (128, 256, 64): a quarter less operand traffic per MFLOP than 128x128 tiles, for the wide layers (session 8)
    shapes = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
    shapes.append((128, 256, 64, 8, 3))
    return [
        suits(triton.Config(dict(BLOCK_C=bc, BLOCK_O=bo, BLOCK_P=bp), num_warps=nw, num_stages=ns), sizes)
        for bc, bo, bp, nw, ns, sizes in [(*s, _NOT_FP64) for s in shapes] + [(64, 64, 32, 4, 2, _FP64)]
    ]


# float32 tiles take twice the shared memory: (128, 256, 64) x 3 stages would need 288 KiB (python -m bench.aot).
_fwd, _FWD_META = tuned(
    masked_conv_fwd_kernel, _fwd_configs(), ["CIN", "COUT", "T", "H", "W", "KH", "KW", "FLIP"], _FWD_INTERP,
    prune=all_of(by_element_size, fits_smem(lambda k: (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"])),
)  # fmt: skip
_wgrad, _WGRAD_META = tuned(
    masked_conv_wgrad_kernel, _wgrad_configs(), ["CIN", "COUT", "T", "H", "W", "KH", "KW", "N"], _WGRAD_INTERP,
    prune=all_of(by_element_size, fits_smem(lambda k: (k["BLOCK_C"] + k["BLOCK_O"]) * k["BLOCK_P"])),
)  # fmt: skip


# The block sizes any weight-gradient launch may take (sizing its split buffer).
_WGRAD_BLOCKS = [_WGRAD_INTERP] if INTERPRETED else [c.kwargs for c in _wgrad_configs()]
_UNPACK_BLOCK = (16, 16) if INTERPRETED else (32, 64)  # (C_in, C_out) per program


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in TL_DTYPES:
        raise ValueError(f"the triton backend takes float16/bfloat16/float32/float64, got {t.dtype}")


def _implicit_gemm(x, packed, bias, kh, kw, flip, memory_format=None, relu_in=False, gate=None, residual=None,
                   centre=None):  # fmt: skip
    """y (N, C_out, H, W) = conv of x over the taps of `packed` (T, C_in, C_out), in `memory_format` (default x's,
    gm._memory_format): the kernel writes through y's strides. The residual block's fusions: relu_in convolves
    relu(x); gate (y's shape) zeroes y where gate is not positive, then residual (y's shape) is added. centre: None,
    or int32 (C_out, 2) on x's device: per output channel, the [lo, hi) of C_in that the last tap (the centre)
    connects (gm.ops.masked_conv.CentreRanges)."""
    _check_dtype(x)
    n, cin, h, w = x.shape
    t, _, cout = packed.shape
    memory_format = format_of(x) if memory_format is None else memory_format
    y = torch.empty(n, cout, h, w, dtype=x.dtype, device=x.device, memory_format=memory_format)
    if t == 0:  # a 1x1 mask-A conv with a single group connects nothing
        y.copy_(bias.view(1, -1, 1, 1).expand_as(y) if bias is not None else torch.zeros_like(y))
        if gate is not None:
            y = torch.where(gate > 0, y, 0.0)
        if residual is not None:
            y = y + residual
        return y.contiguous(memory_format=memory_format)
    if n * h * w >= 2**31 or h * w * max(cin, cout) >= 2**31:
        raise ValueError(f"the triton backend takes N*H*W and H*W*C below 2**31, got x of shape {tuple(x.shape)}")
    packed = packed.to(x.dtype).contiguous()
    x = channels_last(x)
    # the epilogue reads gate and residual at y's offsets
    gate = gate.contiguous(memory_format=memory_format) if gate is not None else None
    residual = residual.contiguous(memory_format=memory_format) if residual is not None else None

    def grid(meta):
        return (cdiv(n * h * w, meta["BLOCK_M"]) * cdiv(cout, meta["BLOCK_N"]),)

    fast(_fwd)[grid](
        x, packed, bias if bias is not None else packed, y,
        residual if residual is not None else y, gate if gate is not None else y,
        centre if centre is not None else packed,  # positional: the fast launch caches no tensor keyword
        n, h, w, cin, cout, t,
        *y.stride(),
        KH=kh, KW=kw, FLIP=flip, HAS_BIAS=bias is not None, WIDE=not int32_offsets(x, y),
        ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype, conv=True),
        RELU_IN=relu_in, GATE=gate is not None, RES=residual is not None,
        CENTRE=centre is not None,
        **_FWD_META,
    )  # fmt: skip
    return y


def forward(x, packed, bias, kh, kw, taps, relu_in=False, residual=None, centre=None):
    """y = conv(relu(x) if relu_in else x) + bias (+ residual), in x's memory format. centre: the forward's centre
    ranges (C_out, 2) or None (_implicit_gemm)."""
    return _implicit_gemm(x, packed, bias, kh, kw, flip=False, relu_in=relu_in, residual=residual, centre=centre)


def input_grad(grad, operand, kh, kw, taps, memory_format=None, gate=None, residual=None, centre=None):
    """dx (N, C_in, H, W) in `memory_format` (default grad's) for the input-gradient operand (T, C_out, C_in): the
    packed weight with its channel dims swapped (gm.ops.masked_conv._triton_operands), contiguous. gate: the
    convolution's input before its ReLU (forward(relu_in=True)): dx is zero where gate is not positive; residual:
    added to dx (the gradient of a residual connection to the same input). centre: the input gradient's centre
    ranges (C_in, 2: per input channel, the C_out range the centre connects) or None."""
    return _implicit_gemm(grad, operand, None, kh, kw, flip=True, memory_format=memory_format, gate=gate,
                          residual=residual, centre=centre)  # fmt: skip


def _num_splits(tiles: int, pixels: int, block_p: int, element_size: int) -> int:
    """Pixel splits of the weight gradient for `tiles` (tap, C_in block, C_out block) tiles: whole waves of programs
    (gm.kernels._common.wave_splits), each split at least 16 k-steps of block_p pixels."""
    if INTERPRETED:
        return 2 if pixels > 2 * block_p else 1  # exercise the split path in tests
    return wave_splits(tiles, cdiv(pixels, block_p), element_size, min_steps=16)


def _wgrad_tiles(t: int, cin: int, cout: int, meta: dict) -> int:
    return t * cdiv(cin, meta["BLOCK_C"]) * cdiv(cout, meta["BLOCK_O"])


@functools.lru_cache(maxsize=1024)
def _most_splits(t: int, cin: int, cout: int, pixels: int, elem: int, slots: int) -> int:
    """The most pixel splits any weight-gradient config asks for at this shape (slots: the SM count the splits
    follow, part of the key only). Cached: ~14 configs' split models per call cost more host time than a launch."""
    return max(_num_splits(_wgrad_tiles(t, cin, cout, c), pixels, c["BLOCK_P"], elem) for c in _WGRAD_BLOCKS)


def weight_grad(x, grad, t, kh, kw, taps, positions, keep, out_dtype, relu_in=False, bias_grad=False, centre=None):
    """Weight gradient (C_out, C_in, kh, kw) in out_dtype, exactly zero at masked taps: the packed (T, C_in, C_out)
    GEMM over pixels in float32 (float64 for float64) partial sums, then one unpack pass (the split sum, the scatter
    and the cast). positions: (kh*kw,) int32, the packed tap of each kernel position or -1; keep: None or
    (T, C_in, C_out) bool, False at the centre tap's forbidden channel pairs. relu_in: the weight gradient of
    conv(relu(x)). bias_grad: returns (dw, db), the bias gradient (C_out,) in out_dtype summed by the same kernels
    (the pixel sum of grad). centre: the forward's centre ranges (C_out, 2) or None: centre-tap tiles outside them
    skip their pixel loop (their zeros are what the unpack's keep makes of them anyway)."""
    _check_dtype(x)
    n, cin, h, w = x.shape
    cout = grad.shape[1]
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    if t == 0:
        dw = torch.zeros(cout, cin, kh, kw, dtype=out_dtype, device=x.device)
        return (dw, grad.sum(dim=(0, 2, 3)).to(out_dtype)) if bias_grad else dw
    pixels = n * h * w
    if pixels >= 2**31:
        raise ValueError(f"the triton backend takes N*H*W < 2**31 pixels, got {pixels}")
    x = channels_last(x)
    grad = channels_last(grad)
    # The split count follows the launched config's tiles (the autotuner calls grid() for every config it times,
    # the chosen one last): the buffer holds the most splits any config asks for, the sum reads the launched ones.
    elem = x.element_size()
    most = _most_splits(t, cin, cout, pixels, elem, sm_slots())
    partial = torch.empty(most, t, cin, cout, dtype=acc_torch, device=x.device)
    db_partial = torch.empty(most, cout, dtype=acc_torch, device=x.device) if bias_grad else partial
    launched = {}

    def grid(meta):
        splits = _num_splits(_wgrad_tiles(t, cin, cout, meta), pixels, meta["BLOCK_P"], elem)
        launched["splits"] = splits
        return (t * cdiv(cin, meta["BLOCK_C"]), cdiv(cout, meta["BLOCK_O"]), splits)

    fast(_wgrad)[grid](
        x, grad, partial, db_partial, centre if centre is not None else positions,
        n, h, w, cin, cout, t,
        KH=kh, KW=kw, WIDE=not int32_offsets(x, grad),
        ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype, conv=True), RELU_IN=relu_in, HAS_DB=bias_grad,
        CENTRE=centre is not None,
        **_WGRAD_META,
    )  # fmt: skip
    dw = torch.empty(cout, cin, kh, kw, dtype=out_dtype, device=x.device)
    db = torch.empty(cout, dtype=out_dtype, device=x.device) if bias_grad else dw
    bc, bo = _UNPACK_BLOCK
    fast(masked_conv_wgrad_unpack_kernel)[(kh * kw, cdiv(cin, bc), cdiv(cout, bo))](
        partial, positions, keep if keep is not None else positions, dw, db_partial, db,
        launched["splits"], t, cin, cout, kh * kw,
        HAS_KEEP=keep is not None, BLOCK_C=bc, BLOCK_O=bo, HAS_DB=bias_grad, num_warps=4,
    )  # fmt: skip
    return (dw, db) if bias_grad else dw
