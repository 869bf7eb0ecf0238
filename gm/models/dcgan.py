"""DCGAN (Radford, Metz, Chintala 2015, "Unsupervised Representation Learning with Deep Convolutional GANs"), and
the evaluation of its discriminator as a feature extractor. The interface the loop uses is in
gm/models/gan_common.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gm.models.gan_common import GAN, ConvDiscriminatorBody, ConvGeneratorBody, bce, dcgan_init

PRESETS: dict[str, dict] = {
    "mnist": dict(channels=1, size=28, z_dim=100, width=64),
    "cifar10": dict(channels=3, size=32, z_dim=100, width=64),
    "tiny": dict(channels=1, size=28, z_dim=8, width=4),
}


def ridge_classifier_error(
    f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor, l2: float = 1.0
) -> float:
    """Test error in % of a closed-form ridge regression onto one-hot labels (argmax of the K outputs): features
    standardised with the training set's mean and std, W = (X^T X + l2 n I)^-1 X^T Y in float64. Deterministic."""
    xt, xs = f_train.double().cpu(), f_test.double().cpu()
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xt, xs = (xt - mean) / std, (xs - mean) / std
    xt, xs = F.pad(xt, (0, 1), value=1.0), F.pad(xs, (0, 1), value=1.0)  # a bias column
    k = int(max(y_train.max(), y_test.max())) + 1
    y = F.one_hot(y_train.long().cpu(), k).double()
    n, d = xt.shape
    # The d x d normal equations, or the n x n dual when there are fewer images than features: the same W.
    if d <= n:
        w = torch.linalg.solve(xt.T @ xt + l2 * n * torch.eye(d, dtype=xt.dtype), xt.T @ y)
    else:
        w = xt.T @ torch.linalg.solve(xt @ xt.T + l2 * n * torch.eye(n, dtype=xt.dtype), y)
    wrong = (xs @ w).argmax(1) != y_test.long().cpu()
    return 100.0 * wrong.double().mean().item()


class DCGAN(GAN):
    """DCGAN (Radford et al. 2015), sized for 28x28 (preset "mnist") or 32x32 (preset "cifar10").

    G: z ~ U(-1, 1)^100 -> FC to (width * 2^(s-1)) x base x base, batch norm, ReLU -> s-1 deconvs 4x4 s2 halving the
    width with batch norm and ReLU -> deconv 4x4 s2 to C channels, tanh (mapped to [0, 1]). For 28x28: 100 -> 128x7x7
    -> 64x14x14 -> 1x28x28; for 32x32: 100 -> 256x4x4 -> 128x8x8 -> 64x16x16 -> 3x32x32.
    D: convs 4x4 s2 (width, 2 width, ...) with LeakyReLU 0.2, batch norm on all but the first, -> FC to one logit;
    it sees images in [-1, 1]. No pooling, no fully connected hidden layers, N(0, 0.02) initialisation; Adam lr 2e-4,
    beta1 0.5, batch 128; the non-saturating generator loss.
    evaluate(): D as a feature extractor, as the paper's section 5.1: every conv stage's maps max-pooled to 4x4,
    concatenated, and a closed-form ridge regression onto one-hot labels fitted on all the labelled training images
    (ridge_classifier_error; the paper used an L2-SVM); the test error in %.
    """

    name = "dcgan"
    metric_name = "test error (ridge classifier on D's features)"
    batch_size = 128

    def __init__(
        self, channels: int = 1, size: int = 28, z_dim: int = 100, width: int = 64, backend: str | None = None
    ) -> None:
        super().__init__(channels, size, backend)
        self.z_dim = z_dim
        body = ConvGeneratorBody(channels, size, width, nn.Tanh())
        c, b = body.in_channels, body.base
        self.generator = nn.Sequential(
            nn.Linear(z_dim, c * b * b, bias=False), nn.Unflatten(1, (c, b, b)), nn.BatchNorm2d(c), nn.ReLU(), body
        )
        conv = ConvDiscriminatorBody(channels, size, width, 0.2)
        self.discriminator = nn.ModuleDict({
            "conv": conv, "out": nn.Linear(conv.out_channels * conv.base**2, 1),
        })  # fmt: skip
        dcgan_init(self)

    def latent(self, n, generator=None, device=None):
        return self._uniform((n, self.z_dim), generator, device, low=-1.0)

    def decode(self, z):
        return (self.generator(z) + 1) * 0.5

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        """D's real/fake logit (N,) for images x in [0, 1]."""
        return self.discriminator["out"](self.discriminator["conv"](x * 2 - 1).flatten(1)).squeeze(1)

    def d_loss(self, batch):
        fake = self._fake(batch.real.shape[0], False, batch.real.device)
        real_logit, fake_logit = self.critic(batch.real), self.critic(fake)
        return bce(real_logit, 1.0) + bce(fake_logit, 0.0), {
            "d_real": torch.sigmoid(real_logit.detach()).mean(), "d_fake": torch.sigmoid(fake_logit.detach()).mean()
        }  # fmt: skip

    def g_loss(self, batch):
        fake = self._fake(batch.real.shape[0], True, batch.real.device)
        return bce(self.critic(fake), 1.0), {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """D's features of images x in [0, 1]: each conv stage max-pooled to 4x4, flattened, concatenated."""
        maps = self.discriminator["conv"](x * 2 - 1, keep=True)
        return torch.cat([F.adaptive_max_pool2d(m, 4).flatten(1) for m in maps], dim=1)

    def evaluate(self, test_images, test_labels, train_images=None, train_labels=None):
        if train_images is None or train_labels is None:
            raise ValueError("DCGAN.evaluate needs train_images and train_labels to fit its classifier on D's features")
        f_train, f_test = self._batched(self.features, train_images), self._batched(self.features, test_images)
        return ridge_classifier_error(f_train, train_labels, f_test, test_labels), self.unit
