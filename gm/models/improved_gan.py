"""Improved GAN (Salimans, Goodfellow, Zaremba, Cheung, Radford, Chen 2016, "Improved Techniques for Training GANs"):
the semi-supervised MNIST model with feature matching, and minibatch discrimination through gm's fused kernel
(presets "mnist-md", "tiny-md"). The interface the loop uses is in gm/models/gan_common.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gm.models.gan_common import GAN
from gm.nn import MinibatchDiscrimination

PRESETS: dict[str, dict] = {
    "mnist": dict(channels=1, size=28, z_dim=100, g_hidden=(500, 500), d_hidden=(1000, 500, 250, 250, 250),
                  classes=10, n_labels=100, input_noise=0.3, hidden_noise=0.5, mbd_kernels=0, mbd_dim=5),
    "mnist-md": dict(channels=1, size=28, z_dim=100, g_hidden=(500, 500), d_hidden=(1000, 500, 250, 250, 250),
                     classes=10, n_labels=100, input_noise=0.3, hidden_noise=0.5, mbd_kernels=100, mbd_dim=5),
    "tiny": dict(channels=1, size=28, z_dim=8, g_hidden=(16,), d_hidden=(32, 16), classes=10, n_labels=20,
                 input_noise=0.3, hidden_noise=0.5, mbd_kernels=0, mbd_dim=5),
    "tiny-md": dict(channels=1, size=28, z_dim=8, g_hidden=(16,), d_hidden=(32, 16), classes=10, n_labels=20,
                    input_noise=0.3, hidden_noise=0.5, mbd_kernels=4, mbd_dim=3),
}  # fmt: skip


def semi_supervised_losses(
    logits_lab: torch.Tensor, labels: torch.Tensor, logits_unl: torch.Tensor, logits_fake: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Salimans et al. 2016, section 5: D has K class logits l and a fake class whose logit is fixed at 0, so
    D(x) = P(real | x) = Z / (Z + 1) with Z = sum_k exp(l_k), i.e. logit D(x) = logsumexp(l).

    Returns (supervised, unsupervised): the cross-entropy of the K classes on the labelled batch, and
    0.5 * (mean -log D(real) + mean -log(1 - D(fake))) computed stably as softplus(lse) - lse and softplus(lse)
    (the 0.5 as in the paper's code: the mean over the real and generated halves)."""
    supervised = F.cross_entropy(logits_lab, labels)
    lse_unl = torch.logsumexp(logits_unl, dim=1)
    lse_fake = torch.logsumexp(logits_fake, dim=1)
    unsupervised = 0.5 * (F.softplus(lse_unl) - lse_unl).mean() + 0.5 * F.softplus(lse_fake).mean()
    return supervised, unsupervised


