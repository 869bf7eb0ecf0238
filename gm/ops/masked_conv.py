"""masked_conv2d: PixelCNN's masked convolution (masks A and B, colour / autoregressive channel groups).

    y = conv2d(x, weight * mask, bias, padding=(kh // 2, kw // 2))

with mask as in gm.reference.masked_conv.conv_mask: taps above the centre row and left of the centre are kept;
the centre tap connects output channel o to input channel c iff out_groups[o] > in_groups[c] (mask "A") or
>= (mask "B"); every other tap is zero. The fast backends never read or multiply those zero taps: they gather
the kept taps into a packed weight (T, C_in, C_out) and run an implicit GEMM over T * C_in.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gm import _ext
from gm._backend import resolve
from gm._checks import check_choice, check_same, check_tensor
from gm._memory_format import format_of
from gm.ops import _masked_conv_cuda
from gm.ops._eager import EagerOp, backward_call, backward_expected, zero_scalar

MASKS = ("A", "B")
_OP = "gm::masked_conv2d"


# ----------------------------------------------------------------------------------------------------------------
# Geometry of the kept taps, shared by the triton and cuda backends.


@functools.lru_cache(maxsize=256)
def tap_offsets(kh: int, kw: int, with_centre: bool) -> tuple[tuple[int, int], ...]:
    """(dy, dx) of each kept tap, row-major: full rows above the centre, then the centre row left of centre,
    then the centre tap itself when any channel pair is connected there."""
    cy, cx = kh // 2, kw // 2
    taps = [(ky - cy, kx - cx) for ky in range(cy) for kx in range(kw)]
    taps += [(0, kx - cx) for kx in range(cx)]
    if with_centre:
        taps.append((0, 0))
    return tuple(taps)


def centre_allowed(
    mask: str, in_groups: torch.Tensor | None, out_groups: torch.Tensor | None, cin: int, cout: int, device
) -> torch.Tensor:
    """(C_out, C_in) bool: which channel pairs the centre tap connects."""
    gin = torch.zeros(cin, dtype=torch.long, device=device) if in_groups is None else in_groups.to(device, torch.long)
    gout = torch.zeros(cout, dtype=torch.long, device=device) if out_groups is None else out_groups.to(device, torch.long)
    if mask == "A":
        return gout[:, None] > gin[None, :]
    return gout[:, None] >= gin[None, :]


def _centre_used(mask: str, in_groups, out_groups) -> bool:
    """Whether the centre tap has any connection: decided without a device sync in the common cases."""
    if in_groups is None and out_groups is None:
        return mask == "B"
    return True  # groups given: assume used (an all-zero centre block still gives exact results)


@dataclasses.dataclass
class PackPlan:
    """How one weight shape + mask + groups maps to the packed (T, C_in, C_out) layout, built once and cached:
    packing is then one gather (and one select where the centre tap has forbidden channel pairs), instead of the
    half-dozen small launches it took per call (measured 0.1-0.2 ms per call on an H200)."""

    taps: tuple[tuple[int, int], ...]
    index: torch.Tensor  # (T, C_in, C_out) int64 positions in weight.view(-1)
    positions: torch.Tensor  # (kh*kw,) int32: the packed tap at each kernel position, -1 where masked out
    keep: torch.Tensor | None  # (T, C_in, C_out) bool, False at forbidden centre pairs; None when all are kept
    groups: tuple  # strong references to the group tensors, so their addresses in the key stay theirs
    # cpu path masks: dtype -> the crop mask (C_out, C_in, kh//2+1, kw); ("full", dtype) -> the whole mask
    crop_masks: dict = dataclasses.field(default_factory=dict)
    # cuda path: both GEMM operands' gather indices (gm.ops._masked_conv_cuda.weight_operands), built on first use
    operand_index: torch.Tensor | None = None
    # triton path: the same for the Triton kernels' unpadded operands (_triton_operands)
    triton_index: torch.Tensor | None = None
    # both fast paths: the centre tap's channel ranges per channel (centre_ranges), built on first use
    centre_ranges: CentreRanges | None = None
    # cuda path: the centre tap's channel ranges per GEMM tile (gm.ops._masked_conv_cuda.centre_table), on first use
    centre_table: object = None


_PLANS: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 256


def _tensor_key(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), getattr(t, "_version", 0), tuple(t.shape), t.dtype)


def pack_plan(weight_shape, mask: str, in_groups, out_groups, device) -> PackPlan:
    key = (tuple(weight_shape), mask, str(device), _tensor_key(in_groups), _tensor_key(out_groups))
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    cout, cin, kh, kw = weight_shape
    taps = tap_offsets(kh, kw, _centre_used(mask, in_groups, out_groups))
    cy, cx = kh // 2, kw // 2
    tap_idx = torch.tensor([(dy + cy) * kw + (dx + cx) for dy, dx in taps], dtype=torch.long, device=device)
    c = torch.arange(cin, device=device).view(1, cin, 1)
    o = torch.arange(cout, device=device).view(1, 1, cout)
    index = o * (cin * kh * kw) + c * (kh * kw) + tap_idx.view(-1, 1, 1)
    keep = None
    if taps and taps[-1] == (0, 0) and (in_groups is not None or out_groups is not None or mask == "A"):
        keep = torch.ones(len(taps), cin, cout, dtype=torch.bool, device=device)
        keep[-1] = centre_allowed(mask, in_groups, out_groups, cin, cout, device).t()
    positions = torch.full((kh * kw,), -1, dtype=torch.int32)
    for t, (dy, dx) in enumerate(taps):
        positions[(dy + cy) * kw + (dx + cx)] = t
    plan = PackPlan(taps, index.contiguous(), positions.to(device), keep, (in_groups, out_groups))
    _PLANS[key] = plan
    if len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def pack_weight(weight: torch.Tensor, mask: str, in_groups, out_groups) -> tuple[torch.Tensor, tuple]:
    """Kept taps of weight as (T, C_in, C_out), the centre tap's forbidden channel pairs zeroed: the plain torch form
    of the packed layout. The launchers gather theirs in one launch (_triton_operands, _masked_conv_cuda.
    weight_operands); tests check those against this."""
    plan = pack_plan(weight.shape, mask, in_groups, out_groups, weight.device)
    packed = weight.reshape(-1)[plan.index]
    if plan.keep is not None:
        packed = torch.where(plan.keep, packed, zero_scalar(packed.device, packed.dtype))
    return packed, plan.taps


# ----------------------------------------------------------------------------------------------------------------
# Backends.


def _crop_mask(weight: torch.Tensor, mask: str, in_groups, out_groups) -> torch.Tensor:
    """The mask of the rows up to the centre, (C_out, C_in, kh//2 + 1, kw) in weight's dtype, cached per plan."""
    plan = pack_plan(weight.shape, mask, in_groups, out_groups, weight.device)
    m = plan.crop_masks.get(weight.dtype)
    if m is None:
        cout, cin, kh, kw = weight.shape
        cy, cx = kh // 2, kw // 2
        m = torch.ones(cout, cin, cy + 1, kw, dtype=weight.dtype, device=weight.device)
        m[:, :, cy, cx + 1 :] = 0
        m[:, :, cy, cx] = centre_allowed(mask, in_groups, out_groups, cin, cout, weight.device).to(weight.dtype)
        plan.crop_masks[weight.dtype] = m
    return m


def _cpu_geometry(weight: torch.Tensor) -> tuple[int, int, int]:
    """(cy, cx, kw_used): rows up to the centre are kept; a 1 x k kernel also drops the columns right of the centre
    (all masked), so oneDNN runs a 1 x (k//2 + 1) kernel padded on the left only."""
    kh, kw = weight.shape[2:]
    cy, cx = kh // 2, kw // 2
    return cy, cx, (cx + 1 if kh == 1 else kw)


def _pad_for_crop(x: torch.Tensor, cy: int, cx: int, kw_used: int) -> torch.Tensor:
    right = kw_used - 1 - cx
    return x if cy == 0 and cx == 0 and right == 0 else F.pad(x, (cx, right, cy, 0))


def _cpu_forward(x, weight, bias, mask, in_groups, out_groups):
    # Rows below the centre are all zero: crop them and pad only the top, so oneDNN skips that half of the taps.
    # (Measured faster on the CPU than a kept-taps GEMM in C++ without a tuned BLAS; see bench.)
    cy, cx, kw_used = _cpu_geometry(weight)
    w = weight[:, :, : cy + 1, :kw_used] * _crop_mask(weight, mask, in_groups, out_groups)[..., :kw_used]
    return F.conv2d(_pad_for_crop(x, cy, cx, kw_used), w, bias)


def _full_mask(weight: torch.Tensor, mask: str, in_groups, out_groups) -> torch.Tensor:
    """The whole (C_out, C_in, kh, kw) mask in weight's dtype: the crop mask and zero rows below it, cached."""
    plan = pack_plan(weight.shape, mask, in_groups, out_groups, weight.device)
    key = ("full", weight.dtype)
    m = plan.crop_masks.get(key)
    if m is None:
        crop = _crop_mask(weight, mask, in_groups, out_groups)
        m = torch.zeros_like(weight)
        m[:, :, : crop.shape[2]] = crop
        plan.crop_masks[key] = m
    return m


# For a 3x3 kernel the cropped backward's input pad and gradient slice cost more than the taps it skips (it keeps 6
# of 9): measured on the 2-core dev CPU through the bench harness, the masked whole-kernel backward was faster
# (bench/NOTES.md). From 5x5 on the crop wins (1.2-1.5x), and for 1 x k kernels (no rows to crop, a left pad only)
# it stays ahead by a few percent (the RowLSTM layer's 1x3: 2.22 vs 2.31 ms fwd+bwd).
_CROP_BACKWARD_MIN_TAPS = 25


def _cpu_backward(grad, x, weight, mask, in_groups, out_groups, need_x, need_w, *, bias_grad=False):
    kh, kw = weight.shape[2:]
    if kh > 1 and kh * kw < _CROP_BACKWARD_MIN_TAPS:
        m = _full_mask(weight, mask, in_groups, out_groups)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight * m, None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], 1, [need_x, need_w, bias_grad]
        )
        return (gx if need_x else None), (gw * m if need_w else None), (gb if bias_grad else None)
    cy, cx, kw_used = _cpu_geometry(weight)
    crop_mask = _crop_mask(weight, mask, in_groups, out_groups)[..., :kw_used]
    w = weight[:, :, : cy + 1, :kw_used] * crop_mask
    xp = _pad_for_crop(x, cy, cx, kw_used)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, xp, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_x, need_w, bias_grad]
    )
    dx = gx[:, :, cy:, cx : cx + x.shape[3]] if need_x else None
    dw = None
    if need_w:
        dw = torch.zeros_like(weight)
        dw[:, :, : cy + 1, :kw_used] = gw * crop_mask
    return dx, dw, (gb if bias_grad else None)


