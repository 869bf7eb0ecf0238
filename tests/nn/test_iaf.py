"""MADE / IAF modules: the autoregressive property exactly (Jacobians), log-det = log|det J|, context, flows."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from gm import reference
from gm.nn import MADE, IAFConvFlow, IAFConvStep, IAFFlow, IAFStep
from gm.nn.made import made_masks
from tests._util import assert_rel, fast_backends, rel_err

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


def _reference_arconv(layer, x):
    return reference.masked_conv2d(x, layer.weight, layer.bias, mask=layer.mask, in_groups=layer.in_groups,
                                   out_groups=layer.out_groups)  # fmt: skip


def _reference_conv_flow(flow, z, h=None):
    """The conv flow written out with gm.reference ops and explicit flips, from the flow's parameters."""
    total = z.new_zeros(z.shape[0])
    spatial = (-2, -1)
    for i, step in enumerate(flow.steps):
        reverse = i % 2 == 1
        zi = z.flip(spatial) if reverse else z
        hi = h.flip(spatial) if (reverse and h is not None) else h
        net = step.net
        x = _reference_arconv(net.hidden[0], zi)
        if hi is not None:
            x = x + F.conv2d(hi, net.context_proj.weight, net.context_proj.bias)
        x = F.elu(x)
        for layer in net.hidden[1:]:
            x = F.elu(_reference_arconv(layer, x))
        m, s = _reference_arconv(net.output, x).chunk(2, dim=1)
        z_new, logdet = reference.iaf_step(zi, m, s, mode=step.mode)
        z = z_new.flip(spatial) if reverse else z_new
        total = total + logdet
    return z, total


def _assert_triangular_in(jac, idx):
    jp = jac[idx][:, idx]
    assert (jp.triu(1) == 0).all(), "z' depends on a later (pixel, channel)"
    assert (jp.tril(-1) != 0).any()


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_flow_steps_alternate_orders_and_logdet_exact(backend, steps):
    c, hh, ww = 2, 3, 3
    size = c * hh * ww
    flow = IAFConvFlow(c, 6, steps=steps, n_hidden=2, backend=backend).double()
    z = torch.randn(1, c, hh, ww, dtype=torch.float64)
    natural = _raster_channel_index(c, hh, ww)
    x, chained = z, torch.eye(size, dtype=torch.float64)
    for i, step in enumerate(flow.steps):
        assert step.reverse == (i % 2 == 1)
        jac = jacobian(lambda v, step=step: step(v)[0], x).reshape(size, size)
        _assert_triangular_in(jac, natural.flip(0) if step.reverse else natural)
        _, logdet = step(x)
        assert torch.allclose(logdet[0], torch.linalg.slogdet(jac).logabsdet, rtol=1e-10)
        x, chained = step(x)[0], jac @ chained
    z_out, logdet = flow(z)
    torch.testing.assert_close(z_out, x, rtol=0, atol=0)
    if backend != "triton":  # the chain rule, checked directly where a Jacobian is cheap (not interpreted)
        direct = jacobian(lambda v: flow(v)[0], z).reshape(size, size)
        torch.testing.assert_close(direct, chained, rtol=1e-12, atol=1e-12)
    jp = chained[natural][:, natural]
    assert (jp.triu(1) != 0).any() and (jp.tril(-1) != 0).any(), "the order must change between steps"
    sign, logabs = torch.linalg.slogdet(chained)
    assert sign > 0
    assert torch.allclose(logdet[0], logabs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["gated", "affine"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_flow_matches_reference_composition(backend, mode):
    c, hh, ww, context = 2, 3, 3, 2
    flow = IAFConvFlow(c, 4, steps=3, n_hidden=2, context=context, mode=mode, backend=backend).double()
    z = torch.randn(2, c, hh, ww, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, context, hh, ww, dtype=torch.float64, requires_grad=True)
    got, want = flow(z, h), _reference_conv_flow(flow, z, h)
    for g, w, what in zip(got, want, ("z", "logdet"), strict=True):
        assert_rel(g, w, torch.float64, what, device=z.device)
    inputs = [z, h, *flow.parameters()]
    probe = torch.randn_like(want[0])
    grads = torch.autograd.grad((got[0] * probe).sum() + got[1].sum(), inputs)
    want_grads = torch.autograd.grad((want[0] * probe).sum() + want[1].sum(), inputs)
    names = ["z", "h", *(n for n, _ in flow.named_parameters())]
    for g, w, name in zip(grads, want_grads, names, strict=True):
        assert_rel(g, w, torch.float64, f"d{name}", device=z.device)


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_conv_flow_matches_reference_composition(dtype):
    """Against the float64 composition of the same parameters: fp32 within REL_TOL; bf16 no worse than twice the
    error of the reference composition run in bf16 (the flash-attention rule)."""
    flow = IAFConvFlow(8, 32, steps=3, context=4).cuda().to(dtype)  # auto backend
    z = torch.randn(4, 8, 16, 16, device="cuda", dtype=dtype, requires_grad=True)
    h = torch.randn(4, 4, 16, 16, device="cuda", dtype=dtype)
    got = flow(z, h)
    with torch.no_grad():
        want = _reference_conv_flow(copy.deepcopy(flow).double(), z.double(), h.double())
        same_precision = _reference_conv_flow(flow, z, h)
    for g, w, p, what in zip(got, want, same_precision, ("z", "logdet"), strict=True):
        if dtype == torch.float32:
            assert_rel(g, w, dtype, what)
        else:
            assert rel_err(g, w) <= 2 * rel_err(p, w) + 1e-3, what
    (gz,) = torch.autograd.grad(got[0].sum() + got[1].sum(), z)
    assert torch.isfinite(gz).all()
