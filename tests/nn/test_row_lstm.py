"""gm.nn.RowLSTM: the composition it computes, every backend, and exact causality with colours."""

from __future__ import annotations

import pytest
import torch

import gm
from gm.reference.masked_conv import masked_conv2d as ref_masked_conv2d
from gm.reference.row_lstm import row_lstm as ref_row_lstm
from tests._util import assert_rel, fast_backends

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