def _reference_forward(x, weight, bias, mask, in_groups, out_groups):
    from gm.reference.masked_conv import masked_conv2d as ref  # noqa: PLC0415

    return ref(x, weight, bias, mask=mask, in_groups=in_groups, out_groups=out_groups)


def _reference_backward(grad, x, weight, mask, in_groups, out_groups, need_x, need_w, *, bias_grad=False):
    from gm.reference.masked_conv import conv_mask  # noqa: PLC0415

    kh, kw = weight.shape[-2:]
    m = conv_mask(tuple(weight.shape), mask, in_groups, out_groups, weight.device).to(weight.dtype)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight * m, None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], 1, [need_x, need_w, bias_grad]
    )
    return gx, (gw * m if need_w else None), (gb if bias_grad else None)


def _triton_operands(weight: torch.Tensor, plan: PackPlan, *, fresh: bool, input_grad: bool = True):
    """(forward operand (T, C_in, C_out), input-gradient operand (T, C_out, C_in) or None): the kept taps of weight,
    the centre tap's forbidden channel pairs zero, both from one gather launch (gm.kernels._layout.gather), made by
    the forward (fresh=True) and reused by its backward (gm._ext.packed), as the cuda path's weight_operands.
    input_grad=False (no backward to come, as in sampling): the forward operand alone, not kept."""
    t, cin, cout = plan.index.shape

    def pack(parts: int):
        from gm.kernels._layout import gather  # noqa: PLC0415

        if plan.triton_index is None:
            zero = math.prod(weight.shape)  # one past the weight: a zero
            idx = plan.index if plan.keep is None else torch.where(plan.keep, plan.index, zero)
            plan.triton_index = torch.cat((idx.reshape(-1), idx.transpose(1, 2).reshape(-1))).to(torch.int32)
        if parts == 1:
            return gather(weight, plan.triton_index[: t * cin * cout]).view(t, cin, cout), None
        both = gather(weight, plan.triton_index)
        return both[: t * cin * cout].view(t, cin, cout), both[t * cin * cout :].view(t, cout, cin)

    if not input_grad:
        with torch.no_grad():
            return pack(1)
    # the plan's identity names mask and groups; the entry holds the plan, so its id is not reused while it lives
    return _ext.packed(weight, ("masked_conv_triton", id(plan)), lambda: (plan, pack(2)), fresh=fresh)[1]


