"""InfoGAN (Chen, Duan, Houthooft, Schulman, Sutskever, Abbeel 2016): the MNIST model with one categorical and two
continuous codes. The interface the loop uses is in gm/models/gan_common.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gm.models.gan_common import GAN, ConvDiscriminatorBody, ConvGeneratorBody, bce, dcgan_init

PRESETS: dict[str, dict] = {
    "mnist": dict(channels=1, size=28, z_dim=62, categories=10, continuous=2, width=64, fc=1024, q_hidden=128,
                  lambda_cat=1.0, lambda_cont=1.0),
    "tiny": dict(channels=1, size=28, z_dim=4, categories=10, continuous=2, width=4, fc=16, q_hidden=8,
                 lambda_cat=1.0, lambda_cont=1.0),
}  # fmt: skip


def mutual_information_bound(
    q_logits: torch.Tensor, q_mean: torch.Tensor, cat: torch.Tensor, cont: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoGAN's variational lower bound L_I = E[log Q(c | G(z, c))] + H(c) (Chen et al. 2016, eq. 5), in nats, for
    a uniform categorical code (H = log K) and continuous codes uniform on [-1, 1] (H = log 2 each) with Q a
    factorised Gaussian of fixed standard deviation 1 (as the paper's code). Returns (categorical, continuous)."""
    k = q_logits.shape[1]
    mi_cat = math.log(k) - F.cross_entropy(q_logits, cat)
    log_q = -0.5 * math.log(2 * math.pi) - 0.5 * (cont - q_mean).square()
    mi_cont = (log_q + math.log(2.0)).sum(1).mean() if cont.shape[1] else q_mean.new_zeros(())
    return mi_cat, mi_cont


def majority_code_error(
    codes_train: torch.Tensor, labels_train: torch.Tensor, codes_test: torch.Tensor, labels_test: torch.Tensor
) -> float:
    """Test error in % of a clustering used as a classifier: each code value is mapped to the most frequent label
    of the training images given that code (ties: the smallest label; a code no training image gets: the most
    frequent training label), as InfoGAN reports its categorical code on MNIST."""
    n_codes = int(max(codes_train.max(), codes_test.max())) + 1
    n_labels = int(max(labels_train.max(), labels_test.max())) + 1
    counts = torch.zeros(n_codes, n_labels, dtype=torch.int64)
    counts.index_put_((codes_train.long().cpu(), labels_train.long().cpu()), torch.ones(()).long(), accumulate=True)
    mapping = counts.argmax(1)
    mapping[counts.sum(1) == 0] = torch.bincount(labels_train.long().cpu(), minlength=n_labels).argmax()
    wrong = mapping[codes_test.long().cpu()] != labels_test.long().cpu()
    return 100.0 * wrong.double().mean().item()


