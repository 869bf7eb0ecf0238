"""`gm train | eval | sample | download` end to end on tiny presets: outputs, bit-exact resume, torchrun with two
CPU processes (gloo) against one process, and bad input (clear message, exit 2, nothing overwritten)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gm.cli import main
from tests._util import train_eager_and_compiled

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--batch-size", "8", "--log-every", "1", "--n-samples", "0", "--device", "cpu"]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def test_train_eval_sample_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "pixelcnn", "--preset", "tiny", "--data", "synthetic:64:10", "--steps", "4",
               "--batch-size", "8", "--eval-every", "2", "--sample-every", "2", "--n-samples", "4", "--log-every", "2",
               "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "test NLL" in text and str(out / "checkpoint.pt") in text and "img/s" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "test_nll" in r] == [2, 4]
    assert records[-1]["summary"]["steps"] == 4
    for png in ("samples.png", "samples_step0000002.png", "samples_step0000004.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = _state(out)
    assert ckpt["step"] == 4 and ckpt["data_position"]["batch_in_epoch"] == 4 and "optimizer_state" in ckpt

    assert main(["eval", str(out / "checkpoint.pt"), "--device", "cpu"]) == 0
    assert "test NLL" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "2", "--size", "6", "--out", str(grid)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    # the full method draws the same images (a float32 model: equal unless a draw lands within rounding of a
    # boundary, which none does for this seed)
    full = tmp_path / "full.png"
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "2", "--size", "6", "--out", str(full),
                 "--method", "full"]) == 0  # fmt: skip
    assert full.read_bytes() == grid.read_bytes()
    # image completion from the top rows of test images, end to end (that the rows are kept and the rest follows the
    # model: tests/models/test_incremental.py)
    done = tmp_path / "completed.png"
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "3", "--complete", "4", "--data", "synthetic:64:10",
                 "--out", str(done)]) == 0  # fmt: skip
    assert done.read_bytes()[:4] == b"\x89PNG" and "completions of test images (top 4 rows given)" in capsys.readouterr().out


def _bf16_train_eval_sample(model, device, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", model, "--preset", "tiny", "--steps", "4", "--batch-size", "16", "--precision", "bf16",
               "--eval-every", "4", "--sample-every", "0", "--n-samples", "4", "--log-every", "1", "--out", str(out),
               "--device", device])  # fmt: skip
    assert rc == 0
    losses = _losses(out)
    assert len(losses) == 4 and all(map(math.isfinite, losses)), losses
    assert "test NLL" in capsys.readouterr().out
    assert main(["eval", str(out / "checkpoint.pt"), "--device", device]) == 0
    grid = tmp_path / "grid.png"
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "2", "--size", "6", "--out", str(grid),
                 "--device", device]) == 0  # fmt: skip
    assert grid.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("model", ["pixelcnn", "rowlstm", "diagonal_bilstm"])
def test_bf16_train_eval_sample(model, tmp_path, capsys):
    """--precision bf16 on the CPU's backends: each model trains a few steps with finite losses, evaluates and
    samples (the diagonal scan's cpu backend once rejected bfloat16 gates here)."""
    _bf16_train_eval_sample(model, "cpu", tmp_path, capsys)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["diagonal_bilstm"])
