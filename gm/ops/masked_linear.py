"""masked_linear: the MADE layer (Germain et al. 2015), a linear map through a fixed 0/1 weight mask.

    y = act(x (W ⊙ M)^T + b),   act in {None, "elu", "relu"}

The fast backends skip all-zero tiles of M: a tile map (which (BLOCK_O x BLOCK_K) tiles of the mask hold a one,
and which are all ones) is computed once per mask and cached, so a degree-sorted MADE layer, whose mask is
block-triangular, does about half the work of the dense GEMM. Gradients: x, weight (exactly zero where masked)
and bias.

Mask cache. `mask_entry(mask)` keys on (data_ptr, version counter, shape, strides, dtype, device) and keeps a
strong reference to the mask, so the address cannot be reused by another tensor while its entry lives, and an
in-place write to the mask (or a view of it) bumps the version and misses the cache. The first use of a mask
checks that it is binary (one device sync) and keeps a uint8 copy; tile maps for each tile size are added
lazily. At most `MASK_CACHE_SIZE` masks are kept (least recently used dropped). Inference-mode tensors have no
version counter: they are keyed without it (do not write into a mask in place under inference_mode).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from gm._backend import resolve
from gm._checks import check_choice, check_same, check_tensor
from gm.ops._eager import EagerOp, backward_call, eager_ok, needs_grad, zero_scalar

ACTIVATIONS = (None, "elu", "relu")
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
               torch.float32, torch.float64)  # fmt: skip
MASK_CACHE_SIZE = 64
_OP = "gm::masked_linear"
# CUDA C++ GEMMs (csrc/masked_linear, gm/ops/_masked_linear_cuda.py): auto picks them for CUDA tensors of
# float16/bfloat16/float32 (float64 goes to triton).
CUDA_READY = True


# ----------------------------------------------------------------------------------------------------------------
# Mask cache and tile maps.


@dataclass
class TileMap:
    """Which (block_o x block_k) tiles of a mask are non-zero, compressed both ways.

    rows = (offsets (n_ot + 1,), k-tile indices, mids (n_ot,)): the non-empty k tiles of each o tile (forward),
    all-ones tiles first (offsets[i]..mids[i]), then partly-zero ones (mids[i]..offsets[i + 1]).
    cols = the same per k tile, listing o tiles (input gradient). flags (n_ot, n_kt): 0 empty, 1 partly zero,
    2 all ones (weight gradient). All int32 on the mask's device.
    """

    block_o: int
    block_k: int
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    cols: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    flags: torch.Tensor
    nonempty: int


@dataclass
class MaskEntry:
    mask: torch.Tensor  # strong reference: keeps the address from being reused while cached
    u8: torch.Tensor  # contiguous uint8 copy, 1 where the mask is non-zero
    maps: dict = field(default_factory=dict)


_CACHE: OrderedDict = OrderedDict()
_LOCK = threading.Lock()


def _mask_key(mask: torch.Tensor) -> tuple:
    try:
        version = mask._version
    except RuntimeError:  # inference tensors track no version
        version = None
    return (mask.data_ptr(), version, mask.shape, mask.stride(), mask.dtype, mask.device)


def check_binary(name: str, mask: torch.Tensor) -> None:
    """ValueError unless every entry of `mask` is 0 or 1 (one device sync for a GPU tensor)."""
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"{name} must be binary (only 0 and 1), got a value {bad}")


def mask_entry(mask: torch.Tensor, name: str = "mask") -> MaskEntry:
    """The cached entry of `mask`, created (and the mask checked binary: one device sync) on first use."""
    key = _mask_key(mask)
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None:
            _CACHE.move_to_end(key)
            return entry
    check_binary(name, mask)
    entry = MaskEntry(mask=mask, u8=(mask != 0).to(torch.uint8).contiguous())
    with _LOCK:
        _CACHE[key] = entry
        while len(_CACHE) > MASK_CACHE_SIZE:
            _CACHE.popitem(last=False)
    return entry


def clear_mask_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def tile_grids(mask_u8: torch.Tensor, block_o: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full) bool (n_ot, n_kt): tiles holding a one; tiles of all ones (out-of-range parts count as ones)."""
    o, k = mask_u8.shape
    n_ot, n_kt = -(-o // block_o), -(-k // block_k)
    padded = torch.zeros(n_ot * block_o, n_kt * block_k, dtype=torch.bool, device=mask_u8.device)
    padded[:o, :k] = mask_u8 != 0
    outside = torch.ones_like(padded)
    outside[:o, :k] = False
    tiles = padded.view(n_ot, block_o, n_kt, block_k)
    anyt = tiles.any(dim=3).any(dim=1)
    full = (tiles | outside.view(n_ot, block_o, n_kt, block_k)).all(dim=3).all(dim=1)
    return anyt, full


def _csr(anyt: torch.Tensor, full: torch.Tensor):
    """(offsets (n + 1,), tile indices, mids (n,)) with each row's all-ones tiles listed before its partly-zero
    ones: row i's tiles are idx[offsets[i]:offsets[i+1]], the all-ones ones idx[offsets[i]:mids[i]]."""
    nz = anyt.nonzero()
    rows, cols = nz[:, 0], nz[:, 1]
    is_full = full[rows, cols]
    n_cols = anyt.shape[1]
    order = torch.argsort(rows * (2 * n_cols) + (~is_full).long() * n_cols + cols)
    idx = cols[order].to(torch.int32).contiguous()
    offsets = torch.zeros(anyt.shape[0] + 1, dtype=torch.int32, device=anyt.device)
    offsets[1:] = anyt.sum(dim=1).cumsum(0)
    mids = (offsets[:-1] + (anyt & full).sum(dim=1)).to(torch.int32).contiguous()
    return (offsets, idx, mids), int(nz.shape[0])


def build_tile_map(anyt: torch.Tensor, full: torch.Tensor, block_o: int, block_k: int) -> TileMap:
    rows, nonempty = _csr(anyt, full)
    cols, _ = _csr(anyt.t(), full.t())
    flags = (anyt.to(torch.int32) * (1 + full.to(torch.int32))).contiguous()
    return TileMap(block_o, block_k, rows, cols, flags, nonempty)


def linear_tile_map(entry: MaskEntry, block_o: int, block_k: int) -> TileMap:
    key = ("linear", block_o, block_k)
    tm = entry.maps.get(key)
    if tm is None:
        tm = build_tile_map(*tile_grids(entry.u8, block_o, block_k), block_o, block_k)
        entry.maps[key] = tm
    return tm


# ----------------------------------------------------------------------------------------------------------------
# Backends.


def act_grad(grad: torch.Tensor, y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """grad * act'(pre-activation), written through the output y: ELU' = 1 or y + 1, ReLU' = [y > 0]. One fused
    pass (aten's elu_backward / threshold_backward, as autograd uses; torch.where + mul took ~4x longer)."""
    if activation == "elu":
        return torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, True, y)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, y, 0)
    return grad


