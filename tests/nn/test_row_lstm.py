"""gm.nn.RowLSTM: the composition it computes, every backend, and exact causality with colours."""

from __future__ import annotations

import importlib

import pytest
import torch

import gm
from gm._memory_format import format_of
from gm.reference.masked_conv import masked_conv2d as ref_masked_conv2d
from gm.reference.row_lstm import row_lstm as ref_row_lstm
from tests._util import (
    ONE_NODE_SHAPES,
    assert_rel,
    composed_without_grad_or_mode,
    fast_backends,
    random_biases,
    triton_here,
)

CPU = torch.device("cpu")


def _reference(m: gm.nn.RowLSTM, x: torch.Tensor) -> torch.Tensor:
    c = m.input_to_state
    gates = ref_masked_conv2d(x, c.weight, c.bias, mask="B", in_groups=c.in_groups, out_groups=c.out_groups)
    h = ref_row_lstm(gates, m.w_ss)
    if m.out is None:
        return h
    o = m.out
    return x + ref_masked_conv2d(h, o.weight, o.bias, mask="B", in_groups=o.in_groups, out_groups=o.out_groups)


@pytest.mark.parametrize("backend", ["reference", *fast_backends(CPU)])
@pytest.mark.parametrize("colors,residual", [(1, True), (3, True), (3, False)], ids=["c1-res", "c3-res", "c3-nores"])
def test_matches_reference(backend, colors, residual):
    m = gm.nn.RowLSTM(3, 6, kernel_size=3, colors=colors, residual=residual, backend=backend).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = m(x)
    dy = torch.randn_like(y)
    params = [x, *m.parameters()]
    grads = torch.autograd.grad(y, params, dy)
    y_ref = _reference(m, x)
    grads_ref = torch.autograd.grad(y_ref, params, dy)
    assert_rel(y, y_ref, torch.float64, "y", device=CPU)
    for i, (g, gr) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_rel(g, gr, torch.float64, f"grad {i}", device=CPU)


