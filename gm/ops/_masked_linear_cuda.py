"""CUDA backend of masked_linear and iaf_made_output: launchers for the tile-skipping tensor-core GEMMs of
csrc/masked_linear/masked_linear_gemm.cuh (entry points in csrc/masked_linear and csrc/iaf).

    forward:      y = act(x (W ⊙ M)^T + b)            over the (128, 64 B) tile map's row CSR
    act_grad:     gp = g act'(y)                        (skipped without an activation)
    input_grad:   dx = gp (W ⊙ M)                       over the (64 B, 128) tile map's column CSR
    weight_grad:  dW = M ⊙ (gp^T x)                     128 x 128 tiles: empty ones store zeros, the mask is read by
                                                        partly-zero ones only; row splits summed here in fp32
    made_output:  [m, s] = hidden (W ⊙ M)^T + b and the IAF step in the epilogue (64 m columns beside their 64 s
                  columns per block; the (64, 64 B) two-head tile map); backward writes dz and d[m, s]

"64 B" is one pipeline stage of the reduction: 32 bf16/fp16 or 16 fp32 elements. Rows are zero-padded to 16-byte
multiples here when they are not (cp.async copies 16 bytes), and the mask gets a uint8 copy with 16-byte rows, cached
with the mask's entry. bfloat16/float16 run on m16n8k16 tensor cores with fp32 accumulation; float32 on tf32
m16n8k8 when torch.backends.cuda.matmul.allow_tf32 is True, else as 3xTF32 (hi/lo splits: fp32-level error).
Nothing here touches CUDA at import.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import torch

from gm._ext import DTYPE_CODES, device_guard, dtype_code, ext, reduction_splits, stream_of

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_STAGE_BYTES = 64  # reduction bytes per pipeline stage = the tile map's reduction granularity
_BLOCK = 128  # block tile columns; the weight gradient's (o, k) tile
_HEAD_COLS = 64  # fused output layer: d columns per block
_BLOCKS_PER_SM = 2
_PRECISION_NATIVE, _PRECISION_TF32, _PRECISION_TF32X3 = 0, 1, 2
ACT_CODES = {None: 0, "elu": 1, "relu": 2}


def precision(dtype: torch.dtype, op: str = "masked_linear") -> int:
    if dtype in (torch.float16, torch.bfloat16):
        return _PRECISION_NATIVE
    if dtype == torch.float32:
        return _PRECISION_TF32 if torch.backends.cuda.matmul.allow_tf32 else _PRECISION_TF32X3
    raise ValueError(f"the cuda backend of {op} takes float16/bfloat16/float32, got {dtype}: use backend='triton' "
                     f"or 'reference' for it")  # fmt: skip


def reduction_tile(dtype: torch.dtype) -> int:
    """Elements of the reduction dim per pipeline stage (the tile maps' block along it)."""
    return _STAGE_BYTES // dtype.itemsize


def _padded(n: int, dtype: torch.dtype) -> int:
    per16 = 16 // dtype.itemsize
    return -(-n // per16) * per16


def _pad_cols(t: torch.Tensor, size: int) -> torch.Tensor:
    """Contiguous t with its last dim zero-padded to `size`, starting on a 16-byte boundary (cp.async reads 16-byte
    chunks: a view into a flat buffer at an odd offset would fault with a misaligned address); no copy when so."""
    if t.shape[-1] == size:
        t = t.contiguous()
        return t if t.data_ptr() % 16 == 0 else t.clone()
    out = t.new_zeros(*t.shape[:-1], size)
    out[..., : t.shape[-1]].copy_(t)
    return out


def mask_rows16(entry) -> torch.Tensor:
    """The entry's uint8 mask with rows zero-padded to a 16-byte multiple (cached with the entry)."""
    key = ("cuda_mask_rows16",)
    m = entry.maps.get(key)
    if m is None:
        m = _pad_cols(entry.u8, -(-entry.u8.shape[1] // 16) * 16)
        entry.maps[key] = m
    return m


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _map_args(entry, kind: str, dtype: torch.dtype) -> tuple:
    """The mask and tile-map addresses one launch kind passes, as ints, cached with the mask's entry (its tensors stay
    alive there): the dict lookup replaces several helper calls and attribute reads per launch (host time).
        "rows":  (mask, mask row bytes, offsets, idx, mids) of the forward's (128, stage) map
        "cols":  the same for the input gradient's (stage, 128) map
        "flags": (u8 mask, flags, non-empty tiles) of the weight gradient's (128, 128) map
        "fused": the fused output layer's (64, stage) two-head map, laid out as for "rows"."""
    key = ("cuda_args", kind, dtype)
    args = entry.maps.get(key)
    if args is None:
        from gm.ops.iaf import fused_tile_map  # noqa: PLC0415
        from gm.ops.masked_linear import linear_tile_map  # noqa: PLC0415

        if kind == "flags":
            tm = linear_tile_map(entry, _BLOCK, _BLOCK)
            args = (entry.u8.data_ptr(), tm.flags.data_ptr(), tm.nonempty)
        else:
            mask = mask_rows16(entry)
            if kind == "rows":
                csr = linear_tile_map(entry, _BLOCK, reduction_tile(dtype)).rows
            elif kind == "cols":
                csr = linear_tile_map(entry, reduction_tile(dtype), _BLOCK).cols
            else:
                csr = fused_tile_map(entry, _HEAD_COLS, reduction_tile(dtype)).rows
            args = (mask.data_ptr(), mask.shape[1], *(t.data_ptr() for t in csr))
        entry.maps[key] = args
    return args


def forward(x: torch.Tensor, weight: torch.Tensor, entry, bias: torch.Tensor | None, activation) -> torch.Tensor:
    rows, k = x.shape
    o = weight.shape[0]
    plan = layer_plan(entry, rows, o, k, x.dtype, x.device, precision(x.dtype))
    y = torch.empty(rows, o, dtype=x.dtype, device=x.device)
    if rows == 0 or o == 0:
        return y
    xp, wp = _pad_cols(x, plan.kp), _pad_cols(weight, plan.kp)
    bias_c = bias.contiguous() if bias is not None else None
    with device_guard(x):
        plan.forward(xp.data_ptr(), wp.data_ptr(), _ptr(bias_c), y.data_ptr(), ACT_CODES[activation], stream_of(x))
    return y


def act_grad(grad: torch.Tensor, y: torch.Tensor, activation) -> torch.Tensor:
    """g * act'(pre-activation) from the saved output y; grad itself without an activation."""
    if activation is None:
        return grad
    out = torch.empty_like(grad)
    with device_guard(grad):
        ext().masked_linear_act_grad_cuda(grad.data_ptr(), y.contiguous().data_ptr(), out.data_ptr(), grad.numel(),
                                          ACT_CODES[activation], dtype_code(grad), stream_of(grad))  # fmt: skip
    return out


def input_grad(gp: torch.Tensor, weight: torch.Tensor, entry, below=None) -> torch.Tensor:
    """dx (R, K) = gp (W ⊙ M). below = (y, activation): x is the output y (R, K) of `activation` in the layer below,
    and dx comes back as that layer's pre-activation gradient act_grad(dx, y, activation), in the GEMM's epilogue
    (bit for bit what the separate pass gives: dx is rounded to its dtype first)."""
    rows, o = gp.shape
    k = weight.shape[1]
    plan = layer_plan(entry, rows, o, k, gp.dtype, gp.device, precision(gp.dtype))
    dx = torch.empty(rows, k, dtype=gp.dtype, device=gp.device)
    if rows == 0 or k == 0:
        return dx
    if o == 0:
        return dx.zero_()
    gpp, wp = _pad_cols(gp, plan.op), _pad_cols(weight, plan.kp)
    y_below = below[0].contiguous() if below is not None and below[1] is not None else None
    act_below = ACT_CODES[below[1]] if y_below is not None else 0
    with device_guard(gp):
        plan.input_grad(gpp.data_ptr(), wp.data_ptr(), dx.data_ptr(), _ptr(y_below), act_below, stream_of(gp))
    return dx


def weight_and_bias_grad(gp: torch.Tensor, x: torch.Tensor, entry, need_w: bool, need_b: bool):
    """(dW (O, K) in x's dtype, exactly zero where the mask is 0, or None; db (O,) in gp's dtype, or None): the weight
    gradient's GEMM into float32 row-split partial sums, then one launch that adds the splits, sums gp's columns for
    the bias and casts both (the split sum, the bias sum and two casts were four launches)."""
    rows, o = gp.shape
    k = x.shape[1]
    dw = torch.empty(o, k, dtype=x.dtype, device=x.device) if need_w else None
    db = torch.empty(o, dtype=gp.dtype, device=gp.device) if need_b else None
    if rows == 0:
        return (dw.zero_() if need_w else None), (db.zero_() if need_b else None)
    plan = layer_plan(entry, rows, o, k, x.dtype, x.device, precision(x.dtype))
    gemm = need_w and o * k > 0
    partial = torch.empty(plan.splits, o, k, dtype=torch.float32, device=x.device) if gemm else None
    gpp, xp = (_pad_cols(gp, plan.op), _pad_cols(x, plan.kp)) if gemm else (None, None)
    gp_c = gp.contiguous() if need_b else None
    with device_guard(gp):
        plan.weight_and_bias_grad(_ptr(gpp), _ptr(xp), _ptr(partial), _ptr(dw) if gemm else 0, _ptr(gp_c), _ptr(db),
                                  stream_of(gp))  # fmt: skip
    return dw, db


def _fused_launch(name, hidden, weight, entry, bias, z, tensors, mode):
    from gm.ops.iaf import _MODE_CODES  # noqa: PLC0415

    prec = precision(hidden.dtype, "iaf_made_output")
    rows, h = hidden.shape
    d = z.shape[1]
    hp = _padded(h, hidden.dtype)
    hidden_p, wp = _pad_cols(hidden, hp), _pad_cols(weight, hp)
    mask, mask_row, offsets, idx, mids = _map_args(entry, "fused", hidden.dtype)
    bias_c = bias.contiguous() if bias is not None else None
    with device_guard(hidden):
        getattr(ext(), name)(
            hidden_p.data_ptr(), wp.data_ptr(), mask, _ptr(bias_c), z.data_ptr(), *(_ptr(t) for t in tensors),
            offsets, idx, mids, rows, d, hp, mask_row, _MODE_CODES[mode], dtype_code(hidden), prec, stream_of(hidden),
        )  # fmt: skip


def made_output_forward(hidden, weight, entry, bias, z, mode):
    """(z' (R, D), logdet (R,)) with m and s computed in registers."""
    rows, d = z.shape
    z_new = torch.empty_like(z)
    n_d = -(-d // _HEAD_COLS)
    ld = torch.empty(n_d, rows, dtype=torch.float32, device=z.device)
    if rows == 0 or d == 0:
        return z_new, torch.zeros(rows, dtype=z.dtype, device=z.device)
    _fused_launch("iaf_made_output_forward_cuda", hidden, weight, entry, bias, z, (z_new, ld), mode)
    return z_new, (ld.sum(0) if n_d > 1 else ld[0]).to(z.dtype)


def made_output_backward(hidden, weight, entry, bias, z, gz, gl, mode):
    """(dz (R, D), d[m, s] (R, 2D)) with m and s recomputed in registers."""
    rows, d = z.shape
    dz = torch.empty_like(z)
    dout = torch.empty(rows, 2 * d, dtype=z.dtype, device=z.device)
    if rows == 0 or d == 0:
        return dz, dout
    # The kernel reads gz (R, D) and gl (R,) in z's layout and dtype; (gz, gl, dz, dout) follow z in its argument list.
    _fused_launch("iaf_made_output_backward_cuda", hidden, weight, entry, bias, z,
                  (gz.contiguous(), gl.contiguous(), dz, dout), mode)  # fmt: skip
    return dz, dout


# ----------------------------------------------------------------------------------------------------------------
# Planned launches (the eager paths of masked_linear and gm.ops.made_iaf_step): every launch argument that does not
# change between calls of one shape, computed once. At the IAF benchmark's sizes a layer's kernels take microseconds
# on an H200 while the argument preparation above (precision flags, padding checks, tile-map lookups, split counts,
# device and stream queries) took longer, per launch. Plans cover layers whose widths are whole 16-byte rows (no
# padding copies); they make the same launches with the same arguments as the launchers above, bit for bit.

_ALIGN = 256  # scratch segments start on 256-byte boundaries (cp.async needs 16)
# Plans hold their masks' cache entries (the mask, its uint8 copy, its tile maps): at most as many as the mask cache
# keeps (gm.ops.masked_linear.MASK_CACHE_SIZE), so masks made anew every step (order-agnostic training) retain no
# more memory than before plans. A model with more (mask, shape) pairs rebuilds plans (correct, slower).
_PLAN_CACHE_SIZE = 64
_PLANS: OrderedDict = OrderedDict()
_PLANS_LOCK = threading.Lock()  # the cache's order is mutated on every hit


def whole_rows(widths, dtype: torch.dtype) -> bool:
    """Whether a plan takes these row widths: each a positive whole number of 16-byte rows, in a dtype the kernels
    take."""
    return dtype in DTYPES and all(w > 0 and (w * dtype.itemsize) % 16 == 0 for w in widths)


def round_up(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def mask_identity(mask: torch.Tensor) -> tuple:
    """A mask's part of a plan key, as gm.ops.masked_linear.mask_entry keys its cache (identity, version, address):
    a plan holds the mask's entry, so the identity stays the mask's while the plan is cached."""
    try:
        return id(mask), mask._version, mask.data_ptr()
    except RuntimeError:  # an inference tensor tracks no version
        return id(mask), None, mask.data_ptr()


_MISSING = object()


def cached_plan(key: tuple, build):
    """The plan cached under `key`, else build() cached (None too: a shape no plan takes asks once)."""
    with _PLANS_LOCK:
        plan = _PLANS.get(key, _MISSING)
        if plan is not _MISSING:
            _PLANS.move_to_end(key)
            return plan
    plan = build()
    with _PLANS_LOCK:
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan


def scratch(nbytes: int, device) -> torch.Tensor:
    """A planned backward's scratch bytes (every byte written before it is read)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and 16-byte aligned (a copy only where it is not, as _pad_cols makes)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class LayerPlan:
    """One masked linear layer's launch arguments at (rows, O, K, dtype, precision): the bound entry points, the
    padded widths, the tile maps' addresses (held by `entry`, which the plan keeps; each map built on first use), the
    weight gradient's row splits. Every launch of the layer goes through it: the launchers above (which pad their
    operands to op / kp) and the planned paths (widths whole 16-byte rows, nothing to pad). Its launch methods take
    addresses; the caller keeps each tensor alive until its launch is queued (the caching allocator reuses freed
    memory only for work queued after it on the stream)."""

    def __init__(self, lib, entry, rows: int, o: int, k: int, dtype: torch.dtype, device, prec: int) -> None:
        self.entry, self.dtype, self.device = entry, dtype, device
        # the entry points, bound once (a module attribute per launch is host time too)
        self.launch_forward = lib.masked_linear_forward_cuda
        self.launch_input_grad = lib.masked_linear_input_grad_cuda
        self.launch_weight_grad = lib.masked_linear_weight_grad_cuda
        self.launch_finish = lib.masked_linear_grad_finish_cuda
        self.launch_act_grad = lib.masked_linear_act_grad_cuda
        self.rows, self.o, self.k = rows, o, k
        self.op, self.kp = _padded(o, dtype), _padded(k, dtype)
        self.dcode, self.prec = DTYPE_CODES[dtype], prec

    @functools.cached_property
    def rows_map(self) -> tuple:
        return _map_args(self.entry, "rows", self.dtype)

    @functools.cached_property
    def cols_map(self) -> tuple:
        return _map_args(self.entry, "cols", self.dtype)

    @functools.cached_property
    def flag_map(self) -> tuple:
        return _map_args(self.entry, "flags", self.dtype)

    @functools.cached_property
    def split(self) -> tuple[int, int]:
        """(splits, rows per split) of the weight gradient's GEMM: the split model over its non-empty tiles."""
        splits = reduction_splits(max(self.flag_map[2], 1), self.rows, self.device, _BLOCKS_PER_SM)
        per_split = -(-self.rows // splits)
        return -(-self.rows // per_split), per_split

    @property
    def splits(self) -> int:
        return self.split[0]

    @property
    def partial_bytes(self) -> int:
        return round_up(self.splits * self.o * self.k * 4)

    def forward(self, x: int, w: int, bias: int, y: int, act_code: int, stream: int) -> None:
        mask, mask_row, offsets, idx, mids = self.rows_map
        self.launch_forward(x, w, mask, bias, y, offsets, idx, mids, self.rows, self.o, self.kp, mask_row, act_code,
                            self.dcode, self.prec, stream)  # fmt: skip

    def input_grad(self, gp: int, w: int, dx: int, y_below: int, act_below: int, stream: int) -> None:
        mask, mask_row, offsets, idx, mids = self.cols_map
        self.launch_input_grad(gp, w, mask, dx, offsets, idx, mids, self.rows, self.o, self.op, self.k, self.kp,
                               mask_row, y_below, act_below, self.dcode, self.prec, stream)  # fmt: skip

    def weight_and_bias_grad(self, gp: int, x: int, partial: int, dw: int, gp_bias: int, db: int, stream: int) -> None:
        """dW into dw (0: not wanted) through the split partials at `partial` (gp and x padded to op / kp), db into
        db (0: not wanted) from gp_bias (gp unpadded, (rows, O)), in one finish launch that also adds the splits."""
        splits = 0
        if dw:
            u8, flags, _ = self.flag_map
            splits, per_split = self.split
            self.launch_weight_grad(gp, x, u8, flags, partial, self.rows, self.o, self.op, self.k, self.kp, per_split,
                                    splits, self.dcode, self.prec, stream)  # fmt: skip
        self.launch_finish(partial if dw else 0, splits, self.o, self.k, dw, gp_bias if db else 0, self.rows, self.o,
                           db, self.dcode, stream)  # fmt: skip


def layer_plan(entry, rows: int, o: int, k: int, dtype: torch.dtype, device, prec: int) -> LayerPlan:
    """The mask entry's LayerPlan for this shape, dtype and precision (kept with the entry: it lives as long as the
    tile maps whose addresses it holds)."""
    lib = ext()
    key = ("layer_plan", lib, rows, o, k, dtype, prec)
    plan = entry.maps.get(key)
    if plan is None:
        plan = entry.maps[key] = LayerPlan(lib, entry, rows, o, k, dtype, device, prec)
    return plan


def linear_plan(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> LayerPlan | None:
    """masked_linear's plan for x (R, K) and weight (O, K), or None where none applies (widths off 16-byte rows, an
    empty dimension, a dtype the kernels do not take)."""
    rows, k = x.shape
    o = weight.shape[0]
    prec = precision(x.dtype)
    key = ("linear", ext(), rows, o, k, x.dtype, x.device, prec, mask_identity(mask))

    def build():
        if rows == 0 or not whole_rows((o, k), x.dtype):
            return None
        from gm.ops.masked_linear import mask_entry  # noqa: PLC0415

        return layer_plan(mask_entry(mask), rows, o, k, x.dtype, x.device, prec)

    return cached_plan(key, build)


def linear_forward(plan: LayerPlan, x: torch.Tensor, weight: torch.Tensor, bias, activation) -> tuple:
    """(y, x as the kernel read it: contiguous, 16-byte aligned) for masked_linear's planned path."""
    x, w = aligned(x), aligned(weight)
    bias_c = bias.contiguous() if bias is not None else None
    y = torch.empty(plan.rows, plan.o, dtype=x.dtype, device=x.device)
    with device_guard(x):
        plan.forward(x.data_ptr(), w.data_ptr(), _ptr(bias_c), y.data_ptr(), ACT_CODES[activation], stream_of(x))
    return y, x


def linear_backward(plan: LayerPlan, grad, y, x, weight, activation, need_x: bool, need_w: bool, need_b: bool):
    """(dx, dW, db), each None where not wanted, for grad (R, O) contiguous and the forward's y and aligned x: the
    activation's gradient pass, the input gradient, the weight gradient's split GEMM and the finish launch that adds
    the splits and sums the bias gradient, as the per-layer launchers make them (scratch: gp and the partials)."""
    act = ACT_CODES[activation]
    device, dtype = grad.device, grad.dtype
    gp_bytes = round_up(grad.numel() * dtype.itemsize) if act else 0
    work = scratch(gp_bytes + (plan.partial_bytes if need_w else 0), device)
    base = work.data_ptr()
    w = aligned(weight)
    dx = torch.empty(plan.rows, plan.k, dtype=dtype, device=device) if need_x else None
    dw = torch.empty(plan.o, plan.k, dtype=dtype, device=device) if need_w else None
    db = torch.empty(plan.o, dtype=dtype, device=device) if need_b else None
    stream = stream_of(grad)
    with device_guard(grad):
        gp = grad.data_ptr()
        if act:
            plan.launch_act_grad(gp, y.data_ptr(), base, grad.numel(), act, plan.dcode, stream)
            gp = base
        if need_x:
            plan.input_grad(gp, w.data_ptr(), dx.data_ptr(), 0, 0, stream)
        if need_w or need_b:
            plan.weight_and_bias_grad(gp, x.data_ptr(), base + gp_bytes, _ptr(dw), gp, _ptr(db), stream)
    return dx, dw, db
