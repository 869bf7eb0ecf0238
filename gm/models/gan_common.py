"""What the GANs of 2016 share (Improved GAN: gm/models/improved_gan.py, DCGAN: dcgan.py, InfoGAN: infogan.py), trained
adversarially by gm.gan_training.

Every model maps images in [0, 1] (N, C, H, W) (grey levels / 255) and exposes what the loop and the tools need:

    generator, discriminator       the two nn.Modules, one Adam optimizer each (InfoGAN's Q head is in discriminator)
    d_loss(batch), g_loss(batch)   (loss, stats) of one discriminator / generator update on a GANBatch; each draws its
                                   own latent codes from the device's RNG (checkpointed, so resumed runs replay it)
    data_init(x)                   data-dependent initialisation before the first step (Improved GAN only)
    generate(n, generator, device) n images in [0, 1]
    evaluate(test_images, test_labels, train_images, train_labels) -> (value, unit): a test error in %
    batch_size, lr_d, lr_g, betas  the paper's optimisation settings (gm train uses them unless told otherwise)

Presets: "mnist" (the paper's MNIST model), "tiny" (tests); Improved GAN also "mnist-md" and "tiny-md" (minibatch
discrimination through gm's fused kernel), DCGAN also "cifar10" (32x32 RGB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GANBatch:
    """One training batch: `real` images in [0, 1] (N, C, H, W); for the semi-supervised model also a batch of
    labelled images and their int64 labels."""

    real: torch.Tensor
    labelled: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class GAN(nn.Module):
    """Base of the GANs: image shape, the training settings, sampling and evaluation helpers."""

    kind = "gan"
    name = "gan"
    metric_name = "test error"
    unit = "%"
    batch_size = 64
    lr_d = lr_g = 2e-4
    betas = (0.5, 0.999)
    n_labels = 0  # > 0: the loop passes a labelled batch from a balanced subset of this size
    generator: nn.Module
    discriminator: nn.Module

    def __init__(self, channels: int, size: int, backend: str | None) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        self.channels, self.size, self.backend = channels, size, backend
        self.levels = 256  # grey levels / 255: what gm's tools read for the data and the sample grids

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def _device(self, device) -> torch.device:
        return torch.device(device) if device is not None else next(self.parameters()).device

    def _uniform(self, shape: tuple[int, ...], generator, device, low: float = 0.0) -> torch.Tensor:
        """Draws uniform on [low, 1) of `shape` on `device` (default: the parameters') in the parameters' dtype: from
        `generator` on the CPU when one is given (a seed gives the same images on any device), else from the
        device's own RNG (the training steps: no host-to-device copy, and so no stream sync, per step)."""
        dev = self._device(device)
        u = torch.rand(shape, generator=generator) if generator is not None else torch.rand(shape, device=dev)
        u = u.to(dev, next(self.parameters()).dtype)
        return u if low == 0.0 else u * (1.0 - low) + low

    def latent(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """n latent vectors for the generator on `device`, drawn as _uniform draws them."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The generator's images in [0, 1] for latent vectors z."""
        return self.generator(z)

    def display_latent(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """The latent vectors generate() shows: random ones (InfoGAN arranges its codes in a grid)."""
        return self.latent(n, generator, device)

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1], in eval mode (batch norm with its running statistics)."""
        was_training = self.training
        self.eval()
        try:
            return self.decode(self.display_latent(n, generator, self._device(device))).clamp(0.0, 1.0)
        finally:
            self.train(was_training)

    def data_init(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation before the first step (a no-op unless a model needs it)."""

    def d_loss(self, batch: GANBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def g_loss(self, batch: GANBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _fake(self, n: int, grad: bool, device) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return self.decode(self.latent(n, device=device))

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, chunk: int = 100) -> torch.Tensor:
        """fn over fixed chunks of `images` in eval mode, concatenated (fixed chunks: minibatch features depend on
        the batch, so the result does not depend on how the caller batches)."""
        was_training = self.training
        self.eval()
        try:
            dev = next(self.parameters()).device
            return torch.cat([fn(images[i : i + chunk].to(dev)).cpu() for i in range(0, images.shape[0], chunk)])
        finally:
            self.train(was_training)

    def evaluate(self, test_images, test_labels, train_images=None, train_labels=None) -> tuple[float, str]:
        raise NotImplementedError


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv and linear weights N(0, 0.02), batch-norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def stride2_stages(size: int) -> tuple[int, int]:
    """(stages, base): how many stride-2 4x4 convolutions take a size x size image down to base x base, halving
    while the side is even and stays >= 4 (28 -> 14 -> 7: 2 stages; 32 -> 16 -> 8 -> 4: 3 stages)."""
    stages, side = 0, size
    while side % 2 == 0 and side // 2 >= 4:
        side //= 2
        stages += 1
    if stages == 0:
        raise ValueError(f"size must be an even number >= 8 (halved by stride-2 convolutions), got {size}")
    return stages, side


class ConvDiscriminatorBody(nn.Module):
    """DCGAN/InfoGAN discriminator convolutions: conv `width` 4x4 s2 lReLU (no batch norm on the first layer, as
    DCGAN), then convs doubling the width, 4x4 s2, batch norm, lReLU, down to base x base."""

    def __init__(self, channels: int, size: int, width: int, slope: float) -> None:
        super().__init__()
        stages, self.base = stride2_stages(size)
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(stages):
            c_out = width * 2**i
            layers.append(nn.Sequential(
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=i == 0),
                *([nn.BatchNorm2d(c_out)] if i else []),
                nn.LeakyReLU(slope),
            ))  # fmt: skip
            c_in = c_out
        self.stages = nn.ModuleList(layers)
        self.out_channels = c_in

    def forward(self, x: torch.Tensor, keep: bool = False):
        """The last stage's maps, or with keep=True the list of every stage's maps."""
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps if keep else x


class ConvGeneratorBody(nn.Module):
    """From base x base maps up to size x size: deconvs 4x4 s2 halving the width, batch norm, ReLU, then the last
    deconv to the image channels (no batch norm) and `out` (tanh for DCGAN, sigmoid for InfoGAN)."""

    def __init__(self, channels: int, size: int, width: int, out: nn.Module) -> None:
        super().__init__()
        stages, self.base = stride2_stages(size)
        self.in_channels = width * 2 ** (stages - 1)
        layers: list[nn.Module] = []
        c_in = self.in_channels
        for _ in range(stages - 1):
            layers += [nn.ConvTranspose2d(c_in, c_in // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c_in // 2), nn.ReLU()]
            c_in //= 2
        layers += [nn.ConvTranspose2d(c_in, channels, 4, 2, 1), out]
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