def _torch_forward(x, weight, mask, bias, activation, entry=None):
    # reference backend: the eager reference on the masked dense weight.
    from gm.reference.iaf import masked_linear  # noqa: PLC0415

    entry or mask_entry(mask)  # checks the mask binary, as the other backends do
    return masked_linear(x, weight, mask, bias, activation=activation)


def _torch_backward(grad, y, x, weight, mask, activation, need_x, need_w, need_b, entry=None):
    entry or mask_entry(mask)
    m = mask.to(weight.dtype)
    gp = act_grad(grad, y, activation)
    dx = gp @ (weight * m) if need_x else None
    dw = (gp.t() @ x) * m if need_w else None
    db = gp.sum(0) if need_b else None
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# cpu backend: PyTorch's GEMMs (MKL/oneDNN) on the mask's non-zero blocks. No C++ GEMM was written: an OpenMP GEMM
# without a tuned micro-kernel does not come near MKL. Instead the mask is cut (once per mask and batch size,
# cached in its entry) into row blocks, each with the column range [k0, k1) that holds its ones; a degree-sorted
# MADE mask is block-triangular, so the blocks cover a bit over half of it and forward, input gradient and weight
# gradient each run a handful of sliced mm/addmm calls writing straight into slices of the result. The cut is
# chosen by a dynamic program under a measured cost model (see CpuPlan); for a mask without structure (random) it
# is one block, the dense masked GEMM.


