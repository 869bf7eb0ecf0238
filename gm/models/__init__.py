"""The models of gm, one file per paper, and a registry: gm.models.get(name, preset, backend=...).

    pixelcnn          PixelCNN                 (gm/models/pixelcnn.py)
    rowlstm           PixelRNN, Row LSTM       (gm/models/pixelrnn.py)
    diagonal_bilstm   PixelRNN, Diagonal BiLSTM
Presets: "mnist" (binary 28x28, Bernoulli logits), "cifar10" (RGB, 256-way softmax per colour), "tiny" and
"tiny-rgb" (for tests).
"""

from __future__ import annotations

from gm.models import pixelcnn, pixelrnn
from gm.models.common import PRECISIONS, PixelModel
from gm.models.pixelcnn import PixelCNN
from gm.models.pixelrnn import DiagonalBiLSTMModel, RowLSTMModel

MODELS = {
    "pixelcnn": (PixelCNN, pixelcnn.PRESETS),
    "rowlstm": (RowLSTMModel, pixelrnn.PRESETS),
    "diagonal_bilstm": (DiagonalBiLSTMModel, pixelrnn.PRESETS),
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


def get(name: str, preset: str = "mnist", *, backend: str | None = None, **overrides) -> PixelModel:
    """Model `name` ("pixelcnn", "rowlstm", "diagonal_bilstm") with preset `preset`; its ops run on `backend`."""
    cls, _ = MODELS[canonical(name)]
    return cls(backend=backend, **config(name, preset, **overrides))


__all__ = [
    "MODELS", "PRECISIONS", "DiagonalBiLSTMModel", "PixelCNN", "PixelModel", "RowLSTMModel", "canonical", "config",
    "get",
]  # fmt: skip
