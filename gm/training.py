"""The training loop behind `gm train`, and the checkpoint, evaluation and sample-grid pieces `gm eval` and
`gm sample` share with it.

Reproducibility: the data order is a function of (seed, step) alone (epoch e uses the permutation drawn from
seed and e; dynamic binarization of step s draws from a generator seeded by seed and s), the model is initialised
from the seed, and a checkpoint holds model, optimizer, gradient scaler, RNG states, step and data position. So a
run resumed from a checkpoint follows the same trajectory as one never stopped, and K processes (torchrun) with a
global batch B follow the trajectory of one process with batch B: each rank takes a strided share of each global
batch, and DDP averages the gradients of equal shares.

Checkpoints and every other file are written atomically (temp file in the same directory, fsync, rename), by rank 0
only, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

import gm.data as gmdata
import gm.models as gmmodels
from gm._checks import check_count

CHECKPOINT_FORMAT = "gm-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.png"
UNBOUNDED = 10**9  # --steps when only --max-minutes bounds the run


class TrainError(RuntimeError):
    """Bad input to the tool (unknown model, missing data, corrupt or foreign checkpoint): a message for people."""


@dataclasses.dataclass
class TrainConfig:
    model: str = "pixelcnn"
    preset: str = "mnist"
    data: str = "digits"
    binarize: str = "threshold"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    lr: float = 1e-3
    precision: str = "fp32"
    compile: bool = False
    cuda_graphs: bool = False
    backend: str | None = None
    device: str = "auto"
    out: str = "runs/pixelcnn"
    seed: int = 0
    eval_every: int = 500
    sample_every: int = 2000
    ckpt_every: int = 500
    log_every: int = 50
    n_samples: int = 36
    max_minutes: float | None = None
    eval_batch_size: int = 250

    def __post_init__(self) -> None:
        """Sizes, counts and rates that cannot run stop here, naming the setting (`gm train` checks its flags the
        same way when it parses them)."""
        steps = {"steps": self.steps} if self.steps is not None else {}
        check_count(1, TrainError, batch_size=self.batch_size, log_every=self.log_every,
                    eval_batch_size=self.eval_batch_size, **steps)  # fmt: skip
        check_count(0, TrainError, eval_every=self.eval_every, sample_every=self.sample_every,
                    ckpt_every=self.ckpt_every, n_samples=self.n_samples)  # fmt: skip
        for name in ("lr", "epochs", "max_minutes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf):
                raise TrainError(f"{name} must be a number > 0, got {v!r}")


# ----------------------------------------------------------------------------------------------------------------
# Files.


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # directories cannot be fsynced on every platform


def save_checkpoint(path: str | Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """A gm checkpoint, validated, or TrainError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise TrainError(f"checkpoint {path} is corrupt or not a gm checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a gm checkpoint (no {CHECKPOINT_FORMAT!r} marker)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path}: checkpoint version {ckpt.get('version')} is not supported ({CHECKPOINT_VERSION} is)")
    missing = {"model", "preset", "model_config", "model_state", "step", "train_config"} - set(ckpt)
    if missing:
        raise TrainError(f"{path} is an incomplete gm checkpoint: missing {sorted(missing)}")
    return ckpt


def model_from_checkpoint(ckpt: dict, *, backend: str | None = None, path="checkpoint") -> gmmodels.PixelModel:
    try:
        model = gmmodels.get(ckpt["model"], ckpt["preset"], backend=backend, **ckpt["model_config"])
        model.load_state_dict(ckpt["model_state"])
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        raise TrainError(f"{path}: cannot rebuild model {ckpt.get('model')!r} from it ({err})") from err
    return model


def image_grid_png(levels: torch.Tensor, n_levels: int, scale: int = 2, pad: int = 2) -> bytes:
    """A PNG (bytes) of a square-ish grid of images given as levels (N, C, H, W)."""
    from PIL import Image  # noqa: PLC0415

    x = levels.detach().float().cpu()
    x = (x * (255.0 / (n_levels - 1))).round().clamp(0, 255).to(torch.uint8)
    n, c, h, w = x.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = torch.full((c, pad + rows * (h + pad), pad + cols * (w + pad)), 128, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Data order, evaluation, sampling.


def _derived_seed(seed: int, *parts: int) -> int:
    s = seed & 0xFFFFFFFF
    for p in parts:
        s = (s * 1_000_003 + p + 1) % (2**63 - 1)
    return s


def batch_indices(seed: int, step: int, n_train: int, batch: int) -> tuple[torch.Tensor, int, int]:
    """Global batch `step` of the run: (indices, epoch, batch index within the epoch); no image repeats within
    an epoch, the last partial batch of each epoch is dropped."""
    per_epoch = n_train // batch
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(_derived_seed(seed, 1, epoch)))
    return perm[j * batch : (j + 1) * batch], epoch, j


