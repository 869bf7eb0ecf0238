"""The Triton kernels' int64 offsets (gm.kernels._common.int32_offsets: int32 below INT32_LIMIT elements, int64 from
there on), run on small tensors by lowering the limit: masked_linear's GEMMs and the LSTM scans' weight gradient
against the reference, forward and every gradient. (masked_conv2d's: tests/ops/test_masked_conv.py.)"""

from __future__ import annotations

import pytest
import torch

import gm
from gm.nn.made import made_masks
from tests._util import assert_rel, fast_backends

pytestmark = pytest.mark.skipif("triton" not in fast_backends(torch.device("cpu")), reason="no triton backend here")


@pytest.fixture
def int64(monkeypatch):
    from gm.kernels import _common  # noqa: PLC0415

    monkeypatch.setattr(_common, "INT32_LIMIT", 0)


def _grads(fn, leaves, backend):
    out = fn(*leaves, backend=backend)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return [out, *torch.autograd.grad(out, leaves, g)]


def _compare(fn, leaves, what):
    got = _grads(fn, leaves, "triton")
    want = _grads(fn, [t.detach().double().requires_grad_() for t in leaves], "reference")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_rel(a, b, torch.float32, f"{what} {i}")


def test_masked_linear(int64):
    torch.manual_seed(0)
    mask = made_masks(6, 10, 1, "natural", heads=1)[1]
    x = torch.randn(9, mask.shape[1], requires_grad=True)
    w = torch.randn(mask.shape, requires_grad=True)
    b = torch.randn(mask.shape[0], requires_grad=True)

    def fn(x, w, b, backend):
        return gm.ops.masked_linear(x, w, mask.to(x.dtype), b, activation="elu", backend=backend)

    _compare(fn, [x, w, b], "masked_linear")


@pytest.mark.parametrize("scan", ["row", "diagonal"])
def test_scan_weight_gradient(int64, scan):
    torch.manual_seed(1)
    gates = torch.randn(2, 12, 4, 5, requires_grad=True)
    w = (0.3 * torch.randn(12, 3, 3 if scan == "row" else 2)).requires_grad_()
    op = gm.ops.row_lstm if scan == "row" else gm.ops.diagonal_lstm
    _compare(lambda g, w, backend: op(g, w, backend=backend), [gates, w], scan)
