"""gm.models.incremental: the models evaluated one pixel at a time from cached layer state (sampling's method).

The pixel-by-pixel logits equal the full forward's on the same image (float64, to rounding), layer by layer and for
whole models, every preset kind (grey, colour), odd sizes; sampling with it draws the same images as the full
method from the same seed; bad arguments are named."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import gm.models as M
import gm.nn
from gm.models import incremental as inc

MODELS = ["pixelcnn", "rowlstm", "diagonal_bilstm"]


def _model(name: str, preset: str, std: float = 0.4, seed: int = 0):
    """A float64 model with weights large enough that every layer matters (fresh inits are near-linear)."""
    torch.manual_seed(seed)
    model = M.get(name, preset, backend="reference").double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def _levels(model, n, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.levels, (n, model.channels, h, w), generator=g).double()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("preset", ["tiny", "tiny-rgb"])
@pytest.mark.parametrize("size", [(5, 4), (1, 3), (4, 1), (7, 9)])
def test_pixel_logits_equal_the_full_forward(name, preset, size):
    model = _model(name, preset)
    x = _levels(model, 3, *size)
    with torch.no_grad():
        want = model(x)
    got = inc.logits(model, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _layer_by_pixel(step, x: torch.Tensor) -> torch.Tensor:
    """A layer's output map computed by its *At stepper, one pixel at a time."""
    n, _, height, width = x.shape
    rows = []
    for r in range(height):
        step.next_row(r)
        rows.append(torch.stack([step(x[:, :, r, c], c) for c in range(width)], dim=-1))
    return torch.stack(rows, dim=-2)


def _randomize(module, std=0.4):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


@pytest.mark.parametrize("colors", [1, 3])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("learn_init", [True, False])
def test_row_lstm_layer_by_pixel(colors, residual, learn_init):
    """RowLSTMAt against gm.nn.RowLSTM, including the learned initial state and kernel 5 (the presets use neither)."""
    torch.manual_seed(2)
    layer = gm.nn.RowLSTM(6, 3 * colors, kernel_size=5, colors=colors, residual=residual, learn_init=learn_init,
                          backend="reference").double()  # fmt: skip
    _randomize(layer)
    x = torch.randn(2, 6, 4, 7, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x)
    got = _layer_by_pixel(inc.RowLSTMAt(layer, 2, 7, torch.float64), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("colors", [1, 3])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("size", [(4, 6), (6, 1), (1, 5)])
def test_diagonal_bilstm_layer_by_pixel(colors, residual, size):
    torch.manual_seed(3)
    layer = gm.nn.DiagonalBiLSTM(6, 3 * colors, colors=colors, residual=residual, backend="reference").double()
    _randomize(layer)
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x)
    got = _layer_by_pixel(inc.DiagonalBiLSTMAt(layer, 2, size[1], torch.float64), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (7, 7), (1, 5), (5, 3)])
@pytest.mark.parametrize("mask", ["A", "B"])
def test_masked_conv_by_pixel(kernel, mask):
    torch.manual_seed(4)
    conv = gm.nn.MaskedConv2d(6, 9, kernel, mask, colors=3, backend="reference").double()
    _randomize(conv)
    x = torch.randn(2, 6, 5, 6, dtype=torch.float64)
    step = inc.ConvAt(conv, 2, 6, torch.float64)
    rows = []
    for r in range(5):
        step.next_row()
        rows.append(torch.stack([step(x[:, :, r, c], c) for c in range(6)], dim=-1))
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(rows, dim=-2), conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("preset", ["tiny", "tiny-rgb"])
def test_sampling_methods_draw_the_same_images(name, preset):
    """Colour by colour, each pass leaves partly drawn pixels in the caches: the images must still be the full
    method's, draw for draw."""
    model = _model(name, preset, std=0.5)
    full = model.sample(4, (5, 4), generator=torch.Generator().manual_seed(7), method="full")
    fast = model.sample(4, (5, 4), generator=torch.Generator().manual_seed(7), method="incremental")
    assert torch.equal(full, fast)
    assert fast.min() >= 0 and fast.max() <= model.levels - 1 and len(fast.unique()) > 1