def feature_matching_loss(f_real: torch.Tensor, f_fake: torch.Tensor) -> torch.Tensor:
    """||mean f(real) - mean f(fake)||^2 / F over the batch (section 3.1; divided by the feature count F as in the
    paper's code, which takes the mean of the squares)."""
    return (f_real.mean(0) - f_fake.mean(0)).square().mean()


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices (sorted) of n images with labels spread evenly over the classes (n // K each, the remainder to the
    first classes), drawn with a fixed seed: the labelled set of the semi-supervised model."""
    labels = labels.long().cpu()
    classes = torch.unique(labels)
    g = torch.Generator().manual_seed(seed)
    per_class, extra = divmod(n, classes.numel())
    chosen = []
    for i, c in enumerate(classes.tolist()):
        pool = torch.nonzero(labels == c).flatten()
        want = per_class + (i < extra)
        if want > pool.numel():
            raise ValueError(f"n_labels={n} needs {want} images of class {c}, the training set has {pool.numel()}")
        chosen.append(pool[torch.randperm(pool.numel(), generator=g)[:want]])
    return torch.cat(chosen).sort().values


class WeightNormLinear(nn.Module):
    """y = g * (x v^T) / ||v|| + b, one norm per output row (Salimans & Kingma 2016), with the paper's code's
    data-dependent initialisation (`init_from_data`): g and b set so that y has mean 0 and std `init_scale`."""

    def __init__(self, in_features: int, out_features: int, init_scale: float = 1.0) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(out_features, in_features) * 0.05)
        self.g = nn.Parameter(torch.ones(out_features))
        self.b = nn.Parameter(torch.zeros(out_features))
        self.init_scale = init_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.v * (self.g / self.v.norm(dim=1)).unsqueeze(1)
        return F.linear(x, w, self.b)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        self.g.fill_(1.0)
        self.b.zero_()
        y = self(x)
        scale = self.init_scale / (y.std(0) + 1e-8)
        self.g.mul_(scale)
        self.b.copy_(-y.mean(0) * scale)


class GaussianNoise(nn.Module):
    """x + sigma * N(0, 1) while training (the Improved GAN discriminator's regulariser), the identity in eval."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.sigma > 0:
            return x + self.sigma * torch.randn_like(x)
        return x


class ImprovedGAN(GAN):
    """Semi-supervised GAN with feature matching (Salimans et al. 2016, section 5; the MNIST model of the paper's
    code, train_mnist_feature_matching.py).

    D: Gaussian noise 0.3 on the input, then d_hidden weight-normalised ReLU layers (1000-500-250-250-250), each
    followed by Gaussian noise 0.5, then a weight-normalised linear layer to K=10 class logits; the fake class's
    logit is fixed at 0 (see semi_supervised_losses). Weight norm with the code's data-dependent initialisation
    (data_init; the output layer's scale 0.1). With mbd_kernels > 0 (preset "mnist-md"), minibatch discrimination
    (gm.nn.MinibatchDiscrimination, gm's fused kernel) on D's last hidden layer before the output layer, computed
    separately for labelled, unlabelled and generated images through its `groups` argument.
    G: z ~ U(0, 1)^100 -> (500 softplus, batch norm) x 2 -> 784 sigmoid with weight norm. Batch norm scales and
    shifts (the code learns the shift only).
    Losses: D minimises supervised cross-entropy + unsupervised loss; G the feature matching loss on D's last
    hidden layer (before the noise and minibatch features). Training: batch 100, Adam lr 0.003, beta1 0.5, as the
    code. `n_labels` labelled training images (balanced over the classes) are the only labels it sees.
    evaluate(): test error in % of argmax over D's K class logits (the paper: 93 +- 6.5 errors of 10,000 with 100
    labels on full MNIST).
    """

    name = "improved_gan"
    metric_name = "test error (D's K-class classifier)"
    batch_size = 100
    lr_d = lr_g = 3e-3

    def __init__(
        self,
        channels: int = 1,
        size: int = 28,
        z_dim: int = 100,
        g_hidden=(500, 500),
        d_hidden=(1000, 500, 250, 250, 250),
        classes: int = 10,
        n_labels: int = 100,
        input_noise: float = 0.3,
        hidden_noise: float = 0.5,
        mbd_kernels: int = 0,
        mbd_dim: int = 5,
        backend: str | None = None,
    ) -> None:
        super().__init__(channels, size, backend)
        if not d_hidden or not g_hidden:
            raise ValueError(f"d_hidden and g_hidden need at least one layer, got {d_hidden!r} and {g_hidden!r}")
        self.z_dim, self.classes, self.n_labels = z_dim, classes, n_labels
        pixels = channels * size * size
        g_layers: list[nn.Module] = []
        width = z_dim
        for h in g_hidden:
            g_layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h), nn.Softplus()]
            width = h
        g_layers += [WeightNormLinear(width, pixels), nn.Sigmoid(), nn.Unflatten(1, self.image_shape)]
        self.generator = nn.Sequential(*g_layers)

        d_layers: list[nn.Module] = [nn.Flatten(), GaussianNoise(input_noise)]
        width = pixels
        for h in d_hidden:
            d_layers += [WeightNormLinear(width, h), nn.ReLU()]
            width = h
        self.discriminator = nn.ModuleDict({
            "features": nn.Sequential(*d_layers),
            "noise": GaussianNoise(hidden_noise),
        })  # fmt: skip
        # Gaussian noise after every hidden layer: inserted after each ReLU but the last (that one is `noise`,
        # applied after the feature-matching layer).
        feats = self.discriminator["features"]
        for i in reversed([j for j, m in enumerate(feats) if isinstance(m, nn.ReLU)][:-1]):
            feats.insert(i + 1, GaussianNoise(hidden_noise))
        if mbd_kernels:
            self.discriminator["minibatch"] = MinibatchDiscrimination(width, mbd_kernels, mbd_dim, backend=backend)
            width += mbd_kernels
        self.discriminator["out"] = WeightNormLinear(width, classes, init_scale=0.1)

    def latent(self, n, generator=None, device=None):
        return self._uniform((n, self.z_dim), generator, device)

    def discriminate(self, x: torch.Tensor, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (N, K), last hidden layer (N, F)) for images x in [0, 1]; `groups` (split sizes) are the
        separate batches of minibatch discrimination."""
        d = self.discriminator
        f = d["features"](x)
        h = d["noise"](f)
        if "minibatch" in d:
            h = d["minibatch"](h, groups=groups)
        return d["out"](h), f

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """Weight norm's data-dependent initialisation, layer by layer on x (noise layers off)."""
        was_training = self.training
        self.eval()
        h = x
        extra = [self.discriminator["minibatch"]] if "minibatch" in self.discriminator else []
        for layer in [*self.discriminator["features"], *extra]:
            if isinstance(layer, WeightNormLinear):
                layer.init_from_data(h)
            h = layer(h)
        self.discriminator["out"].init_from_data(h)
        self.train(was_training)

    def d_loss(self, batch):
        if batch.labelled is None or batch.labels is None:
            raise ValueError("ImprovedGAN.d_loss needs batch.labelled and batch.labels (the labelled batch)")
        n_lab, n_unl = batch.labelled.shape[0], batch.real.shape[0]
        fake = self._fake(n_unl, False, batch.real.device)
        logits, _ = self.discriminate(torch.cat([batch.labelled, batch.real, fake]), groups=[n_lab, n_unl, n_unl])
        lab, unl, gen = torch.split(logits, [n_lab, n_unl, n_unl])
        supervised, unsupervised = semi_supervised_losses(lab, batch.labels, unl, gen)
        with torch.no_grad():
            acc = (lab.argmax(1) == batch.labels).float().mean()
        return supervised + unsupervised, {"sup": supervised.detach(), "unsup": unsupervised.detach(), "acc": acc}

    def g_loss(self, batch):
        n = batch.real.shape[0]
        fake = self._fake(n, True, batch.real.device)
        _, f = self.discriminate(torch.cat([batch.real, fake]), groups=[n, n])
        f_real, f_fake = torch.split(f, [n, n])
        return feature_matching_loss(f_real.detach(), f_fake), {}

    def evaluate(self, test_images, test_labels, train_images=None, train_labels=None):
        logits = self._batched(lambda x: self.discriminate(x)[0], test_images)
        return 100.0 * (logits.argmax(1) != test_labels.cpu()).double().mean().item(), self.unit
