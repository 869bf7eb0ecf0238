"""MADE / IAF modules: the autoregressive property exactly (Jacobians), log-det = log|det J|, context, flows."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from gm.nn import MADE, IAFConvStep, IAFFlow, IAFStep
from gm.nn.made import made_masks
from tests._util import fast_backends

BACKENDS = ["reference", *fast_backends(torch.device("cpu"))]
ORDERS = ["natural", "reversed", "perm"]
D = 6


def _order(name):
    return torch.tensor([3, 0, 5, 1, 4, 2]) if name == "perm" else name


def _position(order) -> torch.Tensor:
    if isinstance(order, torch.Tensor):
        return order
    return torch.arange(D) if order == "natural" else torch.arange(D - 1, -1, -1)


def _allowed(order) -> torch.Tensor:
    """allowed[i, j]: output i may depend on input j (strictly earlier in the order), or is its own diagonal."""
    pos = _position(order)
    return pos[None, :] < pos[:, None]


@pytest.mark.parametrize("order", ORDERS)
def test_made_outputs_depend_only_on_earlier_inputs(order):
    order = _order(order)
    made = MADE(D, 16, n_hidden=2, order=order, heads=2, backend="reference").double()
    x = torch.randn(1, D, dtype=torch.float64)
    jac = jacobian(lambda v: made(v), x)[0, :, 0, :]  # (2D, D)
    allowed = _allowed(order).repeat(2, 1)
    assert (jac[~allowed] == 0).all()
    assert (jac[allowed] != 0).float().mean() > 0.5  # the mask is not trivially empty


def test_hidden_masks_are_block_triangular():
    masks = made_masks(64, 1024, 2)
    # degree-sorted: each row's ones form a prefix, and prefixes grow with the row
    lengths = masks[1].sum(1)
    assert (lengths[1:] >= lengths[:-1]).all()
    assert torch.equal(masks[1], (torch.arange(1024)[None, :] < lengths[:, None]).float())
    assert 0.4 < masks[1].mean() < 0.6


@pytest.mark.parametrize("mode", ["gated", "affine"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_iaf_step_jacobian_is_triangular_and_logdet_exact(backend, order, mode):
    order = _order(order)
    step = IAFStep(D, 16, n_hidden=2, mode=mode, order=order, backend=backend).double()
    if mode == "affine":
        with torch.no_grad():
            step.made.output.weight.mul_(0.3)
    z = torch.randn(2, D, dtype=torch.float64)
    jac = jacobian(lambda v: step(v)[0], z)  # (2, D, 2, D)
    _, logdet = step(z)
    pos = _position(order)
    for n in range(2):
        j = jac[n, :, n, :]
        later = pos[None, :] > pos[:, None]
        assert (j[later] == 0).all(), "z'_i depends on a later z_j"
        sign, logabs = torch.linalg.slogdet(j)
        assert sign > 0
        assert torch.allclose(logdet[n], logabs, rtol=1e-10, atol=1e-10)
    assert (jac[0, :, 1, :] == 0).all(), "rows of the batch must not mix"


@pytest.mark.parametrize("backend", BACKENDS)
def test_iaf_step_with_context(backend):
    step = IAFStep(D, 16, n_hidden=2, context=3, backend=backend).double()
    z = torch.randn(1, D, dtype=torch.float64)
    h = torch.randn(1, 3, dtype=torch.float64)
    jac = jacobian(lambda v: step(v, h)[0], z)[0, :, 0, :]
    assert (jac.triu(1) == 0).all()
    jac_h = jacobian(lambda c: step(z, c)[0], h)[0, :, 0, :]
    assert (jac_h[1:] != 0).any(), "the context must reach the outputs"
    assert torch.allclose(step(z, h)[1], torch.linalg.slogdet(jac).logabsdet, rtol=1e-10)
    with pytest.raises(ValueError, match="context"):
        step(z)


def test_iaf_flow_sums_logdets_and_reverses_order():
    flow = IAFFlow(D, 16, steps=3, backend="reference").double()
    z = torch.randn(1, D, dtype=torch.float64)
    jac = jacobian(lambda v: flow(v)[0], z)[0, :, 0, :]
    _, logdet = flow(z)
    assert torch.allclose(logdet[0], torch.linalg.slogdet(jac).logabsdet, rtol=1e-10)
    assert flow.steps[1].made.degrees.tolist() == list(range(D, 0, -1))


def _raster_channel_index(c, h, w):
    """Flat NCHW index of each position, listed in the autoregressive order (pixel raster, then channel)."""
    return torch.arange(c * h * w).reshape(c, h, w).permute(1, 2, 0).reshape(-1)


@pytest.mark.parametrize("context", [0, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_step_jacobian_is_triangular_and_logdet_exact(backend, context):
    if backend == "cuda":
        pytest.skip("cpu tensors")
    c, hh, ww = 3, 4, 3
    step = IAFConvStep(c, 6, n_hidden=2, context=context, backend=backend).double()
    z = torch.randn(1, c, hh, ww, dtype=torch.float64)
    h = torch.randn(1, context, hh, ww, dtype=torch.float64) if context else None
    jac = jacobian(lambda v: step(v, h)[0], z).reshape(c * hh * ww, c * hh * ww)
    idx = _raster_channel_index(c, hh, ww)
    jp = jac[idx][:, idx]
    assert (jp.triu(1) == 0).all(), "z' depends on a later (pixel, channel)"
    assert (jp.tril(-1) != 0).any()
    _, logdet = step(z, h)
    assert torch.allclose(logdet[0], torch.linalg.slogdet(jac).logabsdet, rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_iaf_step_matches_reference_module(dtype):
    step = IAFStep(64, 256, n_hidden=2).cuda()
    z = torch.randn(128, 64, device="cuda")
    want_z, want_ld = step.float()(z)  # auto backend (triton on CUDA)
    ref = IAFStep(64, 256, n_hidden=2, backend="reference").cuda()
    ref.load_state_dict(step.state_dict())
    got_z, got_ld = ref(z)
    assert torch.allclose(got_z, want_z, rtol=2e-3, atol=2e-3)
    assert torch.allclose(got_ld, want_ld, rtol=2e-3, atol=2e-2)
    step = step.to(dtype)
    zb, ldb = step(z.to(dtype))
    assert torch.isfinite(zb).all() and torch.isfinite(ldb).all()
