"""DiagonalLSTM / DiagonalBiLSTM: against the functional reference, and exact causality with colours."""

from __future__ import annotations

import copy

import pytest
import torch

from gm._memory_format import format_of
from gm.nn import DiagonalBiLSTM, DiagonalLSTM, color_groups
from gm.reference.diagonal_lstm import diagonal_bilstm
from gm.reference.diagonal_lstm import diagonal_lstm as reference_scan
from gm.reference.masked_conv import masked_conv2d as reference_conv
from tests._util import (
    ONE_NODE_SHAPES,
    assert_rel,
    composed_without_grad_or_mode,
    fast_backends,
    random_biases,
    triton_here,
)

CPU = torch.device("cpu")
BACKENDS = ["reference", *fast_backends(CPU)]


def _reference_layer(layer: DiagonalBiLSTM, x: torch.Tensor) -> torch.Tensor:
    h4 = 4 * layer.hidden
    conv = layer.input_to_state
    colors = layer.colors > 1
    out = layer.output
    return diagonal_bilstm(
        x, conv.weight[:h4], conv.bias[:h4], layer.w_ss, conv.weight[h4:], conv.bias[h4:], layer.w_ss_rev,
        out.weight if out is not None else None, out.bias if out is not None else None,
        in_groups=color_groups(layer.in_ch, 3) if colors else None,
        gate_groups=color_groups(h4, 3, blocks=4) if colors else None,
        hidden_groups=color_groups(layer.hidden, 3) if colors else None,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("colors", "residual"), [(1, True), (3, True), (3, False)])
def test_bilstm_matches_reference(backend, colors, residual):
    if backend == "triton" and (colors, residual) != (3, True):
        pytest.skip("interpreter time: one triton case")
    layer = DiagonalBiLSTM(6, 6, colors=colors, residual=residual, backend=backend).double()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y_ref = _reference_layer(layer, x)
    gy = torch.randn_like(y)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(y, params, gy)
    grads_ref = torch.autograd.grad(y_ref, params, gy)
    assert_rel(y, y_ref, torch.float64, "output", device=CPU)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert_rel(a, b, torch.float64, f"grad {i}", device=CPU)


def test_diagonal_lstm_module():
    layer = DiagonalLSTM(3, 3, colors=3, reverse=True, backend="reference").double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    conv = layer.input_to_state
    gates = reference_conv(x, conv.weight, conv.bias, mask="B", in_groups=conv.in_groups, out_groups=conv.out_groups)
    torch.testing.assert_close(layer(x), reference_scan(gates, layer.w_ss, reverse=True))


def _input_jacobian(layer, x):
    """d out / d x as (C_out, H, W, C_in, H, W) for one image."""
    jac = torch.autograd.functional.jacobian(lambda t: layer(t)[0], x)
    return jac[:, :, :, 0]


