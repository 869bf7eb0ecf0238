"""CUDA backend of masked_conv2d: launchers for the implicit-GEMM kernels in csrc/masked_conv/masked_conv_cuda.cu.

    forward:      y[n, o, h, w] = bias[o] + sum_t sum_c x[n, c, h + dy_t, w + dx_t] * packed[t, c, o]
    input_grad:   the same GEMM on grad with the taps negated and packed as (T, C_out, C_in) -> (T, C_in, C_out)
    weight_grad:  dWp[t, c, o] = sum_{n, h, w} x[n, c, h + dy_t, w + dx_t] * grad[n, o, h, w]   (float32)

The kernels read NHWC with the channel count padded to a multiple of 8 (16-byte cp.async chunks): a channels_last
input whose channel count is already a multiple of 8 is used without a copy; anything else is converted once here.
The kernels write the output in the input's memory format (gm._memory_format): channels-last (NHWC in memory) when
the input is, else NCHW-contiguous, so a channels-last model pays no conversion on the way out. bfloat16/float16 run
on tensor cores with fp32 accumulation; float32 runs on tf32 tensor cores when torch.backends.cudnn.allow_tf32 is True
(torch's default for convolutions), otherwise as three tf32 products on hi/lo splits (fp32-level error). The weight
reaches the GEMMs as both operands (Operands: forward and input-gradient layouts, padded) from one gather, made by
the forward and reused by its backward (weight_operands). Nothing here touches CUDA at import.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from gm._ext import device_guard, dtype_code, ext, gather, packed, reduction_splits, stream_of
from gm._memory_format import format_of

_CHANNEL_ALIGN = 8  # elements: 16 bytes of bf16/fp16, 32 bytes of fp32
_TILE = 128  # block tile of the weight-gradient kernel along C_in and C_out
_BLOCKS_PER_SM = 2  # occupancy the kernels are compiled for (__launch_bounds__(256, 2))
_PRECISION_NATIVE, _PRECISION_TF32, _PRECISION_TF32X3 = 0, 1, 2


def _precision(dtype: torch.dtype) -> int:
    if dtype in (torch.float16, torch.bfloat16):
        return _PRECISION_NATIVE
    if dtype == torch.float32:
        return _PRECISION_TF32 if torch.backends.cudnn.allow_tf32 else _PRECISION_TF32X3
    if dtype == torch.float64:
        raise ValueError(
            "the cuda backend of masked_conv2d takes float16/bfloat16/float32, got torch.float64: "
            "use backend='triton' or 'reference' for float64"
        )
    raise ValueError(f"the cuda backend of masked_conv2d takes float16/bfloat16/float32, got {dtype}")


def _check_cuda(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got a tensor on {t.device}")


def _padded(c: int) -> int:
    return -(-c // _CHANNEL_ALIGN) * _CHANNEL_ALIGN


@functools.lru_cache(maxsize=256)
def _tap_table(module, taps: tuple, mirrored: bool):
    """The kernels' tap table of `taps` ((dy, dx) pairs; mirrored: negated), built by `module` (gm._C, or a stand-in
    for it) once per layer geometry: a launch then passes one object, where two sequences converted to vectors on
    every call, with keyword arguments, cost ~1.7 us of a ~2 us pybind11 call (`python -m bench.host --bindings`)."""
    sign = -1 if mirrored else 1
    return module.masked_conv_taps([sign * int(t[0]) for t in taps], [sign * int(t[1]) for t in taps])


# ----------------------------------------------------------------------------------------------------------------
# The weight as the GEMMs' B operand.


class Operands(NamedTuple):
    """A packed weight (T, C_in, C_out) in the layouts the GEMM reads, the channels it sums over zero-padded to a
    multiple of 8: forward (T, C_out, C_in padded), input gradient (T, C_in, C_out padded). centre: the plan's
    CentreTable (None: every centre pair connected, or no centre tap)."""

    forward: torch.Tensor
    input_grad: torch.Tensor | None
    centre: CentreTable | None = None


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    """Contiguous copy of t with its last dim zero-padded to `size`."""
    if t.shape[-1] == size:
        return t.contiguous()
    out = t.new_zeros(*t.shape[:-1], size)
    out[..., : t.shape[-1]].copy_(t)
    return out


def _forward_operand(packed: torch.Tensor | Operands) -> tuple[torch.Tensor, int]:
    """(the forward GEMM's B operand, the address of its centre ranges (CentreTable) or 0)."""
    if isinstance(packed, Operands):
        rows = packed.centre.forward if packed.centre is not None else None
        return packed.forward, rows.data_ptr() if rows is not None else 0
    return _pad_last(packed.transpose(1, 2), _padded(packed.shape[1])), 0


def _input_grad_operand(packed: torch.Tensor | Operands) -> tuple[torch.Tensor, int]:
    """(the input gradient's B operand, the address of its centre ranges (CentreTable) or 0)."""
    if isinstance(packed, Operands):
        rows = packed.centre.input_grad if packed.centre is not None else None
        return packed.input_grad, rows.data_ptr() if rows is not None else 0
    return _pad_last(packed, _padded(packed.shape[2])), 0


class CentreTable(NamedTuple):
    """The GEMMs' centre ranges (csrc masked_conv.h: ConvGemmArgs::centre) for one plan, int32 (lo, hi) rows on the
    plan's device (an empty range: (rows, 0)): weight_grad, per 128-channel tile of C_out, the C_in range the centre
    connects (the weight gradient's centre tiles outside it are skipped); forward, the same rows where the forward GEMM
    takes them, else None; input_grad, per tile of C_in the C_out range, where the input gradient takes them, else
    None. A GEMM takes its rows only where they skip more than _CENTRE_MIN_SKIP of its products (its variant's main
    loop costs ~8% more instructions a stage); the weight gradient's test is outside its main loop."""

    forward: torch.Tensor | None
    input_grad: torch.Tensor | None
    weight_grad: torch.Tensor


_CENTRE_MIN_SKIP = 0.1


def centre_table(plan) -> CentreTable | None:
    """The plan's CentreTable, built on its first use; None where every centre pair is connected (plan.keep None)
    or while the stream is capturing a CUDA graph before it was built. The centre is the last kept tap; its forbidden
    colour pairs are zeros of the packed weight, and a GEMM tile whose output channels connect only a range of the
    reduction channels there sums the centre over that range alone (a 1x1 mask-B layer of 3 colour groups: ~1/4 of
    its products). Reduced on the host from the per-channel ranges (gm.ops.masked_conv.centre_ranges, the Triton
    kernels' form): one device-to-host copy per plan, never during graph capture (the table only saves work: without
    it the results are the same)."""
    if plan.keep is None:  # no colour groups: the common case, first
        return None
    from gm.ops import masked_conv  # noqa: PLC0415

    if not masked_conv.CENTRE_RANGES:
        return None
    if plan.centre_table is None:
        if plan.keep.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        ranges = masked_conv.centre_ranges(plan)
        taps, cin, cout = plan.keep.shape
        fwd, fwd_skip = _tile_ranges(ranges.forward.cpu(), cin, taps)
        dx, dx_skip = _tile_ranges(ranges.input_grad.cpu(), cout, taps)
        fwd, dx = fwd.to(plan.keep.device), dx.to(plan.keep.device)
        plan.centre_table = CentreTable(fwd if fwd_skip > _CENTRE_MIN_SKIP else None,
                                        dx if dx_skip > _CENTRE_MIN_SKIP else None, fwd)  # fmt: skip
    return plan.centre_table


def _tile_ranges(per_channel: torch.Tensor, rows: int, taps: int) -> tuple[torch.Tensor, float]:
    """per_channel (C, 2) int32 [lo, hi) of the `rows` reduction channels each GEMM output channel connects at the
    centre -> ((tiles of C, 2) the union's span per 128-channel tile, the fraction of the GEMM's products over `taps`
    taps that the spans skip)."""
    cols = per_channel.shape[0]
    tiles = -(-cols // _TILE)
    padded = torch.cat((per_channel, per_channel.new_tensor([[rows, 0]]).expand(tiles * _TILE - cols, 2)))
    lo = padded[:, 0].view(tiles, _TILE).amin(1)
    hi = padded[:, 1].view(tiles, _TILE).amax(1)
    width = torch.full((tiles,), _TILE)
    width[-1] = cols - (tiles - 1) * _TILE
    skipped = ((rows - (hi - lo).clamp(min=0)) * width).sum().item()
    return torch.stack((lo, hi), 1).to(torch.int32), skipped / (taps * rows * cols)


def _operand_index(plan, weight_shape) -> torch.Tensor:
    """Both operands' positions in weight.view(-1) (int32), forward then input gradient, built once per plan; the
    index weight.numel(), one past the weight, stands for a zero (the padded channels and the centre tap's forbidden
    pairs)."""
    if plan.operand_index is None:
        zero = weight_shape[0] * weight_shape[1] * weight_shape[2] * weight_shape[3]
        idx = plan.index if plan.keep is None else torch.where(plan.keep, plan.index, zero)  # (T, C_in, C_out)
        t, cin, cout = idx.shape
        fwd = idx.new_full((t, cout, _padded(cin)), zero)
        fwd[..., :cin] = idx.transpose(1, 2)
        bwd = idx.new_full((t, cin, _padded(cout)), zero)
        bwd[..., :cout] = idx
        plan.operand_index = torch.cat((fwd.reshape(-1), bwd.reshape(-1))).to(torch.int32)
    return plan.operand_index


def weight_operands(weight: torch.Tensor, plan, *, fresh: bool, input_grad: bool = True) -> Operands:
    """weight (C_out, C_in, kh, kw) as the GEMM operands (gm.ops.masked_conv.pack_plan's kept taps, forbidden
    centre pairs zero): one gather launch (gm._ext.gather), made by the forward (fresh=True) and reused by its
    backward (gm._ext.packed). input_grad=False (a forward with no backward to come, as in sampling): the forward
    operand alone, not kept (Operands.input_grad None)."""

    def pack(parts: int) -> Operands:
        t, cin, cout = plan.index.shape
        sizes = (t * cout * _padded(cin), t * cin * _padded(cout))
        idx = _operand_index(plan, weight.shape)
        cin_p, cout_p = _padded(cin), _padded(cout)
        centre = centre_table(plan)
        if parts == 1:
            return Operands(gather(weight, idx[: sizes[0]]).view(t, cout, cin_p), None, centre)
        both = gather(weight, idx)  # as_strided: a third of the host time of split() and two views
        return Operands(both.as_strided((t, cout, cin_p), (cout * cin_p, cin_p, 1)),
                        both.as_strided((t, cin, cout_p), (cin * cout_p, cout_p, 1), sizes[0]), centre)  # fmt: skip

    if not input_grad:
        with torch.no_grad():
            return pack(1)
    # the plan's identity names mask and groups; the entry holds the plan, so its id is not reused while it lives
    return packed(weight, ("masked_conv", id(plan)), lambda: (plan, pack(2)), fresh=fresh)[1]


# ----------------------------------------------------------------------------------------------------------------
# Layout and launches. The private functions run under the caller's device guard, on its stream.


def _nhwc(t: torch.Tensor, c_padded: int, stream: int | None = None) -> torch.Tensor:
    """(N, C, H, W) -> a tensor whose memory is (N, H, W, c_padded), zero channels past C, for its data_ptr():
    t itself where t is channels-last with C == c_padded (its memory is already that: a permuted view would cost
    ~1.3 us of host time a call for the same pointer), else a copy. stream: where the caller holds t's device guard,
    the stream to launch on (None: t's current one)."""
    n, c, h, w = t.shape
    if c == c_padded and t.is_contiguous(memory_format=torch.channels_last):
        return t
    if t.is_contiguous() and 0 < n <= 65535 and t.numel() > 0:
        # Tiled transpose kernel: torch's permute-copy measured ~0.2 ms for 64 MB of bf16 on an H200 (0.6 TB/s).
        out = torch.empty(n, h, w, c_padded, dtype=t.dtype, device=t.device)
        if stream is None:
            with device_guard(t):
                return _nhwc_into(t, out, stream_of(t))
        return _nhwc_into(t, out, stream)
    if c == c_padded:
        return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).contiguous()
    buf = t.new_zeros(n, h, w, c_padded)
    buf[..., :c].copy_(t.permute(0, 2, 3, 1))
    return buf


def _nhwc_into(t: torch.Tensor, out: torch.Tensor, stream: int) -> torch.Tensor:
    n, c, h, w = t.shape
    ext().masked_conv_to_nhwc_cuda(t.data_ptr(), out.data_ptr(), n, c, out.shape[3], h * w, t.element_size(), stream)
    return out


def _fill_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # No kept tap (1x1 mask A with one group): the output is the bias alone.
    y.copy_(bias.view(1, -1, 1, 1).expand_as(y) if bias is not None else torch.zeros_like(y))
    return y


def _conv_gemm(a: torch.Tensor, operand: tuple[torch.Tensor, int], bias: torch.Tensor | None, taps, mirrored: bool,
               precision: int, stream: int, a_nhwc=None, relu_a: bool = False, gate=None, residual=None):  # fmt: skip
    """out (N, n_out, H, W) = sum_t a[p + tap_t] @ b[t]^T with a (N, C, H, W) any layout, operand (b, centre): b
    (T, n_out, C padded) in the kernel layout (Operands), centre its centre table's address or 0 (_forward_operand,
    _input_grad_operand); taps mirrored: negated. a_nhwc: a already in the kernel layout (_nhwc). out is
    channels-last where a is (is_channels_last), else NCHW-contiguous: the kernel writes either directly. The fused
    (ReLU, conv) layers (gm.nn.relu_conv): relu_a convolves relu(a); gate (out's shape) zeroes out where gate <= 0,
    then residual (out's shape) is added."""
    n, c, h, w = a.shape
    b, centre = operand
    n_out = b.shape[1]
    fmt = format_of(a)
    out = torch.empty(n, n_out, h, w, dtype=a.dtype, device=a.device, memory_format=fmt)
    if len(taps) == 0:
        out = _fill_bias(out, bias)
        if gate is not None:
            out = torch.where(gate > 0, out, 0.0)
        return (out if residual is None else out + residual).contiguous(memory_format=fmt)
    if out.numel() == 0:
        return out
    # the epilogue reads gate and residual at out's offsets, in out's dtype
    gate = gate.to(a.dtype).contiguous(memory_format=fmt) if gate is not None else None
    residual = residual.to(a.dtype).contiguous(memory_format=fmt) if residual is not None else None
    cp = b.shape[2]
    a_nhwc = _nhwc(a, cp, stream) if a_nhwc is None else a_nhwc
    b = b if b.dtype == a.dtype else b.to(a.dtype)
    bias_c = (bias if bias.dtype == a.dtype else bias.to(a.dtype)).contiguous() if bias is not None else None
    lib = ext()
    lib.masked_conv_gemm_cuda(
        a_nhwc.data_ptr(), b.data_ptr(), bias_c.data_ptr() if bias_c is not None else 0, out.data_ptr(),
        n, h, w, cp, n_out, _tap_table(lib, taps, mirrored), dtype_code(a), precision, stream,
        fmt == torch.channels_last, relu_a, gate.data_ptr() if gate is not None else 0,
        residual.data_ptr() if residual is not None else 0, centre,
    )  # fmt: skip
    return out


def _weight_grad(x, grad, taps, plan, weight_shape, out_dtype, precision: int, stream: int, grad_nhwc=None,
                 relu_x: bool = False, bias_grad: bool = False):  # fmt: skip
    """dw, or (dw, db) with bias_grad: the bias gradient summed by the same kernels."""
    n, cin, h, w = x.shape
    cout = grad.shape[1]
    t = len(taps)
    if t == 0 or n * h * w == 0:
        dw = torch.zeros(weight_shape, dtype=out_dtype, device=x.device)
        return (dw, grad.sum(dim=(0, 2, 3)).to(out_dtype)) if bias_grad else dw
    pixels = n * h * w
    tiles = t * (-(-cin // _TILE)) * (-(-cout // _TILE))
    splits = reduction_splits(tiles, pixels, x.device, _BLOCKS_PER_SM)
    per_split = -(-pixels // splits)
    splits = -(-pixels // per_split)  # no empty trailing split
    cin_p, cout_p = _padded(cin), _padded(cout)
    x_nhwc = _nhwc(x, cin_p, stream)
    if grad_nhwc is None:
        grad_nhwc = _nhwc(grad if grad.dtype == x.dtype else grad.to(x.dtype), cout_p, stream)
    # the float32 partial sums (splits, T, C_in, C_out) and the bias gradient's (splits, C_out) in one allocation,
    # the latter at a 16-byte boundary
    size = -(-splits * t * cin * cout // 4) * 4
    partial = torch.empty(size + (splits * cout if bias_grad else 0), dtype=torch.float32, device=x.device)
    partial_ptr = partial.data_ptr()
    dw = torch.empty(weight_shape, dtype=out_dtype, device=x.device)
    db = torch.empty(cout, dtype=out_dtype, device=x.device) if bias_grad else None
    db_partial_ptr = partial_ptr + 4 * size if bias_grad else 0
    lib = ext()
    lib.masked_conv_wgrad_cuda(
        x_nhwc.data_ptr(), grad_nhwc.data_ptr(), partial_ptr, n, h, w, cin_p, cout_p, cin, cout,
        _tap_table(lib, taps, False), per_split, splits, dtype_code(x), precision, stream, relu_x, db_partial_ptr,
        centre.weight_grad.data_ptr() if (centre := centre_table(plan)) is not None else 0,
    )  # fmt: skip
    keep = plan.keep
    lib.masked_conv_wgrad_unpack_cuda(
        partial_ptr, plan.positions.data_ptr(), keep.data_ptr() if keep is not None else 0, dw.data_ptr(),
        splits, t, cin, cout, weight_shape[2] * weight_shape[3], dtype_code(dw), stream, db_partial_ptr,
        db.data_ptr() if bias_grad else 0,
    )  # fmt: skip
    return (dw, db) if bias_grad else dw


# ----------------------------------------------------------------------------------------------------------------
# Entry points: each checks once and launches everything on one stream under one device guard. `packed` is the
# weight's kept taps (T, C_in, C_out) from gm.ops.masked_conv.pack_weight (copied into the kernel layout here), or
# both operands already in it (weight_operands).


def forward(x: torch.Tensor, packed: torch.Tensor | Operands, bias: torch.Tensor | None, taps, *,
            relu_in: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y (N, C_out, H, W): channels-last when x is (gm._memory_format.is_channels_last), else contiguous.
    relu_in: y = conv(relu(x)); residual (y's shape): added to y."""
    _check_cuda("x", x)
    precision = _precision(x.dtype)
    with device_guard(x):
        return _conv_gemm(x, _forward_operand(packed), bias, taps, False, precision, stream_of(x), relu_a=relu_in,
                          residual=residual)  # fmt: skip


def input_grad(grad: torch.Tensor, packed: torch.Tensor | Operands, taps, *, grad_nhwc=None,
               gate: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """dx (N, C_in, H, W), channels-last when grad is, else contiguous: the forward GEMM on grad with the taps
    mirrored. grad_nhwc: grad already in the kernels' layout (_nhwc). gate: the convolution's input before its ReLU
    (forward(relu_in=True)): dx is zero where gate <= 0; residual (dx's shape): added to dx."""
    _check_cuda("grad", grad)
    precision = _precision(grad.dtype)
    with device_guard(grad):
        return _conv_gemm(grad, _input_grad_operand(packed), None, taps, True, precision, stream_of(grad),
                          a_nhwc=grad_nhwc, gate=gate, residual=residual)  # fmt: skip


def weight_grad(x: torch.Tensor, grad: torch.Tensor, taps, plan, weight_shape, out_dtype, *, grad_nhwc=None,
                relu_in: bool = False, bias_grad: bool = False):  # fmt: skip
    """The weight gradient (C_out, C_in, kh, kw) in out_dtype, exactly zero at masked taps: packed float32 partial
    sums per pixel split (T, C_in, C_out), then one pass that adds the splits in a fixed order, scatters them to the
    weight layout (plan.positions: the packed tap of each kernel position or -1; plan.keep: the centre tap's allowed
    channel pairs or None) and casts. relu_in: the weight gradient of conv(relu(x)). bias_grad: returns (dw, db),
    the bias gradient (the pixel sum of grad) from the same kernels."""
    _check_cuda("x", x)
    precision = _precision(x.dtype)
    with device_guard(x):
        return _weight_grad(x, grad, taps, plan, weight_shape, out_dtype, precision, stream_of(x), grad_nhwc,
                            relu_in, bias_grad)  # fmt: skip



def backward(grad: torch.Tensor, x: torch.Tensor, packed: torch.Tensor | Operands, taps, plan, weight_shape,
             out_dtype, need_x: bool, need_w: bool, *, relu_in: bool = False, residual: torch.Tensor | None = None,
             bias_grad: bool = False):  # fmt: skip
    """(dx, weight gradient (weight_grad), bias gradient), each None where not asked for, converting grad to the
    kernels' layout once for both GEMMs. dx is channels-last when grad is (as input_grad), else contiguous. The fused
    (ReLU, conv) layers (gm.nn.relu_conv): relu_in, the gradients of conv(relu(x)) (dx zero where x <= 0); residual,
    added to dx. bias_grad: the bias gradient from the weight-gradient kernels (a sum without need_w)."""
    _check_cuda("grad", grad)
    precision = _precision(grad.dtype)  # a dtype the kernels take, before the conversion
    if grad.dtype != x.dtype:
        grad = grad.to(x.dtype)
        precision = _precision(x.dtype)
    with device_guard(grad):
        stream = stream_of(grad)
        g_nhwc = _nhwc(grad, _padded(grad.shape[1]), stream) if (need_x and need_w and len(taps) > 0) else None
        dx = dw = db = None
        if need_x:
            dx = _conv_gemm(grad, _input_grad_operand(packed), None, taps, True, precision, stream, a_nhwc=g_nhwc,
                            gate=x if relu_in else None, residual=residual)  # fmt: skip
        if need_w:
            dw = _weight_grad(x, grad, taps, plan, weight_shape, out_dtype, precision, stream, g_nhwc, relu_in,
                              bias_grad)  # fmt: skip
            dw, db = dw if bias_grad else (dw, None)
        elif bias_grad:
            db = grad.sum(dim=(0, 2, 3))
    return dx, dw, db
