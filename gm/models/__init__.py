"""The models of gm, one file per paper, and a registry: gm.models.get(name, preset, backend=...).

    pixelcnn          PixelCNN                 (gm/models/pixelcnn.py)
    rowlstm           PixelRNN, Row LSTM       (gm/models/pixelrnn.py)
    diagonal_bilstm   PixelRNN, Diagonal BiLSTM
    iaf_vae           VAE with inverse autoregressive flow   (gm/models/iaf_vae.py)
    improved_gan      Improved GAN, semi-supervised          (gm/models/improved_gan.py)
    dcgan             DCGAN                                  (gm/models/dcgan.py)
    infogan           InfoGAN                                (gm/models/infogan.py)
The likelihood models (the PixelCNN/PixelRNN family and the VAE) train through gm.training's loop; the GANs
(kind == "gan") through gm.gan_training's.
Presets: "mnist" (binary 28x28, Bernoulli logits), "cifar10" (RGB, 256-way softmax per colour), "tiny" and
"tiny-rgb" (for tests).
"""

from __future__ import annotations

from gm.models import dcgan, iaf_vae, improved_gan, infogan, pixelcnn, pixelrnn
from gm.models.common import PRECISIONS, PixelModel
from gm.models.dcgan import DCGAN
from gm.models.gan_common import GAN
from gm.models.iaf_vae import IAFVAE
from gm.models.improved_gan import ImprovedGAN
from gm.models.infogan import InfoGAN
from gm.models.pixelcnn import PixelCNN
from gm.models.pixelrnn import DiagonalBiLSTMModel, RowLSTMModel

MODELS = {
    "pixelcnn": (PixelCNN, pixelcnn.PRESETS),
    "rowlstm": (RowLSTMModel, pixelrnn.PRESETS),
    "diagonal_bilstm": (DiagonalBiLSTMModel, pixelrnn.PRESETS),
    "iaf_vae": (IAFVAE, iaf_vae.PRESETS),
    "improved_gan": (ImprovedGAN, improved_gan.PRESETS),
    "dcgan": (DCGAN, dcgan.PRESETS),
    "infogan": (InfoGAN, infogan.PRESETS),
}
ALIASES = {"row_lstm": "rowlstm", "diagonal_lstm": "diagonal_bilstm", "diagonalbilstm": "diagonal_bilstm"}


def canonical(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return key


def config(name: str, preset: str = "mnist", **overrides) -> dict:
    """The constructor arguments of preset `preset` of model `name`, with `overrides` applied."""
    _, presets = MODELS[canonical(name)]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for model {name!r}: choose one of {', '.join(presets)}")
    cfg = dict(presets[preset])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}: the options are {sorted(cfg)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def kind(name: str) -> str:
    """The model's kind: "likelihood" (trained on its NLL by gm.training) or "gan" (adversarially, gm.gan_training)."""
    cls, _ = MODELS[canonical(name)]
    return getattr(cls, "kind", "likelihood")


def get(name: str, preset: str = "mnist", *, backend: str | None = None, **overrides) -> PixelModel:
    """Model `name` ("pixelcnn", "rowlstm", "diagonal_bilstm") with preset `preset`; its ops run on `backend`."""
    cls, _ = MODELS[canonical(name)]
    return cls(backend=backend, **config(name, preset, **overrides))


__all__ = [
    "DCGAN", "GAN", "IAFVAE", "MODELS", "PRECISIONS", "DiagonalBiLSTMModel", "ImprovedGAN", "InfoGAN", "PixelCNN",
    "PixelModel", "RowLSTMModel", "canonical", "config", "get", "kind",
]  # fmt: skip