# The kernels' centre ranges on (cuda and triton); False: every centre chunk is reduced, as before session 16 (a
# switch for the GPU run that first executes them: if their GPU tests fail, set it while the kernels are fixed).
CENTRE_RANGES = True


class CentreRanges(NamedTuple):
    """Where the centre tap (the last kept tap) connects channels, as int32 [lo, hi) rows (an empty range: (rows, 0)):
    forward (C_out, 2), for output channel o the span of the input channels connected to o (the forward's and the
    weight gradient's); input_grad (C_in, 2), for input channel c the span of the output channels it reaches."""

    forward: torch.Tensor
    input_grad: torch.Tensor


def centre_ranges(plan: PackPlan) -> CentreRanges | None:
    """The plan's CentreRanges on its device, built once per plan without a device sync; None where every centre pair
    is connected (plan.keep None) or CENTRE_RANGES is off. A Triton program reduces the centre over its channels'
    joint range alone; the cuda kernels take these reduced per 128-channel tile (gm.ops._masked_conv_cuda.centre_table)."""
    if plan.keep is None or not CENTRE_RANGES:
        return None
    if plan.centre_ranges is None:
        allowed = plan.keep[-1]  # (C_in, C_out)
        plan.centre_ranges = CentreRanges(_first_last(allowed), _first_last(allowed.t()))
    return plan.centre_ranges


