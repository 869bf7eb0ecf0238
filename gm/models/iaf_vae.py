"""The VAE with inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling 2016, "Improving
Variational Inference with Inverse Autoregressive Flow", section 5.1 and appendix C: binarized MNIST).

    encoder   x -> 3x3 conv (maps) -> 3 stages of `blocks` ResNet blocks (28x28, 14x14, 7x7: the first block of
              stages 2 and 3 is strided) -> ELU -> linear -> mu, log sigma (N, latent), context h (N, context)
    posterior z_0 = mu + sigma * eps, eps ~ N(0, I);  z_T, Σ log|det| = IAFFlow(z_0, h)   (gm.nn.IAFFlow: `iaf_steps`
              MADE-based gated steps, each MADE `iaf_layers` hidden layers of `iaf_hidden` ELU units plus the
              context h, the variable order reversed between consecutive steps; gm's fused made_iaf_step op)
    decoder   z_T -> linear -> 7x7 maps -> the encoder's stages mirrored (the first block of stages 2 and 3
              upsamples, nearest) -> ELU -> 3x3 conv -> Bernoulli logits (N, 1, H, W)
    ResNet block: shortcut(x) + conv3x3(ELU(conv3x3(ELU(x)))), the shortcut a strided 1x1 conv when downsampling,
              nearest upsampling when upsampling.

Densities: log q(z_T|x) = log N(z_0; mu, sigma) − Σ_t log|det dz_t/dz_{t−1}| (each step's logdet is Σ log σ_t for
the gated update z' = σ z + (1 − σ) m), p(z) = N(0, I), p(x|z) Bernoulli(logits).
Training mode: forward(x) is the negative ELBO of each image from one reparameterised posterior sample,
log q(z_T|x) − log p(z_T) − log p(x|z_T), (N,) nats. Eval mode: nll(x) is the importance-weighted estimate
−log (1/k Σ_i p(x, z_i) / q(z_i|x)) with k = `eval_samples` posterior samples (a logsumexp; an upper bound on
−log p(x) in expectation that tightens as k grows; k = 1 is the negative ELBO). All noise comes from torch's global
RNG (eps drawn as torch.randn((N, latent)) right after the encoder, float32), so a resumed run reproduces; sampling
takes the caller's generator.

What the presets choose and why:
- "mnist": the paper's binarized-MNIST model as we read its appendix: 32 latent variables, ResNet encoder and
  decoder with 3x3 convolutions, 3 stages of 2 blocks (28 -> 14 -> 7), ELU everywhere, a context h from the encoder
  into every IAF step, gated IAF steps with the order reversed between steps. The paper's best posterior (79.10
  nats, ELBO 80.80) is depth 8 (IAF steps) of width 1920 (MADE hidden units); its cheapest IAF (depth 2, width 320)
  already reaches about 81 nats. We keep depth 8 and narrow the MADEs to 2 hidden layers of 320 units, and use 32
  maps in the ResNets (the paper's widths are for a GPU and 60,000 images): at width 1920 the eight MADEs hold 31M
  parameters, which on a CPU costs more than the rest of the model and overfits the embedded 4,000 digits.
  The paper's weight normalisation, data-dependent initialisation, Adamax and Polyak averaging are not used
  (gm's loop trains with Adam); its "free bits" (KL floor per group of latents) is not used either: the loop
  reports the training loss as the model's NLL, and free bits would make that a different number from the bound.
  eval_samples = 16: the IW estimate of the 1,000 embedded test digits took 33 s on one CPU thread (each sample
  is a decoder pass; 128 samples took 243 s and gave a 2.3 nats lower estimate after the 6-minute run below).
  Measured (OMP_NUM_THREADS=1, one core shared with another job): `gm train iaf_vae --preset mnist --max-minutes 6
  --batch-size 64 --lr 1e-3 --eval-every 0 --sample-every 0`: 1,200 steps, 213 images/s, test IW NLL (k=16)
  79.56 nats on the embedded digits (79.51 with the fixed evaluation noise of `gm eval`; threshold-binarized, not
  the paper's binarized MNIST: not comparable to its 79.10), test negative ELBO 86.8.
- "mnist-diag": the same VAE with the diagonal Gaussian posterior (iaf_steps=0), the paper's baseline (~84 nats).
- "tiny": a few maps and latents, 2 small IAF steps, for tests.
The images must be size x size (28 in every preset): the linear layers between the convolutions and the latents
fix the spatial size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gm._checks import check_choice, check_count
from gm.models.common import PixelModel
from gm.nn.iaf import IAFFlow
from gm.ops.iaf import MODES

PRESETS: dict[str, dict] = {
    "mnist": dict(channels=1, levels=2, size=28, latent=32, context=32, maps=32, blocks=2,
                  iaf_steps=8, iaf_hidden=320, iaf_layers=2, iaf_mode="gated", eval_samples=16),
    "mnist-diag": dict(channels=1, levels=2, size=28, latent=32, context=32, maps=32, blocks=2,
                       iaf_steps=0, iaf_hidden=320, iaf_layers=2, iaf_mode="gated", eval_samples=16),
    "tiny": dict(channels=1, levels=2, size=28, latent=4, context=4, maps=4, blocks=1,
                 iaf_steps=2, iaf_hidden=8, iaf_layers=1, iaf_mode="gated", eval_samples=8),
}  # fmt: skip

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Images per decoder call when the IW estimate decodes k samples of a batch: bounds the activations' memory.
IW_CHUNK_IMAGES = 4096
EVAL_SEED = 0  # the noise of the eval-mode NLL estimate: the same number for the same weights and images


def _std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim of log N(z; 0, 1)."""
    return -(0.5 * z.square() + HALF_LOG_2PI).sum(-1)


