"""gm.kernels._launch (fast(kernel)[grid](...)): the same launches as Triton's own path, with less host time.

Without a GPU: tests/fast_launch_check.py runs every gm Triton op through a stand-in Triton driver whose launcher
records its calls (kernels compiled for sm_90 by the installed Triton, and by the GPU machine's Triton 3.6 where
GM_AOT_PYTHON points at it), once through Triton's path and again from the fast path's table, and compares the calls.
On a GPU: the ops' results are bit-identical with the fast path on and off, and the fast path is taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._util import linked_source_tree

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")


def _check(python: str, cwd: Path) -> dict:
    """The check's report, run by `python` in `cwd` (the checkout or a linked_source_tree), which it imports from."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(cwd)
    res = subprocess.run([python, "tests/fast_launch_check.py", "--timing"], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert res.returncode == 0, f"fast_launch_check failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_report(report: dict) -> None:
    ops = report["ops"]
    assert set(ops) >= {"masked_conv2d", "row_lstm", "diagonal_lstm", "minibatch", "masked_linear", "iaf_step"}
    for label, r in ops.items():
        assert r["launches"] > 0, label
        assert r["equal"], f"{label}: the fast path launched differently from Triton's: {r.get('diff')}"
        assert r["triton_runs_when_fast"] == 0, f"{label}: a repeated launch went through Triton's path"
    align = report["alignment"]
    # a misaligned tensor gets Triton's misaligned kernel, never the aligned one; the aligned one is reused after
    assert align["aligned"] == align["aligned again"] and len(align["aligned"]) == 1
    assert set(align["misaligned"]).isdisjoint(align["aligned"]) and len(align["misaligned"]) == 1
    assert report["autotuner_equal"]
    timing = report["us_per_launch"]
    assert timing["fast"] < timing["triton"], timing  # the point of it (the real numbers: bench/NOTES.md)


def test_fast_launch_matches_triton():
    _assert_report(_check(sys.executable, ROOT))


def test_fast_launch_matches_triton_of_the_gpu_machine(tmp_path):
    """The same under Triton 3.6 (the GPU machine's), whose launch path the fast one stands in for there."""
    python = os.environ.get("GM_AOT_PYTHON")
    if not python:
        pytest.skip("GM_AOT_PYTHON is not set (make aot-venv; .ci/run sets it)")
    src = linked_source_tree(tmp_path)
    report = _check(python, src)
    assert report["triton"].startswith(os.environ.get("GM_AOT_TRITON", "3.6")), report["triton"]
    _assert_report(report)


def test_interpreted_fast_is_the_kernel():
    from gm.kernels import _launch, masked_conv  # noqa: PLC0415

    if not _launch.INTERPRETED:
        pytest.skip("runs under the interpreter (the suite's mode without a GPU)")
    assert _launch.fast(masked_conv.masked_conv_fwd_kernel) is masked_conv.masked_conv_fwd_kernel


@pytest.mark.gpu
def test_gpu_fast_launch_results_bit_identical():
    """Each op twice with the fast path on (the second call from its table) and once with it off: equal bits."""
    from gm import ops  # noqa: PLC0415
    from gm.kernels import _launch  # noqa: PLC0415
    from gm.nn.made import made_masks  # noqa: PLC0415

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(4, 16, 12, 10, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gates = torch.randn(3, 32, 9, 7, device=dev, requires_grad=True)
    w_row, w_diag = torch.randn(32, 8, 3, device=dev) * 0.3, torch.randn(32, 8, 2, device=dev) * 0.3
    m = torch.randn(33, 10, 5, device=dev, requires_grad=True)
    mask = made_masks(8, 64, 2)[1].to(dev)
    xl, wl = torch.randn(37, 64, device=dev, requires_grad=True), torch.randn(64, 64, device=dev, requires_grad=True)
    cases = {
        "masked_conv2d": (lambda: ops.masked_conv2d(x, w, mask="B", backend="triton"), (x, w)),
        "row_lstm": (lambda: ops.row_lstm(gates, w_row, backend="triton"), (gates,)),
        "diagonal_lstm": (lambda: ops.diagonal_lstm(gates, w_diag, backend="triton"), (gates,)),
        "minibatch": (lambda: ops.minibatch_discrimination(m, backend="triton"), (m,)),
        "masked_linear": (lambda: ops.masked_linear(xl, wl, mask, activation="elu", backend="triton"), (xl, wl)),
    }

    def run(fn, inputs):
        out = fn()
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        torch.cuda.synchronize()
        return [out.detach().clone(), *grads]

    try:
        for name, (fn, inputs) in cases.items():
            _launch.FAST_LAUNCH = False
            want = run(fn, inputs)
            _launch.FAST_LAUNCH = True
            run(fn, inputs)
            got = run(fn, inputs)
            for a, b in zip(want, got, strict=True):
                assert torch.equal(a, b), name
        assert any(w.entries for w in _launch._WRAPPERS.values()), "the fast path was never taken"
    finally:
        _launch.FAST_LAUNCH = os.environ.get("GM_TRITON_FAST_LAUNCH", "1") != "0"
