"""The cuda backend's whole-step path of gm.ops.made_iaf_step: the same kernels, in the same order and with the same
arguments as the per-layer launchers (gm.ops._masked_linear_cuda), with their host work done once per step shape.

At the IAF benchmark's sizes a step's kernels take tens of microseconds on an H200 while its host work, about 13
launches each with its argument preparation (precision flags, padding checks, tile-map lookups, split counts, device
and stream queries, allocations), took longer (bench/NOTES.md). A StepPlan holds, per step signature (rows, widths,
dtype, masks' cache entries, activation, mode, precision), every launch argument that does not change from call to
call: the bound kernel entry points, the masks' tile-map addresses, padded widths and weight-gradient split counts.
A call then allocates its outputs and makes the launches from those tuples: one device guard and one stream query
for the forward, one each for the backward, and the backward's intermediates (the output layer's [m, s] gradient,
the hidden layers' pre-activation gradients and every float32 split partial) in one workspace.

The path takes steps whose widths are whole 16-byte rows in the step's dtype (D + context, 2D and every hidden
width), as MADEs of the paper's sizes are; other steps keep the per-layer launchers, which pad. Results are bit for bit the
per-layer launchers' (tests/test_cuda_emulated.py).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from gm._ext import DTYPE_CODES, device_guard, ext, reduction_splits, stream_of
from gm.ops import _masked_linear_cuda as kc

_PLANS: OrderedDict = OrderedDict()
_LOCK = threading.Lock()  # the cache's order is mutated on every hit
_PLAN_CACHE_SIZE = 64
_ALIGN = 256  # workspace segments start on 256-byte boundaries (16 are needed: cp.async)


def _aligned_width(n: int, dtype: torch.dtype) -> bool:
    return (n * dtype.itemsize) % 16 == 0


def _applies(z: torch.Tensor, context: torch.Tensor | None, weights) -> bool:
    """Whether the planned path runs this step: every GEMM operand's rows a whole number of 16 bytes (the input
    [z, context], each hidden layer's output and the output layer's [m, s] gradient, 2D wide), a dtype the kernels
    take, no empty dimension."""
    dtype = z.dtype
    if dtype not in kc.DTYPES or z.shape[0] == 0 or z.shape[1] == 0:
        return False
    widths = [z.shape[1] + (0 if context is None else context.shape[1]), 2 * z.shape[1]]
    widths += [w.shape[0] for w in weights[:-1]]
    return all(w > 0 and (w * dtype.itemsize) % 16 == 0 for w in widths)


def _round(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class StepPlan:
    """Launch arguments of one step signature. Holds the masks' cache entries (strong references: the tile maps
    whose addresses it keeps live there)."""

    def __init__(self, rows: int, d: int, widths: list[int], dtype: torch.dtype, device, entries, act, mode,
                 prec: int) -> None:  # fmt: skip
        from gm.ops.iaf import _MODE_CODES  # noqa: PLC0415

        lib = ext()
        self.entries = entries
        self.rows, self.d, self.widths, self.dtype = rows, d, widths, dtype
        self.layers = len(entries)
        self.dcode, self.prec = DTYPE_CODES[dtype], prec
        self.act_code = kc.ACT_CODES[act]
        self.mode_code = _MODE_CODES[mode]
        self.n_d = -(-d // kc._HEAD_COLS)
        self.fwd = lib.masked_linear_forward_cuda
        self.out_fwd = lib.iaf_made_output_forward_cuda
        self.out_bwd = lib.iaf_made_output_backward_cuda
        self.dgrad = lib.masked_linear_input_grad_cuda
        self.wgrad = lib.masked_linear_weight_grad_cuda
        self.finish = lib.masked_linear_grad_finish_cuda
        # per layer i: (O, K) of its weight; the maps of its launches
        self.shapes = [(widths[i + 1], widths[i]) for i in range(self.layers - 1)] + [(2 * d, widths[-1])]
        self.rows_maps = [kc._map_args(e, "rows", dtype) for e in entries[:-1]]
        self.fused_map = kc._map_args(entries[-1], "fused", dtype)
        self.cols_maps = [kc._map_args(e, "cols", dtype) for e in entries]
        self.flag_maps = [kc._map_args(e, "flags", dtype) for e in entries]
        # weight-gradient row splits (as _weight_partials) and the backward workspace: [m, s] gradient, the hidden
        # layers' pre-activation gradients (all but the first layer's input gradient, which is returned), partials
        self.splits = []
        item = dtype.itemsize
        offset = _round(rows * 2 * d * item)  # dout
        self.dh_offsets = []
        for i in range(self.layers - 1, 0, -1):  # the input gradient of layer i: layer i-1's output gradient
            self.dh_offsets.append(offset)
            offset += _round(rows * widths[i] * item)
        self.partial_offsets = []
        for i, (o, k) in enumerate(self.shapes):
            nonempty = self.flag_maps[i][2]
            splits = reduction_splits(max(nonempty, 1), rows, device, kc._BLOCKS_PER_SM)
            per_split = -(-rows // splits)
            self.splits.append((-(-rows // per_split), per_split))
            self.partial_offsets.append(offset)
            offset += _round(self.splits[-1][0] * o * k * 4)
        self.dh_offsets.reverse()  # dh_offsets[i - 1]: layer i's input gradient, for i = 1 .. layers-1
        self.workspace_bytes = offset


def _identity(mask: torch.Tensor) -> tuple:
    try:
        return id(mask), mask._version, mask.data_ptr()
    except RuntimeError:  # an inference tensor tracks no version (as gm.ops.masked_linear keys it)
        return id(mask), None, mask.data_ptr()


def plan_for(z, context, weights, masks, act, mode) -> StepPlan | None:
    """The step's plan (made on first use, with the masks' cache entries: each mask checked binary then), or None
    where the planned path does not apply (_applies). Keyed by the masks' identities, versions and addresses, as
    gm.ops.masked_linear.mask_entry keys them: the plan's strong references keep those identities theirs."""
    prec = kc.precision(z.dtype)
    key = (z.shape, z.dtype, z.device, None if context is None else context.shape[1], act, mode, prec,
           *(w.shape[0] for w in weights), *(_identity(m) for m in masks))  # fmt: skip
    with _LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
            return plan
    if not _applies(z, context, weights):
        return None
    from gm.ops.masked_linear import mask_entry  # noqa: PLC0415

    entries = [mask_entry(m, f"masks[{i}]") for i, m in enumerate(masks)]
    widths = [z.shape[1] + (0 if context is None else context.shape[1])] + [w.shape[0] for w in weights[:-1]]
    plan = StepPlan(z.shape[0], z.shape[1], widths, z.dtype, z.device, entries, act, mode, prec)
    with _LOCK:
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan


def _workspace(nbytes: int, device) -> torch.Tensor:
    """The backward's scratch bytes (every byte written before it is read)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _bias_ptr(b: torch.Tensor | None) -> int:
    return 0 if b is None else b.contiguous().data_ptr()


def _ptr16(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and 16-byte aligned (a copy only where it is not)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def forward(plan: StepPlan, x0: torch.Tensor, z: torch.Tensor, weights, biases):
    """(z', logdet, [x0 as the kernels read it (contiguous, 16-byte aligned), the hidden outputs]): the hidden
    layers' GEMMs, then the fused output layer. Every temporary copy lives until its launch has been queued (the
    caching allocator reuses freed memory only for work queued after it on the stream)."""
    rows, d = plan.rows, plan.d
    stream = stream_of(z)
    x = _ptr16(x0)
    hs = [x]
    with device_guard(z):
        for i in range(plan.layers - 1):
            o, k = plan.shapes[i]
            y = torch.empty(rows, o, dtype=plan.dtype, device=z.device)
            mask, mask_row, offsets, idx, mids = plan.rows_maps[i]
            plan.fwd(x.data_ptr(), _ptr16(weights[i]).data_ptr(), mask, _bias_ptr(biases[i]), y.data_ptr(), offsets,
                     idx, mids, rows, o, k, mask_row, plan.act_code, plan.dcode, plan.prec, stream)  # fmt: skip
            hs.append(y)
            x = y
        z_new = torch.empty_like(z)
        ld = torch.empty(plan.n_d, rows, dtype=torch.float32, device=z.device)
        mask, mask_row, offsets, idx, mids = plan.fused_map
        plan.out_fwd(x.data_ptr(), _ptr16(weights[-1]).data_ptr(), mask, _bias_ptr(biases[-1]), z.data_ptr(),
                     z_new.data_ptr(), ld.data_ptr(), offsets, idx, mids, rows, d, plan.widths[-1], mask_row,
                     plan.mode_code, plan.dcode, plan.prec, stream)  # fmt: skip
    logdet = ld.sum(0) if plan.n_d > 1 else ld[0]
    return z_new, logdet.to(z.dtype), hs


def backward(plan: StepPlan, xs, z, weights, out_bias, gz, gl, below, need_w, need_b):
    """(dz from the output layer, d x0 or None, [dW_i or None], [db_i or None]) for the layers' inputs xs (forward's
    third result) and the output gradients gz, gl (contiguous): the output layer's backward, then
    each hidden layer's from the last down, each input gradient returned as the layer below's pre-activation
    gradient (the activation gradient in the GEMM's epilogue), as gm.ops.made_iaf_step's per-layer path chains them.
    below[i]: whether anything before layer i wants a gradient (layer i passes one on; below[0]: x0 = [z, context]
    does); need_w / need_b per layer."""
    rows, d, layers = plan.rows, plan.d, plan.layers
    device = z.device
    stream = stream_of(z)
    ws = _workspace(plan.workspace_bytes, device)
    base = ws.data_ptr()
    dz = torch.empty_like(z)
    dws, dbs = [None] * layers, [None] * layers
    dx0 = None
    wts = [_ptr16(w) for w in weights]  # alive until the last launch that reads them is queued
    wptrs = [w.data_ptr() for w in wts]
    with device_guard(z):
        gp = base  # the output layer's [m, s] gradient: its GEMMs' pre-activation gradient
        mask, mask_row, offsets, idx, mids = plan.fused_map
        plan.out_bwd(xs[-1].data_ptr(), wptrs[-1], mask, _bias_ptr(out_bias), z.data_ptr(), gz.data_ptr(),
                     gl.data_ptr(), dz.data_ptr(), gp, offsets, idx, mids, rows, d, plan.widths[-1], mask_row,
                     plan.mode_code, plan.dcode, plan.prec, stream)  # fmt: skip
        for i in range(layers - 1, -1, -1):
            o, k = plan.shapes[i]
            if below[i] and i > 0:
                dx = base + plan.dh_offsets[i - 1]
                act = plan.act_code
                y_below = xs[i].data_ptr() if act else 0
            elif below[i]:
                dx0 = torch.empty(rows, k, dtype=plan.dtype, device=device)
                dx, y_below, act = dx0.data_ptr(), 0, 0
            if below[i]:
                mask, mask_row, offsets, idx, mids = plan.cols_maps[i]
                plan.dgrad(gp, wptrs[i], mask, dx, offsets, idx, mids, rows, o, o, k, k, mask_row, y_below, act,
                           plan.dcode, plan.prec, stream)  # fmt: skip
            if need_w[i] or need_b[i]:
                dws[i], dbs[i] = _weight_and_bias_grad(plan, i, gp, xs[i], base, need_w[i], need_b[i], stream)
            if not below[i]:
                break  # nothing at or below layer i wants a gradient
            gp = dx if i > 0 else None
    return dz, dx0, dws, dbs


def _weight_and_bias_grad(plan: StepPlan, i: int, gp: int, x: torch.Tensor, base: int, need_w: bool, need_b: bool,
                          stream: int):  # fmt: skip
    rows = plan.rows
    o, k = plan.shapes[i]
    device = x.device
    dw = torch.empty(o, k, dtype=plan.dtype, device=device) if need_w else None
    db = torch.empty(o, dtype=plan.dtype, device=device) if need_b else None
    splits = 0
    partial = 0
    if need_w:
        splits, per_split = plan.splits[i]
        partial = base + plan.partial_offsets[i]
        u8, flags, _ = plan.flag_maps[i]
        plan.wgrad(gp, x.data_ptr(), u8, flags, partial, rows, o, o, k, k, per_split, splits, plan.dcode, plan.prec,
                   stream)  # fmt: skip
    plan.finish(partial, splits, o, k, dw.data_ptr() if need_w else 0, gp if need_b else 0, rows, o,
                db.data_ptr() if need_b else 0, plan.dcode, stream)  # fmt: skip
    return dw, db