def test_sampling_default_is_incremental_and_float32_models_agree():
    """The default method is the incremental one; a float32 model samples the same images either way here."""
    model = _model("pixelcnn", "tiny-rgb", std=0.5).float()
    a = model.sample(3, (4, 3), generator=torch.Generator().manual_seed(1))
    b = model.sample(3, (4, 3), generator=torch.Generator().manual_seed(1), method="incremental")
    c = model.sample(3, (4, 3), generator=torch.Generator().manual_seed(1), method="full")
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("preset", ["tiny", "tiny-rgb"])
def test_completion_keeps_the_prefix_and_methods_agree(name, preset):
    model = _model(name, preset, std=0.5)
    given = _levels(model, 3, 2, 4, seed=5)
    out = {}
    for method in ("full", "incremental"):
        out[method] = model.sample(3, (5, 4), generator=torch.Generator().manual_seed(2), method=method, prefix=given)
    assert torch.equal(out["full"], out["incremental"])
    assert torch.equal(out["incremental"][:, :, :2], given)
    # the whole image given: nothing is drawn
    whole = _levels(model, 3, 5, 4, seed=6)
    assert torch.equal(model.sample(3, (5, 4), prefix=whole), whole)


@pytest.mark.parametrize("name", MODELS)
def test_completion_follows_the_conditional(name):
    """2x2 binary images with the top row given: the bottom rows drawn match p(x) / p(top row) (exact likelihoods
    over the four completions)."""
    model = _model(name, "tiny", std=0.5, seed=3)
    with torch.no_grad():  # sharpen the distribution so the frequencies are informative
        for p in model.head.convs[-1].parameters():
            p.mul_(8.0)
    n = 4000
    for top in ([0.0, 1.0], [1.0, 1.0]):
        images = torch.tensor([top + list(b) for b in itertools.product([0.0, 1.0], repeat=2)]).reshape(4, 1, 2, 2)
        with torch.no_grad():
            p = torch.exp(-model.nll(images.double()))
        p = p / p.sum()
        prefix = torch.tensor(top).reshape(1, 1, 1, 2).expand(n, 1, 1, 2)
        drawn = model.sample(n, (2, 2), generator=torch.Generator().manual_seed(0), prefix=prefix)
        codes = (drawn[:, 0, 1] * torch.tensor([2.0, 1.0])).sum(1).long()
        freq = torch.bincount(codes, minlength=4).double() / n
        assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / n), (top, freq, p)


@pytest.mark.parametrize(
    ("prefix", "match"),
    [
        (torch.zeros(2, 1, 4, 3), "prefix must have shape"),  # more rows than the image
        (torch.zeros(3, 1, 1, 3), "prefix must have shape"),  # another n
        (torch.zeros(2, 1, 1, 2), "prefix must have shape"),  # another width
        (torch.full((2, 1, 1, 3), 2.0), "integer levels"),
        (torch.full((2, 1, 1, 3), 0.5), "integer levels"),
        ([[0.0]], "prefix must be a tensor"),
    ],
)
def test_completion_bad_prefix(prefix, match):
    model = M.get("pixelcnn", "tiny", backend="reference")
    with pytest.raises(ValueError, match=match):
        model.sample(2, (3, 3), prefix=prefix)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"method": "fast"}, "method must be"), ({"n": 0}, "n must be"), ({"size": (0, 3)}, "size must be")],
)
def test_sample_bad_arguments(kwargs, match):
    model = M.get("pixelcnn", "tiny", backend="reference")
    args = {"n": 2, "size": (3, 3), **kwargs}
    n, size = args.pop("n"), args.pop("size")
    with pytest.raises(ValueError, match=match):
        model.sample(n, size, **args)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_gpu_incremental_sampling_matches_cpu(name):
    """On the GPU the pixel-by-pixel logits match the float64 full forward to float32 rounding, and the samples are
    the CPU's (float32 on both: a draw within rounding of a boundary could differ; none does at this size)."""
    cpu = _model(name, "tiny-rgb", std=0.3).float()
    gpu = _model(name, "tiny-rgb", std=0.3).float().cuda()
    x = _levels(cpu, 3, 5, 4)
    with torch.no_grad():
        want = cpu.double()(x)
    cpu.float()
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, as on the CPU
    try:
        got = inc.logits(gpu, x.float().cuda()).double().cpu()
        b = gpu.sample(4, (5, 4), generator=torch.Generator().manual_seed(3))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    a = cpu.sample(4, (5, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b.cpu())