def make_batch(images: torch.Tensor, idx: torch.Tensor, levels: int, binarize: str, seed: int, step: int):
    g = torch.Generator().manual_seed(_derived_seed(seed, 2, step))
    return gmdata.to_levels(images[idx], levels, binarize, generator=g)


def test_levels(data: gmdata.ImageData, levels: int, binarize: str) -> torch.Tensor:
    """The test set as levels; dynamic binarization evaluates on one fixed Bernoulli draw (seed 0)."""
    return gmdata.to_levels(data.test, levels, binarize, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate(model, test: torch.Tensor, device, batch_size: int = 250, rank: int = 0, world: int = 1) -> float:
    """Mean test NLL in the model's unit (nats/image or bits/dim); sharded over ranks, summed with all_reduce."""
    was_training = model.training
    model.eval()
    idx = torch.arange(rank, test.shape[0], world)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, idx.numel(), batch_size):
        x = test[idx[i : i + batch_size]].to(device)
        total += model.metric(model.nll(x), x[0].numel()).double().sum()
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return total.item() / test.shape[0]


def sample_png(model, n: int, shape: tuple[int, int, int], seed: int, device, **kwargs) -> bytes:
    """A PNG grid of n samples of `shape` (C, H, W); kwargs go to model.sample (method= for the pixel models)."""
    was_training = model.training
    model.eval()
    x = model.sample(n, shape[1:], generator=torch.Generator().manual_seed(seed), device=device, **kwargs)
    model.train(was_training)
    return image_grid_png(x, model.levels)


# ----------------------------------------------------------------------------------------------------------------
# The run.


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), a no-op otherwise."""

    def __init__(self, device_kind: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device_kind == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.detach().clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _device(kind: str, dist_local_rank: int) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA GPU is visible to torch")
        torch.cuda.set_device(dist_local_rank)
        return torch.device("cuda", dist_local_rank)
    if kind != "cpu":
        raise TrainError(f"--device must be auto, cpu or cuda, got {kind!r}")
    return torch.device("cpu")


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Progress:
    """One status line: rewritten in place on a terminal, a line every `log_every` steps otherwise."""

    def __init__(self, enabled: bool, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()

    def update(self, text: str, final_line: bool) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final_line else ""))
        elif final_line:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\r\033[K")
            self.stream.write(text + "\n")
            self.stream.flush()


def _resolve_resume(cfg: TrainConfig, resume: str | bool | None, given: set[str]) -> dict | None:
    """The checkpoint to resume from (validated against what the command line asks), or None."""
    out = Path(cfg.out)
    if not resume:
        if (out / CHECKPOINT_NAME).exists():
            raise TrainError(
                f"{out / CHECKPOINT_NAME} exists: pass --resume to continue that run, or choose another --out "
                "(nothing was overwritten)"
            )
        return None
    path = out / CHECKPOINT_NAME if resume is True else Path(resume)
    ckpt = load_checkpoint(path)
    saved = ckpt["train_config"]
    if gmmodels.canonical(cfg.model) != ckpt["model"] or cfg.preset != ckpt["preset"]:
        raise TrainError(
            f"{path} holds model {ckpt['model']!r} preset {ckpt['preset']!r}, not {cfg.model!r} preset {cfg.preset!r}: "
            "resume with the same model and preset"
        )
    for key in ("seed", "batch_size", "data", "binarize", "lr", "precision"):
        if key in given and getattr(cfg, key) != saved.get(key):
            raise TrainError(
                f"--{key.replace('_', '-')} {getattr(cfg, key)} differs from the checkpoint's {saved.get(key)}: "
                "a resumed run keeps the data order and optimiser of the original (leave the option out)"
            )
        setattr(cfg, key, saved.get(key))
    return ckpt


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop the records written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


def append_record(path: Path, rec: dict) -> None:
    """One JSON line appended to the metrics file."""
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def progress_bar(step: int, total_steps: int) -> str:
    """The "/TOTAL [###   ]" of the progress line, or "" when only --max-minutes bounds the run."""
    return f"/{total_steps} [{'#' * int(20 * step / total_steps):<20}]" if total_steps < UNBOUNDED else ""


def schedule(cfg: TrainConfig, n_train: int, global_batch: int, world: int, data_name: str) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run, or TrainError if the batch does not fit the data or processes."""
    if global_batch % world:
        raise TrainError(f"--batch-size {global_batch} must be a multiple of the number of processes ({world})")
    if n_train < global_batch:
        raise TrainError(f"--batch-size {global_batch} exceeds the {n_train} training images of {data_name}")
    per_epoch = n_train // global_batch
    total_steps = cfg.steps if cfg.steps is not None else math.ceil((cfg.epochs or 1.0) * per_epoch)
    return per_epoch, total_steps


