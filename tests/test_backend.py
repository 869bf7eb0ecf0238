"""Backend choice, the lazy extension's errors, and `gm info`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gm
from gm import _backend, _ext


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("GM_BACKEND", raising=False)
    assert _backend.resolve(None, torch.device("cpu")) == "cpu"


def test_env_overrides_auto_but_not_an_explicit_backend(monkeypatch):
    monkeypatch.setenv("GM_BACKEND", "reference")
    assert _backend.resolve(None, torch.device("cpu")) == "reference"
    assert _backend.resolve("cpu", torch.device("cpu")) == "cpu"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("tpu", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(gm.BackendUnavailable, match="takes CUDA tensors"):
        _backend.resolve("cuda", torch.device("cpu"))


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_load", lambda: (None, f"the extension gm._C is not built (x); {_ext.BUILD_HINT}"))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        _ext.ext()
    with pytest.raises(gm.BackendUnavailable, match="not built"):
        _backend.resolve("cpu", torch.device("cpu"))
    ok, why = _ext.cuda_status()
    assert not ok and "not built" in why


def test_ops_without_cuda_kernels_auto_pick_triton(monkeypatch):
    monkeypatch.delenv("GM_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "cuda_status", lambda: (True, ""))
    monkeypatch.setattr(_backend, "availability", lambda b, d: (True, ""))
    cuda = torch.device("cuda")
    assert _backend.resolve(None, cuda, native_cpu=False) == "cuda"
    assert _backend.resolve(None, cuda, native_cpu=False, cuda_kernels=False) == "triton"
    assert _backend.resolve("cuda", cuda, native_cpu=False, cuda_kernels=False) == "cuda"


def test_info_reports_every_backend():
    d = gm.info(print_out=False)
    for b in gm.BACKENDS:
        assert f"backend.{b}" in d
    assert d["torch"] == torch.__version__


def test_gm_info_command():
    out = subprocess.run([sys.executable, "-m", "gm", "info"], capture_output=True, text=True, check=True).stdout
    assert "backend.reference" in out and "extension" in out


@pytest.mark.gpu
def test_gpu_stream_of_is_the_current_stream():
    """The launchers' raw stream handle follows torch's current stream, on the default stream and inside a side
    stream's context (DiagonalBiLSTM's reverse scan runs there)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from gm._ext import stream_of  # noqa: PLC0415

    t = torch.zeros(1, device="cuda")
    assert stream_of(t) == torch.cuda.current_stream().cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert stream_of(t) == side.cuda_stream != torch.cuda.default_stream().cuda_stream
    assert stream_of(torch.zeros(1)) == 0
