"""`gm train` for the GANs (gm.models.improved_gan, dcgan, infogan): the adversarial loop, and the evaluation and
sample grids that `gm eval` and `gm sample` share with it.

Each step: a batch of real images (grey levels / 255 in [0, 1], in gm.training's batch order), for the
semi-supervised model also a labelled batch drawn from a fixed balanced subset; one Adam step of the discriminator
on model.d_loss, then one of the generator on model.g_loss (its backward accumulates into G's parameters only).
Latent codes and noise layers draw from the device's RNG, which checkpoints hold: a resumed run follows the
uninterrupted one exactly. Files, checkpoints (same format as gm.training's, with "optimizer_d_state" and
"optimizer_g_state"), metrics (JSON lines), progress line and summary as gm.training's.

Settings: batch size and learning rates are the paper's (model.batch_size, model.lr_d, model.lr_g, Adam betas
model.betas) unless --batch-size / --lr are given (--lr sets both optimizers). The GANs train in fp32 in one process,
eager or with --compile (each update's loss compiled); --precision bf16/fp16, --cuda-graphs, --binarize and torchrun
(WORLD_SIZE > 1) are refused.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

import gm.models as gmmodels
from gm import training as tr
from gm.models.gan_common import GANBatch
from gm.models.improved_gan import balanced_subset

DATA_INIT_IMAGES = 500  # images for the data-dependent initialisation (the Improved GAN code's init batch)


def check_config(cfg: tr.TrainConfig, given=frozenset()) -> None:
    """TrainError for the settings the GAN loop does not support (called before anything is written)."""
    model = f"{cfg.model} is a GAN"
    if cfg.cuda_graphs:
        raise tr.TrainError(f"--cuda-graphs: {model}, trained eagerly (two optimizer steps per step); leave it out")
    if cfg.precision != "fp32":
        raise tr.TrainError(f"--precision {cfg.precision}: {model}, trained in fp32 only; leave it out or pass fp32")
    if "binarize" in given:
        raise tr.TrainError(f"--binarize: {model}, trained on grey levels / 255 in [0, 1], not binarized; leave it out")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise tr.TrainError(f"{model}: trained in one process, got WORLD_SIZE > 1 (torchrun); run it without torchrun")


def as_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 grey levels -> float images in [0, 1]."""
    return images.float() / 255.0


@torch.no_grad()
def evaluate(model, data, device=None) -> tuple[float, str]:
    """model.evaluate on the data's test set (training images and labels for the metrics that fit on them), or
    (nan, unit) when the data has no labels."""
    if data.test_labels is None or data.train_labels is None:
        return float("nan"), model.unit
    return model.evaluate(as_unit(data.test), data.test_labels, as_unit(data.train), data.train_labels)


def sample_png(model, n: int, seed: int, device) -> bytes:
    """A PNG grid of n generated images (latents from a CPU generator seeded with `seed`)."""
    x = model.generate(n, generator=torch.Generator().manual_seed(seed), device=device)
    return tr.image_grid_png((x * 255).round(), 256)


def _settings(cfg, model, ckpt, given) -> tuple[float, float]:
    """The learning rates (D, G), and cfg.batch_size set to the batch used: the paper's unless given, the
    checkpoint's on resume."""
    if ckpt is not None:
        saved = ckpt["train_config"]
        return saved["lr_d"], saved["lr_g"]
    if "batch_size" not in given:
        cfg.batch_size = model.batch_size
    if "lr" not in given:
        cfg.lr = model.lr_d  # what the checkpoint's train_config records as "lr"; lr_d and lr_g beside it
        return model.lr_d, model.lr_g
    return cfg.lr, cfg.lr


def _labelled_batch(model, data, subset, seed: int, step: int, batch: int, device):
    if subset is None:
        return None, None
    g = torch.Generator().manual_seed(tr._derived_seed(seed, 4, step))
    idx = subset[torch.randint(subset.numel(), (batch,), generator=g)]
    return as_unit(data.train[idx]).to(device), data.train_labels[idx].to(device)


def _check_data(model, data, name: str, preset: str) -> None:
    # (channels and size: checked by training.train before the run starts)
    if model.n_labels and data.train_labels is None:
        raise tr.TrainError(f"model {name} is semi-supervised: --data {data.name} has no labels")