@pytest.mark.parametrize("backend", ["reference", *fast_backends(CPU)])
def test_causal_with_colours(backend):
    """d out[pixel p, colour k] / d x[q, k'] == 0 for every later pixel q, and for k' > k at p itself."""
    height, width = 3, 4
    m = gm.nn.RowLSTM(3, 6, kernel_size=3, colors=3, residual=True, backend=backend).double()
    x = torch.randn(1, 3, height, width, dtype=torch.float64, requires_grad=True)
    y = m(x)
    pixel = torch.arange(height * width).view(height, width)
    for r in range(height):
        for w in range(width):
            for k in range(3):
                (g,) = torch.autograd.grad(y[0, k, r, w], x, retain_graph=True)
                later = pixel > pixel[r, w]
                assert (g[0][:, later] == 0).all(), f"({r},{w}) colour {k} sees a later pixel"
                assert (g[0, k + 1 :, r, w] == 0).all(), f"({r},{w}) colour {k} sees a later colour"
                assert g[0, k, r, w] != 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernel_size"):
        gm.nn.RowLSTM(3, 6, kernel_size=2)
    with pytest.raises(ValueError, match="hidden must be a positive multiple of colors=3"):
        gm.nn.RowLSTM(3, 4, colors=3)
    with pytest.raises(ValueError, match="colors"):
        gm.nn.RowLSTM(3, 6, colors=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_layer(dtype):
    dev = torch.device("cuda")
    m = gm.nn.RowLSTM(6, 33, colors=3).to(dev)  # hidden: a multiple of colors
    x = torch.randn(2, 6, 16, 16, device=dev)
    ref = _reference(m.double(), x.double())
    m = m.to(dtype)
    assert_rel(m(x.to(dtype)), ref, dtype, "RowLSTM", device=dev)


@pytest.mark.parametrize("backend", ["reference", *fast_backends(CPU)])
def test_learned_initial_state(backend):
    """learn_init: h0/c0 broadcast over columns and batch reach the scan, and get gradients (summed over both)."""
    m = gm.nn.RowLSTM(2, 4, kernel_size=3, residual=False, learn_init=True, backend=backend).double()
    x = torch.randn(3, 2, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        m.h0.normal_()
        m.c0.normal_()
    y = m(x)
    gates = m.input_to_state(x)
    h0 = m.h0.detach().view(1, -1, 1).expand(3, -1, 5).clone().requires_grad_()
    c0 = m.c0.detach().view(1, -1, 1).expand(3, -1, 5).clone().requires_grad_()
    y_ref = ref_row_lstm(gates, m.w_ss, h0=h0, c0=c0)
    assert_rel(y, y_ref, torch.float64, "forward with learned state", device=CPU)
    gy = torch.randn_like(y)
    dh0, dc0 = torch.autograd.grad(y, (m.h0, m.c0), gy)
    dh0_ref, dc0_ref = torch.autograd.grad(y_ref, (h0, c0), gy)
    assert_rel(dh0, dh0_ref.sum((0, 2)), torch.float64, "dh0", device=CPU)
    assert_rel(dc0, dc0_ref.sum((0, 2)), torch.float64, "dc0", device=CPU)


# ------------------------------------------------------------------------------------------- the one-node layer path
# gm.nn.row_lstm.FUSED_LAYER runs the layer as one autograd node (the registered ops' implementations in the composed
# order); it must give the composed ops' bits for the output and every gradient, whichever gradients are wanted.

# Which leaves require grad: all; x alone; the parameters alone; the scan's alone (no conv backward before the scan);
# the output conv's alone (no scan backward at all).
_WANTED = {
    "all": lambda name: True,
    "x": lambda name: name == "x",
    "params": lambda name: name != "x",
    "scan": lambda name: name in ("w_ss", "h0", "c0"),
    "out": lambda name: name.startswith("out."),
}


# gm.ops re-exports its functions under their modules' names (gm.ops.row_lstm is the function): the modules by name.
_LAYER, _CONV, _SCAN = map(importlib.import_module, ("gm.nn.row_lstm", "gm.ops.masked_conv", "gm.ops.row_lstm"))


def _recorder(real, log, describe):
    def call(*args, **kwargs):
        log.append(describe(*args, **kwargs))
        return real(*args, **kwargs)

    return call


def _spy(monkeypatch, name: str, log: list, describe) -> None:
    """Wrap `name` wherever the layer and the ops look it up: each call appends describe(*args, **kwargs) to log."""
    for module in (_LAYER, _CONV, _SCAN):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, _recorder(getattr(module, name), log, describe))


def one_node_equals_composed(layer: gm.nn.RowLSTM, x: torch.Tensor, monkeypatch, wanted=tuple(_WANTED),
                             node: str = "_FusedRowLSTM") -> None:  # fmt: skip
    """Output and every wanted gradient bit for bit (and dtype and memory format) between FUSED_LAYER True and
    False, the one-node path (the autograd Function `node`) is the one that ran, and its backward calls the same
    backward implementations with the same flags (so it computes no gradient the composed path skips)."""
    calls = []
    for name in ("_masked_conv2d_backward_impl", "_row_lstm_backward_impl"):
        # the convs told apart by their weight's shape; the need flags; whether an initial state was given
        flags = 3 if name == "_masked_conv2d_backward_impl" else 2  # (need_x, need_w, need_b) / (backend, need_w)
        _spy(monkeypatch, name, calls, lambda *a, _name=name, _k=flags: (_name, tuple(a[2].shape), a[-_k:], a[3] is None))
    # the channels-last node's scan backward (dy, dgates, w_ss, h0, c0, hs, cs, need_w), recorded as the op's call
    for backend, scan in _SCAN.BACKWARD_CHANNELS_LAST.items():
        describe = lambda *a, _b=backend: ("_row_lstm_backward_impl", tuple(a[2].shape), (_b, a[-1]), a[3] is None)  # noqa: E731
        monkeypatch.setitem(_SCAN.BACKWARD_CHANNELS_LAST, backend, _recorder(scan, calls, describe))
    named = [("x", None), *layer.named_parameters()]
    try:
        for key in wanted:
            names = [name for name, _ in named if _WANTED[key](name)]
            if not names:  # e.g. the output conv's parameters of a layer without one
                continue
            runs = {}
            for fused in (True, False):
                monkeypatch.setattr(_LAYER, "FUSED_LAYER", fused)
                xx = x.detach().clone().requires_grad_("x" in names)
                for name, p in layer.named_parameters():
                    p.requires_grad_(name in names)
                y = layer(xx)
                assert (type(y.grad_fn).__name__ == f"{node}Backward") == fused, (key, type(y.grad_fn).__name__)
                gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
                leaves = [xx if name == "x" else p for name, p in named if name in names]
                calls.clear()
                runs[fused] = [y.detach(), *torch.autograd.grad(y, leaves, gy), calls.copy()]
            assert runs[True].pop() == runs[False].pop(), key
            for name, a, b in zip(["y", *names], runs[True], runs[False], strict=True):
                assert a.dtype == b.dtype, f"{key}: {name}"
                assert torch.equal(a, b), f"{key}: {name}"
                assert a.dim() != 4 or format_of(a) == format_of(b), (key, name, a.stride(), b.stride())
    finally:
        for p in layer.parameters():
            p.requires_grad_(True)


def _layer(backend, colors, residual, learn_init, dtype):
    layer = gm.nn.RowLSTM(6, 3, kernel_size=3, colors=colors, residual=residual, learn_init=learn_init,
                          backend=backend).to(dtype)  # fmt: skip
    return random_biases(layer)  # non-zero initial state and biases, so each gradient is a real one


@pytest.mark.parametrize("backend", ["reference", *fast_backends(CPU)])
@pytest.mark.parametrize("colors", [1, 3], ids=["c1", "c3"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("learn_init", [True, False], ids=["init", "zero"])
def test_one_node_equals_composed(backend, colors, residual, learn_init, monkeypatch):
    dtype = torch.float32 if backend == "triton" else torch.float64
    layer = _layer(backend, colors, residual, learn_init, dtype)
    # (interpreter time: the subsets that only skip host-side work are covered by the other backends)
    wanted = ("all", "x", "params") if backend == "triton" else tuple(_WANTED)
    x = torch.randn(2, 6, 4, 5, dtype=dtype)
    if backend == "triton":  # the channels-last node (test_triton_one_node_channels_last_equals_composed)
        one_node_equals_composed(layer, x, monkeypatch, wanted, "_FusedRowLSTMChannelsLast")
    else:
        one_node_equals_composed(layer, x, monkeypatch, wanted)


@pytest.mark.skipif(not triton_here(), reason="triton is not available")
@pytest.mark.parametrize("shape", list(ONE_NODE_SHAPES.values()), ids=list(ONE_NODE_SHAPES))
@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("learn_init", [True, False], ids=["init", "zero"])
def test_triton_one_node_channels_last_equals_composed(shape, x_format, residual, learn_init, monkeypatch):
    """backend="triton": the channels-last node (gm.nn.row_lstm._FusedRowLSTMChannelsLast: the scans read and write
    (N, H, W, 4h) gates in place, the weight gradient reads them and the states channels-last) gives the composed
    ops' bits for the output and every gradient, NCHW or channels-last input (the input conv's bias gradient too:
    both paths sum it in the conv's weight-gradient kernel, over channels-last gate gradients)."""
    n, height, width, hid, colors = shape
    torch.manual_seed(0)
    layer = random_biases(gm.nn.RowLSTM(3, hid, kernel_size=3, colors=colors, residual=residual,
                                        learn_init=learn_init, backend="triton"))  # fmt: skip
    x = torch.randn(n, 3, height, width).contiguous(memory_format=x_format)
    assert layer.runs_channels_last(x)
    one_node_equals_composed(layer, x, monkeypatch, ("all",), node="_FusedRowLSTMChannelsLast")  # fmt: skip


@pytest.mark.skipif(not triton_here(), reason="triton is not available")
@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_triton_one_node_channels_last_bf16(x_format, monkeypatch):
    """The same in bfloat16 (float32 states, bfloat16 gates, y and gate gradients), and the parameter subsets."""
    torch.manual_seed(0)
    layer = _layer("triton", 3, True, True, torch.bfloat16)
    x = torch.randn(2, 6, 3, 5).to(torch.bfloat16).contiguous(memory_format=x_format)
    one_node_equals_composed(layer, x, monkeypatch, ("all", "scan", "out"), node="_FusedRowLSTMChannelsLast")  # fmt: skip


@pytest.mark.skipif(not triton_here(), reason="triton is not available")
def test_triton_channels_last_switch(monkeypatch):
    """CHANNELS_LAST False, or a residual conv on another backend: the node that calls the ops' implementations."""
    layer = _layer("triton", 1, True, False, torch.float32)
    x = torch.randn(1, 6, 2, 3)
    monkeypatch.setattr(_LAYER, "CHANNELS_LAST", False)
    assert not layer.runs_channels_last(x)
    one_node_equals_composed(layer, x, monkeypatch, ("all",))
    monkeypatch.setattr(_LAYER, "CHANNELS_LAST", True)
    layer.out.backend = "reference"
    assert not layer.runs_channels_last(x)
    one_node_equals_composed(layer, x, monkeypatch, ("all",))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_gpu_one_node_channels_last_equals_composed(dtype, x_format, monkeypatch):
    """On a GPU with backend="cuda" the channels-last node (gm.nn.row_lstm._FusedRowLSTMChannelsLast) gives the
    composed ops' bits, as in the emulator (tests/test_cuda_emulated.py): the image is small enough (70 pixels) for
    one pixel split in the scans' weight gradient, whose atomics then add in a fixed order."""
    torch.manual_seed(0)
    layer = _layer("cuda", 3, True, True, dtype).cuda()
    x = torch.randn(2, 6, 5, 7, device="cuda").to(dtype).contiguous(memory_format=x_format)
    one_node_equals_composed(layer, x, monkeypatch, ("all", "x", "params"), node="_FusedRowLSTMChannelsLast")  # fmt: skip


def test_one_node_parameters_in_another_dtype(monkeypatch):
    """w_ss and h0 in float32 beside float64 gates: the scan takes them cast, and their gradients come back in
    their own dtype and shape, as the composed path's casts give them."""
    layer = _layer("cpu" if "cpu" in fast_backends(CPU) else "reference", 3, True, True, torch.float64)
    layer.w_ss.data = layer.w_ss.data.float()
    layer.h0.data = layer.h0.data.float()
    one_node_equals_composed(layer, torch.randn(1, 6, 3, 4, dtype=torch.float64), monkeypatch, ("all", "scan"))


def test_one_node_same_errors(monkeypatch):
    """Bad input or parameters raise what the composed path raises."""

    def wrong_w_ss(m):
        m.w_ss = torch.nn.Parameter(torch.randn(12, 3, 2))

    def wrong_h0(m):
        m.h0 = torch.nn.Parameter(torch.randn(4))

    cases = [
        (lambda m: None, torch.randn(3, 4, 5)),  # x not 4-D
        (lambda m: None, torch.randn(2, 4, 4, 5)),  # channels
        (lambda m: m.double(), torch.randn(2, 3, 4, 5)),  # dtype
        (lambda m: m.out.double(), torch.randn(2, 3, 4, 5)),  # the residual conv's dtype
        (wrong_w_ss, torch.randn(2, 3, 4, 5)),
        (wrong_h0, torch.randn(2, 3, 4, 5)),
    ]
    for change, x in cases:
        errors = []
        for fused in (True, False):
            monkeypatch.setattr(_LAYER, "FUSED_LAYER", fused)
            m = gm.nn.RowLSTM(3, 3, learn_init=True, backend="reference")
            change(m)
            with pytest.raises(ValueError) as info:
                m(x.requires_grad_())
            errors.append(str(info.value))
        assert errors[0] == errors[1]


def test_one_node_resolves_backends_as_the_ops(monkeypatch):
    """The one-node path chooses each backend with the arguments the public ops use (gm.ops.row_lstm.row_lstm and
    gm.ops.masked_conv.masked_conv2d; auto where it can run here), so a change there shows here."""
    backend = None if "cpu" in fast_backends(CPU) else "reference"
    calls = {}
    for fused in (True, False):
        monkeypatch.setattr(_LAYER, "FUSED_LAYER", fused)
        log = calls[fused] = []
        _spy(monkeypatch, "resolve", log, lambda backend, device, **kw: (backend, str(device), sorted(kw.items())))
        gm.nn.RowLSTM(3, 3, learn_init=True, backend=backend)(torch.randn(1, 3, 2, 3, requires_grad=True))
        monkeypatch.undo()
    assert len(calls[True]) == 3 and calls[True] == calls[False]


def test_one_node_only_in_plain_eager_with_grad():
    """No gradient to record, a mode (here a torch-function mode) or torch.compile: the composed ops run."""
    layer = gm.nn.RowLSTM(3, 3, learn_init=True, backend="reference")
    x = torch.randn(1, 3, 4, 4)
    composed_without_grad_or_mode(layer, x, "_FusedRowLSTM")

    ops = []

    def record(graph_module, _inputs):
        ops.extend(str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    y = torch.compile(layer, backend=record, fullgraph=True)(x.requires_grad_())
    assert any("row_lstm" in op for op in ops) and any("masked_conv2d" in op for op in ops), ops
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
