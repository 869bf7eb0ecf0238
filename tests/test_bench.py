"""python -m bench end to end on the CPU (one quick case): rows saved as JSON lines with the run's environment,
the --profile breakdown beside them, and bench.report renders the README section from that folder."""

from __future__ import annotations

import json

import pytest
import torch

import gm._malloc
from bench import harness, report
from bench.__main__ import main


def test_bench_quick_profile_and_report(tmp_path, capsys, monkeypatch):
    # Rows slower than SLOW_MS are not profiled; gm[cpu] takes ~10 ms here, but several times that on a loaded
    # 2-core machine: this test checks the files and the report, not the cut-off.
    monkeypatch.setattr(harness, "SLOW_MS", float("inf"))
    malloc_calls = []
    monkeypatch.setattr(gm._malloc, "keep_freed_memory", lambda: malloc_calls.append(1) or True)
    assert main(["--quick", "--ops", "minibatch", "--no-compile", "--profile", "--out", str(tmp_path),
                 "--warmup-ms", "1", "--rep-ms", "5"]) == 0  # fmt: skip
    assert malloc_calls == [1]  # a CPU run times the steady state of a training loop (gm._malloc)
    (rows_file,) = tmp_path.glob("*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    impls = {r["impl"] for r in rows}
    assert "gm[cpu]" in impls and "naive (N×N×B×C)" in impls
    assert all(r["error"] is None and r["fwdbwd_ms"] > 0 and "profile" not in r for r in rows)
    assert all(r["triton_autotune"] in (True, False, "picks") and r["commit"] for r in rows)
    gm_row = next(r for r in rows if r["impl"] == "gm[cpu]")
    assert gm_row["speedup_fwdbwd"] > 1  # against the naive N x N x B x C baseline, even at N=256
    profile = (tmp_path / (rows_file.stem + "_profile.md")).read_text()
    assert "gm[cpu]: wall" in profile and "minibatch" in profile and "host (self CPU time):" in profile
    assert "gm[cpu]: wall" in capsys.readouterr().out
    section = report.render(report.load_rows(tmp_path))
    assert "| minibatch_discrimination |" in section and "gm[cpu]" in section


def test_readme_results_section_is_current():
    """README's results section is what bench/results/*.jsonl give (python -m bench.report rewrites it)."""
    assert report.main(["--check"]) == 0


def test_report_shows_the_device_kernel_time_when_profiled():
    """GPU runs with --profile save each row's device-kernel time per fwd+bwd; the report gives it a column (every
    table line keeps the header's cell count, error rows too), and leaves the column out where no row has it."""
    base = {"device": "gpu", "torch": "t", "triton": "3", "commit": "c", "date": "d", "op": "op", "case": "k",
            "dtype": "float32", "fwd_ms": 1.0, "fwdbwd_ms": 3.0, "speedup_fwdbwd": 1.0, "tflops_fwd": None}  # fmt: skip
    rows = [{**base, "impl": "gm[cuda]", "kernels_fwdbwd_ms": 0.25}, {**base, "impl": "reference", "error": "OOM"},
            {**base, "impl": "F", "kernels_fwdbwd_ms": None}]  # fmt: skip
    lines = [line for line in report.render(rows).splitlines() if line.startswith("|")]
    assert "device kernels ms" in lines[0] and "| 0.250 |" in lines[2]
    assert len({line.count("|") for line in lines}) == 1
    plain = report.render([{**r, "kernels_fwdbwd_ms": None} for r in rows])
    assert "device kernels" not in plain


def test_report_names_each_run_a_table_draws_on():
    """Rows of one device from several runs (each case from its newest): a numbered list of the runs with their
    ops, and a run column pointing each row at its run; one run keeps the plain header and no column."""
    base = {"device": "gpu", "torch": "t", "triton": "3", "case": "k", "dtype": "float32", "impl": "gm[cuda]",
            "fwd_ms": 1.0, "fwdbwd_ms": 3.0, "speedup_fwdbwd": 1.0, "tflops_fwd": None}  # fmt: skip
    rows = [{**base, "op": "a", "commit": "old", "date": "d1", "triton_autotune": False},
            {**base, "op": "b", "commit": "new", "date": "d2", "triton_autotune": True},
            {**base, "op": "b", "impl": "ref", "commit": "new", "date": "d2", "triton_autotune": True,
             "error": "OOM"}]  # fmt: skip
    text = report.render(rows)
    assert "1. t" in text and "commit old, d1, Triton kernels on their first config (autotune off): a" in text
    assert "2. t" in text and "commit new, d2: b" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert "| run |" in table[0] and len({line.count("|") for line in table}) == 1
    assert table[2].startswith("| a |") and "| 1 |" in table[2] and "| 2 |" in table[3] and "| 2 |" in table[4]
    single = report.render(rows[1:])
    assert "| run |" not in single and "commit new, d2)" in single


def test_report_shows_the_host_issue_time_where_measured():
    """GPU runs time the host's issue of each fwd+bwd (harness._host_ms); the report gives it a column where some
    row has it, and none otherwise."""
    base = {"device": "gpu", "torch": "t", "triton": "3", "commit": "c", "date": "d", "op": "op", "case": "k",
            "dtype": "float32", "fwd_ms": 1.0, "fwdbwd_ms": 3.0, "speedup_fwdbwd": 1.0, "tflops_fwd": None}  # fmt: skip
    rows = [{**base, "impl": "gm[cuda]", "host_fwdbwd_ms": 2.5}, {**base, "impl": "reference", "error": "OOM"}]
    lines = [line for line in report.render(rows).splitlines() if line.startswith("|")]
    assert "fwd+bwd host ms" in lines[0] and "| 2.500 |" in lines[2] and len({x.count("|") for x in lines}) == 1
    assert "host ms" not in report.render([{**base, "impl": "x"}])


def test_host_issue_time_waits_for_nothing_but_the_call(monkeypatch):
    """harness._host_ms: each call starts after a synchronize and is timed without one; the median is taken."""
    calls = []
    monkeypatch.setattr(harness.torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    ms = harness._host_ms(lambda: calls.append("run"), "cuda", calls=3)
    assert calls == ["sync", "run"] * 3 + ["sync"] and 0 <= ms < 50


def test_report_shows_cuda_graph_times_and_failed_captures():
    base = {"device": "gpu", "torch": "t", "triton": "3", "commit": "c", "date": "d", "op": "op", "case": "k",
            "dtype": "float32", "fwd_ms": 1.0, "fwdbwd_ms": 3.0, "speedup_fwdbwd": 1.0, "tflops_fwd": None}  # fmt: skip
    rows = [{**base, "impl": "gm[cuda]", "graph_fwdbwd_ms": 0.5}, {**base, "impl": "F", "graph_error": "boom"},
            {**base, "impl": "reference", "error": "OOM"}]  # fmt: skip
    lines = [line for line in report.render(rows).splitlines() if line.startswith("|")]
    assert "fwd+bwd CUDA graph ms" in lines[0] and "| 0.500 |" in lines[2] and "| capture failed |" in lines[3]
    assert len({line.count("|") for line in lines}) == 1
    assert "CUDA graph" not in report.render([{**base, "impl": "x"}])
    both = [{**base, "impl": "gm[cuda]", "graph_fwdbwd_ms": 0.5, "speedup_graph": 4.0},
            {**base, "impl": "reference", "graph_fwdbwd_ms": 2.0, "speedup_graph": 1.0}]  # fmt: skip
    lines = [line for line in report.render(both).splitlines() if line.startswith("|")]
    assert "speedup, CUDA graphs" in lines[0] and "| 4.00x |" in lines[2] and len({x.count("|") for x in lines}) == 1


def test_host_cost_tool_runs_every_module(capsys):
    """python -m bench.host: gm's per-call host cost with the CUDA kernels stubbed, one row per module."""
    from bench import host  # noqa: PLC0415

    assert host.main(["--calls", "3", "--models"]) == 0
    out = capsys.readouterr().out
    for name in ("MaskedConv2d", "RowLSTM", "DiagonalBiLSTM", "MinibatchDiscrimination", "IAFStep", "nn.Linear",
                 "model pixelcnn (", "model pixelcnn unfused", "model rowlstm", "model diagonal_bilstm"):
        assert f"| {name}" in out


def test_host_cost_proxies_time_the_baselines_beside_gm(capsys):
    """--proxies: the IAF step's and masked_linear's eager baselines against gm's ops, with their ratio."""
    from bench import host  # noqa: PLC0415

    assert host.main(["--calls", "3", "--proxies"]) == 0
    out = capsys.readouterr().out
    assert "| IAF step (MADE, gated) |" in out and "| masked_linear (MADE mask) |" in out and "x |" in out


def test_host_cost_breakdown_lists_the_pieces_and_the_floor(capsys):
    """--breakdown: MaskedConv2d's cuda path piece by piece, and the floor (an autograd.Function, 8 stub launches)."""
    from bench import host  # noqa: PLC0415

    assert host.main(["--calls", "2", "--breakdown"]) == 0
    out = capsys.readouterr().out
    for piece in ("| module fwd+bwd |", "weight pack (gather)", "backward launcher", "| floor: autograd.Function"):
        assert piece in out


def test_host_cost_bindings_builds_the_replica_and_times_each_call_style(capsys):
    """--bindings: bench/pybind_call.cpp builds here (g++, pybind11) and each argument style of masked_conv's GEMM
    binding gets a row (no speed is asserted: the numbers are the tool's to report)."""
    from bench import host  # noqa: PLC0415

    assert host.main(["--calls", "5", "--bindings"]) == 0
    out = capsys.readouterr().out
    for style in ("two sequences, four keywords (before)", "two sequences, positional", "tap table, positional (now)",
                  "no arguments"):  # fmt: skip
        (row,) = [line for line in out.splitlines() if line.startswith(f"| {style} |")]
        assert float(row.split("|")[2]) > 0


def test_host_cost_profile_takes_a_prefix_and_names_the_choices(capsys):
    """--profile takes a module's name or a prefix naming one; anything else stops before timing, listing the names."""
    from bench import host  # noqa: PLC0415

    assert host._profile_name("maskedconv", list(host._MODULE_NAMES)) == "MaskedConv2d 3x3 B"
    with pytest.raises(SystemExit, match=r"--profile: got 'Masked'.*'MaskedLinear \(MADE mask\)'"):
        host.main(["--calls", "1", "--profile", "Masked"])
    assert "| module |" not in capsys.readouterr().out


def test_bench_backends_option_restricts_the_gm_rows(tmp_path):
    """--backends names the gm backends to time: one that is not on the device leaves no gm row, the baselines run."""
    assert main(["--quick", "--ops", "minibatch", "--no-compile", "--out", str(tmp_path), "--warmup-ms", "1",
                 "--rep-ms", "5", "--backends", "cuda"]) == 0  # fmt: skip
    (rows_file,) = tmp_path.glob("*.jsonl")
    impls = {json.loads(line)["impl"] for line in rows_file.read_text().splitlines()}
    assert not any(i.startswith("gm[") for i in impls) and "naive (N×N×B×C)" in impls


def test_bench_sampling_case_times_both_methods(tmp_path):
    """The sampling cases (forward only): the incremental method and the full one, the full one the baseline."""
    assert main(["--quick", "--ops", "sampling", "--out", str(tmp_path), "--warmup-ms", "1", "--rep-ms", "1"]) == 0
    (rows_file,) = tmp_path.glob("*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in ("sample:pixelcnn", "sample:diagonal_bilstm") for impl in ("incremental", "full")
    }
    for r in rows:
        assert r["error"] is None and r["fwd_ms"] > 0 and r["fwdbwd_ms"] is None
        assert r["speedup_fwd"] == 1.0 if r["impl"] == "full" else r["speedup_fwd"] > 0


def test_targets_check_the_best_gm_backend_against_each_comparator(tmp_path, capsys):
    """python -m bench.targets: per case the best gm backend against the issue's comparator, met or not, a missing
    comparator said as such, graph ratios where both rows have graph times, later files replacing earlier rows."""
    from bench import targets  # noqa: PLC0415

    def row(impl, ms, case="7x7 A N=128 C=256 32x32", dtype="bfloat16", op="masked_conv2d", **extra):
        return {"device": "NVIDIA H200", "op": op, "case": case, "dtype": dtype, "impl": impl, "fwdbwd_ms": ms,
                "fwd_ms": ms / 3 if ms else None, **extra}  # fmt: skip

    old = [row("gm[cuda]", 4.0), row("gm[triton]", 9.0), row("F.conv2d(masked w)", 4.5)]
    new = [row("gm[triton]", 2.9, graph_fwdbwd_ms=2.5, host_fwdbwd_ms=0.4),
           row("F.conv2d(masked w)", 4.5, graph_fwdbwd_ms=4.4, host_fwdbwd_ms=0.3),
           row("gm[cuda]", 1.0, case="3x3 B N=128 C=128 32x32", dtype="float32"),
           row("gm[cuda]", 1.4, op="minibatch_discrimination", case="N=4096 B=100 C=5", dtype="float32"),
           row("naive (N×N×B×C)", None, op="minibatch_discrimination", case="N=4096 B=100 C=5", dtype="float32",
               error="OutOfMemoryError")]  # fmt: skip
    files = []
    for i, rows in enumerate((old, new)):
        files.append(tmp_path / f"{i}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert targets.main([str(f) for f in files]) == 0
    out = capsys.readouterr().out
    conv = next(line for line in out.splitlines() if "bf16 fwd+bwd vs cuDNN" in line)
    assert "| gm[triton] | 2.900 | 4.500 | 1.55x | 1.5x | yes | 1.76x | 0.400 / 0.300 |" in conv  # newer triton row
    assert "F.conv2d(masked w): not measured" in out  # the float32 case has no cuDNN row
    assert "naive (N×N×B×C): OutOfMemoryError" in out
    assert "| N=4096 B=100 C=5 | NVIDIA H200 | gm[cuda] | 0.467 | 0.503 | 0.93x |" in out  # fwd vs the fp32 floor
    assert "issue 2: 1 of 1 measured target rows met (1 without a comparator row)" in out


def _gpu_check(tmp_path, env: dict) -> list[str]:
    """bench/gpu_check.sh run with a stub python that records each `-m bench...` call (the autotune mode it got and
    its arguments) and answers the device-name query with an H200's slug; the recorded lines."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    seen = tmp_path / "seen.txt"
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\n"
                    f'case "$2" in bench*) echo "$GM_TRITON_AUTOTUNE $*" >> {seen};; esac\n'
                    '[ "$1" = -c ] && echo nvidia-h200\n'
                    "exit 0\n")  # fmt: skip
    stub.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    base = {k: v for k, v in os.environ.items() if k not in ("GM_TRITON_AUTOTUNE", "BENCH_AUTOTUNE")}
    run = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], cwd=root, capture_output=True, text=True,
                         env={**base, **env, "PYTHON": str(stub), "OUT": str(tmp_path / "out"), "WARM_JOBS": "2"},
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return sorted(seen.read_text().splitlines())


@pytest.mark.parametrize(("env", "expected"), [({}, "1"), ({"GM_TRITON_AUTOTUNE": "picks"}, "picks"),
                                               ({"GM_TRITON_AUTOTUNE": "picks", "BENCH_AUTOTUNE": "0"}, "0")])  # fmt: skip
def test_gpu_check_bench_stage_keeps_the_callers_autotune_mode(tmp_path, env, expected):
    """bench/gpu_check.sh's bench stage runs `python -m bench` with BENCH_AUTOTUNE, else the caller's
    GM_TRITON_AUTOTUNE, else 1 (session 10 planned GM_TRITON_AUTOTUNE=picks for a call: bench/NOTES.md)."""
    (line,) = _gpu_check(tmp_path, {**env, "STAGES": "bench", "BENCH_OPS": "minibatch"})
    assert line.split()[0] == expected and "--ops minibatch" in line


@pytest.mark.parametrize(("mode", "aot_args", "models"), [("1", "", False), ("0", "--first-config", True),
                                                          ("picks", "--picks nvidia-h200", True)])  # fmt: skip
def test_gpu_check_warms_what_the_bench_will_launch(tmp_path, mode, aot_args, models):
    """The warm stage compiles what the bench stage's mode launches: every config when autotuning (not the models
    cases: thousands of variants), the first suitable config with autotuning off, the shipped pick of the GPU (or
    the first suitable) with picks; one bench.aot process per shard."""
    lines = _gpu_check(tmp_path, {"STAGES": "warm,bench", "BENCH_AUTOTUNE": mode, "BENCH_OPS": "row_lstm,models"})
    warm = [line for line in lines if "bench.aot" in line]
    assert len(warm) == 2 and all(f"--shard {k}/2" in line for k, line in enumerate(warm))
    ops = "row_lstm,models" if models else "row_lstm"
    assert all(f"--ops {ops} {aot_args}".replace("  ", " ") in line for line in warm), warm


def test_compile_ops_keeps_the_compile_baselines_of_the_named_modules_only(monkeypatch):
    """--no-compile --compile-ops iaf: the torch.compile baselines run for iaf's cases and no other's; an unknown
    name stops before anything runs, naming the known ones."""
    seen = []
    monkeypatch.setattr(harness, "run_case", lambda case, *a: seen.append((case.op, harness.WITH_COMPILE)) or [])
    assert main(["--quick", "--ops", "minibatch,iaf", "--no-compile", "--compile-ops", "iaf", "--no-save"]) == 0
    # bench/cases/iaf.py holds the iaf_step and masked_linear cases, minibatch.py the minibatch_discrimination ones
    assert {op for op, with_compile in seen if with_compile} == {"iaf_step", "masked_linear"}
    assert {op for op, with_compile in seen if not with_compile} == {"minibatch_discrimination"}
    seen.clear()
    with pytest.raises(SystemExit):
        main(["--quick", "--ops", "iaf", "--no-compile", "--compile-ops", "iafs", "--no-save"])
    assert seen == []


def test_gpu_check_warms_the_compile_baselines_the_bench_will_time(tmp_path):
    """With compile baselines selected (--compile-ops, or no --no-compile), the warm stage runs COMPILE_WARM_JOBS
    `bench --warm-compile` shards with the bench stage's ops and arguments, gm's autotuning off; the default
    arguments (--no-compile) warm none."""
    args = "--no-compile --compile-ops iaf --graphs"
    lines = _gpu_check(tmp_path, {"STAGES": "warm", "BENCH_OPS": "iaf,minibatch", "BENCH_ARGS": args,
                                  "COMPILE_WARM_JOBS": "2"})  # fmt: skip
    warm = [line for line in lines if "--warm-compile" in line]
    assert len(warm) == 2 and all(f"--shard {k}/2" in line for k, line in enumerate(warm)), lines
    assert all(line.split()[0] == "0" and f"--ops iaf,minibatch {args}" in line for line in warm), warm
    (tmp_path / "default").mkdir()
    default = _gpu_check(tmp_path / "default", {"STAGES": "warm", "BENCH_OPS": "iaf"})
    assert default and not [line for line in default if "--warm-compile" in line]


def test_warm_compile_runs_each_selected_compile_baseline_once_across_shards(monkeypatch, capsys):
    """--warm-compile times nothing and runs the "+compile" baselines that the same arguments would time, each in
    exactly one of the shards; --compile-ops selects the modules as it does for a timing run; a bad --shard stops."""
    monkeypatch.setattr(harness, "run_case", lambda *a: pytest.fail("--warm-compile timed a case"))
    seen = []
    monkeypatch.setattr(harness, "warm", lambda case, fn, device: seen.append((case.op, case.name, fn)))
    args = ["--warm-compile", "--quick", "--ops", "models,minibatch", "--no-compile", "--compile-ops", "models"]
    for k in range(3):
        assert main([*args, "--shard", f"{k}/3"]) == 0
    from bench.cases import models  # noqa: PLC0415

    expected = [(c.op, c.name, fn) for c in models.cases(torch.device("cpu"), True)
                for label, fn in c.impls.items() if "compile" in label]  # fmt: skip
    assert len(expected) >= 2 and len(seen) == len(expected)
    assert {(op, name) for op, name, _ in seen} == {(op, name) for op, name, _ in expected}
    assert capsys.readouterr().out.count("warm-compile [model:") == len(expected)
    seen.clear()
    assert main(["--warm-compile", "--quick", "--ops", "models", "--no-compile"]) == 0 and seen == []
    with pytest.raises(SystemExit):
        main([*args, "--shard", "3/3"])


def test_warm_fills_the_compile_cache_a_timing_run_reads(tmp_path, monkeypatch):
    """harness.warm runs a compiled baseline forward and forward+backward: a later compile of the same function in a
    fresh process would find both graphs in inductor's cache; here, the warmed function runs again without a
    recompile (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters  # noqa: PLC0415

    def ref(x, w):
        return torch.tanh(x @ w).sum(dim=1)

    fn = harness.compiled(ref)
    case = harness.Case(op="toy", name="toy", dtype=torch.float32,
                        make_inputs=lambda: {"x": torch.randn(4, 3, requires_grad=True),
                                             "w": torch.randn(3, 5, requires_grad=True)})  # fmt: skip
    counters.clear()
    harness.warm(case, fn, torch.device("cpu"))
    compiled_frames = counters["stats"]["unique_graphs"]
    assert compiled_frames >= 1
    harness.run_impl(case, "toy+compile", fn, torch.device("cpu"), 1.0, 2.0)
    assert counters["stats"]["unique_graphs"] == compiled_frames  # the timing run compiled nothing new
