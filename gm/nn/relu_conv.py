"""A chain of (ReLU, masked convolution) layers, optionally around a residual connection, as one autograd node.

The PixelCNN residual block is x + conv3(relu(conv2(relu(conv1(relu(x)))))) and the models' output head is
conv3(relu(conv2(relu(conv1(relu(h)))))). Composed, each ReLU is a launch and a full pass over its tensor forward
and backward (its derivative), the residual add one more each way, and autograd keeps every ReLU's output. Where
every convolution of the chain runs on triton, or every one on cuda, relu_conv_chain runs it as one node instead:
- forward: each convolution applies ReLU to its input as it loads it (the Triton kernels' RELU_IN, the CUDA GEMM's
  relu on its A fragments) and the last adds the residual in its epilogue; the node keeps each convolution's input
  (before its ReLU);
- backward: each input gradient applies ReLU's derivative in its epilogue (gate: the convolution's input), the
  first also adds the residual's gradient; the weight gradients apply ReLU as they read the input; each weight's
  packed operands come from its forward (gm._ext.packed).
Per (ReLU, conv) layer that removes two launches and two full passes (one forward, one backward), and one more of
each for the residual. Elsewhere (other backends, torch.compile, modes, autocast: gm.ops._eager.eager_ok) the
composed modules run. Values: the same kernels on the same operands as the composed triton ops, except that the
residual is added in the float32 (float64) accumulator before the output is rounded, where the composed path adds
two rounded tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from gm._memory_format import format_of
from gm.ops._eager import eager_ok, needs_grad
from gm.ops.masked_conv import check_masked_conv_args, conv_backend

# False: always the composed modules (tests compare the two).
FUSED = True


def relu_conv_chain(x: torch.Tensor, convs, residual: bool = False) -> torch.Tensor:
    """conv_n(relu(... conv_1(relu(x)))), plus x when `residual` (the last conv then maps back to x's channels);
    `convs` are gm.nn.MaskedConv2d modules."""
    fused = _fused(x, convs, residual)
    if fused is not None:
        return fused
    h = x
    for conv in convs:
        h = conv(F.relu(h))
    return x + h if residual else h


_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fused(x: torch.Tensor, convs, residual: bool) -> torch.Tensor | None:
    params = [p for conv in convs for p in (conv.weight, conv.bias)]
    if not (FUSED and x.numel() > 0 and eager_ok(x, *params)):
        return None
    backends = {conv_backend(conv.backend, x) for conv in convs}
    if len(backends) != 1 or not backends <= {"triton", "cuda"}:
        return None
    backend = backends.pop()
    mixed = any(p is not None and (p.dtype != x.dtype or p.device != x.device) for p in params)
    if mixed or (backend == "cuda" and x.dtype not in _CUDA_DTYPES):
        return None  # the composed path names the mismatch
    first = convs[0]
    check_masked_conv_args(x, first.weight, first.bias, first.mask, first.in_groups, first.out_groups)
    spec = (tuple((c.mask, c.in_groups, c.out_groups) for c in convs), residual, backend)
    if needs_grad(x, *params):
        return _ReluConvChain.apply(spec, x, *params)
    with torch.no_grad():
        return _chain_forward(spec, x, params, backward=False)[0]


def _plans(spec, params):
    from gm.ops.masked_conv import pack_plan  # noqa: PLC0415

    return [pack_plan(params[2 * i].shape, *conv, params[2 * i].device) for i, conv in enumerate(spec[0])]


def _layer_forward(backend: str, h, w, b, plan, residual, backward: bool):
    """conv(relu(h)) + b (+ residual) on `backend`, its weight packed for the backward too where one follows."""
    if backend == "cuda":
        from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415

        operands = c.weight_operands(w, plan, fresh=True, input_grad=backward)
        return c.forward(h, operands, b, plan.taps, relu_in=True, residual=residual)
    from gm.kernels import masked_conv as k  # noqa: PLC0415
    from gm.ops.masked_conv import _triton_operands  # noqa: PLC0415

    operand, _ = _triton_operands(w, plan, fresh=True, input_grad=backward)
    return k.forward(h, operand, b, w.shape[2], w.shape[3], plan.taps, relu_in=True, residual=residual)


def _layer_backward(backend: str, g, h, w, plan, need_w: bool, need_b: bool, need_h: bool, residual, fmt):
    """(dw, db, dh), each None where not needed, of conv(relu(h)) + b for its output gradient g (on triton
    channels-last already): dh = relu'(h) * conv^T g (+ residual) in `fmt`, the weight gradient reading relu(h)
    with the bias gradient from the same kernels; the forward's packed weight."""
    kh, kw = w.shape[2], w.shape[3]
    if backend == "cuda":
        from gm.ops import _masked_conv_cuda as c  # noqa: PLC0415

        g_nhwc = c.grad_nhwc(g, plan.taps) if need_w and need_h else None
        dw = db = None
        if need_w:
            grads = c.weight_grad(h, g, plan.taps, plan, tuple(w.shape), w.dtype, grad_nhwc=g_nhwc, relu_in=True,
                                  bias_grad=need_b)  # fmt: skip
            dw, db = grads if need_b else (grads, None)
        elif need_b:
            db = g.sum(dim=(0, 2, 3))
        if not need_h:
            return dw, db, None
        operands = c.weight_operands(w, plan, fresh=False)  # the forward's, unless w changed since
        dh = c.input_grad(g, operands, plan.taps, grad_nhwc=g_nhwc, gate=h, residual=residual)
        return dw, db, dh.contiguous(memory_format=fmt)
    from gm.kernels import masked_conv as k  # noqa: PLC0415
    from gm.ops.masked_conv import _triton_operands  # noqa: PLC0415

    dw = db = None
    if need_w:
        grads = k.weight_grad(h, g, len(plan.taps), kh, kw, plan.taps, plan.positions, plan.keep, w.dtype,
                              relu_in=True, bias_grad=need_b)  # fmt: skip
        dw, db = grads if need_b else (grads, None)
    elif need_b:
        db = g.sum(dim=(0, 2, 3))
    if not need_h:
        return dw, db, None
    _, operand = _triton_operands(w, plan, fresh=False)  # the forward's, unless w changed since
    return dw, db, k.input_grad(g, operand, kh, kw, plan.taps, fmt, gate=h, residual=residual)


def _chain_forward(spec, x, params, *, backward: bool):
    """(output, the convolutions' inputs): the forward kernels with ReLU on load and the residual in the last
    epilogue; backward: whether a backward will follow (the weights' input-gradient operands are packed too)."""
    plans = _plans(spec, params)
    inputs, h = [], x
    last = len(plans) - 1
    for i, plan in enumerate(plans):
        inputs.append(h)
        h = _layer_forward(spec[2], h, params[2 * i], params[2 * i + 1], plan, x if spec[1] and i == last else None,
                           backward)  # fmt: skip
    return h, inputs


class _ReluConvChain(torch.autograd.Function):
    """relu_conv_chain's fused path (module docstring): inputs (spec, x, w_1, b_1, ..., w_n, b_n); spec: (the convs'
    (mask, in_groups, out_groups), residual, backend)."""

    @staticmethod
    def forward(ctx, spec, x, *params):
        out, inputs = _chain_forward(spec, x, params, backward=True)
        ctx.spec = spec
        ctx.has_bias = tuple(b is not None for b in params[1::2])
        ctx.save_for_backward(*inputs, *params[0::2])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        spec = ctx.spec
        backend = spec[2]
        n = len(spec[0])
        saved = ctx.saved_tensors
        inputs, weights = saved[:n], saved[n:]
        plans = _plans(spec, [p for w in weights for p in (w, None)])
        need = ctx.needs_input_grad
        x = inputs[0]
        fmt = format_of(x)
        g_out = grad.to(x.dtype)
        if backend == "triton":  # the Triton kernels read channels-last: convert once, for both of a layer's grads
            from gm.kernels._layout import channels_last  # noqa: PLC0415

            g_out = channels_last(g_out)
        g = g_out
        grads = [None] * (2 * n)
        dx = None
        for i in reversed(range(n)):
            need_h = i > 0 or need[1]
            # hidden gradients channels-last (what the kernels read); dx in x's layout
            grads[2 * i], grads[2 * i + 1], dh = _layer_backward(
                backend, g, inputs[i], weights[i], plans[i], need[2 + 2 * i], need[3 + 2 * i] and ctx.has_bias[i],
                need_h, g_out if i == 0 and spec[1] else None, fmt if i == 0 else torch.channels_last)  # fmt: skip
            if i == 0:
                dx = dh
            g = dh
        return None, dx, *grads