def checkpoint_payload(
    cfg: TrainConfig,
    name: str,
    model_cfg: dict,
    model: torch.nn.Module,
    device: torch.device,
    step: int,
    per_epoch: int,
    global_batch: int,
    data_name: str,
    *,
    train_extra: dict | None = None,
    **states,
) -> dict:
    """What a checkpoint holds: the format marker, the model (name, preset, config, state), the run's settings
    (`train_extra` added to them), RNG states, step and data position, and the `states` given (optimizers, ...)."""
    epoch, j = divmod(step, per_epoch)
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": name, "preset": cfg.preset,
        "model_config": model_cfg, "train_config": dataclasses.asdict(cfg) | (train_extra or {}),
        "model_state": model.state_dict(), **states, "rng": _rng_state(device), "step": step,
        "data_position": {"epoch": epoch, "batch_in_epoch": j, "steps_per_epoch": per_epoch,
                          "global_batch": global_batch, "data": data_name},
    }  # fmt: skip


class RunClock:
    """Wall time of a training run: the --max-minutes deadline, and training images/s that leave out the time spent
    in evaluation, checkpoints and sampling (`paused`)."""

    def __init__(self, max_minutes: float | None) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + max_minutes * 60 if max_minutes else None
        self.window_start, self.window_images, self.images = self.start, 0, 0
        self.paused_total = self.paused_window = 0.0

    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def count(self, images: int) -> None:
        self.window_images += images
        self.images += images

    def window_rate(self) -> float:
        """Training images/s since the last call (or the start), then a new window."""
        now = time.perf_counter()
        rate = self.window_images / max(now - self.window_start - self.paused_window, 1e-9)
        self.window_start, self.window_images, self.paused_window = now, 0, 0.0
        return rate

    def paused(self, fn, *args):
        """fn(*args), its time not counted as training."""
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            dt = time.perf_counter() - t
            self.paused_total += dt
            self.paused_window += dt

    def training_rate(self) -> float:
        """Training images/s over the whole run so far."""
        return self.images / max(time.perf_counter() - self.start - self.paused_total, 1e-9)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def periodic(cfg: TrainConfig, step: int, total_steps: int, clock: RunClock, evaluate, checkpoint, samples):
    """After `step`: evaluation, checkpoint and samples when their intervals say (evaluation and samples not at the
    last step, which the run's end does anyway), their time paused; the evaluation's result, or None."""
    result = None
    if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
        result = clock.paused(evaluate, step)
    if cfg.ckpt_every and step % cfg.ckpt_every == 0:
        clock.paused(checkpoint, step)
    if cfg.sample_every and step % cfg.sample_every == 0 and step < total_steps:
        clock.paused(samples, step)
    return result


def done_message(summary: dict, metric_line: str) -> str:
    """The run's closing lines: steps, time and images/s, the final metric, and where the files are."""
    samples = summary["samples"]
    return (
        f"\ndone: {summary['steps']} steps of batch {summary['batch_size']} in {summary['elapsed_s']:.1f} s on "
        f"{summary['device']} ({summary['train_images_per_s']:.0f} training images/s)\n"
        f"  {metric_line}\n"
        f"  checkpoint   {summary['checkpoint']}\n"
        f"  metrics      {summary['metrics']}\n" + (f"  samples      {samples}\n" if samples else "")
    )


def _check_cuda_graphs(cfg: TrainConfig, device: torch.device) -> None:
    if not cfg.cuda_graphs:
        return
    if device.type != "cuda":
        raise TrainError(f"--cuda-graphs needs a CUDA device, got {device}")
    if cfg.precision == "fp16":
        raise TrainError("--cuda-graphs takes --precision fp32 or bf16, got fp16 (its loss scaler is not capturable)")
    if cfg.compile:
        raise TrainError("--cuda-graphs and --compile are exclusive: choose one")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError("--cuda-graphs runs in a single process, got WORLD_SIZE > 1 (torchrun)")