def _first_last(allowed: torch.Tensor) -> torch.Tensor:
    """allowed (R, C) bool -> (C, 2): [first, last + 1) of the rows set in each column, (R, 0) where none is."""
    rows = allowed.shape[0]
    at = torch.arange(rows, device=allowed.device)[:, None]
    first_last = torch.stack((torch.where(allowed, at, rows).amin(0), torch.where(allowed, at + 1, 0).amax(0)), 1)
    return first_last.to(torch.int32).contiguous()


# Every backend's backward returns (dx, dw, db), each None where not asked for; bias_grad asks for db (on triton
# and cuda summed by the weight-gradient kernels as they read grad, no pass of its own). The triton and cuda
# implementations also take the fused (ReLU, conv) layers' options (gm.nn.relu_conv): forward relu_in
# (conv(relu(x))) and residual (added to y), backward relu_in (the gradients of conv(relu(x))) and residual (added
# to dx); backward (forward): whether a backward follows, so the weight's input-gradient operand is packed too
# (default: backward_expected()).


def _triton_forward(x, weight, bias, mask, in_groups, out_groups, *, relu_in=False, residual=None, backward=None):
    from gm.kernels import masked_conv as k  # noqa: PLC0415

    plan = pack_plan(weight.shape, mask, in_groups, out_groups, weight.device)
    backward = backward_expected() if backward is None else backward
    operand, _ = _triton_operands(weight, plan, fresh=True, input_grad=backward)
    centre = centre_ranges(plan)
    return k.forward(x, operand, bias, weight.shape[2], weight.shape[3], plan.taps, relu_in=relu_in, residual=residual,
                     centre=centre.forward if centre is not None else None)  # fmt: skip


def _triton_backward(grad, x, weight, mask, in_groups, out_groups, need_x, need_w, *, relu_in=False, residual=None,
                     bias_grad=False):  # fmt: skip
    from gm.kernels import masked_conv as k  # noqa: PLC0415
    from gm.kernels._layout import channels_last  # noqa: PLC0415

    plan = pack_plan(weight.shape, mask, in_groups, out_groups, weight.device)
    # The kernels read channels-last operands: convert grad once for both gradients (each conversion is a full
    # read and write of grad). The input gradient is written in x's memory format, as the forward writes y.
    grad = channels_last(grad)
    centre = centre_ranges(plan)
    dx = dw = db = None
    if need_x:
        _, operand = _triton_operands(weight, plan, fresh=False)  # the forward's, unless weight changed since
        dx = k.input_grad(grad, operand, weight.shape[2], weight.shape[3], plan.taps, format_of(x),
                          gate=x if relu_in else None, residual=residual,
                          centre=centre.input_grad if centre is not None else None)  # fmt: skip
    if need_w:
        dw = k.weight_grad(x, grad, len(plan.taps), weight.shape[2], weight.shape[3], plan.taps, plan.positions,
                           plan.keep, weight.dtype, relu_in=relu_in, bias_grad=bias_grad,
                           centre=centre.forward if centre is not None else None)  # fmt: skip
        dw, db = dw if bias_grad else (dw, None)
    elif bias_grad:
        db = grad.sum(dim=(0, 2, 3))
    return dx, dw, db


