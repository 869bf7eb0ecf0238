"""How the CUDA weight-gradient GEMMs split their reduction (gm._ext.reduction_splits' model, no GPU needed)."""

from __future__ import annotations

import pytest

from gm._ext import _reduction_splits

SLOTS = 264  # an H200: 132 SMs x 2 resident blocks


@pytest.mark.parametrize("tiles", [1, 2, 4])
def test_few_output_tiles_spread_the_reduction_over_the_gpu(tiles):
    """One or two output tiles over 32768 pixels (the PixelRNN layers' 1x1 convolutions): the cap of 64 splits, not
    one block per tile (the old score's pick: 1 ms on a single SM)."""
    assert _reduction_splits(tiles, 32768, SLOTS) == 64


def test_many_tiles_split_little():
    """96 tiles (a 7x7 conv, 256 -> 256 channels) over 131072 pixels: a few waves of blocks, not 64 splits."""
    s = _reduction_splits(96, 131072, SLOTS)
    assert 4 <= s <= 16


@pytest.mark.parametrize(("tiles", "work"), [(1, 100), (1, 511), (3, 1000), (36, 4096), (500, 1 << 20)])
def test_every_split_keeps_at_least_256_steps(tiles, work):
    s = _reduction_splits(tiles, work, SLOTS)
    assert 1 <= s <= 64 and (s == 1 or work // s >= 256)


def test_no_split_when_the_tiles_fill_the_gpu_and_the_reduction_is_short():
    assert _reduction_splits(264, 512, SLOTS) == 1


def test_minibatch_splits_fill_whole_waves():
    """N = 1024, B = 100 (104 blocks): 2 parts fill one wave of 264 slots (two blocks per SM on an H200's 132 SMs;
    3, the old rule, spilled 48 blocks into a second); twice the slots take 4."""
    from gm.ops.minibatch import _splits_for  # noqa: PLC0415

    assert _splits_for(104, 1024, 264) == 2
    assert _splits_for(104, 1024, 528) == 4


@pytest.mark.parametrize("n", [1, 3, 127, 128, 300, 1000, 1024, 4097, 65536])
@pytest.mark.parametrize("slots", [264, 528])
def test_minibatch_splits_are_what_the_kernels_launch(n, slots):
    """The part count returned is the one the CUDA launcher derives from it (whole 64-j tiles, no empty part): the
    partial-sum buffer is sized by it."""
    from gm.ops.minibatch import _splits_for  # noqa: PLC0415

    tiles = -(-n // 128) * 13
    s = _splits_for(tiles, n, slots)
    per_part = -(-n // s)
    chunk = -(-per_part // 64) * 64  # csrc/minibatch/minibatch_cuda.cu: j_chunk
    assert 1 <= s <= 64 and -(-n // chunk) == s
