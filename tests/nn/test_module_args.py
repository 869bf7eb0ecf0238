"""The modules' constructors and forwards reject bad sizes and counts with a ValueError naming the argument, what it
got and what it expects (before any tensor is made from them)."""

from __future__ import annotations

import pytest
import torch

import gm

BAD = [
    (lambda: gm.nn.MaskedConv2d(0, 4, 3), r"in_channels must be an integer >= 1, got 0"),
    (lambda: gm.nn.MaskedConv2d(3, -4, 3), r"out_channels must be an integer >= 1, got -4"),
    (lambda: gm.nn.MaskedConv2d(3, 4.0, 3), r"out_channels must be an integer >= 1, got 4.0"),
    (lambda: gm.nn.MaskedConv2d(3, 4, 4), r"kernel_size must be odd and >= 1, got \(4, 4\)"),
    (lambda: gm.nn.MaskedConv2d(3, 4, (-1, 3)), r"kernel_size must be odd and >= 1, got \(-1, 3\)"),
    (lambda: gm.nn.MaskedConv2d(3, 4, 3, colors=0), r"colors must be an integer >= 1, got 0"),
    (lambda: gm.nn.MaskedConv2d(4, 6, 3, colors=3), r"in_channels must be a multiple of colors\*in_blocks=3, got 4"),
    (lambda: gm.nn.MaskedConv2d(3, 6, 3, colors=3, blocks=4), r"out_channels must be a multiple of colors\*blocks=12"),
    (lambda: gm.nn.MADE(0, 16), r"features must be an integer >= 1, got 0"),
    (lambda: gm.nn.MADE(4, 16, context=-1), r"context must be an integer >= 0, got -1"),
    (lambda: gm.nn.MADE(4, 16, heads=True), r"heads must be an integer >= 1, got True"),
    (lambda: gm.nn.IAFStep(4, 16, mode="additive"), r"mode must be one of \['gated', 'affine'\], got 'additive'"),
    (lambda: gm.nn.IAFFlow(4, 16, 0), r"steps must be an integer >= 1, got 0"),
    (lambda: gm.nn.IAFConvFlow(2, 8, 0), r"steps must be an integer >= 1, got 0"),
    (lambda: gm.nn.IAFConvStep(2, 8, mode="x"), r"mode must be one of"),
    (lambda: gm.nn.ARMultiConv2d(2, 0), r"hidden must be an integer >= 1, got 0"),
    (lambda: gm.nn.ARConv2d(2, 4, 0), r"order_size must be an integer >= 1, got 0"),
    (lambda: gm.nn.MaskedLinear(torch.ones(4)), r"mask must have 2 dimensions, got shape \(4,\)"),
    (lambda: gm.nn.MaskedLinear(torch.ones(0, 4)), r"mask must have at least one row and column, got shape \(0, 4\)"),
    (lambda: gm.nn.MaskedLinear(torch.full((3, 4), 0.5)), r"mask must be binary \(only 0 and 1\), got a value 0.5"),
    (lambda: gm.nn.MaskedLinear(torch.ones(3, 4), activation="tanh"), r"activation must be one of"),
    (lambda: gm.nn.MinibatchDiscrimination(8, dim=2.5), r"dim must be an integer >= 1, got 2.5"),
    (lambda: gm.nn.IAFStep(4, 16)(torch.randn(2, 5)), r"z must have features=4 columns, got shape \(2, 5\)"),
    (lambda: gm.nn.IAFStep(4, 16)(torch.randn(2, 4, 1)), r"z must have 2 dimensions, got shape \(2, 4, 1\)"),
]


@pytest.mark.parametrize(("make", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_sizes_and_counts_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_checks_keep_what_was_allowed():
    """Sizes as tuples, colour groups over blocks, a context of 0, one-step flows: still built as before."""
    assert gm.nn.MaskedConv2d(6, 24, (1, 3), colors=3, blocks=4).out_groups.shape == (24,)
    assert gm.nn.MaskedConv2d(3, 5, 3, blocks=2).out_groups is None  # blocks only group colours
    assert gm.nn.MaskedLinear(torch.ones(3, 4, dtype=torch.bool)).mask.dtype == torch.float32
    z, logdet = gm.nn.IAFFlow(4, 16, 1)(torch.randn(2, 4))
    assert z.shape == (2, 4) and logdet.shape == (2,)
