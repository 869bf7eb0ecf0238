"""gm.ops._eager: plain eager calls run each op's registered functions through an autograd.Function instead of
the custom op. Same results, bit for bit, forward and every gradient, for every op and backend on the machine;
under torch.compile / fake tensors the registered op still runs."""

from __future__ import annotations

import pytest
import torch

import gm.ops as ops
from gm.nn.made import made_masks
from gm.ops import _eager
from tests._util import fast_backends

BACKENDS = ["reference", *fast_backends(torch.device("cpu"))]


def _leaf(*shape, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_()


def _cases():
    torch.manual_seed(0)
    mask = made_masks(6, 16, 1, "natural", heads=1)[0]
    out_mask = made_masks(6, 16, 1, "natural", heads=2)[1]
    return {
        "masked_conv2d": (lambda b, x, w, bias: ops.masked_conv2d(x, w, bias, mask="B", backend=b),
                          (_leaf(2, 3, 5, 6), _leaf(4, 3, 3, 3), _leaf(4))),
        "row_lstm": (lambda b, g, w, h0, c0: ops.row_lstm(g, w, h0=h0, c0=c0, backend=b),
                     (_leaf(2, 12, 4, 5), _leaf(12, 3, 3, scale=0.3), _leaf(2, 3, 5), _leaf(2, 3, 5))),
        "diagonal_lstm": (lambda b, g, w: ops.diagonal_lstm(g, w, reverse=True, backend=b),
                          (_leaf(2, 12, 4, 5), _leaf(12, 3, 2, scale=0.3))),
        "minibatch": (lambda b, m: ops.minibatch_discrimination(m, backend=b), (_leaf(5, 3, 2),)),
        "masked_linear": (lambda b, x, w, bias: ops.masked_linear(x, w, mask, bias, activation="elu", backend=b),
                          (_leaf(7, 6), _leaf(16, 6), _leaf(16))),
        "iaf_step": (lambda b, z, m, s: ops.iaf_step(z, m, s, backend=b), (_leaf(4, 6), _leaf(4, 6), _leaf(4, 6))),
        "iaf_made_output": (lambda b, h, w, bias, z: ops.iaf_made_output(h, w, out_mask, bias, z, backend=b),
                            (_leaf(5, 16), _leaf(12, 16, scale=0.3), _leaf(12), _leaf(5, 6))),
    }


def _run(fn, backend, inputs):
    outs = fn(backend, *inputs)
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    weights = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    node, names = outs[0].grad_fn, []
    while node is not None and len(names) < 3:  # the op's node, under a reshape's view node at most
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    return outs, torch.autograd.grad(loss, inputs), " ".join(names)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_cases()))
def test_eager_path_equals_custom_op(name, backend, monkeypatch):
    fn, inputs = _cases()[name]
    if backend == "triton" and name == "masked_conv2d":
        inputs = tuple(t.detach().float().requires_grad_() for t in inputs)  # the interpreter's float64 dots: slow
    runs = {}
    for fast in (True, False):
        monkeypatch.setattr(_eager, "EAGER_FAST_PATH", fast)
        runs[fast] = _run(fn, backend, inputs)
    (out_f, grads_f, node_f), (out_s, grads_s, node_s) = runs[True], runs[False]
    assert "_eagerBackward" in node_f or "_Cpu" in node_f, node_f
    assert "eager" not in node_s, node_s
    for a, b in zip(out_f + list(grads_f), out_s + list(grads_s), strict=True):
        assert torch.equal(a, b)


def test_eager_path_is_skipped_under_modes():
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    x = torch.randn(3, 4)
    assert _eager.eager_ok(x, None, torch.nn.Parameter(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _eager.eager_ok(x)
    with FakeTensorMode() as mode:
        fm = mode.from_tensor(torch.randn(5, 3, 2))
        assert not _eager.eager_ok(fm)
        assert ops.minibatch_discrimination(fm, backend="reference").shape == (5, 3)


def test_compiled_graph_holds_the_custom_op():
    seen = []

    def backend(gm_, example_inputs):
        seen.extend(str(n.target) for n in gm_.graph.nodes)
        return gm_.forward

    f = torch.compile(lambda m: ops.minibatch_discrimination(m, backend="reference"), backend=backend, fullgraph=True)
    f(torch.randn(5, 3, 2))
    assert any("gm.minibatch_discrimination" in t for t in seen), seen
