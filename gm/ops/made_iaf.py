"""A whole MADE-based IAF step as one op: made_iaf_step(z, weights, masks, biases, context=None, mode, activation).

    x_0 = [z, context]                      (the context columns only when given)
    x_i = act(x_{i-1} (W_i ⊙ M_i)^T + b_i)  for the hidden layers i = 1..L
    (z', logdet) = iaf_made_output(x_L, W_out, M_out, b_out, z, mode)

This is exactly `masked_linear` per hidden layer followed by the fused output layer `iaf_made_output`, on the same
backend kernels. What it changes is the host side. In plain eager mode the whole step is ONE autograd node that
runs the layers' kernels back to back: three ops (each an argument check, a backend choice, an autograd node and a
backward call) become one. At the IAF benchmark's sizes (a 2x1024 MADE, N=4096) the kernels take tens of
microseconds on an H200, while that machine's host spent about 0.3 ms per autograd node. So the step is bound by
its node count, and the eager reference pays for about 15 nodes.

Under torch.compile/export, fake tensors, tensor subclasses, dispatch or function modes, functorch transforms and
autocast (gm.ops._eager.eager_ok is False), the step calls the registered per-layer ops instead. Tracing then sees
gm::masked_linear and gm::iaf_made_output. The two paths run the same backend functions in the same order, so
their results are identical (tests/ops/test_made_iaf.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from gm._backend import resolve
from gm._checks import check_choice, check_same, check_tensor
from gm.ops import _made_iaf_cuda as _cuda_plan
from gm.ops._eager import eager_ok, needs_grad
from gm.ops.iaf import _FUSED_BWD, _FUSED_FWD, CUDA_FUSED_READY, MODES, _grad_or_zeros, iaf_made_output
from gm.ops.masked_linear import (
    _BACKWARD,
    _FORWARD,
    CUDA_READY,
    MASK_DTYPES,
    check_mask,
    mask_entry,
    masked_linear,
)

_HIDDEN_ACTIVATIONS = ("elu", "relu", None)


def _first_input(z: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    return z if context is None else torch.cat([z, context], dim=1)


def _entries(masks) -> list:
    """The masks' cache entries (created, and each mask checked binary, on first use)."""
    return [mask_entry(m, f"masks[{i}]") for i, m in enumerate(masks)]


def _run_forward(z, context, weights, masks, biases, mode, act, backend):
    """The layers' forward kernels: (z', logdet, inputs of every layer, what the output layer saved, the masks'
    cache entries, the cuda backend's StepPlan or None). z contiguous. On cuda, steps whose widths are whole 16-byte
    rows run their planned launches (gm.ops._made_iaf_cuda): the same kernels and arguments as the per-layer
    launchers, less host work."""
    plan = _cuda_plan.plan_for(z, context, weights, masks, act, mode) if backend == "cuda" else None
    if plan is not None:
        z_new, ld, xs = _cuda_plan.forward(plan, _first_input(z, context), z, weights, biases)
        return z_new, ld, xs, [], plan.entries, plan
    # The masks' cache entries (strong references; the cpu backend also keeps its GEMM plans in them).
    entries = _entries(masks)
    xs = [_first_input(z, context)]
    for w, m, b, e in zip(weights[:-1], masks[:-1], biases[:-1], entries[:-1], strict=True):
        xs.append(_FORWARD[backend](xs[-1], w, m, b, act, entry=e).contiguous())
    z_new, ld, *saved = _FUSED_FWD[backend](xs[-1], weights[-1], masks[-1], biases[-1], z, mode, entry=entries[-1])
    return z_new.contiguous(), ld.contiguous(), xs, saved, entries, None


