"""made_iaf_step (a whole MADE-based IAF step as one op) against the plain-PyTorch reference chain, its equality
with the per-layer ops it replaces, its gradient subsets and its argument checks."""

from __future__ import annotations

import pytest
import torch

from gm.nn.made import made_masks
from gm.ops import _eager
from gm.ops.made_iaf import made_iaf_step
from gm.reference import iaf as ref
from tests._util import assert_rel, fast_backends, poison_empty

CPU = torch.device("cpu")
BACKENDS = ["reference", *fast_backends(CPU)]
MODES = ["gated", "affine"]
# (N, D, hidden, n_hidden, context, bias): the IAFStep default, a one-variable flow with context and a single
# hidden layer, three hidden layers of an odd width without biases.
SHAPES = [(5, 6, 16, 2, 0, True), (1, 1, 3, 1, 2, True), (7, 3, 5, 3, 0, False)]


def _inputs(n, d, hidden, n_hidden, context, bias, dtype, mode="gated", device=CPU):
    masks = [m.to(device) for m in made_masks(d, hidden, n_hidden, "natural", heads=2, context=context)]
    scale = 1.0 if mode == "gated" else 0.3  # keep exp(-s) moderate in affine mode
    weights = [(torch.randn(m.shape, dtype=dtype, device=device) * scale / m.shape[1] ** 0.5).requires_grad_()
               for m in masks]  # fmt: skip
    biases = [torch.randn(m.shape[0], dtype=dtype, device=device).mul_(scale).requires_grad_() if bias else None
              for m in masks]  # fmt: skip
    z = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
    ctx = torch.randn(n, context, dtype=dtype, device=device, requires_grad=True) if context else None
    return z, ctx, weights, masks, biases


def _leaves(z, ctx, weights, biases):
    return [t for t in (z, ctx, *weights, *biases) if t is not None]


def _reference(z, ctx, weights, masks, biases, mode, activation="elu"):
    x = z if ctx is None else torch.cat([z, ctx], dim=1)
    for w, m, b in zip(weights[:-1], masks[:-1], biases[:-1], strict=True):
        x = ref.masked_linear(x, w, m, b, activation=activation)
    return ref.iaf_made_output(x, weights[-1], masks[-1], biases[-1], z, mode=mode)


def _loss(z_new, ld):
    gz = torch.linspace(-1, 1, z_new.numel(), dtype=z_new.dtype, device=z_new.device).view(z_new.shape)
    return (z_new * gz).sum() + 0.7 * ld.sum()


def _compare(backend, shape, dtype, mode):
    z, ctx, weights, masks, biases = _inputs(*shape, dtype, mode)
    z_new, ld = made_iaf_step(z, weights, masks, biases, context=ctx, mode=mode, backend=backend)
    leaves = _leaves(z, ctx, weights, biases)
    grads = torch.autograd.grad(_loss(z_new, ld), leaves)
    dbl = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(dbl)
    z64 = next(it)
    ctx64 = next(it) if ctx is not None else None
    w64 = [next(it) for _ in weights]
    b64 = [next(it) if b is not None else None for b in biases]
    z_ref, ld_ref = _reference(z64, ctx64, w64, masks, b64, mode)
    grads_ref = torch.autograd.grad(_loss(z_ref, ld_ref), dbl)
    assert_rel(z_new, z_ref, dtype, "z_new", CPU)
    assert_rel(ld, ld_ref, dtype, "logdet", CPU)
    for i, (got, want) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_rel(got, want, dtype, f"gradient of leaf {i}", CPU)
    first_w = len(grads) - len(weights) - sum(b is not None for b in biases)
    for m, g in zip(masks, grads[first_w : first_w + len(weights)], strict=True):
        assert (g[m == 0] == 0).all(), "weight gradients must be exactly zero where masked"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, shape, mode):
    if mode == "affine" and not shape[-1] and dtype == torch.float32:
        # Without biases the affine logdet −Σ s sums zero-mean terms of ~0.1 to ~1e-4: a float32 relative error
        # of that sum measures the cancellation, not the kernels (float64 covers the case).
        pytest.skip("ill-conditioned in float32")
    _compare(backend, shape, dtype, mode)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_poisoned_outputs_are_all_written(backend, monkeypatch):
    poison_empty(monkeypatch)
    _compare(backend, (9, 5, 21, 2, 3, True), torch.float64, "gated")


def _run(backend, inputs, mode, wanted):
    """Outputs and the gradients of the leaves whose indices are in `wanted` (others detached)."""
    z, ctx, weights, masks, biases = inputs
    leaves = _leaves(z, ctx, weights, biases)
    fresh = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(leaves)]
    it = iter(fresh)
    z = next(it)
    ctx = next(it) if ctx is not None else None
    weights = [next(it) for _ in weights]
    biases = [next(it) if b is not None else None for b in biases]
    z_new, ld = made_iaf_step(z, weights, masks, biases, context=ctx, mode=mode, backend=backend)
    if not wanted:
        assert z_new.grad_fn is None and ld.grad_fn is None
        return [z_new, ld]
    grads = torch.autograd.grad(_loss(z_new, ld), [fresh[i] for i in sorted(wanted)])
    return [z_new, ld, *grads]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_node_equals_the_per_layer_ops(backend, monkeypatch):
    """The eager single-node path and the registered per-layer ops (what torch.compile traces) give identical
    results, for every subset of wanted gradients: all, z and context only, the first and the last layer only,
    and none (a no-grad forward)."""
    torch.manual_seed(0)
    inputs = _inputs(6, 5, 12, 2, 3, True, torch.float64)
    n = len(_leaves(inputs[0], inputs[1], inputs[2], inputs[4]))  # z, ctx, 3 weights, 3 biases
    subsets = [set(range(n)), {0, 1}, {2, 5}, {4, 7}, set()]
    for wanted in subsets:
        runs = {}
        for fast in (True, False):
            monkeypatch.setattr(_eager, "EAGER_FAST_PATH", fast)
            runs[fast] = _run(backend, inputs, "gated", wanted)
        for a, b in zip(runs[True], runs[False], strict=True):
            assert torch.equal(a, b), wanted


