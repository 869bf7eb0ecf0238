"""Which models the tests can build here (a PixelRNN model needs its recurrent module to exist)."""

from __future__ import annotations

import importlib.util

import pytest

LAYER_MODULES = {"rowlstm": "gm.nn.row_lstm", "diagonal_bilstm": "gm.nn.diagonal_lstm"}


def missing_module(model: str) -> str | None:
    mod = LAYER_MODULES.get(model)
    if mod is None:
        return None
    return None if importlib.util.find_spec(mod) is not None else mod


def model_param(model: str):
    """pytest.param(model), skipped with a reason naming the module it lacks."""
    mod = missing_module(model)
    marks = [pytest.mark.skip(reason=f"{mod} is not written yet (the {model} model needs it)")] if mod else []
    return pytest.param(model, marks=marks, id=model)


MODELS = [model_param(m) for m in ("pixelcnn", "rowlstm", "diagonal_bilstm")]
