"""The cuda backend's planned path of gm.ops.made_iaf_step: the same kernels, in the same order and with the same
arguments as the per-layer launchers (gm.ops._masked_linear_cuda), with their host work done once per step shape.

At the IAF benchmark's sizes a step's kernels take tens of microseconds on an H200 while its host work, about 13
launches each with its argument preparation (precision flags, padding checks, tile-map lookups, split counts, device
and stream queries, allocations), took longer (bench/NOTES.md). A StepPlan holds, per step signature (rows, widths,
dtype, masks, activation, mode, precision), every launch argument that does not change from call to call: one
gm.ops._masked_linear_cuda.LayerPlan per layer (the bound kernel entry points, the masks' tile-map addresses, the
weight gradients' split counts) and the fused output layer's map. A call then allocates its outputs and makes the
launches from those: one device guard and one stream query for the forward, one each for the backward, and the
backward's intermediates (the output layer's [m, s] gradient, the hidden layers' pre-activation gradients and every
float32 split partial) in one scratch buffer.

The path takes steps whose widths are whole 16-byte rows in the step's dtype (D + context, 2D and every hidden
width), as MADEs of the paper's sizes are; other steps keep the per-layer launchers, which pad. Results are bit for bit
the per-layer launchers' (tests/test_cuda_emulated.py).
"""

from __future__ import annotations

import torch

from gm._ext import device_guard, ext, stream_of
from gm.ops import _masked_linear_cuda as kc


