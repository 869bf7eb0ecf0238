"""A chain of (ReLU, masked convolution) layers, optionally around a residual connection, as one autograd node.

The PixelCNN residual block is x + conv3(relu(conv2(relu(conv1(relu(x)))))) and the models' output head is
conv3(relu(conv2(relu(conv1(relu(h)))))). Composed, each ReLU is a launch and a full pass over its tensor forward
and backward (its derivative), the residual add one more each way, and autograd keeps every ReLU's output. Where
every convolution of the chain runs on triton, relu_conv_chain runs it as one node instead:
- forward: each convolution applies ReLU to its input as it loads it (gm.kernels.masked_conv.forward(relu_in=True))
  and the last adds the residual in its epilogue; the node keeps each convolution's input (before its ReLU);
- backward: each input gradient applies ReLU's derivative in its epilogue (input_grad(gate=the convolution's
  input)), the first also adds the residual's gradient; the weight gradients apply ReLU as they load the input
  (weight_grad(relu_in=True)); each weight's packed operands come from its forward (gm._ext.packed).
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


def _fused(x: torch.Tensor, convs, residual: bool) -> torch.Tensor | None:
    params = [p for conv in convs for p in (conv.weight, conv.bias)]
    if not (FUSED and x.numel() > 0 and eager_ok(x, *params)):
        return None
    if any(conv_backend(conv.backend, x) != "triton" for conv in convs):
        return None
    if any(p is not None and p.dtype != x.dtype for p in params):
        return None  # the composed path names the mismatch
    first = convs[0]
    check_masked_conv_args(x, first.weight, first.bias, first.mask, first.in_groups, first.out_groups)
    spec = (tuple((c.mask, c.in_groups, c.out_groups) for c in convs), residual)
    if needs_grad(x, *params):
        return _ReluConvChain.apply(spec, x, *params)
    with torch.no_grad():
        return _chain_forward(spec, x, params, backward=False)[0]


def _plans(spec, params):
    from gm.ops.masked_conv import pack_plan  # noqa: PLC0415

    return [pack_plan(params[2 * i].shape, *conv, params[2 * i].device) for i, conv in enumerate(spec[0])]


def _chain_forward(spec, x, params, *, backward: bool):
    """(output, the convolutions' inputs): the forward kernels with ReLU on load and the residual in the last
    epilogue; backward: whether a backward will follow (the weights' input-gradient operands are packed too)."""
    from gm.kernels import masked_conv as k  # noqa: PLC0415
    from gm.ops.masked_conv import _triton_operands  # noqa: PLC0415

    plans = _plans(spec, params)
    inputs, h = [], x
    last = len(plans) - 1
    for i, plan in enumerate(plans):
        w, b = params[2 * i], params[2 * i + 1]
        operand, _ = _triton_operands(w, plan, fresh=True, input_grad=backward)
        inputs.append(h)
        h = k.forward(h, operand, b, w.shape[2], w.shape[3], plan.taps, relu_in=True,
                      residual=x if spec[1] and i == last else None)  # fmt: skip
    return h, inputs


class _ReluConvChain(torch.autograd.Function):
    """relu_conv_chain's fused path (module docstring): inputs (spec, x, w_1, b_1, ..., w_n, b_n)."""

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
        from gm.kernels import masked_conv as k  # noqa: PLC0415
        from gm.kernels._layout import channels_last  # noqa: PLC0415
        from gm.ops.masked_conv import _triton_operands  # noqa: PLC0415

        spec = ctx.spec
        n = len(spec[0])
        saved = ctx.saved_tensors
        inputs, weights = saved[:n], saved[n:]
        params = [p for w in weights for p in (w, None)]
        plans = _plans(spec, params)
        need = ctx.needs_input_grad
        x = inputs[0]
        fmt = format_of(x)
        # The kernels read channels-last operands: convert the incoming gradient once, for both of a layer's gradients.
        g_out = channels_last(grad.to(x.dtype))
        g = g_out
        grads = [None] * (2 * n)
        dx = None
        for i in reversed(range(n)):
            w, plan, h = weights[i], plans[i], inputs[i]
            kh, kw = w.shape[2], w.shape[3]
            if need[2 + 2 * i]:
                grads[2 * i] = k.weight_grad(h, g, len(plan.taps), kh, kw, plan.taps, plan.positions, plan.keep,
                                             w.dtype, relu_in=True)  # fmt: skip
            if need[3 + 2 * i] and ctx.has_bias[i]:
                grads[2 * i + 1] = g.sum(dim=(0, 2, 3))
            if i == 0 and not need[1]:
                break
            _, operand = _triton_operands(w, plan, fresh=False)  # the forward's, unless w changed since
            residual = g_out if i == 0 and spec[1] else None
            g = k.input_grad(g, operand, kh, kw, plan.taps, fmt if i == 0 else torch.channels_last, gate=h,
                             residual=residual)  # fmt: skip
            if i == 0:
                dx = g
        return None, dx, *grads
