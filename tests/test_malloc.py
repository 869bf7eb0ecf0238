"""gm._malloc: the CLI's glibc malloc settings."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import gm._malloc as gmalloc
from gm.cli import main

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _in_fresh_process(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("GM_MALLOC_TUNE", None)
    if env_value is not None:
        env["GM_MALLOC_TUNE"] = env_value
    code = "import gm._malloc as m; print(m.keep_freed_memory(), m.keep_freed_memory())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_sets_the_thresholds_once_and_can_be_switched_off():
    assert _in_fresh_process(None).split() == ["True", "True"]
    assert _in_fresh_process("0").split() == ["False", "False"]


def test_train_eval_and_sample_apply_it_and_other_commands_do_not(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gmalloc, "keep_freed_memory", lambda: calls.append(1) or True)
    out = tmp_path / "run"
    assert main(["train", "pixelcnn", "--preset", "tiny", "--data", "synthetic:16:2", "--steps", "1", "--batch-size",
                 "4", "--n-samples", "0", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert main(["eval", str(out / "checkpoint.pt"), "--device", "cpu"]) == 0
    grid = str(tmp_path / "g.png")
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "1", "--size", "3", "--out", grid]) == 0
    assert len(calls) == 3
    assert main(["info"]) == 0
    assert len(calls) == 3
