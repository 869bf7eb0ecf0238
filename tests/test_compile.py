"""torch.compile(fullgraph=True) traces through every gm module (custom ops with fake implementations), on the
CPU backend, and gives the eager result and input gradient; on a GPU, inductor compiles the PixelRNN layers on the
triton and cuda backends and on auto (whose shape checks run once, at trace time)."""

from __future__ import annotations

import pytest
import torch

from gm import nn as gnn
from tests._util import HAS_GPU


def _modules():
    yield "MaskedConv2d", gnn.MaskedConv2d(3, 6, 3, mask="A", colors=3, backend="cpu"), (2, 3, 6, 6)
    yield "RowLSTM", gnn.RowLSTM(3, 6, kernel_size=3, colors=3, backend="cpu"), (2, 3, 5, 4)
    yield "DiagonalBiLSTM", gnn.DiagonalBiLSTM(3, 6, colors=3, backend="cpu"), (2, 3, 4, 5)
    yield "MinibatchDiscrimination", gnn.MinibatchDiscrimination(8, kernels=4, dim=3, backend="cpu"), (6, 8)
    yield "MADE", gnn.MADE(5, 16, backend="cpu"), (4, 5)
    yield "IAFStep", gnn.IAFStep(5, 16, backend="cpu"), (4, 5)
    yield "IAFConvFlow", gnn.IAFConvFlow(3, 6, steps=2, backend="cpu"), (2, 3, 4, 5)


@pytest.mark.skipif(HAS_GPU, reason="compiled on the CPU backend here")
@pytest.mark.parametrize(("name", "module", "shape"), list(_modules()), ids=[m[0] for m in _modules()])
def test_compile_fullgraph_matches_eager(name, module, shape):
    torch._dynamo.reset()
    x = torch.randn(*shape, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), module(x)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r)
    (gx,) = torch.autograd.grad(sum(o.sum() for o in outs), x)
    (gx_ref,) = torch.autograd.grad(sum(r.sum() for r in refs), x)
    torch.testing.assert_close(gx, gx_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", None], ids=["triton", "cuda", "auto"])
@pytest.mark.parametrize("layer", ["RowLSTM", "DiagonalBiLSTM"])
def test_gpu_compile_fullgraph_matches_eager(layer, backend):
    """On a GPU, inductor compiles the PixelRNN layers on the triton and cuda backends (its generated code checks
    each custom op's output strides against the fake implementation's: the scans' channels-last saved states) and
    gives the eager output and input gradient."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from gm._backend import availability  # noqa: PLC0415

    ok, why = availability(backend, torch.device("cuda")) if backend is not None else (True, "")
    if not ok:
        pytest.skip(why)
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = getattr(gnn, layer)(3, 6, colors=3, backend=backend).cuda()
    x = torch.randn(2, 3, 7, 5, device="cuda", requires_grad=True)
    out, ref = torch.compile(module, fullgraph=True)(x), module(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
