"""How the CUDA weight-gradient GEMMs split their reduction (gm._ext.reduction_splits' model, no GPU needed)."""

from __future__ import annotations

import pytest
import torch

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


def _walk(n, backward, b=100, slots=SLOTS):
    from gm.ops.minibatch import _plan, _splits_for  # noqa: PLC0415

    groups = -(-b // 8)
    return _plan(n, groups, slots, _splits_for(-(-n // 128) * groups, n, slots), backward)


def test_minibatch_pair_walk_from_a_thousand_rows():
    """The time model (waves x (j a block + 128), the pair walk's j at its SASS cost: 1.16x forward, 1.36x
    backward) keeps the rows walk where a block's fixed cost outweighs the halved pairs (N <= 512, B = 100) and takes
    the pair walk above, with whole tile-pair steps a block (at most T / 2 + 1 of T tiles)."""
    for n in (100, 256, 512):
        for backward in (False, True):
            splits, steps = _walk(n, backward)
            assert steps == 0 and splits >= 1
    for n in (1024, 2048, 4096, 16384, 65536):
        for backward in (False, True):
            splits, steps = _walk(n, backward)
            assert splits == 1 and 1 <= steps <= n // 128 // 2 + 1, (n, backward, steps)


def test_minibatch_rows_walk_when_deterministic_or_asked_or_wide(monkeypatch):
    """torch.use_deterministic_algorithms (the pair walk's atomics are not bit-reproducible), GM_MBD_ROWS=1 (the CPU
    backend's switch too) and C > 8 (the generic kernel) take the rows walk; FORCE_PAIR_STEPS overrides the model."""
    from gm.ops import minibatch as mb  # noqa: PLC0415

    monkeypatch.setattr("gm._ext.sm_count", lambda device: 132)
    assert mb.cuda_plan(4096, 100, 5, "cuda", backward=False)[1] > 0
    assert mb.cuda_plan(4096, 100, 9, "cuda", backward=False) == (1, 0)
    monkeypatch.setattr(mb, "_ROWS_ONLY", True)  # GM_MBD_ROWS=1 at import
    assert mb.cuda_plan(4096, 100, 5, "cuda", backward=False)[1] == 0
    monkeypatch.setattr(mb, "_ROWS_ONLY", False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert mb.cuda_plan(4096, 100, 5, "cuda", backward=True)[1] == 0
    monkeypatch.setattr(mb, "FORCE_PAIR_STEPS", 3)
    assert mb.cuda_plan(300, 100, 5, "cuda", backward=True) == (1, 3)


# The Triton weight gradients (masked_conv, masked_linear, row_lstm): gm.kernels._common.wave_splits, the same model in
# k-steps with a fixed cost of SPLIT_FIXED_STEPS, on an H200's 132 SMs (two 16-bit programs per SM, one fp32).
@pytest.fixture
def h200(monkeypatch):
    triton = pytest.importorskip("triton")  # noqa: F841
    from gm.kernels import _common  # noqa: PLC0415

    monkeypatch.setattr("gm._ext.sm_count", lambda device: 132)
    monkeypatch.setattr("torch.cuda.current_device", lambda: 0)
    return _common


def _waves(programs, slots):
    return -(-programs // slots)


@pytest.mark.parametrize(
    ("tiles", "steps", "elem", "min_steps", "old"),
    [
        (96, 2048, 2, 16, 3),  # 7x7 mask A, 256 -> 256 channels, N=128 32x32, bf16: 24 taps x 2 x 2, 64-pixel steps
        (5, 2048, 2, 16, 53),  # 3x3 mask B, 128 -> 128: 5 taps x 1 x 1
        (96, 2048, 4, 16, 3),  # the 7x7 case in fp32 (one program per SM)
        (6, 512, 2, 4, 44),  # RowLSTM h=64 wgrad, 128x64 tiles, N=32 32x32 (row_lstm's minimum of 4 steps)
    ],
)
def test_triton_splits_fill_whole_waves(h200, tiles, steps, elem, min_steps, old):
    """The old rule (enough programs for two per SM) spilled a few programs into a second wave: 288 and 265
    programs on 264 slots. The model's pick costs no more than the old one by its own measure, and its last wave is
    at least three-quarters full."""
    slots = 132 * (2 if elem <= 2 else 1)
    s = h200.wave_splits(tiles, steps, elem, min_steps=min_steps)

    def cost(k):
        return _waves(tiles * k, slots) * (-(-steps // k) + h200.SPLIT_FIXED_STEPS)

    assert cost(s) <= cost(old)
    if tiles * old > slots:
        assert cost(s) < cost(old)
    assert (tiles * s) % slots == 0 or (tiles * s) % slots >= 0.75 * slots or _waves(tiles * s, slots) > 3


def test_triton_single_tile_spreads_over_the_gpu(h200):
    """One output tile (a 1x1 conv, 64 -> 128 channels) over 2048 k-steps: 128 splits (16 k-steps each), as many
    as the minimum split length allows."""
    assert h200.wave_splits(1, 2048, 2, min_steps=16) == 128