def test_gpu_train_eval_sample(model, tmp_path, capsys):
    """The tool on the GPU (auto backends, bf16 compute, test NLL, samples, checkpoint), on the model with the most
    kinds of kernel (the models' kernels are checked one by one in tests/models: a budget choice)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _bf16_train_eval_sample(model, "cuda", tmp_path, capsys)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = ["pixelcnn", *FAST, "--binarize", "dynamic", "--eval-every", "0", "--ckpt-every", "3", "--seed", "7"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert main(["train", *common, "--steps", "6", "--out", str(straight)]) == 0
    assert main(["train", *common, "--steps", "3", "--out", str(resumed)]) == 0
    assert main(["train", "pixelcnn", "--preset", "tiny", "--steps", "6", "--out", str(resumed), "--resume",
                 "--log-every", "1", "--n-samples", "0", "--eval-every", "0", "--device", "cpu"]) == 0  # fmt: skip
    a, b = _state(straight), _state(resumed)
    assert a["step"] == b["step"] == 6
    for name, t in a["model_state"].items():
        assert torch.equal(t, b["model_state"][name]), name
    assert _losses(straight) == _losses(resumed)


@pytest.mark.parametrize(("model", "size"), [("pixelcnn", 8), ("diagonal_bilstm", 8), ("iaf_vae", 28)])
def test_compile_trains_like_eager(model, size, tmp_path):
    """`gm train --compile` (torch.compile of the model, inductor on the CPU here) runs the same training as eager:
    the same losses to float32 rounding, step by step (gm's ops are custom ops inside the compiled graph). The VAE
    draws its posterior noise in the graph: inductor's own generator would draw other numbers, so it is told to use
    torch's (fallback_random) for the comparison."""
    common = [model, *FAST, "--data", f"synthetic:32:{size}", "--steps", "3", "--eval-every", "0", "--seed", "3"]
    eager, compiled = train_eager_and_compiled(main, common, tmp_path)
    want, got = _losses(eager), _losses(compiled)
    assert len(got) == len(want) == 3
    assert all(abs(g - w) <= 1e-4 * abs(w) for g, w in zip(got, want, strict=True)), (got, want)


def _run_quiet(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, **kw)


def test_torchrun_two_processes_match_one(tmp_path):
    args = ["pixelcnn", *FAST, "--data", "synthetic:64:8", "--steps", "3", "--eval-every", "0"]
    one = _run_quiet([sys.executable, "-m", "gm", "train", *args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _run_quiet([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gm",
                      "train", *args, "--out", str(tmp_path / "two")])  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "processes=2" in two.stdout
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (l1, l2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    assert _state(tmp_path / "two")["step"] == 3


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "pixelcnn", *FAST, "--steps", "1", "--eval-every", "0", "--out", str(out)]) == 0
    return out


def _bad(argv, capsys, match):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err


def test_bad_input_exits_with_a_message_and_overwrites_nothing(finished_run, tmp_path, capsys):
    ckpt = finished_run / "checkpoint.pt"
    before = ckpt.read_bytes()
    _bad(["train", "pixelgan", "--out", str(tmp_path / "x")], capsys, "unknown model 'pixelgan'")
    _bad(["train", "pixelcnn", "--preset", "imagenet", "--out", str(tmp_path / "x")], capsys, "unknown preset")
    _bad(["train", "pixelcnn", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capsys,
         "does not exist")  # fmt: skip
    assert not (tmp_path / "x").exists()
    _bad(["train", "pixelcnn", *FAST, "--steps", "2", "--out", str(finished_run)], capsys, "pass --resume")
    _bad(["train", "diagonal_bilstm", *FAST, "--steps", "2", "--out", str(finished_run), "--resume"], capsys,
         "holds model 'pixelcnn'")  # fmt: skip
    _bad(["train", "pixelcnn", *FAST, "--steps", "2", "--out", str(finished_run), "--resume", "--seed", "5"], capsys,
         "differs from the checkpoint")  # fmt: skip
    assert ckpt.read_bytes() == before

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(before[: len(before) // 2])
    _bad(["eval", str(corrupt)], capsys, "corrupt")
    grid = tmp_path / "keep.png"
    grid.write_bytes(b"mine")
    _bad(["sample", str(corrupt), "--out", str(grid)], capsys, "corrupt")
    assert grid.read_bytes() == b"mine"
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    _bad(["eval", str(foreign)], capsys, "not a gm checkpoint")
    _bad(["eval", str(tmp_path / "missing.pt")], capsys, "does not exist")
    _bad(["sample", str(ckpt), "--out", str(grid), "--data", "digits"], capsys, "give --complete ROWS too")
    _bad(["sample", str(ckpt), "--out", str(grid), "--complete", "99"], capsys, "--complete 99: the images have")
    _bad(["sample", str(ckpt), "--out", str(grid), "--complete", "2", "--size", "5"], capsys, "--size 5: --complete")
    _bad(["sample", str(ckpt), "--out", str(grid), "--complete", "2", "--n", "100000"], capsys, "test images to")
    _bad(["sample", str(ckpt), "--out", str(grid), "--complete", "2", "--data", str(tmp_path / "nowhere")], capsys,
         "does not exist")  # fmt: skip
    assert grid.read_bytes() == b"mine"
    _bad(["download", "mnist", str(tmp_path / "d"), "--base-url", "http://127.0.0.1:1/", "--timeout", "5"], capsys,
         "Are you offline")  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "pixelcnn", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["train", "pixelcnn", "--lr", "0"], "argument --lr: expected a number > 0, got '0'"),
    (["train", "pixelcnn", "--lr", "nan"], "argument --lr: expected a number > 0, got 'nan'"),
    (["train", "pixelcnn", "--steps", "-3"], "argument --steps: expected an integer >= 1, got '-3'"),
    (["train", "pixelcnn", "--epochs", "inf"], "argument --epochs: expected a number > 0, got 'inf'"),
    (["train", "pixelcnn", "--log-every", "0"], "argument --log-every: expected an integer >= 1, got '0'"),
    (["train", "pixelcnn", "--eval-every", "-1"], "argument --eval-every: expected an integer >= 0, got '-1'"),
    (["train", "pixelcnn", "--n-samples", "two"], "argument --n-samples: expected an integer >= 0, got 'two'"),
    (["eval", "x.pt", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["sample", "x.pt", "--n", "0"], "argument --n: expected an integer >= 1, got '0'"),
    (["download", "mnist", "d", "--timeout", "-5"], "argument --timeout: expected a number > 0, got '-5'"),
])  # fmt: skip
def test_bad_numbers_are_usage_errors(argv, message, tmp_path, capsys):
    """Sizes, counts and rates that cannot run are refused while the command line is parsed (exit status 2, nothing
    written): --batch-size 0 and --lr 0 used to fall back to the defaults silently, --log-every 0 to divide by 0."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "x")] if argv[0] == "train" else argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_config_refuses_what_cannot_run():
    """The same checks for callers of gm.training.train: TrainConfig names the setting (TrainError)."""
    from gm import training  # noqa: PLC0415

    for kwargs, message in (({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
                            ({"lr": -1e-3}, "lr must be a number > 0, got -0.001"),
                            ({"steps": 0}, "steps must be an integer >= 1, got 0"),
                            ({"ckpt_every": 2.5}, "ckpt_every must be an integer >= 0, got 2.5")):  # fmt: skip
        with pytest.raises(training.TrainError, match=message):
            training.TrainConfig(**kwargs)


def test_cuda_graphs_refuses_what_it_cannot_capture(tmp_path, capsys):
    """--cuda-graphs needs a CUDA device and a capturable step: a clear message and exit 2 otherwise, nothing
    written."""
    out = tmp_path / "g"
    _bad(["train", "pixelcnn", *FAST, "--steps", "1", "--cuda-graphs", "--out", str(out)], capsys,
         "--cuda-graphs needs a CUDA device, got cpu")  # fmt: skip
    assert not out.exists()
    if torch.cuda.is_available():
        _bad(["train", "pixelcnn", "--preset", "tiny", "--steps", "1", "--device", "cuda", "--cuda-graphs",
              "--precision", "fp16", "--out", str(out)], capsys, "not capturable")  # fmt: skip
        _bad(["train", "pixelcnn", "--preset", "tiny", "--steps", "1", "--device", "cuda", "--cuda-graphs",
              "--compile", "--out", str(out)], capsys, "exclusive")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["pixelcnn", "diagonal_bilstm"])
def test_gpu_cuda_graphs_train_like_eager(model, tmp_path):
    """Training steps replayed from a CUDA graph (after 3 eager warm-up steps) follow the eager run's losses and end
    at its weights, and the graphed run resumes from its checkpoint."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    common = [model, "--preset", "tiny", "--batch-size", "8", "--log-every", "1", "--n-samples", "0", "--device",
              "cuda", "--eval-every", "0", "--seed", "3", "--steps", "8"]  # fmt: skip
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert main(["train", *common, "--out", str(eager)]) == 0
    assert main(["train", *common, "--cuda-graphs", "--out", str(graphed)]) == 0
    le, lg = _losses(eager), _losses(graphed)
    assert len(le) == len(lg) == 8
    for a, b in zip(le, lg, strict=True):
        assert abs(a - b) <= 1e-3 * abs(a), (le, lg)
    a, b = _state(eager)["model_state"], _state(graphed)["model_state"]
    for name, t in a.items():
        torch.testing.assert_close(b[name], t, rtol=1e-3, atol=1e-4, msg=name)
    assert main(["train", model, "--preset", "tiny", "--steps", "10", "--out", str(graphed), "--resume",
                 "--cuda-graphs", "--log-every", "1", "--n-samples", "0", "--eval-every", "0", "--device",
                 "cuda"]) == 0  # fmt: skip
    assert _state(graphed)["step"] == 10 and len(_losses(graphed)) == 10