@dataclass
class CpuPlan:
    """Blocks of an (O, K) mask for the cpu backend's GEMMs.

    rows: (r0, r1, k0, k1, z0, z1): output rows r0..r1 need only input columns k0..k1 (forward, weight
        gradient); the block's zeros lie in columns z0..z1 (z0 == z1: none), where its weight gradient is masked.
        k0 == k1: the rows see nothing (y = bias). Covers every row once.
    cols: (c0, c1, o0, o1): input columns c0..c1 are reached only from output rows o0..o1 (input gradient).
    area: the fraction of O*K that the row blocks cover.
    cost: the cost model's estimate for the row and the column blocks (forward + input gradient).
    dense: one block each way covering the whole mask (the plain masked GEMMs, without slicing).
    """

    rows: tuple
    cols: tuple
    area: float
    cost: float
    dense: bool = False


# Cost of one GEMM call over a block of r x c (the batch N is the third dimension), in units of one
# multiply-add over the batch: (r + PAD) * (c + PAD) + FIXED_MACS * threads / N. PAD models the lower efficiency
# of thin blocks, FIXED_MACS the per-call cost (Python, dispatch, OpenMP fork/join: ~10-15 us, during which each
# thread could have done ~1e6 multiply-adds). Fitted on the 2-core dev machine (MKL sgemm; bench/NOTES.md, "IAF on
# the CPU").
CPU_PAD = 16
CPU_FIXED_MACS = 1.0e6
CPU_COL_ALIGN = 8
CPU_MAX_CANDIDATES = 96  # block boundaries considered per dimension (rows are cut at multiples of O / 96 or 16)


def cpu_call_cost() -> float:
    """The fixed cost of one GEMM call in multiply-adds (CPU_FIXED_MACS per thread)."""
    return CPU_FIXED_MACS * torch.get_num_threads()


def _spans(nz: torch.Tensor) -> tuple[list[int], list[int]]:
    """(first, last + 1) non-zero column of each row of a bool (O, K) matrix; (K, 0) for an empty row."""
    k = nz.shape[1]
    idx = torch.arange(k, device=nz.device)
    lo = torch.where(nz, idx, k).amin(dim=1) if k else torch.full((nz.shape[0],), 0, dtype=torch.long)
    hi = torch.where(nz, idx + 1, 0).amax(dim=1) if k else torch.zeros(nz.shape[0], dtype=torch.long)
    return lo.tolist(), hi.tolist()