class _MadeIafStep(torch.autograd.Function):
    """The eager path: one node for the whole step. apply(spec, z, context, *weights, *masks, *biases)."""

    @staticmethod
    def forward(ctx, spec, z, context, *tensors):
        layers, mode, act, backend = spec
        weights, masks, biases = tensors[:layers], tensors[layers : 2 * layers], tensors[2 * layers :]
        z_new, ld, xs, saved, entries, plan = _run_forward(z.contiguous(), context, weights, masks, biases, mode,
                                                           act, backend)  # fmt: skip
        ctx.spec, ctx.entries, ctx.plan = spec, entries, plan
        ctx.has_bias = [b is not None for b in biases]
        # The output layer's backward recomputes [m, s] (its bias too); the hidden layers' read their outputs. The
        # masks are saved on both paths (the planned one reads them through its entries): a mask written in place
        # before the backward is an error, as for the registered ops.
        ctx.save_for_backward(z, *xs, *weights, biases[-1], *masks, *(saved[:1]))
        return z_new, ld

    @staticmethod
    @once_differentiable
    def backward(ctx, gz, gl):
        layers, mode, act, backend = ctx.spec
        saved = ctx.saved_tensors
        z, xs, weights = saved[0], saved[1 : layers + 1], saved[layers + 1 : 2 * layers + 1]
        out_bias, rest = saved[2 * layers + 1], saved[2 * layers + 2 :]
        masks, out_saved = rest[:layers], rest[layers:]
        need = ctx.needs_input_grad  # (spec, z, context, *weights, *masks, *biases)
        need_z, need_ctx = need[1], need[2]
        need_w = need[3 : 3 + layers]
        need_b = [n and has for n, has in zip(need[3 + 2 * layers :], ctx.has_bias, strict=True)]
        z = z.contiguous()
        gz = _grad_or_zeros(gz, z)
        gl = _grad_or_zeros(gl, z[:, 0])
        # below[i]: whether anything before layer i wants a gradient, i.e. whether layer i passes one on.
        below = [need_z or need_ctx]
        for i in range(layers - 1):
            below.append(below[-1] or need_w[i] or need_b[i])
        if ctx.plan is not None:
            dz, dh, dws, dbs = _cuda_plan.backward(ctx.plan, xs, z, weights, out_bias, gz, gl, below, need_w, need_b)
        else:
            dz, dh, dws, dbs = _layers_backward(ctx, xs, z, weights, masks, out_bias, out_saved, gz, gl, below,
                                                need_w, need_b)  # fmt: skip
        d = z.shape[1]
        if need_z:
            dz = dz + dh[:, :d]
        dctx = dh[:, d:] if need_ctx else None
        return None, (dz if need_z else None), dctx, *dws, *([None] * layers), *dbs


def _layers_backward(ctx, xs, z, weights, masks, out_bias, out_saved, gz, gl, below, need_w, need_b):
    """The per-layer launchers' backward of the step: (dz from the output layer, d[z, context] or None, weight and
    bias gradients)."""
    layers, mode, act, backend = ctx.spec
    dws, dbs = [None] * layers, [None] * layers
    # cuda: each input gradient into a hidden layer's output comes back as that layer's pre-activation gradient
    # (the activation gradient in the GEMM's epilogue, bit for bit the separate pass): one launch and one round
    # trip through memory less per hidden layer.
    chain = backend == "cuda" and act is not None

    def onto(i):  # the cuda input gradient's `below` for layer i's input
        return {"below": (xs[i], act) if i > 0 else None} if chain else {}

    # The output layer, then the hidden layers from the last down: each passes its input's gradient on.
    dh, dws[-1], dbs[-1], dz = _FUSED_BWD[backend](
        xs[-1], weights[-1], masks[-1], out_bias, z, gz, gl, mode, below[-1],
        need_w[-1], need_b[-1], out_saved[0] if out_saved else None, entry=ctx.entries[-1], **onto(layers - 1),
    )  # fmt: skip
    for i in range(layers - 2, -1, -1):
        if not below[i + 1]:
            continue  # nothing at or below layer i wants a gradient
        need_x = below[i]
        dh, dws[i], dbs[i] = _BACKWARD[backend](
            dh.contiguous(), xs[i + 1], xs[i], weights[i], masks[i], act, need_x, need_w[i], need_b[i],
            entry=ctx.entries[i], **({"grad_is_gp": True, **onto(i)} if chain else {}),
        )  # fmt: skip
    return dz, (dh if below[0] else None), dws, dbs


def _check_layers(z, context, weights, masks, biases) -> None:
    if not isinstance(weights, Sequence) or not isinstance(masks, Sequence):
        raise ValueError(f"weights and masks must be sequences of tensors, got {type(weights).__name__} and "
                         f"{type(masks).__name__}")  # fmt: skip
    if len(weights) < 2:
        raise ValueError(f"weights must hold at least 2 layers (hidden layers, then the output layer), got "
                         f"{len(weights)}")  # fmt: skip
    if len(masks) != len(weights) or len(biases) != len(weights):
        raise ValueError(f"masks and biases must have one entry per weight ({len(weights)}), got {len(masks)} masks "
                         f"and {len(biases)} biases")  # fmt: skip
    n, d = z.shape
    width = d + (0 if context is None else context.shape[1])
    last = len(weights) - 1
    for i, (w, m, b) in enumerate(zip(weights, masks, biases, strict=True)):
        want = (2 * d if i == last else _rows(w), width)
        # A plain predicate first (this runs on every call); the named checks only to word an error.
        plain = (
            type(w) in _TENSORS and w.shape == want and w.dtype == z.dtype and w.device == z.device
            and type(m) in _TENSORS and m.shape == want and m.dtype in MASK_DTYPES and m.device == z.device
            and (b is None or (type(b) in _TENSORS and b.shape == want[:1] and b.dtype == z.dtype
                               and b.device == z.device))
        )  # fmt: skip
        if not plain:
            _explain_layer(i, w, m, b, want, z, context, width, i == last)
        width = want[0]


