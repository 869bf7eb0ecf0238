"""Every gm module's forward+backward captures into one CUDA graph on the triton and cuda backends, and replaying
the graph on new input values gives what eager mode gives: no host synchronisation, no allocation outside the
capture's pool, nothing cached from the captured call's pointers that a replay would read stale. CUDA graphs are how
a training loop removes the host's per-launch cost (bench --graphs times them), so this is the mode the fastest
users run in."""

from __future__ import annotations

import pytest
import torch

from gm import nn as gnn


def _modules(backend):
    yield "MaskedConv2d", lambda: gnn.MaskedConv2d(6, 12, 3, mask="B", colors=3, backend=backend), (2, 6, 7, 5)
    yield "RowLSTM", lambda: gnn.RowLSTM(6, 8, kernel_size=3, colors=3, backend=backend), (2, 6, 7, 5)
    yield "DiagonalBiLSTM", lambda: gnn.DiagonalBiLSTM(6, 8, colors=3, backend=backend), (2, 6, 7, 5)
    yield "MinibatchDiscrimination", lambda: gnn.MinibatchDiscrimination(16, kernels=8, dim=3, backend=backend), (
        37, 16)  # fmt: skip
    yield "IAFStep", lambda: gnn.IAFStep(12, 32, backend=backend), (9, 12)
    yield "IAFConvFlow", lambda: gnn.IAFConvFlow(4, 8, steps=2, backend=backend), (2, 4, 5, 6)


NAMES = [name for name, _, _ in _modules(None)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", NAMES)
def test_fwd_bwd_replays_from_a_cuda_graph(name, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from gm._backend import availability  # noqa: PLC0415

    ok, why = availability(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    make, shape = next((m, s) for n, m, s in _modules(backend) if n == name)
    module = make().cuda()
    params = list(module.parameters())
    x = torch.randn(*shape, device="cuda", requires_grad=True)

    def step():
        out = module(x)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device="cuda").view_as(o)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
        return [o.detach() for o in outs], grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires (compiles, autotunes, caches)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outs, static_grads = step()
    for trial in range(2):  # new values in the captured input: the replay must read them
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        outs, grads = step()
        for got, want in zip(static_outs, outs, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, t=trial: f"replay {t}: {m}")
        for got, want in zip(static_grads, grads, strict=True):
            if want is None:
                assert got is None
                continue
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, t=trial: f"replay {t}: {m}")