def cut_blocks(nz: torch.Tensor, n: int) -> tuple[list[tuple[int, int, int, int]], float]:
    """Row blocks (r0, r1, k0, k1) of a bool (O, K) mask minimising the cost model for batch size n (a dynamic
    program over block boundaries at multiples of 16 rows or O / CPU_MAX_CANDIDATES), and their cost."""
    o, k = nz.shape
    if o == 0:
        return [], 0.0
    lo, hi = _spans(nz)
    ca = CPU_COL_ALIGN  # column ranges widened to multiples of 8: MKL's sgemm takes ~1.5x longer for odd widths
    lo, hi = [v - v % ca for v in lo], [min(k, -(-v // ca) * ca) for v in hi]
    align = max(16, -(-o // CPU_MAX_CANDIDATES))
    bounds = list(range(0, o, align)) + [o]
    seg_lo = [min(lo[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    seg_hi = [max(hi[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    fixed = cpu_call_cost() / max(n, 1)
    m = len(bounds)
    best = [0.0] + [float("inf")] * (m - 1)
    prev = [0] * m
    for j in range(1, m):
        k0, k1 = k, 0
        for i in range(j - 1, -1, -1):
            k0, k1 = min(k0, seg_lo[i]), max(k1, seg_hi[i])
            cost = best[i] + fixed + ((bounds[j] - bounds[i] + CPU_PAD) * (k1 - k0 + CPU_PAD) if k1 > k0 else 0)
            if cost < best[j]:
                best[j], prev[j] = cost, i
    out, j = [], m - 1
    while j > 0:
        i = prev[j]
        r0, r1 = bounds[i], bounds[j]
        k0, k1 = min(lo[r0:r1]), max(hi[r0:r1])
        out.append((r0, r1, k0, k1) if k1 > k0 else (r0, r1, 0, 0))
        j = i
    return out[::-1], best[-1]


def plan_blocks(nz: torch.Tensor, n: int) -> CpuPlan:
    """The CpuPlan of a bool (O, K) CPU mask for batch size n."""
    o, k = nz.shape
    row_blocks, row_cost = cut_blocks(nz, n)
    col_blocks, col_cost = cut_blocks(nz.t(), n)
    rows = tuple((r0, r1, k0, k1, *_zero_columns(nz[r0:r1, k0:k1], k0)) for r0, r1, k0, k1 in row_blocks)
    area = sum((r1 - r0) * (k1 - k0) for r0, r1, k0, k1, _, _ in rows) / max(o * k, 1)
    dense = [r[:4] for r in rows] == [(0, o, 0, k)] and col_blocks == [(0, k, 0, o)] and o * k > 0
    return CpuPlan(rows, tuple(col_blocks), area, row_cost + col_cost, dense)


def _zero_columns(block: torch.Tensor, k0: int) -> tuple[int, int]:
    """The column range [z0, z1) (offset by k0) holding every zero of a bool block; (k0, k0) without zeros."""
    cols = (~block).any(dim=0).nonzero().flatten().tolist() if block.numel() else []
    return (k0 + cols[0], k0 + cols[-1] + 1) if cols else (k0, k0)


def batch_bucket(n: int) -> tuple[int, int]:
    """Plans are kept per power-of-two bucket of the batch size and per thread count."""
    return 1 << (max(int(n), 1).bit_length() - 1), torch.get_num_threads()


def cpu_plan(entry: MaskEntry, n: int) -> CpuPlan:
    """The cached CpuPlan of a mask for batch size n (kept per batch_bucket)."""
    bucket = batch_bucket(n)
    key = ("cpu_plan", bucket)
    plan = entry.maps.get(key)
    if plan is None:
        plan = entry.maps[key] = plan_blocks(entry.u8.cpu() != 0, bucket[0])
    return plan


def mask_as(entry: MaskEntry, dtype: torch.dtype) -> torch.Tensor:
    """The mask in `dtype` (cached on the entry)."""
    key = ("mask_as", dtype)
    m = entry.maps.get(key)
    if m is None:
        m = entry.maps[key] = entry.u8.to(dtype)
    return m


def premasked_weight(weight: torch.Tensor, entry: MaskEntry, *, transposed: bool) -> torch.Tensor:
    """W ⊙ M in one pass, as an (O, K) view; transposed=True lays it out (K, O) in memory (the forward GEMM's
    B operand, contiguous along its columns). One pass over the weight buys the GEMM kernels mask-free tiles in
    the layout the tensor cores read (masked tiles loaded transposed, with their mask, spilled registers)."""
    keep = mask_as(entry, torch.bool)
    zero = zero_scalar(weight.device, weight.dtype)
    if not transposed:
        return torch.where(keep, weight, zero)  # where, not a product: a NaN under the mask stays out
    out = torch.empty(weight.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device)
    torch.where(keep.t(), weight.t(), zero, out=out)
    return out.t()


def blocked_linear(x, wm, bias, plan: CpuPlan) -> torch.Tensor:
    """x (N, K) @ wm^T + bias over the plan's row blocks; wm (O, K) is the masked weight."""
    if plan.dense:
        return torch.addmm(bias, x, wm.t()) if bias is not None else torch.mm(x, wm.t())
    y = x.new_empty(x.shape[0], wm.shape[0])
    for r0, r1, k0, k1, _, _ in plan.rows:
        out = y[:, r0:r1]
        if k1 > k0:
            if bias is not None:
                torch.addmm(bias[r0:r1], x[:, k0:k1], wm[r0:r1, k0:k1].t(), out=out)
            else:
                torch.mm(x[:, k0:k1], wm[r0:r1, k0:k1].t(), out=out)
        elif bias is not None:
            out.copy_(bias[r0:r1].expand_as(out))
        else:
            out.zero_()
    return y


def blocked_input_grad(gp, wm, plan: CpuPlan) -> torch.Tensor:
    """gp (N, O) @ wm (O, K) over the plan's column blocks."""
    if plan.dense:
        return torch.mm(gp, wm)
    dx = gp.new_empty(gp.shape[0], wm.shape[1])
    for c0, c1, o0, o1 in plan.cols:
        if o1 > o0:
            torch.mm(gp[:, o0:o1], wm[o0:o1, c0:c1], out=dx[:, c0:c1])
        else:
            dx[:, c0:c1].zero_()
    return dx


def blocked_weight_grad(gp, x, mf: torch.Tensor, plan: CpuPlan) -> torch.Tensor:
    """(gp^T x) ⊙ mf, exactly zero outside the blocks; mf (O, K) is the mask in gp's dtype. Multiplying by the
    0/1 mask (as the reference does) runs ~20x faster than masked_fill_ with a bool mask."""
    if plan.dense:
        dw = torch.mm(gp.t(), x)
        _, _, _, _, z0, z1 = plan.rows[0]
        if z1 > z0:
            dw[:, z0:z1].mul_(mf[:, z0:z1])
        return dw
    dw = gp.new_empty(gp.shape[1], x.shape[1])
    k = x.shape[1]
    for r0, r1, k0, k1, z0, z1 in plan.rows:
        if k1 > k0:
            torch.mm(gp[:, r0:r1].t(), x[:, k0:k1], out=dw[r0:r1, k0:k1])
            if z1 > z0:  # only the columns of the block that hold zeros (a staircase's last few)
                dw[r0:r1, z0:z1].mul_(mf[r0:r1, z0:z1])
        if k0 > 0:
            dw[r0:r1, :k0].zero_()
        if k1 < k:
            dw[r0:r1, k1:].zero_()
    return dw


def _cpu_forward(x, weight, mask, bias, activation, entry=None):
    entry = entry or mask_entry(mask)
    plan = cpu_plan(entry, x.shape[0])
    y = blocked_linear(x, premasked_weight(weight, entry, transposed=False), bias, plan)
    if activation == "elu":
        torch.nn.functional.elu(y, inplace=True)
    elif activation == "relu":
        y.relu_()
    return y


def _cpu_backward(grad, y, x, weight, mask, activation, need_x, need_w, need_b, entry=None):
    entry = entry or mask_entry(mask)
    plan = cpu_plan(entry, x.shape[0])
    gp = act_grad(grad, y, activation)
    dx = blocked_input_grad(gp, premasked_weight(weight, entry, transposed=False), plan) if need_x else None
    dw = blocked_weight_grad(gp, x, mask_as(entry, weight.dtype), plan) if need_w else None
    db = gp.sum(0) if need_b else None
    return dx, dw, db


def _triton_forward(x, weight, mask, bias, activation, entry=None):
    from gm.kernels import masked_linear as k  # noqa: PLC0415

    entry = entry or mask_entry(mask)
    bo, bk = k.tile_sizes(x.dtype)
    tm = linear_tile_map(entry, bo, bk)
    wm = premasked_weight(weight, entry, transposed=True)
    return k.masked_gemm(
        x, None, wm, entry.u8, bias, tm.rows, transpose=False, pro_act=None, epi_act=activation,
        block_i=bk, block_j=bo, premasked=True,
    )  # fmt: skip


def _triton_backward(grad, y, x, weight, mask, activation, need_x, need_w, need_b, entry=None):
    from gm.kernels import masked_linear as k  # noqa: PLC0415

    entry = entry or mask_entry(mask)
    dx = dw = db = None
    if need_x:
        bo, bk = k.tile_sizes(x.dtype)
        tm = linear_tile_map(entry, bo, bk)
        dx = k.masked_gemm(
            grad, y, premasked_weight(weight, entry, transposed=False), entry.u8, None, tm.cols, transpose=True,
            pro_act=activation, epi_act=None, block_i=bo, block_j=bk, premasked=True,
        )  # fmt: skip
    if need_w or need_b:
        bo, bk = k.wgrad_tile_sizes(x.dtype)
        tm = linear_tile_map(entry, bo, bk)
        dw, db = k.masked_wgrad(
            grad, y, x, entry.u8, tm.flags, tm.nonempty, act=activation, need_bias=need_b, block_o=bo, block_k=bk
        )
    return dx, dw, db


def _cuda_forward(x, weight, mask, bias, activation, entry=None):
    from gm.ops import _masked_linear_cuda as kc  # noqa: PLC0415

    return kc.forward(x, weight, entry or mask_entry(mask), bias, activation)


def _cuda_backward(grad, y, x, weight, mask, activation, need_x, need_w, need_b, entry=None, grad_is_gp=False,
                   below=None):  # fmt: skip
    """grad_is_gp: grad is already the pre-activation gradient (the layer above's input gradient applied act'; see
    below). below = (x, its activation): dx comes back as the layer below's pre-activation gradient (its
    activation gradient applied in the GEMM's epilogue). gm.ops.made_iaf_step chains the layers this way."""
    from gm.ops import _masked_linear_cuda as kc  # noqa: PLC0415

    entry = entry or mask_entry(mask)
    gp = grad if grad_is_gp else kc.act_grad(grad, y, activation)  # shared by both gradients
    dx = kc.input_grad(gp, weight, entry, below) if need_x else None
    dw, db = kc.weight_and_bias_grad(gp, x, entry, need_w, need_b) if need_w or need_b else (None, None)
    return dx, dw, db


_FORWARD = {"reference": _torch_forward, "cpu": _cpu_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {"reference": _torch_backward, "cpu": _cpu_backward, "triton": _triton_backward, "cuda": _cuda_backward}


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration.


def _act_name(activation: str) -> str | None:
    return None if activation == "none" else activation


def _masked_linear_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    backend: str,
) -> torch.Tensor:
    return _FORWARD[backend](x, weight, mask, bias, _act_name(activation)).contiguous()


_masked_linear_op = torch.library.custom_op(_OP, _masked_linear_impl, mutates_args=())


@_masked_linear_op.register_fake
def _(x, weight, mask, bias, activation, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


def _masked_linear_backward_impl(
    grad: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    activation: str,
    backend: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _BACKWARD[backend](
        grad.contiguous(), y, x, weight, mask, _act_name(activation), need_x, need_w, need_b
    )
    dx = dx.contiguous() if dx is not None else x.new_empty(0)
    dw = dw.contiguous() if dw is not None else weight.new_empty(0)
    db = db.contiguous() if db is not None else weight.new_empty(0)
    return dx, dw, db


_masked_linear_backward_op = torch.library.custom_op(_OP + "_backward", _masked_linear_backward_impl, mutates_args=())


@_masked_linear_backward_op.register_fake
def _(grad, y, x, weight, mask, activation, backend, need_x, need_w, need_b):
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        weight.new_empty(weight.shape) if need_w else weight.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_b else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias, activation, backend = inputs
    y = output if activation != "none" else None
    ctx.save_for_backward(x, weight, mask, y)
    ctx.activation, ctx.backend, ctx.has_bias = activation, backend, bias is not None


def _backward(ctx, grad):
    x, weight, mask, y = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    if not (need_x or need_w or need_b):
        return None, None, None, None, None, None
    y = y if y is not None else grad  # unused without an activation
    dx, dw, db = backward_call(ctx, _masked_linear_backward_op, _masked_linear_backward_impl, grad, y, x, weight, mask,
                               ctx.activation, ctx.backend, need_x, need_w, need_b)  # fmt: skip
    return (dx if need_x else None), (dw if need_w else None), None, (db if need_b else None), None, None


_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)
_MASKED_LINEAR = EagerOp(_masked_linear_op, _masked_linear_impl, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------------------------
# Eager cpu calls with gradients: an autograd.Function of their own (gm.ops._eager), which also keeps the mask's
# cache entry for the backward.


class _CpuMaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, bias, activation):
        ctx.entry = mask_entry(mask)  # the mask's cache entry (a strong reference), reused by the backward
        y = _cpu_forward(x, weight, mask, bias, activation, ctx.entry)
        ctx.save_for_backward(x, weight, mask, y if activation is not None else None)  # mask: version-checked
        ctx.activation, ctx.has_bias = activation, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, mask, y = ctx.saved_tensors
        need_x, need_w, _, need_b, _ = ctx.needs_input_grad
        need_b = need_b and ctx.has_bias
        if not (need_x or need_w or need_b):
            return None, None, None, None, None
        dx, dw, db = _cpu_backward(grad.contiguous(), y, x, weight, mask, ctx.activation, need_x, need_w, need_b,
                                   ctx.entry)  # fmt: skip
        return dx, dw, None, db, None


class _CudaMaskedLinear(torch.autograd.Function):
    """Eager cuda calls with gradients whose widths are whole 16-byte rows: the per-layer launchers' launches from
    a plan made once per shape (gm.ops._masked_linear_cuda.LayerPlan), bit for bit the registered op's results."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, activation, plan):
        from gm.ops import _masked_linear_cuda as kc  # noqa: PLC0415

        y, x_read = kc.linear_forward(plan, x, weight, bias, activation)
        ctx.plan, ctx.activation, ctx.has_bias = plan, activation, bias is not None
        # x as the kernel read it (contiguous, aligned: the weight gradient reads it so); mask: version-checked
        ctx.save_for_backward(x_read, weight, mask, y if activation is not None else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        from gm.ops import _masked_linear_cuda as kc  # noqa: PLC0415

        x, weight, _, y = ctx.saved_tensors
        need_x, need_w, _, need_b, _, _ = ctx.needs_input_grad
        need_b = need_b and ctx.has_bias
        if not (need_x or need_w or need_b):
            return None, None, None, None, None, None
        dx, dw, db = kc.linear_backward(ctx.plan, grad.contiguous(), y, x, weight, ctx.activation, need_x, need_w,
                                        need_b)  # fmt: skip
        return dx, dw, None, db, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public function.


def check_mask(mask, weight: torch.Tensor, name: str = "mask") -> None:
    check_tensor(name, mask, ndim=2, dtypes=MASK_DTYPES)
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"{name} must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{name} is on {mask.device} but weight is on {weight.device}: put them on one device")


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = act(x (weight ⊙ mask)^T + bias): a MADE layer.

    Args:
        x: (..., K) float16/bfloat16/float32/float64.
        weight: (O, K), same dtype and device as x.
        mask: (O, K) binary (bool, int or float holding only 0 and 1). Checked and tiled once per mask (cached;
            see the module docstring), so pass the same tensor each call (a module buffer).
        bias: optional (O,).
        activation: None, "elu" (alpha 1) or "relu", applied after the bias.
        backend: None (auto), "reference", "cpu", "triton" or "cuda" (float16/bfloat16/float32; auto sends
            float64 CUDA tensors to triton).

    Returns:
        (..., O), x's dtype.

    Example:
        >>> w = torch.randn(4, 3); m = torch.tril(torch.ones(4, 3), -1)
        >>> masked_linear(torch.randn(2, 3), w, m, activation="elu").shape
        torch.Size([2, 4])
    """
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    check_same("x", x, weight=weight, bias=bias)
    check_mask(mask, weight)
    check_choice("activation", activation, ACTIVATIONS)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape (..., K={weight.shape[1]}) for weight {tuple(weight.shape)}, got "
                         f"{tuple(x.shape)}")  # fmt: skip
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have O={weight.shape[0]} entries, got {bias.shape[0]}")
    chosen = resolve(backend, x.device, native_cpu=False, cuda_kernels=CUDA_READY and x.dtype != torch.float64,
                     op="masked_linear", dtype=x.dtype)  # fmt: skip
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (a same-shape reshape adds an autograd node)
    plan = None
    if chosen == "cuda" and eager_ok(x, weight, mask, bias):
        from gm.ops import _masked_linear_cuda as kc  # noqa: PLC0415

        plan = kc.linear_plan(x2, weight, mask)  # None: widths off 16-byte rows (the launchers pad)
    if plan is not None:
        if needs_grad(x, weight, bias):
            y = _CudaMaskedLinear.apply(x2, weight, mask, bias, activation, plan)
        else:
            y = kc.linear_forward(plan, x2, weight, bias, activation)[0]
    elif chosen == "cpu" and eager_ok(x, weight, mask, bias):
        if needs_grad(x, weight, bias):
            y = _CpuMaskedLinear.apply(x2, weight, mask, bias, activation)
        else:
            y = _cpu_forward(x2, weight, mask, bias, activation)
    else:
        y = _MASKED_LINEAR(x2, weight, mask, bias, activation or "none", chosen)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["masked_linear", "mask_entry", "clear_mask_cache", "TileMap", "CpuPlan"]