def _cuda_forward(x, weight, bias, mask, in_groups, out_groups, *, relu_in=False, residual=None, backward=None):
    c = _masked_conv_cuda
    plan = pack_plan(weight.shape, mask, in_groups, out_groups, weight.device)
    # both operands when a backward will follow (kept for it), the forward's alone otherwise (sampling)
    backward = backward_expected() if backward is None else backward
    operands = c.weight_operands(weight, plan, fresh=True, input_grad=backward)
    return c.forward(x, operands, bias, plan.taps, relu_in=relu_in, residual=residual)


def _cuda_backward(grad, x, weight, mask, in_groups, out_groups, need_x, need_w, *, relu_in=False, residual=None,
                   bias_grad=False):  # fmt: skip
    c = _masked_conv_cuda
    plan = pack_plan(weight.shape, mask, in_groups, out_groups, weight.device)
    # the forward's operands, unless weight changed since
    operands = c.weight_operands(weight, plan, fresh=False) if need_x else None
    # converts grad to NHWC once for both gradients; the weight gradient comes back in weight's layout and dtype
    return c.backward(grad, x, operands, plan.taps, plan, tuple(weight.shape), weight.dtype, need_x, need_w,
                      relu_in=relu_in, residual=residual, bias_grad=bias_grad)  # fmt: skip


_FORWARD = {"reference": _reference_forward, "cpu": _cpu_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {
    "reference": _reference_backward,
    "cpu": _cpu_backward,
    "triton": _triton_backward,
    "cuda": _cuda_backward,
}


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration: custom ops with fake implementations and autograd, so torch.compile traces them.


def _masked_conv2d_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: str,
    in_groups: torch.Tensor | None,
    out_groups: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    # The output keeps x's memory format (gm._memory_format): a channels-last model converts nothing between layers.
    return _FORWARD[backend](x, weight, bias, mask, in_groups, out_groups).contiguous(memory_format=format_of(x))


_masked_conv2d_op = torch.library.custom_op(_OP, _masked_conv2d_impl, mutates_args=())


@_masked_conv2d_op.register_fake
def _(x, weight, bias, mask, in_groups, out_groups, backend):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=format_of(x))


def _masked_conv2d_backward_impl(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: str,
    in_groups: torch.Tensor | None,
    out_groups: torch.Tensor | None,
    backend: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad = grad.contiguous(memory_format=format_of(grad))
    dx, dw, db = _BACKWARD[backend](grad, x, weight, mask, in_groups, out_groups, need_x, need_w, bias_grad=need_b)
    dx = dx.contiguous(memory_format=format_of(x)) if dx is not None else x.new_empty(0)
    dw = dw.contiguous() if dw is not None else weight.new_empty(0)
    return dx, dw, (db if db is not None else weight.new_empty(0))


_masked_conv2d_backward_op = torch.library.custom_op(_OP + "_backward", _masked_conv2d_backward_impl, mutates_args=())


@_masked_conv2d_backward_op.register_fake
def _(grad, x, weight, mask, in_groups, out_groups, backend, need_x, need_w, need_b):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=format_of(x)) if need_x else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    return dx, dw, weight.new_empty(weight.shape[0] if need_b else 0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask, in_groups, out_groups, backend = inputs
    ctx.save_for_backward(x, weight, in_groups, out_groups)
    ctx.mask, ctx.backend, ctx.has_bias = mask, backend, bias is not None


def conv_grads(grad, x, weight, mask, in_groups, out_groups, backend, need_x, need_w, need_b, *, call=None):
    """(dx, dw, db) of masked_conv2d(x, weight, bias, ...) for the output gradient grad, each None where not needed:
    the backward implementation (or `call`, with the same arguments: the registered backward op) where dx or dw is
    needed, the bias gradient with them (on triton and cuda summed by the weight-gradient kernels as they read grad,
    no pass of its own); a plain sum where only the bias gradient is. The one-node layers' backward calls it too."""
    if not (need_x or need_w):
        return None, None, (grad.sum(dim=(0, 2, 3)) if need_b else None)
    dx, dw, db = (call or _masked_conv2d_backward_impl)(grad, x, weight, mask, in_groups, out_groups, backend,
                                                        need_x, need_w, need_b)  # fmt: skip
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None)