_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _rows(w) -> int:
    return w.shape[0] if isinstance(w, torch.Tensor) and w.dim() == 2 else -1


def _explain_layer(i, w, m, b, want, z, context, width, last) -> None:
    """Raises the ValueError that says what is wrong with layer i."""
    check_tensor(f"weights[{i}]", w, ndim=2)
    check_same("z", z, **{f"weights[{i}]": w, f"biases[{i}]": b})
    if tuple(w.shape) != want:
        what = "the output layer (2D, H)" if last else "a hidden layer (H_out, H_in)"
        raise ValueError(f"weights[{i}] must have shape {want} for {what} after an input of width {width} "
                         f"(z {tuple(z.shape)}, context {None if context is None else tuple(context.shape)}), "
                         f"got {tuple(w.shape)}")  # fmt: skip
    check_mask(m, w, f"masks[{i}]")
    if b is not None:
        check_tensor(f"biases[{i}]", b, ndim=1)
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"biases[{i}] must have {w.shape[0]} entries, got {b.shape[0]}")
    raise AssertionError(f"layer {i} failed the plain check but passed every named one")  # pragma: no cover


def made_iaf_step(
    z: torch.Tensor,
    weights: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    *,
    context: torch.Tensor | None = None,
    mode: str = "gated",
    activation: str | None = "elu",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One IAF step on a MADE: the hidden masked layers, then the output layer fused with the update.

    Args:
        z: (N, D).
        weights, masks: the hidden layers' (H_1, D + context), (H_2, H_1), ..., then the output layer's (2D, H_L)
            whose rows 0..D−1 give m and rows D..2D−1 give s (gm.nn.MADE's layout, heads=2). Masks binary, cached
            per tensor as in gm.ops.masked_linear (pass module buffers).
        biases: one optional (O,) bias per layer, or None for none.
        context: optional (N, C), the MADE's context input, concatenated to z for the first layer.
        mode: "gated" or "affine" (gm.ops.iaf_step).
        activation: the hidden layers' activation, "elu" (the MADE default), "relu" or None.
        backend: None (auto), "reference", "cpu", "triton" or "cuda", as masked_linear.

    Returns:
        (z' (N, D), logdet (N,)), equal to masked_linear per hidden layer then iaf_made_output.

    Example:
        >>> from gm.nn.made import made_masks
        >>> masks = made_masks(4, 8, n_hidden=2)
        >>> weights = [torch.randn(m.shape) for m in masks]
        >>> z_new, logdet = made_iaf_step(torch.randn(3, 4), weights, masks)
        >>> z_new.shape, logdet.shape
        (torch.Size([3, 4]), torch.Size([3]))
    """
    check_tensor("z", z, ndim=2)
    if context is not None:
        check_tensor("context", context, ndim=2)
        check_same("z", z, context=context)
        if context.shape[0] != z.shape[0]:
            raise ValueError(f"context must have z's batch size {z.shape[0]}, got {tuple(context.shape)}")
    biases = [None] * len(weights) if biases is None else list(biases)
    _check_layers(z, context, weights, masks, biases)
    check_choice("mode", mode, MODES)
    check_choice("activation", activation, _HIDDEN_ACTIVATIONS)
    chosen = resolve(backend, z.device, native_cpu=False, cuda_kernels=CUDA_READY and CUDA_FUSED_READY
                     and z.dtype != torch.float64, op="made_iaf_step", dtype=z.dtype)  # fmt: skip
    layers = len(weights)
    if eager_ok(z, context, *weights, *masks, *biases):
        if needs_grad(z, context, *weights, *biases):
            spec = (layers, mode, activation, chosen)
            return _MadeIafStep.apply(spec, z, context, *weights, *masks, *biases)
        with torch.no_grad():
            return _run_forward(z.contiguous(), context, weights, masks, biases, mode, activation, chosen)[:2]
    # Traced or under a mode: the registered per-layer ops.
    x = _first_input(z, context)
    for w, m, b in zip(weights[:-1], masks[:-1], biases[:-1], strict=True):
        x = masked_linear(x, w, m, b, activation=activation, backend=chosen)
    return iaf_made_output(x, weights[-1], masks[-1], biases[-1], z, mode=mode, backend=chosen)


__all__ = ["made_iaf_step"]
