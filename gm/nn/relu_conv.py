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


def _chain_forward(spec, x, params, *, backward: bool):
    """(output, the convolutions' inputs): the forward kernels with ReLU on load and the residual in the last
    epilogue (gm.ops.masked_conv's triton and cuda implementations); backward: whether a backward will follow (the
    weights' input-gradient operands are packed too)."""
    from gm.ops.masked_conv import _FORWARD  # noqa: PLC0415

    convs, residual, backend = spec
    inputs, h = [], x
    for i, conv in enumerate(convs):
        inputs.append(h)
        last = residual and i == len(convs) - 1
        h = _FORWARD[backend](h, params[2 * i], params[2 * i + 1], *conv, relu_in=True, residual=x if last else None,
                              backward=backward)  # fmt: skip
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
        from gm.ops.masked_conv import _BACKWARD  # noqa: PLC0415

        convs, residual, backend = ctx.spec
        n = len(convs)
        saved = ctx.saved_tensors
        inputs, weights = saved[:n], saved[n:]
        need = ctx.needs_input_grad
        x = inputs[0]
        g_out = grad.to(x.dtype)
        g = g_out
        grads = [None] * (2 * n)
        for i in reversed(range(n)):
            # each layer: dh = relu'(h) * conv^T g (+ the residual's gradient at the first), the weight gradient of
            # conv(relu(h)) and the bias gradient from the same kernels, the forward's packed weight
            need_b = need[3 + 2 * i] and ctx.has_bias[i]
            g, grads[2 * i], grads[2 * i + 1] = _BACKWARD[backend](
                g, inputs[i], weights[i], *convs[i], i > 0 or need[1], need[2 + 2 * i], relu_in=True,
                residual=g_out if i == 0 and residual else None, bias_grad=need_b,
            )  # fmt: skip
            if g is not None:  # in its input's layout (cuda writes the grad's: the logits' may be ambiguous)
                g = g.contiguous(memory_format=format_of(inputs[i]))
        return None, g, *grads