@pytest.mark.parametrize("backend", ["cpu" if "cpu" in BACKENDS else "reference"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
def test_bilstm_causality_rgb(backend, residual):
    """Output (pixel p, colour k) has exactly zero gradient w.r.t. the input at any later pixel, and at p w.r.t.
    colours after k. The pixel above-right of p is reached only through the right-to-left scan shifted down one
    row: it must be non-zero (without the shift, the pixel to the right would be non-zero too)."""
    torch.manual_seed(1)
    hgt, wid, cin, hid = 4, 5, 3, 3
    layer = DiagonalBiLSTM(cin, hid, colors=3, residual=residual, backend=backend).double()
    x = torch.randn(1, cin, hgt, wid, dtype=torch.float64)
    jac = _input_jacobian(layer, x)
    out_colour = color_groups(jac.shape[0], 3)
    in_colour = color_groups(cin, 3)
    for i in range(hgt):
        for j in range(wid):
            p = i * wid + j
            for k in range(3):
                g = jac[out_colour == k, i, j].abs().sum(0)  # (C_in, H, W)
                later = torch.zeros(hgt, wid, dtype=torch.bool).view(-1)
                later[p + 1 :] = True
                assert g.reshape(cin, -1)[:, later].eq(0).all(), f"pixel {(i, j)} colour {k} sees a later pixel"
                assert g[in_colour > k, i, j].eq(0).all(), f"pixel {(i, j)} colour {k} sees a later colour"
                if i > 0 and j + 1 < wid:
                    assert g[:, i - 1, j + 1].abs().sum() > 0, "the right-to-left scan does not reach the row above"
    # Same colour at the same pixel is reached (mask B), so the test can see a connection where one is allowed.
    assert jac[out_colour == 0][:, 2, 2][:, in_colour == 0, 2, 2].abs().sum() > 0


def test_bad_sizes():
    with pytest.raises(ValueError, match="multiples of colors=3"):
        DiagonalBiLSTM(4, 6, colors=3)
    with pytest.raises(ValueError, match="colors must be one of"):
        DiagonalBiLSTM(4, 4, colors=2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_bilstm_concurrent_directions_equal_sequential(backend, monkeypatch):
    """The two scans on two CUDA streams give what one after the other gives, forward and every gradient (to
    rounding: cuBLAS may pick another algorithm on another stream), and the reference within fp32 tolerance."""
    import gm.nn.diagonal_lstm as mod  # noqa: PLC0415

    if backend not in fast_backends(torch.device("cuda")):
        pytest.skip(f"backend {backend} is not available")
    torch.manual_seed(0)
    layer = DiagonalBiLSTM(16, 32, backend=backend).cuda()
    x = torch.randn(4, 16, 12, 10, device="cuda", requires_grad=True)
    gy = torch.randn(4, 16, 12, 10, device="cuda")
    runs = []
    for concurrent in (True, False):
        monkeypatch.setattr(mod, "CONCURRENT_DIRECTIONS", concurrent)
        y = layer(x)
        runs.append((y, *torch.autograd.grad(y, (x, *layer.parameters()), gy)))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_rel(runs[0][0], _reference_layer(layer.double(), x.double()), torch.float32, "y", torch.device("cuda"))


def fused_and_composed(layer, x, monkeypatch, module, node: str = "_FusedBiLSTM", *, exact: bool = True) -> None:
    """The layer's one-node path (module.FUSED_LAYER) against its composed ops on the same input: output and every
    gradient bit for bit (exact=False, float64: to 1e-12, for the cpu channels-last node, whose convolutions run
    channels-last where the composed ones run NCHW: torch's CPU convolutions sum in another order then) and in the
    same memory format, for every subset of wanted gradients tried (all; x alone; the weights alone), and the
    one-node path (the autograd Function `node`) is the one that ran."""
    named = list(layer.named_parameters())
    params = [p for _, p in named]
    gy = None
    for wanted in ("all", "x", "params"):
        runs = {}
        for fused in (True, False):
            monkeypatch.setattr(module, "FUSED_LAYER", fused)
            xx = x.detach().clone().requires_grad_(wanted != "params")
            for p in params:
                p.requires_grad_(wanted != "x")
            y = layer(xx)
            assert (type(y.grad_fn).__name__ == f"{node}Backward") == fused, type(y.grad_fn).__name__
            gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y) if gy is None else gy
            leaves = ([xx] if wanted != "params" else []) + (params if wanted != "x" else [])
            runs[fused] = [y.detach(), *torch.autograd.grad(y, leaves, gy)]
        names = ["y"] + (["x"] if wanted != "params" else []) + ([n for n, _ in named] if wanted != "x" else [])
        for name, a, b in zip(names, runs[True], runs[False], strict=True):
            if exact:
                assert torch.equal(a, b), f"{wanted}: {name}"
            else:
                assert a.dtype == torch.float64
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{wanted}: {name}")
            assert a.dim() != 4 or format_of(a) == format_of(b), (wanted, a.stride(), b.stride())
    for p in params:
        p.requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("colors", "residual"), [(1, True), (3, True), (3, False)])
def test_bilstm_one_node_equals_composed(backend, colors, residual, monkeypatch):
    import gm.nn.diagonal_lstm as mod  # noqa: PLC0415

    torch.manual_seed(0)
    dtype = torch.float32 if backend == "triton" else torch.float64
    layer = DiagonalBiLSTM(6, 6, colors=colors, residual=residual, backend=backend).to(dtype)
    x = torch.randn(2, 6, 5, 4, dtype=dtype)
    if backend in ("triton", "cpu"):  # the channels-last node (test_*_one_node_channels_last_equals_composed)
        fused_and_composed(layer, x, monkeypatch, mod, "_FusedBiLSTMChannelsLast", exact=backend == "triton")
    else:
        fused_and_composed(layer, x, monkeypatch, mod)


def _triton_layer(hidden: int, colors: int, residual: bool, dtype: torch.dtype) -> DiagonalBiLSTM:
    """A triton layer with random biases (the default init zeroes them, which would hide a bias read wrongly)."""
    return random_biases(DiagonalBiLSTM(3, hidden, colors=colors, residual=residual, backend="triton").to(dtype))


@pytest.mark.skipif(not triton_here(), reason="triton is not available")
@pytest.mark.parametrize("shape", list(ONE_NODE_SHAPES.values()), ids=list(ONE_NODE_SHAPES))
@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
def test_triton_one_node_channels_last_equals_composed(shape, x_format, residual, monkeypatch):
    """backend="triton": the channels-last node (gm.nn.diagonal_lstm._FusedBiLSTMChannelsLast: each scan reads and
    writes its half of the (N, H, W, 8h) gates and gate gradients in place, the weight gradient reads them and y
    channels-last) gives the composed ops' bits for the output and every gradient, NCHW or channels-last input, for
    every subset of wanted gradients (the input conv's bias gradient too: both paths sum it in the conv's
    weight-gradient kernel, over channels-last gate gradients)."""
    import gm.nn.diagonal_lstm as mod  # noqa: PLC0415

    n, height, width, hid, colors = shape
    torch.manual_seed(0)
    layer = _triton_layer(hid, colors, residual, torch.float32)
    x = torch.randn(n, 3, height, width).contiguous(memory_format=x_format)
    assert layer.runs_channels_last(x)
    fused_and_composed(layer, x, monkeypatch, mod, "_FusedBiLSTMChannelsLast")


@pytest.mark.skipif(not triton_here(), reason="triton is not available")
@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_triton_one_node_channels_last_bf16(x_format, monkeypatch):
    """The same in bfloat16 (float32 states, bfloat16 gates, y and gate gradients)."""
    import gm.nn.diagonal_lstm as mod  # noqa: PLC0415

    torch.manual_seed(0)
    layer = _triton_layer(6, 3, True, torch.bfloat16)
    x = torch.randn(2, 3, 3, 5).to(torch.bfloat16).contiguous(memory_format=x_format)
    fused_and_composed(layer, x, monkeypatch, mod, "_FusedBiLSTMChannelsLast")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="gm._C is not built")
