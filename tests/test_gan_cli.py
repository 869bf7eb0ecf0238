"""`gm train | eval | sample` for the GANs end to end on tiny presets and synthetic data: outputs and checkpoint
format, bit-exact resume, the paper's settings as defaults, and the flags that do not apply (clear message, exit 2,
nothing written)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gm import training
from gm.cli import main
from tests._util import train_eager_and_compiled

DATA = ["--data", "synthetic:64:28"]
FAST = [*DATA, "--batch-size", "8", "--log-every", "1", "--n-samples", "0", "--device", "cpu"]
MODELS = [("improved_gan", "tiny-md"), ("dcgan", "tiny"), ("infogan", "tiny")]


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _state(run) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize(("model", "preset"), MODELS, ids=lambda v: v)
def test_train_eval_sample_end_to_end(model, preset, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", model, "--preset", preset, *DATA, "--steps", "4", "--batch-size", "8", "--eval-every", "2",
               "--sample-every", "2", "--n-samples", "4", "--log-every", "2", "--out", str(out),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "test error" in text and str(out / "checkpoint.pt") in text and "img/s" in text
    records = _records(out)
    assert [r["step"] for r in records if "test_metric" in r] == [2, 4]
    assert all(r["unit"] == "%" and 0 <= r["test_metric"] <= 100 for r in records if "test_metric" in r)
    losses = [r for r in records if "loss_d" in r]
    assert [r["step"] for r in losses] == [2, 4]
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) and r["images_per_s"] > 0 for r in losses)
    summary = records[-1]["summary"]
    assert summary["steps"] == 4 and summary["unit"] == "%" and summary["test_metric"] == records[-2]["test_metric"]
    assert {"final_loss", "final_loss_g", "train_images_per_s", "checkpoint", "samples", "metric"} <= set(summary)
    for png in ("samples.png", "samples_step0000002.png", "samples_step0000004.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = _state(out)
    assert ckpt["format"] == training.CHECKPOINT_FORMAT and ckpt["version"] == training.CHECKPOINT_VERSION
    assert {"model", "preset", "model_config", "train_config", "model_state", "step", "rng", "optimizer_d_state",
            "optimizer_g_state", "data_position"} <= set(ckpt)  # fmt: skip
    assert ckpt["model"] == model and ckpt["preset"] == preset and ckpt["step"] == 4
    assert ckpt["model_config"]["channels"] == 1 and ckpt["data_position"]["batch_in_epoch"] == 4
    assert training.load_checkpoint(out / "checkpoint.pt")["step"] == 4

    assert main(["eval", str(out / "checkpoint.pt"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"{summary['test_metric']:.2f} %" in printed and "over 6 images" in printed, printed
    grid = tmp_path / "grid.png"
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "3", "--out", str(grid), "--seed", "1"]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.png"
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "3", "--out", str(again), "--seed", "1"]) == 0
    assert again.read_bytes() == grid.read_bytes()
    assert main(["sample", str(out / "checkpoint.pt"), "--out", str(again), "--method", "full"]) == 2
    assert "only the PixelCNN and PixelRNN models sample pixel by pixel" in capsys.readouterr().err
    assert main(["sample", str(out / "checkpoint.pt"), "--out", str(again), "--complete", "3"]) == 2
    assert "only the PixelCNN and PixelRNN models complete images" in capsys.readouterr().err


@pytest.mark.parametrize(("model", "preset"), MODELS, ids=lambda v: v)
def test_resume_reproduces_the_uninterrupted_run(model, preset, tmp_path):
    common = [model, "--preset", preset, *FAST, "--eval-every", "2", "--ckpt-every", "3", "--seed", "7"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert main(["train", *common, "--steps", "6", "--out", str(straight)]) == 0
    assert main(["train", *common, "--steps", "3", "--out", str(resumed)]) == 0
    assert main(["train", model, "--preset", preset, "--steps", "6", "--out", str(resumed), "--resume",
                 "--log-every", "1", "--n-samples", "0", "--eval-every", "2", "--device", "cpu"]) == 0  # fmt: skip
    a, b = _state(straight), _state(resumed)
    assert a["step"] == b["step"] == 6
    for name, t in a["model_state"].items():
        assert torch.equal(t, b["model_state"][name]), name
    la, lb = (
        [(r["step"], r["loss_d"], r["loss_g"]) for r in _records(run) if "loss_d" in r] for run in (straight, resumed)
    )
    assert len(la) == 6 and la == lb


def test_the_papers_batch_and_learning_rates_unless_given(tmp_path):
    paper, given = tmp_path / "paper", tmp_path / "given"
    args = ["improved_gan", "--preset", "tiny", "--data", "synthetic:256:28", "--steps", "1", "--eval-every", "0",
            "--n-samples", "0", "--device", "cpu"]  # fmt: skip
    assert main(["train", *args, "--out", str(paper)]) == 0
    tc = _state(paper)["train_config"]
    assert tc["batch_size"] == 100 and tc["lr_d"] == tc["lr_g"] == 3e-3
    assert main(["train", *args, "--batch-size", "16", "--lr", "1e-4", "--out", str(given)]) == 0
    tc = _state(given)["train_config"]
    assert tc["batch_size"] == 16 and tc["lr_d"] == tc["lr_g"] == 1e-4
    opt = _state(given)["optimizer_g_state"]
    assert opt["param_groups"][0]["lr"] == 1e-4 and opt["param_groups"][0]["betas"] == (0.5, 0.999)


@pytest.mark.parametrize(("model", "preset"), [("improved_gan", "tiny-md"), ("infogan", "tiny")], ids=lambda v: v)
def test_compile_trains_like_eager(model, preset, tmp_path):
    """--compile (each update's loss a torch.compile graph; inductor on the CPU here): the eager run's losses step by
    step, to float32 rounding, with torch's generator for the latents and noise drawn inside the graphs
    (fallback_random: inductor's own would draw other numbers). The Improved GAN preset runs gm's minibatch op in
    the graph, InfoGAN its categorical code."""
    common = [model, "--preset", preset, *FAST, "--steps", "3", "--eval-every", "0", "--seed", "5"]
    eager, compiled = train_eager_and_compiled(main, common, tmp_path)
    want, got = _records(eager), _records(compiled)
    for key in ("loss_d", "loss_g"):
        a, b = [r[key] for r in want if key in r], [r[key] for r in got if key in r]
        assert len(a) == len(b) == 3
        assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b, strict=True)), (key, a, b)


@pytest.mark.parametrize(("flags", "message"), [
    (["--cuda-graphs"], "--cuda-graphs: dcgan is a GAN"),
    (["--precision", "bf16"], "--precision bf16: dcgan is a GAN, trained in fp32 only"),
    (["--precision", "fp16"], "--precision fp16"),
    (["--binarize", "threshold"], "--binarize: dcgan is a GAN"),
    (["--data", "synthetic:64:10"], "takes 28x28 images but --data synthetic:64:10 has 10x10"),
])  # fmt: skip
def test_flags_that_do_not_apply_are_refused(flags, message, tmp_path, capsys):
    out = tmp_path / "x"
    rc = main(["train", "dcgan", "--preset", "tiny", *DATA, "--steps", "1", "--device", "cpu", *flags,
               "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not out.exists()


def test_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "x"
    assert main(["train", "infogan", "--preset", "tiny", *DATA, "--steps", "1", "--out", str(out)]) == 2
    assert "WORLD_SIZE > 1" in capsys.readouterr().err and not out.exists()


def test_sample_refuses_another_size(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "dcgan", "--preset", "tiny", *FAST, "--steps", "1", "--eval-every", "0",
                 "--out", str(out)]) == 0  # fmt: skip
    grid = tmp_path / "grid.png"
    assert main(["sample", str(out / "checkpoint.pt"), "--size", "32", "--out", str(grid)]) == 2
    assert "makes 28x28 images" in capsys.readouterr().err and not grid.exists()
