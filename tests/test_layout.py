"""kernels._layout: the tiled NCHW <-> channels_last copies of the Triton launchers (interpreted here)."""

from __future__ import annotations

import pytest
import torch

from tests._util import DEVICE

triton = pytest.importorskip("triton")

from gm.kernels import _layout  # noqa: E402

# Odd channel and pixel counts (partial tiles both ways), one image, a single channel, a single pixel.
SHAPES = [(2, 3, 5, 7), (1, 37, 6, 6), (3, 1, 4, 5), (2, 20, 1, 1), (2, 33, 17, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_exact(shape, dtype):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    cl = _layout.channels_last(x)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, x)
    back = _layout.nchw(cl)
    assert back.is_contiguous() and torch.equal(back, x)


def test_no_copy_when_already_in_layout():
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _layout.channels_last(cl) is cl
    assert _layout.nchw(x) is x


@pytest.mark.parametrize("half", [0, 1])
def test_channel_slice_is_read_in_place(half, monkeypatch):
    """A channel slice of an NCHW tensor (DiagonalBiLSTM's chunk of its 8h gates) goes through the tiled copy, not
    torch's, and comes out exact."""
    x = torch.randn(3, 10, 4, 5, device=DEVICE)
    part = x.chunk(2, dim=1)[half]
    assert not part.is_contiguous()
    _layout.channels_last(part)  # compiled (on a GPU) before .contiguous is trapped
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("torch's copy was used"))
    cl = _layout.channels_last(part)
    monkeypatch.undo()
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, part)


def test_other_layouts_go_through_torch():
    x = torch.randn(2, 8, 6, 4, device=DEVICE)[:, ::2]  # neither layout
    assert torch.equal(_layout.channels_last(x), x)
    assert _layout.channels_last(x).is_contiguous(memory_format=torch.channels_last)
    y = torch.randn(2, 8, 6, 4, device=DEVICE).permute(0, 1, 3, 2)
    assert torch.equal(_layout.nchw(y), y) and _layout.nchw(y).is_contiguous()


@pytest.mark.gpu
def test_gpu_large():
    x = torch.randn(128, 256, 32, 32, device="cuda", dtype=torch.bfloat16)
    cl = _layout.channels_last(x)
    assert torch.equal(cl, x) and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_layout.nchw(cl), x)


@pytest.mark.parametrize(("splits", "shape"), [(1, (5, 3)), (3, (7, 13)), (4, (70,)), (2, (0, 4))])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_sum_splits(splits, shape, out_dtype):
    """The split-K partial sums: summed over the first dim (in the partials' dtype) and cast in one pass; partial
    blocks of the flat range and an empty result included."""
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    partial = torch.randn(splits, *shape, device=DEVICE, dtype=acc)
    got = _layout.sum_splits(partial, out_dtype)
    assert got.dtype == out_dtype and got.shape == shape
    torch.testing.assert_close(got, partial.sum(0).to(out_dtype))  # bf16: a rounding step apart at most


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_gather(dtype):
    """gather(src, idx): src.view(-1)[idx], exactly 0 at the sentinel index src.numel(); repeated and unordered
    indices, a length off the block, a non-contiguous source, an empty index."""
    src = torch.randn(9, 13, device=DEVICE).to(dtype).t()
    flat = src.contiguous().reshape(-1)
    idx = torch.randint(0, src.numel() + 1, (301,), dtype=torch.int32, device=DEVICE)
    idx[:3] = src.numel()
    got = _layout.gather(src, idx)
    want = torch.cat((flat, flat.new_zeros(1)))[idx.long()]
    assert got.dtype == dtype and torch.equal(got, want)
    assert _layout.gather(src, idx[:0]).numel() == 0