class ResBlock(nn.Module):
    """shortcut(x) + conv3x3(ELU(conv3x3(ELU(x)))); resample "down" strides the first conv by 2 (shortcut: a 1x1
    conv of stride 2), "up" upsamples the input (nearest) to `size` first (shortcut: the upsampled input)."""

    def __init__(self, maps: int, resample: str | None = None, size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.resample, self.size = resample, size
        self.conv1 = nn.Conv2d(maps, maps, 3, stride=2 if resample == "down" else 1, padding=1)
        self.conv2 = nn.Conv2d(maps, maps, 3, padding=1)
        self.shortcut = nn.Conv2d(maps, maps, 1, stride=2) if resample == "down" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            x = F.interpolate(x, size=self.size, mode="nearest")
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.conv2(F.elu(self.conv1(F.elu(x))))


def _stage_sizes(size: int, stages: int = 3) -> list[int]:
    """Side of each stage's maps: a stride-2 3x3 conv with padding 1 takes s to ceil(s / 2)."""
    sides = [size]
    for _ in range(stages - 1):
        sides.append(-(-sides[-1] // 2))
    return sides


class IAFVAE(PixelModel):
    """VAE with an IAF posterior on binary images (N, 1, size, size); see the module docstring.

    Args:
        channels, levels: 1 and 2 (binary grey images: Bernoulli decoder).
        size: image side (the images are size x size).
        latent: dimension of z. context: dimension of the encoder's context h for the IAF steps.
        maps: feature maps of every ResNet convolution. blocks: ResNet blocks per stage (3 stages each way).
        iaf_steps: IAF steps (0: the diagonal Gaussian posterior). iaf_hidden, iaf_layers: each step's MADE, hidden
            units per layer and hidden layers. iaf_mode: "gated" (the paper's eq. 14) or "affine".
        eval_samples: k of the importance-weighted NLL estimate in eval mode.
        backend: the backend of gm's ops (the IAF steps).
    """

    name = "iaf_vae"

    def __init__(
        self,
        channels: int = 1,
        levels: int = 2,
        size: int = 28,
        latent: int = 32,
        context: int = 32,
        maps: int = 32,
        blocks: int = 2,
        iaf_steps: int = 8,
        iaf_hidden: int = 320,
        iaf_layers: int = 2,
        iaf_mode: str = "gated",
        eval_samples: int = 16,
        backend: str | None = None,
        **unknown,
    ) -> None:
        if unknown:
            raise ValueError(f"unknown IAFVAE options {sorted(unknown)}: the options are {sorted(PRESETS['mnist'])}")
        if channels != 1:
            raise ValueError(f"channels must be 1 (the IAF VAE models grey binary images), got {channels!r}")
        if levels != 2:
            raise ValueError(f"levels must be 2 (the IAF VAE has a Bernoulli decoder), got {levels!r}")
        check_count(size=size, latent=latent, maps=maps, blocks=blocks, iaf_hidden=iaf_hidden,
                    iaf_layers=iaf_layers, eval_samples=eval_samples)  # fmt: skip
        check_count(0, context=context, iaf_steps=iaf_steps)
        check_choice("iaf_mode", iaf_mode, MODES)
        super().__init__(channels, levels, backend)
        self.config = dict(channels=channels, levels=levels, size=size, latent=latent, context=context, maps=maps,
                           blocks=blocks, iaf_steps=iaf_steps, iaf_hidden=iaf_hidden, iaf_layers=iaf_layers,
                           iaf_mode=iaf_mode, eval_samples=eval_samples)  # fmt: skip
        self.size, self.latent, self.context, self.eval_samples = size, latent, context, eval_samples
        sides = _stage_sizes(size)
        self.bottom = sides[-1]
        flat = maps * self.bottom * self.bottom

        self.enc_in = nn.Conv2d(channels, maps, 3, padding=1)
        self.enc_blocks = nn.Sequential(*(
            ResBlock(maps, "down" if stage > 0 and b == 0 else None)
            for stage in range(len(sides)) for b in range(blocks)
        ))  # fmt: skip
        self.enc_out = nn.Linear(flat, 2 * latent + context)
        self.flow = (IAFFlow(latent, iaf_hidden, iaf_steps, iaf_layers, context, iaf_mode, backend)
                     if iaf_steps else None)  # fmt: skip
        self.dec_in = nn.Linear(latent, flat)
        up_sides = sides[::-1]
        self.dec_blocks = nn.Sequential(*(
            ResBlock(maps, "up", (up_sides[stage],) * 2) if stage > 0 and b == 0 else ResBlock(maps)
            for stage in range(len(sides)) for b in range(blocks)
        ))  # fmt: skip
        self.dec_out = nn.Conv2d(maps, channels, 3, padding=1)

    # -- the model's parts -----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Levels x (N, 1, H, W) -> (mu, log sigma) (N, latent) and the context h (N, context) (None if 0)."""
        h = self.enc_in(x.to(self.enc_in.weight.dtype) * 2.0 - 1.0)
        h = self.enc_out(F.elu(self.enc_blocks(h)).flatten(1))
        mu, log_sigma, ctx = h.split([self.latent, self.latent, self.context], dim=1)
        return mu, log_sigma, (ctx if self.context else None)

    def transform(self, z0: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The IAF steps: (z_T, Σ_t log|det dz_t/dz_{t−1}| (N,)); the identity and 0 with iaf_steps=0."""
        if self.flow is None:
            return z0, z0.new_zeros(z0.shape[0])
        return self.flow(z0, h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, latent) -> Bernoulli logits (N, 1, size, size)."""
        h = self.dec_in(z.to(self.dec_in.weight.dtype)).view(z.shape[0], -1, self.bottom, self.bottom)
        return self.dec_out(F.elu(self.dec_blocks(F.elu(h))))

    def log_weights(self, x: torch.Tensor, encoded, eps: torch.Tensor) -> torch.Tensor:
        """log p(x, z) − log q(z|x) for each posterior sample given by its noise eps (S, N, latent): (S, N)."""
        mu, log_sigma, h = encoded
        s, n, _ = eps.shape
        acc = torch.promote_types(mu.dtype, torch.float32)  # densities summed in fp32 (fp64 for a fp64 model)
        eps = eps.to(mu.dtype)
        z0 = (mu + log_sigma.exp() * eps).reshape(s * n, -1)
        rep = (lambda t: t.expand(s, *t.shape).reshape(s * n, -1)) if s > 1 else (lambda t: t.reshape(n, -1))
        z, logdet = self.transform(z0, None if h is None else rep(h))
        log_q = _std_normal_log_prob(eps.to(acc)).reshape(s * n) - rep(log_sigma).to(acc).sum(1) - logdet.to(acc)
        logits = self.decode(z).to(acc)
        xs = x.to(acc).expand(s, *x.shape).reshape(s * n, *x.shape[1:])
        log_px = -F.binary_cross_entropy_with_logits(logits, xs, reduction="none").flatten(1).sum(1)
        return (log_px + _std_normal_log_prob(z.to(acc)) - log_q).view(s, n)

    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(f"x must have shape (N, {self.channels}, {self.size}, {self.size}) (preset size="
                             f"{self.size}), got {tuple(x.shape)}")  # fmt: skip

    # -- forward and likelihood ------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, samples: int | None = None, seed: int | None = None, _cast: bool = True
    ) -> torch.Tensor:
        """Negative ELBO of each image (N,) in nats from one posterior sample (samples=None), or the
        importance-weighted NLL estimate with `samples` posterior samples, their noise drawn from `seed` when given
        (else from the global RNG, left as it was). In the parameters' dtype's accumulation precision (float32 under
        bf16/fp16 compute, as PixelModel.forward)."""
        dt = self.compute_dtype
        if _cast and dt is not None:
            # Mixed precision as PixelModel.forward: bf16/fp16 copies of the fp32 parameters (a differentiable cast).
            params = {n: p.to(dt) for n, p in self.named_parameters()}
            return torch.func.functional_call(self, params, (x,), {"samples": samples, "seed": seed, "_cast": False})
        self._check_images(x)
        encoded = self.encode(x)
        n = x.shape[0]
        if samples is None:
            eps = torch.randn((1, n, self.latent), device=x.device)
            return -self.log_weights(x, encoded, eps)[0]
        check_count(samples=samples)
        per_call = max(1, IW_CHUNK_IMAGES // max(n, 1))
        chunks = []
        # The estimate's noise comes from the global RNG, whose state is put back afterwards: an evaluation inside
        # a training run (gm.training evaluates, then checkpoints the RNG state) leaves the run's noise unchanged, so
        # a resumed run reproduces an uninterrupted one whatever the evaluation schedule.
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, samples, per_call):
                eps = torch.randn((min(per_call, samples - start), n, self.latent), device=x.device)
                chunks.append(self.log_weights(x, encoded, eps))
        log_w = torch.cat(chunks)
        return math.log(samples) - torch.logsumexp(log_w, dim=0)

    def nll(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image NLL in nats (N,): `out` (the forward's negative ELBO) when given; else the negative ELBO of one
        sample in training mode, the importance-weighted estimate with eval_samples samples in eval mode, from fixed
        noise (EVAL_SEED): `gm eval` of a checkpoint prints the same number every time, as the test set's one fixed
        binarization does."""
        if out is not None:
            return out
        return self(x) if self.training else self(x, samples=self.eval_samples, seed=EVAL_SEED)

    # -- sampling --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, n: int, size: tuple[int, int], *, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """n images (n, 1, H, W) of levels {0, 1}: z ~ N(0, I), then a Bernoulli draw of each pixel of the
        decoder's probabilities. Both draws come from `generator` (CPU), so a seed gives the same images anywhere."""
        if tuple(size) != (self.size, self.size):
            raise ValueError(f"size must be ({self.size}, {self.size}) (the preset's size), got {tuple(size)}")
        device = device or next(self.parameters()).device
        # Decoded in the parameters' dtype (fp32 masters under bf16/fp16 training): one pass, precision is free.
        z = torch.randn((n, self.latent), generator=generator).to(device, self.dec_in.weight.dtype)
        logits = self.decode(z)
        p = torch.sigmoid(logits.double()).cpu()
        u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
        return (u < p).to(device, torch.float32)