def test_one_autograd_node():
    z, ctx, weights, masks, biases = _inputs(4, 5, 12, 2, 0, True, torch.float64)
    z_new, ld = made_iaf_step(z, weights, masks, biases, backend="reference")
    assert z_new.grad_fn is ld.grad_fn is not None
    assert type(z_new.grad_fn).__name__ == "_MadeIafStepBackward"


def test_gradcheck_cpu():
    z, ctx, weights, masks, biases = _inputs(3, 4, 7, 2, 2, True, torch.float64)
    k = len(weights)

    def f(z, ctx, *params):
        return made_iaf_step(z, params[:k], masks, params[k:], context=ctx, backend="cpu")

    assert torch.autograd.gradcheck(f, (z, ctx, *weights, *biases))


def test_bad_input():
    z, ctx, weights, masks, biases = _inputs(4, 5, 12, 2, 0, True, torch.float32)
    with pytest.raises(ValueError, match="at least 2 layers"):
        made_iaf_step(z, weights[:1], masks[:1], biases[:1])
    with pytest.raises(ValueError, match="one entry per weight"):
        made_iaf_step(z, weights, masks[:2], biases)
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \(12, 12\)"):
        made_iaf_step(z, [weights[0], weights[1][:, :5], weights[2]], masks, biases)
    with pytest.raises(ValueError, match=r"weights\[2\] must have shape \(10, 12\)"):
        made_iaf_step(z, [*weights[:2], weights[2][:8]], [*masks[:2], masks[2][:8]], biases)
    with pytest.raises(ValueError, match=r"weights\[0\] must have shape \(12, 4\)"):
        made_iaf_step(z[:, :4], weights, masks, biases)
    with pytest.raises(ValueError, match=r"masks\[0\] must have the weight's shape"):
        made_iaf_step(z, weights, [masks[0][:, :4], *masks[1:]], biases)
    with pytest.raises(ValueError, match=r"biases\[1\] must have 12 entries"):
        made_iaf_step(z, weights, masks, [biases[0], biases[1][:5], biases[2]])
    with pytest.raises(ValueError, match=r"weights\[0\] has dtype torch.float64"):
        made_iaf_step(z, [weights[0].double(), *weights[1:]], masks, biases)
    with pytest.raises(ValueError, match="must be binary"):
        made_iaf_step(z, weights, [masks[0] * 2, *masks[1:]], biases)
    with pytest.raises(ValueError, match="context must have z's batch size 4"):
        made_iaf_step(z, weights, masks, biases, context=torch.randn(3, 2))
    with pytest.raises(ValueError, match="mode must be one of"):
        made_iaf_step(z, weights, masks, biases, mode="additive")
    with pytest.raises(ValueError, match="activation must be one of"):
        made_iaf_step(z, weights, masks, biases, activation="tanh")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_matches_reference(backend, dtype):
    """The benchmark's layer widths at a small batch: 2x1024 hidden, D=64, with a context input."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    z, ctx, weights, masks, biases = _inputs(300, 64, 1024, 2, 8, True, dtype, device=cuda)
    z_new, ld = made_iaf_step(z, weights, masks, biases, context=ctx, backend=backend)
    leaves = _leaves(z, ctx, weights, biases)
    grads = torch.autograd.grad(_loss(z_new, ld), leaves)
    dbl = [t.detach().double().requires_grad_() for t in leaves]
    z_ref, ld_ref = _reference(dbl[0], dbl[1], dbl[2:5], masks, dbl[5:], "gated")
    grads_ref = torch.autograd.grad(_loss(z_ref, ld_ref), dbl)
    # float32 runs as 3xTF32 in the GEMMs unless torch allows tf32 (rel_tol's GPU float32 bound covers both).
    assert_rel(z_new, z_ref, dtype, "z_new", cuda)
    assert_rel(ld, ld_ref, dtype, "logdet", cuda)
    for i, (got, want) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_rel(got, want, dtype, f"gradient of leaf {i}", cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_planned_step_equals_the_per_layer_ops(dtype, monkeypatch):
    """On the GPU, the cuda backend's planned launches (gm.ops._made_iaf_cuda: the step's widths are whole 16-byte
    rows) give bit for bit what the registered per-layer ops give: same kernels, same arguments, and no buffer freed
    and reused while a kernel still reads it (the emulator runs the launches in order and cannot see that)."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    inputs = _inputs(1000, 64, 1024, 2, 8, True, dtype, device=cuda)
    n = len(_leaves(inputs[0], inputs[1], inputs[2], inputs[4]))
    runs = {}
    for fast in (True, False):
        monkeypatch.setattr(_eager, "EAGER_FAST_PATH", fast)
        runs[fast] = [_run("cuda", inputs, "gated", set(range(n))) for _ in range(2)]  # twice: a warm plan too
    for first, again in zip(runs[True], runs[False], strict=True):
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
