"""The IAF update (Kingma, Salimans et al. 2016) and the MADE output layer fused with it.

iaf_step(z, m, s, mode="gated"):  σ = sigmoid(s), z' = σ z + (1 − σ) m, logdet = Σ log σ over non-batch dims
                                  (log σ through a stable log-sigmoid: finite for any finite s)
iaf_step(z, m, s, mode="affine"): z' = (z − m) exp(−s), logdet = −Σ s
iaf_made_output(hidden, weight, mask, bias, z, mode): [m, s] = hidden (W ⊙ M)^T + b, weight (2D, H) with rows
    0..D−1 giving m and rows D..2D−1 giving s; then iaf_step(z, m, s). The triton and cuda backends compute m
    and s in registers and apply the step in the GEMM's epilogue (forward and backward), skipping all-zero mask
    tiles (cuda: csrc/iaf/iaf_made_output_cuda.cu on the masked_linear tensor-core GEMM).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from gm._backend import resolve
from gm._checks import check_choice, check_same, check_tensor
from gm.ops._eager import EagerOp, backward_call, eager_ok, needs_grad, zero_scalar
from gm.ops.masked_linear import (
    batch_bucket,
    blocked_input_grad,
    blocked_linear,
    blocked_weight_grad,
    build_tile_map,
    check_mask,
    cpu_call_cost,
    cpu_plan,
    linear_tile_map,
    mask_as,
    mask_entry,
    plan_blocks,
    premasked_weight,
    tile_grids,
)

MODES = ("gated", "affine")
_STEP = "gm::iaf_step"
_FUSED = "gm::iaf_made_output"
# C++ CUDA: the elementwise step (csrc/iaf/iaf_cuda.cu) and the fused GEMM (csrc/iaf/iaf_made_output_cuda.cu, on the
# masked_linear GEMM); auto picks them for CUDA tensors of float16/bfloat16/float32 (float64 goes to triton).
CUDA_FUSED_READY = True


# ----------------------------------------------------------------------------------------------------------------
# iaf_step backends. Tensors arrive as contiguous (R, F).


def _torch_step_backward(z, m, s, gz, gl, mode):
    gl = gl[:, None]
    if mode == "gated":
        sig, one_minus = torch.sigmoid(s), torch.sigmoid(-s)
        return gz * sig, gz * one_minus, (gz * (z - m) * sig + gl) * one_minus
    e = torch.exp(-s)
    dz = gz * e
    return dz, -dz, -gz * ((z - m) * e) - gl


def _reference_step(z, m, s, mode):
    from gm.reference.iaf import iaf_step  # noqa: PLC0415

    return iaf_step(z, m, s, mode=mode)


def _upcast_16bit(fn):
    """The C++ CPU kernels take float32/float64: 16-bit CPU tensors go through float32 and back."""

    def wrapped(*tensors_and_mode):
        *tensors, mode = tensors_and_mode
        dtype = tensors[0].dtype
        if dtype not in (torch.float16, torch.bfloat16):
            return fn(*tensors, mode)
        return tuple(t.to(dtype) for t in fn(*(t.float() for t in tensors), mode))

    return wrapped


@_upcast_16bit
def native_cpu_step(z, m, s, mode):
    """The C++ kernel of csrc/iaf/iaf_cpu.cpp on contiguous (R, F) tensors (measured slower than PyTorch)."""
    from gm._ext import ext  # noqa: PLC0415

    r, f = z.shape
    z_new, ld = torch.empty_like(z), torch.empty(r, dtype=z.dtype)
    ext().iaf_step_forward_cpu(z.data_ptr(), m.data_ptr(), s.data_ptr(), z_new.data_ptr(), ld.data_ptr(), r, f,
                               _MODE_CODES[mode], _dtype_code(z))  # fmt: skip
    return z_new, ld


@_upcast_16bit
def native_cpu_step_backward(z, m, s, gz, gl, mode):
    from gm._ext import ext  # noqa: PLC0415

    r, f = z.shape
    dz, dm, ds = torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)
    ext().iaf_step_backward_cpu(z.data_ptr(), m.data_ptr(), s.data_ptr(), gz.data_ptr(), gl.data_ptr(), dz.data_ptr(),
                                dm.data_ptr(), ds.data_ptr(), r, f, _MODE_CODES[mode], _dtype_code(z))  # fmt: skip
    return dz, dm, ds


def _cuda_step(z, m, s, mode):
    from gm._ext import device_guard, ext, stream_of  # noqa: PLC0415

    r, f = z.shape
    z_new, ld = torch.empty_like(z), torch.empty(r, dtype=z.dtype, device=z.device)
    with device_guard(z):  # launch on the tensors' GPU
        ext().iaf_step_forward_cuda(z.data_ptr(), m.data_ptr(), s.data_ptr(), z_new.data_ptr(), ld.data_ptr(), r, f,
                                    _MODE_CODES[mode], _dtype_code(z), stream_of(z))  # fmt: skip
    return z_new, ld


def _cuda_step_backward(z, m, s, gz, gl, mode):
    from gm._ext import device_guard, ext, stream_of  # noqa: PLC0415

    r, f = z.shape
    dz, dm, ds = torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)
    with device_guard(z):
        ext().iaf_step_backward_cuda(z.data_ptr(), m.data_ptr(), s.data_ptr(), gz.data_ptr(), gl.data_ptr(),
                                     dz.data_ptr(), dm.data_ptr(), ds.data_ptr(), r, f, _MODE_CODES[mode],
                                     _dtype_code(z), stream_of(z))  # fmt: skip
    return dz, dm, ds


def _triton_step(z, m, s, mode):
    from gm.kernels import iaf as k  # noqa: PLC0415

    return k.step_forward(z, m, s, mode)


def _triton_step_backward(z, m, s, gz, gl, mode):
    from gm.kernels import iaf as k  # noqa: PLC0415

    return k.step_backward(z, m, s, gz, gl, mode)


_MODE_CODES = {"gated": 0, "affine": 1}


def _dtype_code(t):
    from gm._ext import dtype_code  # noqa: PLC0415

    return dtype_code(t)


# cpu backend: PyTorch. Measured (one thread, N=4096, D=64 / 256, float32): the scalar C++ kernel of
# csrc/iaf/iaf_cpu.cpp took 4.4 / 17.5 ms forward against PyTorch's vectorised (SLEEF) 0.5 / 9.6 ms, and
# 7.6 / 39 ms forward+backward against 1.6 / 14 ms: without vectorised exp/log1p the fused pass loses. The C++
# entry points stay (gm._C.iaf_step_forward_cpu, ...) as the host twin of the CUDA kernel's shared math.
_STEP_FWD = {"reference": _reference_step, "cpu": _reference_step, "triton": _triton_step, "cuda": _cuda_step}
_STEP_BWD = {
    "reference": _torch_step_backward,
    "cpu": _torch_step_backward,
    "triton": _triton_step_backward,
    "cuda": _cuda_step_backward,
}


# ----------------------------------------------------------------------------------------------------------------
# iaf_made_output backends.


def _torch_made_output(hidden, weight, mask, bias, z, mode, entry=None):
    from gm.reference.iaf import iaf_made_output  # noqa: PLC0415

    entry or mask_entry(mask)  # checks the mask binary, as the other backends do
    return iaf_made_output(hidden, weight, mask, bias, z, mode=mode)


def _torch_made_output_backward(hidden, weight, mask, bias, z, gz, gl, mode, need_h, need_w, need_b, saved=None,
                                entry=None):
    from gm.reference.iaf import masked_linear  # noqa: PLC0415

    d = z.shape[1]
    out = masked_linear(hidden, weight, mask, bias)
    m, s = out[:, :d].contiguous(), out[:, d:].contiguous()
    dz, dm, ds = _torch_step_backward(z, m, s, gz, gl, mode)
    dout = torch.cat([dm, ds], dim=1)
    mw = mask.to(weight.dtype)
    dh = dout @ (weight * mw) if need_h else None
    dw = (dout.t() @ hidden) * mw if need_w else None
    db = dout.sum(0) if need_b else None
    return dh, dw, db, dz


def _group(d: int) -> int:
    return math.gcd(d, 16)


def _interleave(t: torch.Tensor, d: int) -> torch.Tensor:
    """Rows [m (D); s (D)] of a (2D, ...) tensor reordered in groups of g = gcd(D, 16) rows:
    m_0..m_{g-1}, s_0..s_{g-1}, m_g, ... (a copy)."""
    g = _group(d)
    rest = t.shape[1:]
    return t.view(2, d // g, g, *rest).transpose(0, 1).reshape(t.shape)


def _deinterleave(t: torch.Tensor, d: int) -> torch.Tensor:
    g = _group(d)
    rest = t.shape[1:]
    return t.view(d // g, 2, g, *rest).transpose(0, 1).reshape(t.shape)


CPU_COPY_MACS = 10  # cost of copying one element, in multiply-adds (2-core dev machine: ~0.1 ns vs ~0.01 ns)


def _cpu_fused_layout(entry, n: int):
    """How the cpu backend runs the output layer at batch size n: (interleaved, plan).

    A MADE output mask stacks one staircase per head ([m rows; s rows]), so row blocks of it cannot follow the
    staircase without doubling the GEMM calls. With the rows interleaved in groups of 16 (m_0..m_15, s_0..s_15,
    m_16, ...) both heads' rows of one degree sit together and half as many blocks follow it. The interleaved
    layout is used when the cost model says it is cheaper, counting what it adds: the weight and bias are
    interleaved (one pass each), m and s copied out of the GEMM's output and dm, ds copied back in (N x 2D
    each), the weight gradient de-interleaved at the end. On the dev machine that pays from a 2 x 1024 MADE
    (H = 1024) up, not at H = 256 with N = 512 (bench/NOTES.md).
    """
    key = ("cpu_fused", batch_bucket(n))
    hit = entry.maps.get(key)
    if hit is None:
        plan = cpu_plan(entry, n)
        hit = (False, plan)
        o, h = entry.u8.shape
        if o % 2 == 0 and o > 0:
            nb = batch_bucket(n)[0]
            nz_i = _interleave(entry.u8.cpu() != 0, o // 2)
            plan_i = plan_blocks(nz_i, nb)
            # Extra passes (5 over N x 2D, 2 over 2D x H) at ~10 multiply-adds an element, and ~5 small calls
            # at a quarter of a GEMM call's fixed cost, in the plan's units (multiply-adds / N).
            extra = CPU_COPY_MACS * (5 * o + 2 * o * h / nb) + 0.25 * 5 * cpu_call_cost() / nb
            if plan_i.cost + extra < plan.cost:
                hit = (True, plan_i)
        entry.maps[key] = hit
    return hit


def _cpu_fused_mask(entry, dtype: torch.dtype, d: int, interleaved: bool) -> torch.Tensor:
    """The mask as `dtype` in the layout of _cpu_fused_layout (cached)."""
    if not interleaved:
        return mask_as(entry, dtype)
    key = ("cpu_fused_mask", dtype)
    mf = entry.maps.get(key)
    if mf is None:
        mf = entry.maps[key] = _interleave(mask_as(entry, dtype), d)
    return mf


def _cpu_fused_weight(weight, entry, d: int, interleaved: bool) -> torch.Tensor:
    """weight ⊙ mask in the layout of _cpu_fused_layout (one pass; a where, so NaN under the mask stays out)."""
    if not interleaved:
        return premasked_weight(weight, entry, transposed=False)
    keep = _cpu_fused_mask(entry, torch.bool, d, interleaved)
    zero = zero_scalar(weight.device, weight.dtype)
    g = _group(d)
    out = weight.new_empty(d // g, 2, g, weight.shape[1])
    torch.where(keep.view(out.shape), weight.view(2, d // g, g, -1).transpose(0, 1), zero, out=out)
    return out.view(weight.shape)


def _split_heads(out: torch.Tensor, d: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not interleaved:
        return out[:, :d], out[:, d:]
    g = _group(d)
    grouped = out.view(out.shape[0], d // g, 2, g)
    return grouped[:, :, 0].reshape(-1, d), grouped[:, :, 1].reshape(-1, d)


def _cpu_made_output(hidden, weight, mask, bias, z, mode, entry=None):
    """cpu backend: [m, s] on the mask's non-zero blocks (gm.ops.masked_linear.blocked_linear), then the step.
    Returns [m, s] (N, 2D, in the layout of _cpu_fused_layout) as well, saved for the backward, which then
    need not recompute it."""
    entry = entry or mask_entry(mask)
    d = z.shape[1]
    inter, plan = _cpu_fused_layout(entry, z.shape[0])
    wm = _cpu_fused_weight(weight, entry, d, inter)
    out = blocked_linear(hidden, wm, bias if bias is None or not inter else _interleave(bias, d), plan)
    z_new, ld = _reference_step(z, *_split_heads(out, d, inter), mode)
    return z_new, ld, out


def _cpu_made_output_backward(hidden, weight, mask, bias, z, gz, gl, mode, need_h, need_w, need_b, saved=None,
                              entry=None):
    entry = entry or mask_entry(mask)
    n, d = z.shape
    inter, plan = _cpu_fused_layout(entry, n)
    wm = _cpu_fused_weight(weight, entry, d, inter)
    out = saved
    if saved is None or saved.dim() != 2:  # not saved by the forward: recompute [m, s]
        out = blocked_linear(hidden, wm, bias if bias is None or not inter else _interleave(bias, d), plan)
    dz, dm, ds = _torch_step_backward(z, *_split_heads(out, d, inter), gz, gl, mode)
    if inter:
        g = _group(d)
        dout = torch.stack([dm.view(n, d // g, g), ds.view(n, d // g, g)], dim=2).view(n, 2 * d)
    else:
        dout = torch.cat([dm, ds], dim=1)
    dh = blocked_input_grad(dout, wm, plan) if need_h else None
    dw = None
    if need_w:
        dw = blocked_weight_grad(dout, hidden, _cpu_fused_mask(entry, weight.dtype, d, inter), plan)
        dw = _deinterleave(dw, d) if inter else dw
    db = torch.cat([dm.sum(0), ds.sum(0)]) if need_b else None
    return dh, dw, db, dz


def fused_tile_map(entry, block_d: int, block_k: int):
    """Tile map over (D, H) for both heads at once: a tile is listed when either head's tile holds a one, and
    marked full only when both are all ones."""
    key = ("iaf_output", block_d, block_k)
    tm = entry.maps.get(key)
    if tm is None:
        d = entry.u8.shape[0] // 2
        any_m, full_m = tile_grids(entry.u8[:d], block_d, block_k)
        any_s, full_s = tile_grids(entry.u8[d:], block_d, block_k)
        tm = build_tile_map(any_m | any_s, full_m & full_s, block_d, block_k)
        entry.maps[key] = tm
    return tm


def _triton_made_output(hidden, weight, mask, bias, z, mode, entry=None):
    from gm.kernels import iaf as k  # noqa: PLC0415

    entry = entry or mask_entry(mask)
    bd, bk = k.fused_tile_sizes(hidden.dtype)
    tm = fused_tile_map(entry, bd, bk)
    return k.made_output_forward(hidden, weight, entry.u8, bias, z, tm.rows, bd, bk, mode)


def _triton_made_output_backward(hidden, weight, mask, bias, z, gz, gl, mode, need_h, need_w, need_b, saved=None,
                                 entry=None):
    from gm.kernels import iaf as k  # noqa: PLC0415
    from gm.kernels import masked_linear as kl  # noqa: PLC0415

    entry = entry or mask_entry(mask)
    bd, bk = k.fused_tile_sizes(hidden.dtype)
    tm = fused_tile_map(entry, bd, bk)
    dz, dout = k.made_output_backward(hidden, weight, entry.u8, bias, z, gz, gl, tm.rows, bd, bk, mode)
    dh = dw = db = None
    if need_h:
        bo, bkk = kl.tile_sizes(hidden.dtype)
        lm = linear_tile_map(entry, bo, bkk)
        dh = kl.masked_gemm(dout, None, premasked_weight(weight, entry, transposed=False), entry.u8, None, lm.cols,
                            transpose=True, pro_act=None, epi_act=None, block_i=bo, block_j=bkk,
                            premasked=True)  # fmt: skip
    if need_w or need_b:
        bo, bkk = kl.wgrad_tile_sizes(hidden.dtype)
        lm = linear_tile_map(entry, bo, bkk)
        dw, db = kl.masked_wgrad(dout, None, hidden, entry.u8, lm.flags, lm.nonempty, act=None, need_bias=need_b,
                                 block_o=bo, block_k=bkk)  # fmt: skip
    return dh, dw, db, dz


def _cuda_made_output(hidden, weight, mask, bias, z, mode, entry=None):
    from gm.ops import _masked_linear_cuda as kc  # noqa: PLC0415

    return kc.made_output_forward(hidden, weight, entry or mask_entry(mask), bias, z, mode)


def _cuda_made_output_backward(hidden, weight, mask, bias, z, gz, gl, mode, need_h, need_w, need_b, saved=None,
                               entry=None, below=None):  # fmt: skip
    """below = (hidden, the hidden layers' activation): dh comes back as the last hidden layer's pre-activation
    gradient (gm.ops._masked_linear_cuda.input_grad), as gm.ops.made_iaf_step chains the layers."""
    from gm.ops import _masked_linear_cuda as kc  # noqa: PLC0415

    entry = entry or mask_entry(mask)
    dz, dout = kc.made_output_backward(hidden, weight, entry, bias, z, gz, gl, mode)
    dh = kc.input_grad(dout, weight, entry, below) if need_h else None
    dw, db = kc.weight_and_bias_grad(dout, hidden, entry, need_w, need_b) if need_w or need_b else (None, None)
    return dh, dw, db, dz


_FUSED_FWD = {
    "reference": _torch_made_output,
    "cpu": _cpu_made_output,
    "triton": _triton_made_output,
    "cuda": _cuda_made_output,
}
_FUSED_BWD = {
    "reference": _torch_made_output_backward,
    "cpu": _cpu_made_output_backward,
    "triton": _triton_made_output_backward,
    "cuda": _cuda_made_output_backward,
}


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration.


def _grad_or_zeros(g, like):
    return torch.zeros_like(like) if g is None else g.contiguous()


def _iaf_step_impl(
    z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, mode: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    z_new, ld = _STEP_FWD[backend](z.contiguous(), m.contiguous(), s.contiguous(), mode)
    return z_new.contiguous(), ld.contiguous()


_iaf_step_op = torch.library.custom_op(_STEP, _iaf_step_impl, mutates_args=())


@_iaf_step_op.register_fake
def _(z, m, s, mode, backend):
    return z.new_empty(z.shape), z.new_empty(z.shape[0])


def _iaf_step_backward_impl(
    z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, gz: torch.Tensor, gl: torch.Tensor, mode: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dz, dm, ds = _STEP_BWD[backend](z.contiguous(), m.contiguous(), s.contiguous(), gz.contiguous(), gl.contiguous(),
                                    mode)  # fmt: skip
    return dz.contiguous(), dm.contiguous(), ds.contiguous()


_iaf_step_backward_op = torch.library.custom_op(_STEP + "_backward", _iaf_step_backward_impl, mutates_args=())


@_iaf_step_backward_op.register_fake
def _(z, m, s, gz, gl, mode, backend):
    return z.new_empty(z.shape), z.new_empty(z.shape), z.new_empty(z.shape)


def _step_setup(ctx, inputs, output):
    z, m, s, mode, backend = inputs
    ctx.save_for_backward(z, m, s)
    ctx.mode, ctx.backend = mode, backend


def _step_backward(ctx, gz, gl):
    z, m, s = ctx.saved_tensors
    gz = _grad_or_zeros(gz, z)
    gl = _grad_or_zeros(gl, z[:, 0])
    dz, dm, ds = backward_call(ctx, _iaf_step_backward_op, _iaf_step_backward_impl, z, m, s, gz, gl, ctx.mode,
                               ctx.backend)  # fmt: skip
    return dz, dm, ds, None, None


_iaf_step_op.register_autograd(_step_backward, setup_context=_step_setup)
_IAF_STEP = EagerOp(_iaf_step_op, _iaf_step_impl, _step_setup, _step_backward)


def _made_output_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    mode: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z', logdet, saved): saved is what the backend keeps for its backward ([m, s] (N, 2D) on the cpu backend,
    an empty tensor on the others); the public function drops it."""
    z_new, ld, *saved = _FUSED_FWD[backend](hidden, weight, mask, bias, z.contiguous(), mode)
    saved = saved[0].contiguous() if saved else hidden.new_empty(0)
    return z_new.contiguous(), ld.contiguous(), saved


_made_output_op = torch.library.custom_op(_FUSED, _made_output_impl, mutates_args=())


@_made_output_op.register_fake
def _(hidden, weight, mask, bias, z, mode, backend):
    saved = hidden.new_empty(z.shape[0], weight.shape[0]) if backend == "cpu" else hidden.new_empty(0)
    return z.new_empty(z.shape), z.new_empty(z.shape[0]), saved


def _made_output_backward_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    gz: torch.Tensor,
    gl: torch.Tensor,
    saved: torch.Tensor,
    mode: str,
    backend: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dh, dw, db, dz = _FUSED_BWD[backend](hidden, weight, mask, bias, z.contiguous(), gz.contiguous(),
                                         gl.contiguous(), mode, need_h, need_w, need_b, saved)  # fmt: skip
    dh = dh.contiguous() if dh is not None else hidden.new_empty(0)
    dw = dw.contiguous() if dw is not None else weight.new_empty(0)
    db = db.contiguous() if db is not None else weight.new_empty(0)
    return dh, dw, db, dz.contiguous()


_made_output_backward_op = torch.library.custom_op(_FUSED + "_backward", _made_output_backward_impl, mutates_args=())


@_made_output_backward_op.register_fake
def _(hidden, weight, mask, bias, z, gz, gl, saved, mode, backend, need_h, need_w, need_b):
    return (
        hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_w else weight.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_b else weight.new_empty(0),
        z.new_empty(z.shape),
    )


def _fused_setup(ctx, inputs, output):
    hidden, weight, mask, bias, z, mode, backend = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(hidden, weight, mask, bias, z, output[2])
    ctx.mode, ctx.backend = mode, backend


def _fused_backward(ctx, gz, gl, _gsaved):
    hidden, weight, mask, bias, z, saved = ctx.saved_tensors
    need_h, need_w, _, need_b, _ = ctx.needs_input_grad[:5]
    need_b = need_b and bias is not None
    gz = _grad_or_zeros(gz, z)
    gl = _grad_or_zeros(gl, z[:, 0])
    dh, dw, db, dz = backward_call(ctx, _made_output_backward_op, _made_output_backward_impl, hidden, weight, mask,
                                   bias, z, gz, gl, saved, ctx.mode, ctx.backend, need_h, need_w, need_b)  # fmt: skip
    return (dh if need_h else None), (dw if need_w else None), None, (db if need_b else None), dz, None, None


_made_output_op.register_autograd(_fused_backward, setup_context=_fused_setup)
_MADE_OUTPUT = EagerOp(_made_output_op, _made_output_impl, _fused_setup, _fused_backward)


class _CpuMadeOutput(torch.autograd.Function):
    """Eager cpu calls with gradients (gm.ops._eager), keeping the mask's cache entry for the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, mask, bias, z, mode):
        ctx.entry = mask_entry(mask)
        z_new, ld, saved = _cpu_made_output(hidden, weight, mask, bias, z.contiguous(), mode, ctx.entry)
        ctx.save_for_backward(hidden, weight, mask, bias, z, saved)
        ctx.mode = mode
        return z_new, ld

    @staticmethod
    @once_differentiable
    def backward(ctx, gz, gl):
        hidden, weight, mask, bias, z, saved = ctx.saved_tensors
        need_h, need_w, _, need_b, need_z, _ = ctx.needs_input_grad
        need_b = need_b and bias is not None
        if not (need_h or need_w or need_b or need_z):
            return None, None, None, None, None, None
        z = z.contiguous()
        gz = _grad_or_zeros(gz, z)
        gl = _grad_or_zeros(gl, z[:, 0])
        dh, dw, db, dz = _cpu_made_output_backward(hidden, weight, mask, bias, z, gz, gl, ctx.mode, need_h, need_w,
                                                   need_b, saved, ctx.entry)  # fmt: skip
        return dh, dw, None, db, dz, None


# ----------------------------------------------------------------------------------------------------------------
# Public functions.


def _step_backend(backend: str | None, device: torch.device) -> str:
    chosen = resolve(backend, device, native_cpu=False)
    if chosen == "cuda":
        from gm._ext import ext  # noqa: PLC0415

        if not hasattr(ext(), "iaf_step_forward_cuda"):
            raise NotImplementedError("gm._C has no iaf CUDA kernels: rebuild the extension with nvcc on PATH")
    return chosen


def iaf_step(
    z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, *, mode: str = "gated", backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One IAF update (Kingma, Salimans et al. 2016, eq. 14 for "gated"; "affine" is eq. 10 with s = log σ).

    Args:
        z, m, s: (N, ...) tensors of one shape and float dtype, on one device.
        mode: "gated" (σ = sigmoid(s), z' = σ z + (1 − σ) m, logdet = Σ log σ) or
            "affine" (z' = (z − m) exp(−s), logdet = −Σ s).
        backend: None (auto), "reference", "cpu", "triton" or "cuda".

    Returns:
        (z' with z's shape, logdet (N,)) where logdet sums over every non-batch dim.

    Example:
        >>> z, m, s = torch.randn(3, 4, 4, 4).unbind(0)
        >>> z_new, logdet = iaf_step(z, m, s)
        >>> z_new.shape, logdet.shape
        (torch.Size([4, 4]), torch.Size([4]))
    """
    check_tensor("z", z)
    check_tensor("m", m)
    check_tensor("s", s)
    check_same("z", z, m=m, s=s)
    if z.dim() < 1:
        raise ValueError("z must have a batch dimension, got a 0-d tensor")
    for name, t in (("m", m), ("s", s)):
        if t.shape != z.shape:
            raise ValueError(f"{name} must have z's shape {tuple(z.shape)}, got {tuple(t.shape)}")
    check_choice("mode", mode, MODES)
    chosen = _step_backend(backend, z.device)
    n = z.shape[0]
    flat = (n, z[0].numel()) if n > 0 else (0, 1)
    z_new, ld = _IAF_STEP(z.reshape(flat), m.reshape(flat), s.reshape(flat), mode, chosen)
    return z_new.reshape(z.shape), ld


def iaf_made_output(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    *,
    mode: str = "gated",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last MADE layer fused with the IAF step: [m, s] = hidden (weight ⊙ mask)^T + bias, then iaf_step.

    Args:
        hidden: (N, H) output of the last hidden layer.
        weight, mask: (2D, H); rows 0..D−1 produce m, rows D..2D−1 produce s. mask binary (cached as in
            gm.ops.masked_linear).
        bias: optional (2D,).
        z: (N, D).
        mode: "gated" or "affine" (see iaf_step).
        backend: None (auto), "reference", "cpu", "triton" or "cuda" (float16/bfloat16/float32; auto sends
            float64 CUDA tensors to triton).

    Returns:
        (z' (N, D), logdet (N,)).
    """
    check_tensor("hidden", hidden, ndim=2)
    check_tensor("weight", weight, ndim=2)
    check_tensor("z", z, ndim=2)
    check_same("hidden", hidden, weight=weight, bias=bias, z=z)
    check_mask(mask, weight)
    check_choice("mode", mode, MODES)
    n, h = hidden.shape
    d = z.shape[1]
    if weight.shape != (2 * d, h):
        raise ValueError(f"weight must have shape (2D, H) = {(2 * d, h)} for z {tuple(z.shape)} and hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")  # fmt: skip
    if z.shape[0] != n:
        raise ValueError(f"z must have hidden's batch size {n}, got {z.shape[0]}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != 2 * d:
            raise ValueError(f"bias must have 2D={2 * d} entries, got {bias.shape[0]}")
    chosen = resolve(backend, hidden.device, native_cpu=False,
                     cuda_kernels=CUDA_FUSED_READY and hidden.dtype != torch.float64)  # fmt: skip
    if chosen == "cpu" and eager_ok(hidden, weight, mask, bias, z):
        if needs_grad(hidden, weight, bias, z):
            return _CpuMadeOutput.apply(hidden, weight, mask, bias, z, mode)
        return _cpu_made_output(hidden, weight, mask, bias, z.contiguous(), mode)[:2]
    z_new, ld, _ = _MADE_OUTPUT(hidden, weight, mask, bias, z, mode, chosen)
    return z_new, ld
