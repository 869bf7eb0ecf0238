"""Every Triton kernel compiles for a Hopper GPU (sm_90), without one: python -m bench.aot in its own process
(it must import triton without the interpreter), at the benchmark's quick shapes plus its small direct op calls in
float32, bfloat16 and float16, first autotune config of each kernel."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._util import linked_source_tree

ROOT = Path(__file__).resolve().parents[1]


def _kernel_names() -> set[str]:
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    return names


def test_kernel_list_is_found():
    assert {"masked_conv_fwd_kernel", "row_lstm_fwd_kernel", "minibatch_bwd_kernel"} <= _kernel_names()


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    report = tmp_path / "aot.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "bench.aot", "--quick", "--first-config", "--arch", "90", "--out", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert res.returncode == 0, f"bench.aot failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    text = report.read_text()
    compiled = set(re.findall(r"^\| (\w+_kernel) \|", text, flags=re.M))
    missing = _kernel_names() - compiled
    assert not missing, f"kernels never launched by bench.aot (add them to its extras): {sorted(missing)}"
    rows = [line for line in text.splitlines() if line.startswith("| ") and "_kernel" in line]
    assert rows and all("compile error" not in r for r in rows)
    assert any("wgmma" in r for r in rows if "bfloat16" in r), "no bf16 dot became wgmma on sm_90"


def test_every_triton_kernel_compiles_with_the_gpu_machines_triton(tmp_path):
    """The same compile under the Triton of the GPU machine (3.6; `make aot-venv` builds that environment and
    .ci/run points GM_AOT_PYTHON at it): Triton 3.6 aborted on float64 register-operand dots that 3.9 compiles."""
    python = os.environ.get("GM_AOT_PYTHON")
    if not python:
        pytest.skip("GM_AOT_PYTHON is not set (make aot-venv; .ci/run sets it)")
    src = linked_source_tree(tmp_path)
    report = tmp_path / "aot.md"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = str(src)
    res = subprocess.run(
        [python, "-m", "bench.aot", "--quick", "--first-config", "--arch", "90", "--out", str(report)],
        cwd=src, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert res.returncode == 0, f"bench.aot failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    text = report.read_text()
    assert text.startswith(f"Triton {os.environ.get('GM_AOT_TRITON', '3.6')}"), text.splitlines()[0]
    compiled = set(re.findall(r"^\| (\w+_kernel) \|", text, flags=re.M))
    assert not _kernel_names() - compiled


def test_picks_choice_is_what_the_picks_mode_launches(monkeypatch):
    """bench.aot --picks SLUG compiles, per autotuned launch, the table's pick for Triton's key of the launch (the key
    arguments' values, then the tensors' dtypes, as str) when the call's pruned configs hold it, else the first of
    them: what GM_TRITON_AUTOTUNE=picks launches on that GPU."""
    import types  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    from gm.kernels import _common  # noqa: PLC0415
    from gm.kernels._common import picks_choice  # noqa: PLC0415

    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (32, 64, 128)]
    table = {"picks": {"k": [{"key": ["1024", "torch.float32"], "config": str(configs[2])}]}}
    monkeypatch.setattr(_common, "tuned_table", lambda slug: table if slug == "gpu" else {})
    x = torch.empty(3)
    tuner = types.SimpleNamespace(nargs={"x": x, "N": 1024}, arg_names=["x", "N"], keys=["N"],
                                  base_fn=types.SimpleNamespace(__name__="k"), configs=configs)  # fmt: skip
    assert picks_choice(tuner, configs, {}, "gpu") == [configs[2]]
    assert picks_choice(tuner, configs[:2], {}, "gpu") == [configs[0]]  # the pick pruned away: the first kept
    assert picks_choice(tuner, configs, {}, "other") == [configs[0]]  # no table: the first
    tuner.nargs["N"] = 2048
    assert picks_choice(tuner, configs, {}, "gpu") == [configs[0]]  # another key: the first