class GraphedStep:
    """One training step (forward, loss, backward, Adam step) replayed from a CUDA graph: the host launches one
    graph per step instead of every kernel, which is what bounds the small models' step time on a GPU host.

    The first `warmup` calls run eagerly on a side stream (capture needs the autotuners, caches and the optimizer's
    state settled), each a real step on its batch; the next call captures the step on a static input buffer and
    replays it, later calls copy their batch into that buffer and replay. The optimizer must be capturable
    (Adam(capturable=True)); parameters are updated in place, so checkpoints, evaluation and sampling between steps
    see them as in eager mode. Returns the step's loss (a tensor the next replay overwrites)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, dims: int, warmup: int = 3):
        self.model, self.opt, self.dims, self.warmup = model, opt, dims, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        loss = self.model.metric(self.model.nll(x, self.model(x)), self.dims).mean()
        loss.backward()
        self.opt.step()
        return loss.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        main = torch.cuda.current_stream(x.device)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                loss = self._step(x)
            main.wait_stream(side)
            return loss
        if self.graph is None:
            self.static_x = x.clone()
            self.opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in its pool
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    self.static_loss = self._step(self.static_x)
            except RuntimeError as err:
                raise TrainError(f"--cuda-graphs: the training step could not be captured ({err}); "
                                 "train without --cuda-graphs") from err  # fmt: skip
        else:
            self.static_x.copy_(x)
        self.graph.replay()
        return self.static_loss


def train(
    cfg: TrainConfig, *, resume: str | bool | None = None, given: frozenset[str] = frozenset(), log=print
) -> dict:
    """Run `gm train`; returns the summary (paths, final test NLL, steps, time, images/s)."""
    # Validate everything before anything is written.
    try:
        name = gmmodels.canonical(cfg.model)
        model_cfg = gmmodels.config(name, cfg.preset)
    except ValueError as err:
        raise TrainError(str(err)) from err
    is_gan = gmmodels.kind(name) == "gan"
    if is_gan:
        from gm import gan_training  # noqa: PLC0415

        gan_training.check_config(cfg, given)
    if cfg.precision not in gmmodels.PRECISIONS:
        raise TrainError(f"--precision must be one of {', '.join(gmmodels.PRECISIONS)}, got {cfg.precision!r}")
    if cfg.binarize not in gmdata.BINARIZE:
        raise TrainError(f"--binarize must be one of {', '.join(gmdata.BINARIZE)}, got {cfg.binarize!r}")
    ckpt = _resolve_resume(cfg, resume, set(given))
    try:
        data = gmdata.resolve(cfg.data, channels=model_cfg["channels"])
    except gmdata.DataError as err:
        raise TrainError(str(err)) from err
    if data.shape[0] != model_cfg["channels"]:
        raise TrainError(
            f"model {name} preset {cfg.preset!r} takes {model_cfg['channels']}-channel images but --data {cfg.data} "
            "has "
            f"{data.shape[0]} channels: choose a preset for this data"
        )
    size = model_cfg.get("size")  # the models with linear layers between image and latent take one image size
    if size is not None and tuple(data.shape[1:]) != (size, size):
        raise TrainError(
            f"model {name} preset {cfg.preset!r} takes {size}x{size} images but --data {cfg.data} has "
            f"{data.shape[1]}x{data.shape[2]}: choose a preset or data of that size"
        )
    device = _device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL starts
    _check_cuda_graphs(cfg, device)
    dist = _Dist(device.type)
    try:
        if is_gan:
            return gan_training.run(cfg, name, model_cfg, data, ckpt, dist, device, log, given=given)
        return _run(cfg, name, model_cfg, data, ckpt, dist, device, log)
    finally:
        dist.close()


def _run(cfg, name, model_cfg, data, ckpt, dist: _Dist, device: torch.device, log) -> dict:
    global_batch = cfg.batch_size
    n_train = data.train.shape[0]
    per_epoch, total_steps = schedule(cfg, n_train, global_batch, dist.world, data.name)
    levels = model_cfg["levels"]

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = gmmodels.get(name, cfg.preset, backend=cfg.backend).to(device)
    model.compute_dtype = gmmodels.PRECISIONS[cfg.precision]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, capturable=cfg.cuda_graphs)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        opt.load_state_dict(ckpt["optimizer_state"])
        if ckpt.get("scaler_state"):
            scaler.load_state_dict(ckpt["scaler_state"])
        _set_rng_state(ckpt["rng"], device)
        step = ckpt["step"]
    runner = model
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        runner = torch.compile(runner)
    graphed = GraphedStep(model, opt, dims=math.prod(data.shape)) if cfg.cuda_graphs else None

    out = Path(cfg.out)
    metrics_path, ckpt_path, samples_path = out / METRICS_NAME, out / CHECKPOINT_NAME, out / SAMPLES_NAME
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            _trim_metrics(metrics_path, step)
    test = test_levels(data, levels, cfg.binarize)
    dims = math.prod(data.shape)
    progress = Progress(dist.main)
    unit = model.metric_name
    progress.line(
        f"gm train {name} preset={cfg.preset} ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"data={data.name} ({n_train} train / {test.shape[0]} test, {data.shape}) device={device} "
        f"processes={dist.world} batch={global_batch} precision={cfg.precision} steps {step}->"
        + (str(total_steps) if total_steps < UNBOUNDED else f"(for {cfg.max_minutes} min)")
    )

    def record(rec: dict) -> None:
        if dist.main:
            append_record(metrics_path, rec)

    def checkpoint(at_step: int) -> None:
        if dist.main:
            save_checkpoint(ckpt_path, checkpoint_payload(
                cfg, name, model_cfg, model, device, at_step, per_epoch, global_batch, data.name,
                optimizer_state=opt.state_dict(), scaler_state=scaler.state_dict() if scaler.is_enabled() else None,
            ))  # fmt: skip
        dist.barrier()

    def write_samples(at_step: int) -> None:
        if dist.main and cfg.n_samples > 0:
            png = sample_png(model, cfg.n_samples, data.shape, _derived_seed(cfg.seed, 3, at_step), device)
            atomic_write_bytes(samples_path, png)
            atomic_write_bytes(out / f"samples_step{at_step:07d}.png", png)
        dist.barrier()

    def run_eval(at_step: int) -> float:
        nll = evaluate(model, test, device, cfg.eval_batch_size, dist.rank, dist.world)
        record({"step": at_step, "test_nll": nll, "unit": unit})
        progress.line(f"step {at_step}: test NLL {nll:.4f} {unit}")
        return nll

    clock = RunClock(cfg.max_minutes)
    last_nll, last_loss = float("nan"), float("nan")
    model.train()
    while step < total_steps:
        if clock.expired():
            progress.line(f"--max-minutes {cfg.max_minutes} reached at step {step}")
            break
        idx, _, _ = batch_indices(cfg.seed, step, n_train, global_batch)
        x = make_batch(data.train, idx, levels, cfg.binarize, cfg.seed, step)[dist.rank :: dist.world].to(device)
        if graphed is not None:
            loss = graphed(x)
        else:
            logits = runner(x)
            loss = model.metric(model.nll(x, logits), dims).mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        step += 1
        clock.count(global_batch)
        if step % cfg.log_every == 0 or step == total_steps:
            # The only host sync of a training step, once per log interval.
            last_loss = dist.mean(loss.detach()).item()
            ips, elapsed = clock.window_rate(), clock.elapsed()
            record({"step": step, "loss": last_loss, "unit": unit, "images_per_s": ips, "elapsed_s": elapsed})
            progress.update(
                f"step {step}{progress_bar(step, total_steps)} loss {last_loss:.4f} {unit}  {ips:.0f} img/s  "
                f"{elapsed:.0f} s",
                final_line=not progress.tty or step == total_steps,
            )
        nll = periodic(cfg, step, total_steps, clock, run_eval, checkpoint, write_samples)
        last_nll = last_nll if nll is None else nll
    train_rate = clock.training_rate()
    last_nll = run_eval(step)
    checkpoint(step)
    write_samples(step)
    summary = {
        "model": name, "preset": cfg.preset, "data": data.name, "steps": step, "batch_size": global_batch,
        "processes": dist.world, "device": str(device), "precision": cfg.precision, "test_nll": last_nll,
        "unit": unit, "final_loss": last_loss, "elapsed_s": clock.elapsed(), "train_images_per_s": train_rate,
        "checkpoint": str(ckpt_path), "metrics": str(metrics_path),
        "samples": str(samples_path) if cfg.n_samples > 0 else None,
    }  # fmt: skip
    if dist.main:
        record({"step": step, "summary": summary})
        log(done_message(summary, f"test NLL     {last_nll:.4f} {unit}"))
    return summary