class StepPlan:
    """Launch arguments of one step signature. Holds the masks' cache entries through its layers' plans (strong
    references: the tile maps whose addresses it keeps live there)."""

    def __init__(self, lib, rows: int, d: int, widths: list[int], dtype: torch.dtype, device, entries, act, mode,
                 prec: int) -> None:  # fmt: skip
        from gm.ops.iaf import _MODE_CODES  # noqa: PLC0415

        self.out_forward = lib.iaf_made_output_forward_cuda  # bound once, as LayerPlan's
        self.out_backward = lib.iaf_made_output_backward_cuda
        self.entries = entries
        self.rows, self.d, self.widths, self.dtype = rows, d, widths, dtype
        self.n = len(entries)
        self.act_code = kc.ACT_CODES[act]
        self.mode_code = _MODE_CODES[mode]
        self.n_d = -(-d // kc._HEAD_COLS)
        shapes = [(widths[i + 1], widths[i]) for i in range(self.n - 1)] + [(2 * d, widths[-1])]
        # the per-layer launchers' plans (the output layer's forward is the fused launch: fused_map)
        self.layers = [kc.layer_plan(e, rows, o, k, dtype, device, prec)
                       for e, (o, k) in zip(entries, shapes, strict=True)]  # fmt: skip
        self.fused_map = kc._map_args(entries[-1], "fused", dtype)
        self.dcode, self.prec = self.layers[-1].dcode, prec
        # The backward's scratch: the [m, s] gradient, the hidden layers' pre-activation gradients (every input
        # gradient but the first layer's, which is returned), the layers' split partials.
        item = dtype.itemsize
        offset = kc.round_up(rows * 2 * d * item)
        self.dh_offsets = [0] * self.n  # dh_offsets[i]: layer i's input gradient, for i = 1 .. n-1
        for i in range(1, self.n):
            self.dh_offsets[i] = offset
            offset += kc.round_up(rows * widths[i] * item)
        self.partial_offsets = []
        for layer in self.layers:
            self.partial_offsets.append(offset)
            offset += layer.partial_bytes
        self.scratch_bytes = offset


def _applies(z: torch.Tensor, context: torch.Tensor | None, weights) -> bool:
    """Whether the planned path runs this step: every GEMM operand's rows a whole number of 16 bytes (the input
    [z, context], each hidden layer's output and the output layer's [m, s] gradient, 2D wide), a dtype the kernels
    take, no empty dimension."""
    if z.shape[0] == 0 or z.shape[1] == 0:
        return False
    widths = [z.shape[1] + (0 if context is None else context.shape[1]), 2 * z.shape[1]]
    return kc.whole_rows(widths + [w.shape[0] for w in weights[:-1]], z.dtype)


def plan_for(z, context, weights, masks, act, mode) -> StepPlan | None:
    """The step's plan (made on first use, with the masks' cache entries: each mask checked binary then), or None
    where the planned path does not apply (_applies). Keyed by the masks' identities, versions and addresses, as
    gm.ops.masked_linear.mask_entry keys them: the plan's strong references keep those identities theirs."""
    prec, lib = kc.precision(z.dtype), ext()
    ctx_width = 0 if context is None else context.shape[1]
    key = ("step", lib, z.shape, z.dtype, z.device, ctx_width, act, mode, prec, *(w.shape[0] for w in weights),
           *(kc.mask_identity(m) for m in masks))  # fmt: skip

    def build():
        if not _applies(z, context, weights):
            return None
        from gm.ops.masked_linear import mask_entry  # noqa: PLC0415

        entries = [mask_entry(m, f"masks[{i}]") for i, m in enumerate(masks)]
        widths = [z.shape[1] + ctx_width] + [w.shape[0] for w in weights[:-1]]
        return StepPlan(lib, z.shape[0], z.shape[1], widths, z.dtype, z.device, entries, act, mode, prec)

    return kc.cached_plan(key, build)


def _bias_ptr(b: torch.Tensor | None) -> int:
    return 0 if b is None else b.contiguous().data_ptr()


def forward(plan: StepPlan, x0: torch.Tensor, z: torch.Tensor, weights, biases):
    """(z', logdet, [x0 as the kernels read it (contiguous, 16-byte aligned), the hidden outputs]): the hidden
    layers' GEMMs, then the fused output layer. Every temporary copy lives until its launch has been queued (the
    caching allocator reuses freed memory only for work queued after it on the stream)."""
    rows, d = plan.rows, plan.d
    stream = stream_of(z)
    x = kc.aligned(x0)
    xs = [x]
    with device_guard(z):
        for layer, w, b in zip(plan.layers[:-1], weights[:-1], biases[:-1], strict=True):
            y = torch.empty(rows, layer.o, dtype=plan.dtype, device=z.device)
            layer.forward(x.data_ptr(), kc.aligned(w).data_ptr(), _bias_ptr(b), y.data_ptr(), plan.act_code, stream)
            xs.append(y)
            x = y
        z_new = torch.empty_like(z)
        ld = torch.empty(plan.n_d, rows, dtype=torch.float32, device=z.device)
        mask, mask_row, offsets, idx, mids = plan.fused_map
        plan.out_forward(
            x.data_ptr(), kc.aligned(weights[-1]).data_ptr(), mask, _bias_ptr(biases[-1]), z.data_ptr(),
            z_new.data_ptr(), ld.data_ptr(), offsets, idx, mids, rows, d, plan.widths[-1], mask_row, plan.mode_code,
            plan.dcode, plan.prec, stream,
        )  # fmt: skip
    logdet = ld.sum(0) if plan.n_d > 1 else ld[0]
    return z_new, logdet.to(z.dtype), xs


def backward(plan: StepPlan, xs, z, weights, out_bias, gz, gl, below, need_w, need_b):
    """(dz from the output layer, d x0 or None, [dW_i or None], [db_i or None]) for the layers' inputs xs (forward's
    third result) and the output gradients gz, gl (contiguous): the output layer's backward, then each hidden
    layer's from the last down, each input gradient returned as the layer below's pre-activation gradient (the
    activation gradient in the GEMM's epilogue), as gm.ops.made_iaf_step's per-layer path chains them.
    below[i]: whether anything before layer i wants a gradient (layer i passes one on; below[0]: x0 = [z, context]
    does); need_w / need_b per layer."""
    rows, d, dtype = plan.rows, plan.d, plan.dtype
    device = z.device
    stream = stream_of(z)
    work = kc.scratch(plan.scratch_bytes, device)
    base = work.data_ptr()
    dz = torch.empty_like(z)
    dws, dbs = [None] * plan.n, [None] * plan.n
    dx0 = None
    wts = [kc.aligned(w) for w in weights]  # alive until the last launch that reads them is queued
    with device_guard(z):
        gp = base  # the output layer's [m, s] gradient: its GEMMs' pre-activation gradient
        mask, mask_row, offsets, idx, mids = plan.fused_map
        plan.out_backward(
            xs[-1].data_ptr(), wts[-1].data_ptr(), mask, _bias_ptr(out_bias), z.data_ptr(), gz.data_ptr(),
            gl.data_ptr(), dz.data_ptr(), gp, offsets, idx, mids, rows, d, plan.widths[-1], mask_row, plan.mode_code,
            plan.dcode, plan.prec, stream,
        )  # fmt: skip
        for i in range(plan.n - 1, -1, -1):
            layer = plan.layers[i]
            dx = 0
            if below[i] and i > 0:  # into layer i-1's pre-activation gradient (its activation's in the epilogue)
                dx = base + plan.dh_offsets[i]
                act = plan.act_code
                layer.input_grad(gp, wts[i].data_ptr(), dx, xs[i].data_ptr() if act else 0, act, stream)
            elif below[i]:
                dx0 = torch.empty(rows, layer.k, dtype=dtype, device=device)
                layer.input_grad(gp, wts[i].data_ptr(), dx0.data_ptr(), 0, 0, stream)
            if need_w[i] or need_b[i]:
                dws[i] = torch.empty(layer.o, layer.k, dtype=dtype, device=device) if need_w[i] else None
                dbs[i] = torch.empty(layer.o, dtype=dtype, device=device) if need_b[i] else None
                layer.weight_and_bias_grad(gp, xs[i].data_ptr(), base + plan.partial_offsets[i], kc._ptr(dws[i]),
                                           gp, kc._ptr(dbs[i]), stream)  # fmt: skip
            if not below[i]:
                break  # nothing at or below layer i wants a gradient
            gp = dx
    return dz, dx0, dws, dbs