class InfoGAN(GAN):
    """InfoGAN (Chen et al. 2016), the paper's MNIST model (appendix C.1, table 1).

    Latent: z ~ U(-1, 1)^62, one categorical code c1 ~ Cat(K=10) (one-hot), continuous codes c2, c3 ~ U(-1, 1).
    G: FC 1024 BN ReLU -> FC 128x7x7 BN ReLU -> deconv 64 4x4 s2 BN ReLU -> deconv 1 4x4 s2 sigmoid.
    D: conv 64 4x4 s2 lReLU(0.1) -> conv 128 4x4 s2 BN lReLU -> FC 1024 BN lReLU -> FC 1 (real/fake logit);
    Q shares D up to the FC 1024 layer: FC 128 BN lReLU -> K categorical logits + the means of the continuous codes
    (Gaussian with std 1, as the paper's code). D and Q minimise the GAN loss - lambda L_I, G its non-saturating loss
    - lambda L_I (mutual_information_bound; lambda_cat = 1 as the paper, lambda_cont = 1 as its code's
    info_reg_coeff). Adam: D lr 2e-4, G lr 1e-3, beta1 0.5, batch 128, DCGAN initialisation.
    generate(n): a grid in image_grid_png's layout where row r uses code value r mod K and each column keeps one
    z and one c2, c3. evaluate(): the categorical code (argmax of Q's logits) as a classifier, each value mapped to its
    majority label on the training images: test error in % (the paper: 5% on MNIST).
    """

    name = "infogan"
    metric_name = "test error (categorical code as classifier)"
    batch_size = 128
    lr_d, lr_g = 2e-4, 1e-3

    def __init__(
        self,
        channels: int = 1,
        size: int = 28,
        z_dim: int = 62,
        categories: int = 10,
        continuous: int = 2,
        width: int = 64,
        fc: int = 1024,
        q_hidden: int = 128,
        lambda_cat: float = 1.0,
        lambda_cont: float = 1.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(channels, size, backend)
        if categories < 2:
            raise ValueError(f"categories must be >= 2, got {categories}")
        self.z_dim, self.categories, self.continuous = z_dim, categories, continuous
        self.lambda_cat, self.lambda_cont = lambda_cat, lambda_cont
        latent = z_dim + categories + continuous
        body = ConvGeneratorBody(channels, size, width, nn.Sigmoid())
        c, b = body.in_channels, body.base
        self.generator = nn.Sequential(
            nn.Linear(latent, fc, bias=False), nn.BatchNorm1d(fc), nn.ReLU(),
            nn.Linear(fc, c * b * b, bias=False), nn.BatchNorm1d(c * b * b), nn.ReLU(), nn.Unflatten(1, (c, b, b)),
            body,
        )  # fmt: skip
        conv = ConvDiscriminatorBody(channels, size, width, 0.1)
        self.discriminator = nn.ModuleDict({
            "conv": conv,
            "fc": nn.Sequential(nn.Flatten(), nn.Linear(conv.out_channels * conv.base**2, fc, bias=False),
                                nn.BatchNorm1d(fc), nn.LeakyReLU(0.1)),
            "out": nn.Linear(fc, 1),
            "q": nn.Sequential(nn.Linear(fc, q_hidden, bias=False), nn.BatchNorm1d(q_hidden), nn.LeakyReLU(0.1),
                               nn.Linear(q_hidden, categories + continuous)),
        })  # fmt: skip
        dcgan_init(self)

    def codes(self, n: int, generator=None, device=None):
        """(z, categorical code (n,) int64, continuous codes (n, continuous)) on `device`, drawn as _uniform draws."""
        z = self._uniform((n, self.z_dim), generator, device, low=-1.0)
        if generator is not None:
            cat = torch.randint(self.categories, (n,), generator=generator).to(z.device)
        else:
            cat = torch.randint(self.categories, (n,), device=z.device)
        return z, cat, self._uniform((n, self.continuous), generator, device, low=-1.0)

    def join(self, z, cat, cont) -> torch.Tensor:
        return torch.cat([z, F.one_hot(cat, self.categories).to(z.dtype), cont], dim=1)

    def latent(self, n, generator=None, device=None):
        return self.join(*self.codes(n, generator, device))

    def display_latent(self, n, generator=None, device=None):
        """n latents in image_grid_png's layout (ceil(sqrt(n)) columns): row r has code value r mod K; the images of
        a column share z and the continuous codes."""
        cols = max(1, math.ceil(math.sqrt(n)))
        z, _, cont = self.codes(cols, generator, device)
        i = torch.arange(n)
        cat = (i // cols) % self.categories
        col = (i % cols).to(z.device)
        return self.join(z[col], cat.to(z.device), cont[col])

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(real/fake logit (N,), Q's categorical logits (N, K), Q's continuous means (N, continuous))."""
        d = self.discriminator
        h = d["fc"](d["conv"](x))
        q = d["q"](h)
        return d["out"](h).squeeze(1), q[:, : self.categories], q[:, self.categories :]

    def _info_loss(self, fake, cat, cont):
        logit, q_logits, q_mean = self.heads(fake)
        mi_cat, mi_cont = mutual_information_bound(q_logits, q_mean, cat, cont)
        return logit, -(self.lambda_cat * mi_cat + self.lambda_cont * mi_cont), mi_cat.detach()

    def d_loss(self, batch):
        z, cat, cont = self.codes(batch.real.shape[0], device=batch.real.device)
        with torch.no_grad():
            fake = self.decode(self.join(z, cat, cont))
        real_logit = self.heads(batch.real)[0]
        fake_logit, info, mi_cat = self._info_loss(fake, cat, cont)
        loss = bce(real_logit, 1.0) + bce(fake_logit, 0.0) + info
        return loss, {"mi_cat": mi_cat}

    def g_loss(self, batch):
        z, cat, cont = self.codes(batch.real.shape[0], device=batch.real.device)
        fake_logit, info, _ = self._info_loss(self.decode(self.join(z, cat, cont)), cat, cont)
        return bce(fake_logit, 1.0) + info, {}

    def evaluate(self, test_images, test_labels, train_images=None, train_labels=None):
        if train_images is None or train_labels is None:
            train_images, train_labels = test_images, test_labels  # map the codes on the test set itself

        def code(x):
            return self.heads(x)[1].argmax(1)

        err = majority_code_error(self._batched(code, train_images), train_labels,
                                  self._batched(code, test_images), test_labels)  # fmt: skip
        return err, self.unit
