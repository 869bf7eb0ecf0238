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


@pytest.fixture
def fake_gpu(monkeypatch):
    """resolve() on a CUDA device without one: cuda built and every backend available, picks recorded for
    masked_conv2d on this 'GPU model'."""
    monkeypatch.delenv("GM_BACKEND", raising=False)
    monkeypatch.delenv("GM_BACKEND_PICKS", raising=False)
    monkeypatch.setattr(_backend, "cuda_status", lambda: (True, ""))
    monkeypatch.setattr(_backend, "availability", lambda b, d: (True, ""))
    monkeypatch.setattr(_backend, "_slug_of", lambda index: "fake-gpu")
    table = {"masked_conv2d": {"bfloat16": {"backend": "triton"}, "float32": {"backend": "cuda"}}}
    monkeypatch.setattr(_backend, "backend_picks", lambda slug: table if slug == "fake-gpu" else {})
    return torch.device("cuda", 0)


def test_auto_takes_the_measured_backend(fake_gpu, monkeypatch):
    def auto(dtype, **kw):
        return _backend.resolve(None, fake_gpu, native_cpu=False, op="masked_conv2d", dtype=dtype, **kw)

    assert auto(torch.bfloat16) == "triton"  # measured ahead, though cuda is built
    assert auto(torch.float32) == "cuda"
    assert auto(torch.float32, prefer="triton") == "cuda"  # the measurement outranks an op's preference
    assert auto(torch.float32, cuda_kernels=False) == "triton"  # but never sends a call the kernels refuse
    assert auto(torch.float16) == "cuda" and auto(torch.float16, prefer="triton") == "triton"  # no record: the rules
    assert _backend.resolve(None, fake_gpu, native_cpu=False, dtype=torch.bfloat16) == "cuda"  # no op named
    assert _backend.resolve("cuda", fake_gpu, native_cpu=False, op="masked_conv2d", dtype=torch.bfloat16) == "cuda"
    monkeypatch.setenv("GM_BACKEND", "cuda")
    assert auto(torch.bfloat16) == "cuda"  # the environment's choice outranks the record
    monkeypatch.delenv("GM_BACKEND")
    monkeypatch.setenv("GM_BACKEND_PICKS", "0")
    assert auto(torch.bfloat16) == "cuda"  # records switched off


def test_auto_prefers_cuda_when_triton_is_missing(fake_gpu, monkeypatch):
    monkeypatch.setattr(_backend, "triton_status", lambda: (False, "not installed"))
    assert _backend.resolve(None, fake_gpu, native_cpu=False, op="masked_conv2d", dtype=torch.bfloat16) == "cuda"
    assert _backend.resolve(None, fake_gpu, native_cpu=False, prefer="triton") == "cuda"


def test_backend_picks_read_the_shipped_tables():
    """The tables folder is found without importing gm.kernels; a GPU without a table has no picks."""
    folder = _backend._tuned_dir()
    assert folder is not None and (folder / "nvidia-h200.json").is_file()
    assert isinstance(_backend.backend_picks("nvidia-h200"), dict)
    assert _backend.backend_picks("no-such-gpu") == {}
    assert _backend.device_slug("NVIDIA H200") == "nvidia-h200"