def run(cfg, name, model_cfg, data, ckpt, dist, device, log, given=frozenset()) -> dict:
    """Train a GAN; returns the summary (paths, final test metric, steps, time, images/s)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = gmmodels.get(name, cfg.preset, backend=cfg.backend).to(device)
    _check_data(model, data, name, cfg.preset)
    lr_d, lr_g = _settings(cfg, model, ckpt, given)
    global_batch, n_train = cfg.batch_size, data.train.shape[0]
    per_epoch, total_steps = tr.schedule(cfg, n_train, global_batch, dist.world, data.name)
    subset = None
    if model.n_labels:
        try:
            subset = balanced_subset(data.train_labels, model.n_labels, tr._derived_seed(cfg.seed, 5))
        except ValueError as err:
            raise tr.TrainError(f"model {name} preset {cfg.preset!r}: {err}") from err
    # --compile: each update's loss (its forward, and through it the backward) as torch.compile graphs; evaluation
    # and sampling stay eager
    d_loss_fn, g_loss_fn = (torch.compile(model.d_loss), torch.compile(model.g_loss)) if cfg.compile else (
        model.d_loss, model.g_loss)  # fmt: skip
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr_d, betas=model.betas)
    g_params = list(model.generator.parameters())
    opt_g = torch.optim.Adam(g_params, lr=lr_g, betas=model.betas)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        opt_d.load_state_dict(ckpt["optimizer_d_state"])
        opt_g.load_state_dict(ckpt["optimizer_g_state"])
        tr._set_rng_state(ckpt["rng"], device)
        step = ckpt["step"]
    else:
        g = torch.Generator().manual_seed(tr._derived_seed(cfg.seed, 6))
        model.data_init(as_unit(data.train[torch.randperm(n_train, generator=g)[:DATA_INIT_IMAGES]]).to(device))

    out = Path(cfg.out)
    metrics_path, ckpt_path, samples_path = out / tr.METRICS_NAME, out / tr.CHECKPOINT_NAME, out / tr.SAMPLES_NAME
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        tr._trim_metrics(metrics_path, step)
    progress = tr.Progress(True)
    unit = model.unit
    labels = f", {model.n_labels} labelled" if model.n_labels else ""
    progress.line(
        f"gm train {name} preset={cfg.preset} ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"data={data.name} ({n_train} train{labels} / {data.test.shape[0]} test, {data.shape}) device={device} "
        f"batch={global_batch} lr D {lr_d:g} G {lr_g:g} steps {step}->"
        + (str(total_steps) if total_steps < tr.UNBOUNDED else f"(for {cfg.max_minutes} min)")
    )

    def checkpoint(at_step: int) -> None:
        tr.save_checkpoint(ckpt_path, tr.checkpoint_payload(
            cfg, name, model_cfg, model, device, at_step, per_epoch, global_batch, data.name,
            train_extra={"lr_d": lr_d, "lr_g": lr_g},
            optimizer_d_state=opt_d.state_dict(), optimizer_g_state=opt_g.state_dict(),
        ))  # fmt: skip

    def write_samples(at_step: int) -> None:
        if cfg.n_samples > 0:
            png = sample_png(model, cfg.n_samples, tr._derived_seed(cfg.seed, 3, at_step), device)
            tr.atomic_write_bytes(samples_path, png)
            tr.atomic_write_bytes(out / f"samples_step{at_step:07d}.png", png)

    def run_eval(at_step: int) -> float:
        value, _ = evaluate(model, data, device)
        tr.append_record(metrics_path, {"step": at_step, "test_metric": value, "unit": unit})
        progress.line(f"step {at_step}: {model.metric_name} {value:.2f} {unit}")
        return value

    clock = tr.RunClock(cfg.max_minutes)
    last_metric, last = float("nan"), {"loss_d": float("nan"), "loss_g": float("nan")}
    model.train()
    while step < total_steps:
        if clock.expired():
            progress.line(f"--max-minutes {cfg.max_minutes} reached at step {step}")
            break
        idx, _, _ = tr.batch_indices(cfg.seed, step, n_train, global_batch)
        real = as_unit(data.train[idx]).to(device)
        batch = GANBatch(real, *_labelled_batch(model, data, subset, cfg.seed, step, global_batch, device))
        loss_d, stats = d_loss_fn(batch)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g, g_stats = g_loss_fn(batch)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward(inputs=g_params)  # through D to G, accumulating into G's parameters only
        opt_g.step()
        step += 1
        clock.count(global_batch)
        if step % cfg.log_every == 0 or step == total_steps:
            # The only host sync of a training step, once per log interval.
            last = {"loss_d": loss_d.item(), "loss_g": loss_g.item(),
                    **{k: v.item() for k, v in {**stats, **g_stats}.items()}}  # fmt: skip
            ips, elapsed = clock.window_rate(), clock.elapsed()
            tr.append_record(metrics_path, {"step": step, **last, "images_per_s": ips, "elapsed_s": elapsed})
            extra = "".join(f" {k} {v:.3f}" for k, v in last.items() if k not in ("loss_d", "loss_g"))
            progress.update(
                f"step {step}{tr.progress_bar(step, total_steps)} D {last['loss_d']:.4f} G {last['loss_g']:.4f}"
                f"{extra}  {ips:.0f} img/s  {elapsed:.0f} s",
                final_line=not progress.tty or step == total_steps,
            )
        value = tr.periodic(cfg, step, total_steps, clock, run_eval, checkpoint, write_samples)
        last_metric = last_metric if value is None else value
    train_rate = clock.training_rate()
    last_metric = run_eval(step)
    checkpoint(step)
    write_samples(step)
    summary = {
        "model": name, "preset": cfg.preset, "data": data.name, "steps": step, "batch_size": global_batch,
        "processes": dist.world, "device": str(device), "precision": cfg.precision, "test_metric": last_metric,
        "metric": model.metric_name, "unit": unit, "final_loss": last["loss_d"], "final_loss_g": last["loss_g"],
        "elapsed_s": clock.elapsed(), "train_images_per_s": train_rate,
        "checkpoint": str(ckpt_path), "metrics": str(metrics_path),
        "samples": str(samples_path) if cfg.n_samples > 0 else None,
    }  # fmt: skip
    tr.append_record(metrics_path, {"step": step, "summary": summary})
    log(tr.done_message(summary, f"{model.metric_name}  {last_metric:.2f} {unit}"))
    return summary


__all__ = ["check_config", "evaluate", "run", "sample_png"]