@pytest.mark.parametrize("shape", list(ONE_NODE_SHAPES.values()), ids=list(ONE_NODE_SHAPES))
@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
def test_cpu_one_node_channels_last_equals_composed(shape, x_format, residual, monkeypatch):
    """backend="cpu": the channels-last node (the C++ scans read and write their halves of the (N, H, W, 8h) gates and
    gate gradients in place, and keep the pre-activations for the backward) against the composed ops, float64, NCHW
    or channels-last input, every subset of wanted gradients; and against the float64 reference layer."""
    import gm.nn.diagonal_lstm as mod  # noqa: PLC0415

    n, height, width, hid, colors = shape
    torch.manual_seed(0)
    layer = random_biases(DiagonalBiLSTM(3, hid, colors=colors, residual=residual, backend="cpu").double())
    x = torch.randn(n, 3, height, width, dtype=torch.float64).contiguous(memory_format=x_format)
    assert layer.runs_channels_last(x)
    fused_and_composed(layer, x, monkeypatch, mod, "_FusedBiLSTMChannelsLast", exact=False)
    monkeypatch.setattr(mod, "FUSED_LAYER", True)
    xx = x.clone().requires_grad_()
    y = layer(xx)
    assert type(y.grad_fn).__name__ == "_FusedBiLSTMChannelsLastBackward"
    y_ref = _reference_layer(layer, xx)
    gy = torch.randn_like(y)
    params = [xx, *layer.parameters()]
    grads, grads_ref = torch.autograd.grad(y, params, gy), torch.autograd.grad(y_ref, params, gy)
    for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_rel(a, b, torch.float64, f"grad {i}", device=CPU)
    assert_rel(y, y_ref, torch.float64, "y", device=CPU)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="gm._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_one_node_channels_last_low_precision(dtype):
    """The cpu channels-last node in float32 and bfloat16 (scanned in float32 from widened gates, the float32 h kept
    in the state for the backward) against the float64 reference layer, within the dtype's tolerance."""
    torch.manual_seed(0)
    layer = random_biases(DiagonalBiLSTM(3, 6, colors=3, backend="cpu")).to(dtype)
    x = torch.randn(2, 3, 5, 4).to(dtype).requires_grad_()
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_FusedBiLSTMChannelsLastBackward" and y.dtype == dtype
    gy = torch.randn(y.shape).to(dtype)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], gy)
    layer64 = copy.deepcopy(layer).double()  # the same (rounded) weights and input in float64
    x64 = x.detach().double().requires_grad_()
    y_ref = _reference_layer(layer64, x64)
    grads_ref = torch.autograd.grad(y_ref, [x64, *layer64.parameters()], gy.double())
    assert_rel(y.double(), y_ref, dtype, "y", device=CPU)
    for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_rel(a.double(), b, dtype, f"grad {i}", device=CPU)


@pytest.mark.skipif(not triton_here(), reason="triton is not available")
def test_triton_channels_last_switch(monkeypatch):
    """CHANNELS_LAST False: the node that calls the ops' implementations; so too for convs and scans on different
    backends, or on ones without channels-last scans."""
    import gm.nn.diagonal_lstm as mod  # noqa: PLC0415

    layer = _triton_layer(3, 1, True, torch.float32)
    x = torch.randn(1, 3, 2, 3)
    monkeypatch.setattr(mod, "CHANNELS_LAST", False)
    assert not layer.runs_channels_last(x)
    fused_and_composed(layer, x, monkeypatch, mod)
    monkeypatch.setattr(mod, "CHANNELS_LAST", True)
    assert all(mod._channels_last(b, b) for b in ("triton", "cuda", "cpu"))
    assert not any(mod._channels_last(c, s) for c, s in [("cuda", "triton"), ("triton", "cuda"), ("cpu", "triton")])


def test_bilstm_one_node_only_in_plain_eager_with_grad():
    """No gradient to record, or a mode (here a torch-function mode): the composed ops run."""
    composed_without_grad_or_mode(DiagonalBiLSTM(3, 3, backend="cpu"), torch.randn(1, 3, 4, 4), "_FusedBiLSTM")
