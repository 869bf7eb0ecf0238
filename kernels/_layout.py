"""Data-movement passes shared by the Triton launchers: memory-format conversions (NCHW-contiguous <->
channels_last, NHWC in memory), the gather that packs a weight for a kernel (gather) and the sum of split-K partial
results (sum_splits, at the end of this file).

The implicit-GEMM and diagonal-scan kernels read channels-last operands (16-byte loads along the channel dim), and
the diagonal scans write channels-last outputs. torch's `t.contiguous(memory_format=...)` between the two layouts
is a generic strided copy: ~0.2 ms for 64 MB of bf16 on an H200 (~0.6 TB/s of the 4.2 available; bench/NOTES.md).
Both directions are a batched 2-D transpose, (B, R, S) -> (B, S, R): the kernel here copies one (R x S) tile per
program, read along S and written along R (Triton stages the transpose through shared memory), so reads and
writes are both coalesced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gm.kernels._common import INTERPRETED, cdiv
from gm.kernels._launch import fast


@triton.jit
def transpose_kernel(x_ptr, y_ptr, R, S, X_BATCH_STRIDE, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """y[b, s, r] = x[b, r, s] for x (B, R, S) with contiguous (R, S) blocks X_BATCH_STRIDE elements apart (a
    channel slice of a larger NCHW tensor too) and contiguous y (B, S, R)."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(2).to(tl.int64)  # one batch entry; offsets inside it fit int32 (the launcher checks)
    ok = (r[:, None] < R) & (s[None, :] < S)
    v = tl.load(x_ptr + b * X_BATCH_STRIDE + (r[:, None] * S + s[None, :]), mask=ok)
    tl.store(y_ptr + b * R * S + (s[None, :] * R + r[:, None]), v, mask=ok)


_BLOCK = 16 if INTERPRETED else 64  # tile edge
_MAX_GRID_Z = 65535


def _transpose_into(x: torch.Tensor, out: torch.Tensor, b: int, r: int, s: int) -> torch.Tensor:
    grid = (cdiv(s, _BLOCK), cdiv(r, _BLOCK), b)
    fast(transpose_kernel)[grid](x, out, r, s, x.stride(0), BLOCK_R=_BLOCK, BLOCK_S=_BLOCK, num_warps=4)
    return out


def _images_contiguous(t: torch.Tensor) -> bool:
    """Each image's (C, H, W) block contiguous (an NCHW tensor, or a channel slice of one), images anywhere."""
    _, c, h, w = t.shape
    return t.stride()[1:] == (h * w, w, 1) or c * h * w <= 1


def _kernel_ok(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.numel() > 0 and t.shape[0] <= _MAX_GRID_Z and t[0].numel() < 2**31


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) `t` as a channels_last tensor: `t` itself when it is one already, a tiled copy when each image
    of `t` is an NCHW block (a contiguous tensor or a channel slice of one), torch's strided copy otherwise."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return t
    if not (_kernel_ok(t) and (t.is_contiguous() or _images_contiguous(t))):
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    return _transpose_into(t, torch.empty_like(t, memory_format=torch.channels_last), n, c, h * w)


def nchw(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) `t` as an NCHW-contiguous tensor: `t` itself when it is one already, a tiled copy of a
    channels_last `t`, torch's strided copy of any other layout."""
    if t.is_contiguous():
        return t
    if not (t.is_contiguous(memory_format=torch.channels_last) and _kernel_ok(t)):
        return t.contiguous()
    n, c, h, w = t.shape
    return _transpose_into(t, torch.empty(t.shape, dtype=t.dtype, device=t.device), n, h * w, c)


@triton.jit
def gather_kernel(src_ptr, idx_ptr, out_ptr, N, SRC_NUMEL, BLOCK: tl.constexpr):
    """out[i] = src[idx[i]], 0 where idx[i] >= SRC_NUMEL, for i < N (int32 indices >= 0)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    j = tl.load(idx_ptr + i, mask=ok, other=0)
    tl.store(out_ptr + i, tl.load(src_ptr + j, mask=ok & (j < SRC_NUMEL), other=0.0), mask=ok)


_GATHER_BLOCK = 128 if INTERPRETED else 1024


def gather(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = src.view(-1)[index[i]], 0 where index[i] >= src.numel(), in one launch, for an int32 `index` (built
    once per layout and cached by the caller): a weight packed in the layout a kernel reads, its masked or padded
    positions zero, where torch takes an index, a select and a transposed copy per form. The Triton twin of
    gm._ext.gather (csrc/layout), without its cast (the interpreter rounds float32 -> bfloat16 toward zero, so a
    cast here could not be checked against torch's on the CPU)."""
    src = src.contiguous()
    out = src.new_empty(index.shape)
    n = out.numel()
    if n == 0:
        return out
    if n >= 2**31 or src.numel() >= 2**31:
        raise ValueError(f"gather takes fewer than 2**31 elements, got an index of {n} into {src.numel()}")
    fast(gather_kernel)[(cdiv(n, _GATHER_BLOCK),)](src, index, out, n, src.numel(), BLOCK=_GATHER_BLOCK, num_warps=4)
    return out


@triton.jit
def split_sum_kernel(x_ptr, y_ptr, S, M, BLOCK: tl.constexpr):
    """y[i] = sum_s x[s, i] for contiguous x (S, M), accumulated in x's dtype, stored in y's."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M
    acc = tl.zeros((BLOCK,), dtype=x_ptr.dtype.element_ty)
    src = x_ptr + i
    for _ in range(0, S):
        acc += tl.load(src, mask=ok, other=0.0)
        src += M  # pointer arithmetic: 64-bit past 2**31 elements in all
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=ok)


_SUM_BLOCK = 64 if INTERPRETED else 1024


def sum_splits(partial: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """partial (S, ...) summed over its first dim and cast to out_dtype in one pass (torch's sum then cast is two
    launches and an intermediate): the split-K partial sums of the weight-gradient GEMMs."""
    if partial.shape[0] == 1:
        return partial[0].to(out_dtype)
    partial = partial.contiguous()
    out = torch.empty(partial.shape[1:], dtype=out_dtype, device=partial.device)
    m = out.numel()
    if m == 0:
        return out
    if m >= 2**31:
        return partial.sum(0).to(out_dtype)
    grid = (cdiv(m, _SUM_BLOCK),)
    fast(split_sum_kernel)[grid](partial, out, partial.shape[0], m, BLOCK=_SUM_BLOCK, num_warps=4)
    return out
