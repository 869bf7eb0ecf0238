"""`pip install .` (a wheel, not the editable install the tests run on) ships what gm needs: the compiled gm._C,
the Triton kernels as gm.kernels with the shipped autotuner tables, gm.reference; and the installed package works
from elsewhere. Built from a copy of the tracked files with GM_CUDA=0 (the C++ CPU sources only: ~1 minute on 2
cores; CI's own `make test` build already compiles the CUDA sources)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_from_elsewhere(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the wheel is built from its tracked files)")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "GM_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.startswith("gm/_C.") and n.endswith(".so") for n in names)
    for needed in ("gm/kernels/masked_conv.py", "gm/kernels/_launch.py", "gm/kernels/tuned/nvidia-h200.json",
                   "gm/reference/masked_conv.py", "gm/ops/masked_conv.py", "gm/nn/relu_conv.py", "gm/cli.py"):
        assert needed in names, needed
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    check = (
        "import gm, gm.reference, torch, gm.kernels.tuned as t, importlib.resources as r\n"
        "assert gm.__file__.startswith(%r), gm.__file__\n"
        "x = torch.randn(2, 3, 5, 5); w = torch.randn(4, 3, 3, 3)\n"
        "y = gm.ops.masked_conv2d(x, w, mask='A', backend='cpu')\n"
        "ref = gm.reference.masked_conv2d(x, w, mask='A')\n"
        "assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()\n"
        "import gm._C\n"  # the compiled extension itself, and an op that runs on it (the C++ CPU kernels)
        "m = torch.randn(5, 3, 2)\n"
        "o = gm.ops.minibatch_discrimination(m, backend='cpu')\n"
        "assert torch.allclose(o, gm.reference.minibatch_discrimination(m), atol=1e-5)\n"
        "assert r.files(t).joinpath('nvidia-h200.json').is_file()\n"
        "print('ok')\n"
    ) % str(site)
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site)})  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