def _backward(ctx, grad):
    x, weight, in_groups, out_groups = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    call = functools.partial(backward_call, ctx, _masked_conv2d_backward_op, _masked_conv2d_backward_impl)
    dx, dw, db = conv_grads(grad, x, weight, ctx.mask, in_groups, out_groups, ctx.backend, need_x, need_w,
                            need_b and ctx.has_bias, call=call)  # fmt: skip
    return dx, dw, db, None, None, None, None


_masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
_MASKED_CONV2D = EagerOp(_masked_conv2d_op, _masked_conv2d_impl, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------------------------
# Public function.


def _check_groups(name: str, groups, length: int, x: torch.Tensor, channels_name: str) -> None:
    if groups is None:
        return
    check_tensor(name, groups, ndim=1, dtypes=(torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8))
    if groups.shape[0] != length:
        raise ValueError(f"{name} must have one entry per {channels_name} channel ({length}), got {groups.shape[0]}")
    if groups.device != x.device:
        raise ValueError(f"{name} is on {groups.device} but x is on {x.device}: put them on one device")


def check_masked_conv_args(x, weight, bias, mask, in_groups, out_groups) -> None:
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_same("x", x, weight=weight, bias=bias)
    check_choice("mask", mask, MASKS)
    cout, cin, kh, kw = weight.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"weight must have odd kernel sizes (kh, kw), got ({kh}, {kw})")
    if x.shape[1] != cin:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects C_in={cin} (weight shape {tuple(weight.shape)})")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != cout:
            raise ValueError(f"bias must have C_out={cout} entries, got {bias.shape[0]}")
    _check_groups("in_groups", in_groups, cin, x, "input")
    _check_groups("out_groups", out_groups, cout, x, "output")


def conv_backend(backend: str | None, x: torch.Tensor) -> str:
    """The backend masked_conv2d runs x on (the PixelRNN layers' one-node paths ask the same): auto takes the
    backend a benchmark run measured fastest for masked_conv2d in x's dtype on this GPU model
    (gm._backend.measured_pick), else cuda where gm._C has it."""
    return resolve(backend, x.device, native_cpu=False, op="masked_conv2d", dtype=x.dtype)


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mask: str = "B",
    in_groups: torch.Tensor | None = None,
    out_groups: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Masked 2-D convolution with 'same' padding, as in PixelCNN (van den Oord et al. 2016).

    Args:
        x: (N, C_in, H, W) input, float16/bfloat16/float32/float64 (NCHW or channels_last).
        weight: (C_out, C_in, kh, kw), kh and kw odd (1x1 ... 7x7, 1xk).
        bias: optional (C_out,).
        mask: "A" (centre tap strictly earlier groups: first layer) or "B" (same group allowed).
        in_groups, out_groups: optional int tensors (C_in,), (C_out,): channel groups for the centre tap
            (colours, or per-channel autoregressive orders). None means one group.
        backend: None (auto), "reference", "cpu", "triton" or "cuda".

    Returns:
        (N, C_out, H, W), same dtype as x, channels_last in memory when x is (gm._memory_format.is_channels_last),
        else contiguous; the input gradient likewise follows x.

    Example:
        >>> x = torch.randn(2, 3, 8, 8); w = torch.randn(16, 3, 7, 7)
        >>> masked_conv2d(x, w, mask="A").shape
        torch.Size([2, 16, 8, 8])
    """
    check_masked_conv_args(x, weight, bias, mask, in_groups, out_groups)
    chosen = conv_backend(backend, x)
    return _MASKED_CONV2D(x, weight, bias, mask, in_groups, out_groups, chosen)
