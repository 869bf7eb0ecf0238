"""What the PixelCNN and PixelRNN models share: the input scaling, the output head, the exact likelihood, the
metric (nats per image for binary data, bits per dimension for 256 levels) and pixel-by-pixel sampling.

A model maps integer levels x (N, C, H, W) (floats holding 0/1, or 0..255) to logits: (N, C, H, W) Bernoulli
logits when levels == 2, (N, C, 256, H, W) when levels == 256. The logits at pixel (r, c), colour k, depend only on
pixels before (r, c) in raster order and on colours before k at (r, c) (R -> G -> B through colour groups).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gm.nn import MaskedConv2d
from gm.nn.relu_conv import relu_conv_chain

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class OutputHead(nn.Module):
    """The paper's top: two (ReLU, 1x1 mask B) layers of `maps` channels, then (ReLU, 1x1 mask B) to the logits
    (C channels for Bernoulli outputs, C x 256 for the softmax, colour-major so R's 256 logits come first)."""

    def __init__(self, in_ch: int, maps: int, out_ch: int, colors: int, backend: str | None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                MaskedConv2d(in_ch, maps, 1, "B", colors=colors, backend=backend),
                MaskedConv2d(maps, maps, 1, "B", colors=colors, backend=backend),
                MaskedConv2d(maps, out_ch, 1, "B", colors=colors, backend=backend),
            ]
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return relu_conv_chain(h, self.convs)  # one fused node where the convs run on triton


class PixelModel(nn.Module):
    """Base of the autoregressive image models: subclasses build `self.features(x) -> (N, F, H, W)` and
    `self.head`, and for `sample` a stem and `layers_at(n, width, dtype)`: the layers between the stem and the head
    as gm.models.incremental evaluates them, one pixel at a time (the IAF VAE, which decodes whole images, has its
    own `sample` and no `layers_at`: gm sample tells the two kinds apart by it)."""

    name = "model"
    # Run channels-last (NHWC in memory): gm's convolutions keep their input's memory format, so a model of masked
    # convolutions and elementwise ops converts nothing between layers (each NCHW layer costs the kernels a transpose
    # of its input, of its output gradient and of its input again in the backward). The all-convolution PixelCNN
    # sets it; the PixelRNN models where their layers' one-node paths run channels-last (the cuda and the triton
    # scans, and the cpu diagonal scan), as their channels_last properties say: the cpu row scan reads NCHW rows.
    channels_last = False

    def __init__(self, channels: int, levels: int, backend: str | None) -> None:
        super().__init__()
        if levels not in (2, 256):
            raise ValueError(f"levels must be 2 (binary) or 256, got {levels}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels, self.levels, self.backend = channels, levels, backend
        self.colors = channels  # colour groups: one per channel (R, G, B), or a single group for grey
        self.out_channels = channels if levels == 2 else channels * levels
        self.compute_dtype: torch.dtype | None = None  # bf16/fp16 mixed precision: parameters cast per forward

    # -- forward ---------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, _cast: bool = True) -> torch.Tensor:
        """Logits for levels x (N, C, H, W): (N, C, H, W) if binary, else (N, C, 256, H, W), in the parameters' dtype
        (float32 under bf16/fp16 compute)."""
        dt = self.compute_dtype
        if _cast and dt is not None:
            # Mixed precision: compute with bf16/fp16 copies of the fp32 parameters (the cast is differentiable,
            # so gradients land on the fp32 masters); works with every op, including ones autocast does not know.
            params = {n: p.to(dt) for n, p in self.named_parameters()}
            return torch.func.functional_call(self, params, (x,), {"_cast": False})
        h = x.to(dt or next(self.parameters()).dtype) * (2.0 / (self.levels - 1)) - 1.0
        if self.channels_last:
            h = h.to(memory_format=torch.channels_last)
        logits = self.head(self.features(h))
        if dt is not None:
            logits = logits.float()
        if self.levels == 2:
            return logits
        n, _, hh, ww = logits.shape
        return logits.view(n, self.channels, self.levels, hh, ww)

    # -- likelihood ------------------------------------------------------------------------------------------
    def nll(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Exact negative log-likelihood of each image in nats, (N,)."""
        if logits is None:
            logits = self(x)
        if self.levels == 2:
            return F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none").flatten(1).sum(1)
        if logits.stride(2) == 1:
            # Channels-last logits (a channels_last model): (N, H, W, C, 256) is a view, one row per softmax, so the
            # gradient flows back channels-last too (the transposed form's comes back NCHW: one more conversion of
            # the largest activation in the model).
            rows = logits.permute(0, 3, 4, 1, 2).reshape(-1, self.levels)
            ce = F.cross_entropy(rows, x.long().permute(0, 2, 3, 1).reshape(-1), reduction="none")
            return ce.view(x.shape[0], -1).sum(1)
        ce = F.cross_entropy(logits.transpose(1, 2), x.long(), reduction="none")  # (N, C, H, W)
        return ce.flatten(1).sum(1)

    @property
    def metric_name(self) -> str:
        return "nats/image" if self.levels == 2 else "bits/dim"

    def metric(self, nll_nats: torch.Tensor, dims: int) -> torch.Tensor:
        """Per-image NLL in the model's unit: nats per image (binary) or bits per dimension (256 levels)."""
        return nll_nats if self.levels == 2 else nll_nats / (dims * math.log(2.0))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Training loss: the mean metric over the batch."""
        return self.metric(self.nll(x), x[0].numel()).mean()

    # -- sampling --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        size: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        device=None,
        method: str = "incremental",
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """n images (n, C, H, W) of levels, drawn pixel by pixel in raster order and colour by colour (R, G, B).

        method="incremental" (gm.models.incremental) computes one pixel at every layer per step, from each layer's
        cached state: H*W*C steps of matrix-vector work, in float32 (float64 for a float64 model). method="full"
        runs the model (its backends and compute precision) on rows 0..r for every step (rows below the current
        one cannot influence it: masks and scans never look down): the plain algorithm, H*W*C forward passes.
        Uniform draws come from `generator` (CPU), one per pixel and colour in that order, so a seed gives the same
        images on any device and with either method (up to a draw that falls within rounding of a boundary).

        prefix (n, C, k, W) of levels, k <= H: image completion (the PixelRNN paper's figures): rows 0..k-1 are
        prefix's, the rest is drawn from the model given them; no uniform draw is spent on them.
        """
        if method not in ("incremental", "full"):
            raise ValueError(f"method must be 'incremental' or 'full', got {method!r}")
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n must be a positive int, got {n!r}")
        hh, ww = size
        if not all(isinstance(v, int) and v >= 1 for v in (hh, ww)):
            raise ValueError(f"size must be two positive ints (H, W), got {size!r}")
        device = device or next(self.parameters()).device
        x = torch.zeros(n, self.channels, hh, ww, device=device)
        given = 0
        if prefix is not None:
            given = self._check_prefix(prefix, n, hh, ww)
            x[:, :, :given] = prefix.to(device, x.dtype)
        steps = None
        if method == "incremental":
            from gm.models.incremental import PixelSteps  # noqa: PLC0415

            steps = PixelSteps(self, n, ww)
        for r in range(hh):
            if steps is not None:
                steps.begin_row(r)
            if r < given:
                if steps is not None:  # the caches take a given row as it is (every colour of a pixel at once)
                    for c in range(ww):
                        steps(x[:, :, r, c], c)
                        steps.finish(x[:, :, r, c], c)
                continue
            for c in range(ww):
                for k in range(self.channels):
                    if steps is not None:
                        logits = steps(x[:, :, r, c], c, k if self.channels > 1 else None)  # colour k's part
                    else:
                        logits = self(x[:, :, : r + 1])[..., r, c]
                    x[:, k, r, c] = self._draw(logits[:, k], generator).to(device, x.dtype)
                if steps is not None:
                    steps.finish(x[:, :, r, c], c)
        return x

    def _check_prefix(self, prefix: torch.Tensor, n: int, hh: int, ww: int) -> int:
        """The number of given rows, after checking prefix (n, C, k <= H, W) of integer levels."""
        if not isinstance(prefix, torch.Tensor):
            raise ValueError(f"prefix must be a tensor of levels, got {type(prefix).__name__}")
        shape = tuple(prefix.shape)
        if prefix.dim() != 4 or shape[:2] != (n, self.channels) or shape[3] != ww or shape[2] > hh:
            raise ValueError(f"prefix must have shape (n={n}, C={self.channels}, k <= {hh}, W={ww}), got {shape}")
        bad = (prefix < 0) | (prefix > self.levels - 1)
        if prefix.is_floating_point():
            bad |= prefix != prefix.round()
        if bool(bad.any()):
            raise ValueError(f"prefix must hold integer levels in [0, {self.levels - 1}]")
        return shape[2]

    def _draw(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One level per image from its logits, (n,) Bernoulli logits or (n, 256), with one uniform draw each."""
        u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64)
        if self.levels == 2:
            p = torch.sigmoid(logits.double()).cpu().unsqueeze(1)
            return (u < p).double().squeeze(1)
        cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1).cpu()
        return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=self.levels - 1).squeeze(1).double()
