"""MinibatchDiscrimination against the naive reference layer: output and the gradients of f, T and bias."""

from __future__ import annotations

import pytest
import torch

from gm.nn import MinibatchDiscrimination
from gm.reference.minibatch import group_slices, minibatch_discrimination, minibatch_discrimination_layer
from tests._util import DEVICE, assert_rel, fast_backends

BACKENDS = ["reference", *fast_backends(torch.device("cpu"))]
GROUPS = [
    pytest.param(None, id="one-group"),
    pytest.param([2, 3], id="split-sizes"),
    pytest.param(torch.tensor([1, 0, 1, 2, 0]), id="group-ids"),
]


def _layer(backend, dtype, bias=True, exclude_self=True, device="cpu"):
    torch.manual_seed(1)
    layer = MinibatchDiscrimination(6, kernels=4, dim=3, bias=bias, exclude_self=exclude_self, backend=backend)
    layer = layer.to(device=device, dtype=dtype)
    if bias:
        with torch.no_grad():
            layer.bias.normal_(std=0.1)
    return layer


def _layer_reference_rounded_m(layer, f, f64, T64, b64, groups):
    """The float64 reference layer, except that m takes the value the layer's own low-precision f @ T rounds to
    (gradients still flow through the float64 product). o = sum exp(-|m_i - m_j|_1) turns m's rounding (2^-9
    relative in bf16) into errors of a few percent in o and its gradients; that rounding belongs to torch's matmul,
    the same for every backend, and is not what these tests measure: the op's own error is."""
    m_lp = (f.detach() @ layer.T.detach()).double()
    m64 = f64 @ T64
    m64 = (m64 + (m_lp - m64).detach()).view(f.shape[0], layer.kernels, layer.dim)
    o = m64.new_zeros(f.shape[0], layer.kernels)
    for rows in group_slices(groups, f.shape[0], f.device):
        o[rows] = minibatch_discrimination(m64[rows], exclude_self=layer.exclude_self)
    if b64 is not None:
        o = o + b64
    return torch.cat([f64, o], dim=1)


def _compare(layer, f, groups, dtype, device=torch.device("cpu")):
    f = f.detach().requires_grad_()
    y = layer(f, groups=groups)
    gy = torch.randn_like(y)
    params = [f, layer.T] + ([layer.bias] if layer.bias is not None else [])
    grads = torch.autograd.grad(y, params, gy)

    f64 = f.detach().double().requires_grad_()
    T64 = layer.T.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_() if layer.bias is not None else None
    groups64 = groups.to(f.device) if isinstance(groups, torch.Tensor) else groups
    if dtype in (torch.float16, torch.bfloat16):
        y_ref = _layer_reference_rounded_m(layer, f, f64, T64, b64, groups64)
    else:
        y_ref = minibatch_discrimination_layer(
            f64, T64, b64, kernels=layer.kernels, dim=layer.dim, exclude_self=layer.exclude_self, groups=groups64
        )
    refs = torch.autograd.grad(y_ref, [f64, T64] + ([b64] if b64 is not None else []), gy.double())
    assert y.shape == (f.shape[0], layer.in_features + layer.kernels)
    assert_rel(y, y_ref, dtype, "y", device=device)
    for name, g, r in zip(("f", "T", "bias"), grads, refs):
        assert_rel(g, r, dtype, f"grad {name}", device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_matches_reference(backend, dtype, groups, bias):
    layer = _layer(backend, dtype, bias=bias)
    _compare(layer, torch.randn(5, 6, dtype=dtype), groups, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_include_self_and_single_row(backend):
    layer = _layer(backend, torch.float64, exclude_self=False)
    _compare(layer, torch.randn(3, 6, dtype=torch.float64), None, torch.float64)
    layer = _layer(backend, torch.float64, bias=False)
    y = layer(torch.randn(1, 6, dtype=torch.float64))
    assert torch.equal(y[:, 6:], torch.zeros(1, 4, dtype=torch.float64))  # no other sample: o = 0 exactly


def test_groups_are_separate():
    """Each group's features only see its own rows: o of [real; fake] in groups == o of each alone."""
    layer = _layer(BACKENDS[-1], torch.float64)
    real, fake = torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    both = layer(torch.cat([real, fake]), groups=[3, 4])
    assert torch.allclose(both[:3], layer(real), rtol=1e-12, atol=0)
    assert torch.allclose(both[3:], layer(fake), rtol=1e-12, atol=0)
    ids = torch.tensor([0, 1, 0, 1, 1, 0, 1])
    mixed = torch.cat([real, fake])[torch.tensor([0, 3, 1, 4, 5, 2, 6])]
    by_id = layer(mixed, groups=ids)
    assert torch.allclose(by_id[ids == 0], layer(real), rtol=1e-12, atol=0)


def test_init():
    torch.manual_seed(0)
    layer = MinibatchDiscrimination(256, kernels=100, dim=5)
    assert layer.T.shape == (256, 500) and layer.bias.shape == (100,)
    assert abs(layer.T.std().item() - 0.05) < 0.002
    assert torch.equal(layer.bias, torch.zeros(100))
    assert layer.out_features == 356
    assert MinibatchDiscrimination(8, bias=False).bias is None


@pytest.mark.parametrize(
    ("f", "groups", "match"),
    [
        pytest.param(torch.randn(5), None, "2 dimensions", id="rank1"),
        pytest.param(torch.randn(5, 7), None, "in_features", id="features"),
        pytest.param(torch.randn(5, 6, dtype=torch.float64), None, "dtype", id="dtype-mix"),
        pytest.param(torch.randn(5, 6), [2, 2], "sum to", id="split-sum"),
        pytest.param(torch.randn(5, 6), torch.tensor([0, 1]), "one group id per row", id="ids-length"),
        pytest.param(torch.randn(5, 6), torch.zeros(5), "dtype", id="ids-float"),
    ],
)
def test_bad_input(f, groups, match):
    layer = MinibatchDiscrimination(6, kernels=4, dim=3)
    with pytest.raises(ValueError, match=match):
        layer(f, groups=groups)


def test_bad_construction():
    with pytest.raises(ValueError, match="kernels"):
        MinibatchDiscrimination(6, kernels=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_layer_gpu(backend, dtype):
    if backend not in fast_backends(DEVICE):
        pytest.skip(f"backend {backend} is not available")
    layer = _layer(backend, dtype, device="cuda")
    f = torch.randn(64, 6, device="cuda").to(dtype)
    _compare(layer, f, [32, 32], dtype, device=torch.device("cuda"))


@pytest.mark.parametrize("backend", fast_backends(torch.device("cpu")))
def test_layer_bf16(backend):
    """bf16 layer: the op's error within bf16 tolerance once m's own rounding is mirrored in the reference."""
    layer = _layer(backend, torch.bfloat16)
    _compare(layer, torch.randn(64, 6).to(torch.bfloat16), [32, 32], torch.bfloat16)
