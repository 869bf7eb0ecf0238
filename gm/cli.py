"""The command line: `gm info | bench | train | eval | sample | download` (also `python -m gm ...`).

Bad input (unknown model or preset, missing data directory, corrupt or foreign checkpoint) prints one clear
message to stderr and exits with status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    if args.triton_interpret:
        import os  # noqa: PLC0415

        os.environ.setdefault("TRITON_INTERPRET", "1")
    from gm.info import info  # noqa: PLC0415

    info()
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    # The benchmarks live in the checkout (bench/), not in the installed package: find them beside gm/ or in cwd.
    from pathlib import Path  # noqa: PLC0415

    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "bench" / "harness.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    else:
        print("gm bench: the benchmarks are part of the gm checkout: run `python -m bench` from it", file=sys.stderr)
        return 2
    from bench.__main__ import main as bench_main  # noqa: PLC0415

    return bench_main(args.rest)


EXIT_BAD_INPUT = 2


def _fail(message: str) -> int:
    print(f"gm: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _prepare_backend(backend: str | None) -> None:
    # Triton runs CPU tensors only under its interpreter, which must be chosen before triton is imported.
    if backend == "triton":
        import os  # noqa: PLC0415

        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")


_RESUME_CHECKED = ("seed", "batch_size", "data", "binarize", "lr", "precision")


def _cmd_train(args: argparse.Namespace) -> int:
    from gm import training  # noqa: PLC0415
    from gm.data import DataError  # noqa: PLC0415

    _prepare_backend(args.backend)
    given = {k for k in _RESUME_CHECKED if getattr(args, k) is not None}
    defaults = training.TrainConfig()
    cfg = training.TrainConfig(
        model=args.model, preset=args.preset, data=args.data or defaults.data,
        binarize=args.binarize or defaults.binarize, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size if args.batch_size is not None else defaults.batch_size,
        lr=args.lr if args.lr is not None else defaults.lr,
        precision=args.precision or defaults.precision, compile=args.compile, cuda_graphs=args.cuda_graphs,
        backend=args.backend,
        device=args.device, out=args.out or f"runs/{args.model}-{args.preset}",
        seed=args.seed if args.seed is not None else defaults.seed, eval_every=args.eval_every,
        sample_every=args.sample_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
        n_samples=args.n_samples, max_minutes=args.max_minutes,
    )  # fmt: skip
    if cfg.steps is None and cfg.epochs is None and cfg.max_minutes is None:
        cfg.steps = 1000
    elif cfg.steps is None and cfg.epochs is None:
        cfg.steps = training.UNBOUNDED  # bounded by --max-minutes
    try:
        training.train(cfg, resume=args.resume, given=frozenset(given))
    except (training.TrainError, DataError) as err:
        return _fail(str(err))
    return 0


def _load_for_use(path: str, backend: str | None, device: str):
    import torch  # noqa: PLC0415

    from gm import training  # noqa: PLC0415

    _prepare_backend(backend)
    ckpt = training.load_checkpoint(path)
    model = training.model_from_checkpoint(ckpt, backend=backend, path=path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return ckpt, model.to(dev), dev


def _data_for(spec: str | None, ckpt: dict, model):
    """The dataset that --data names (default: the one the checkpoint trained on), checked against the model's
    channels and, for the models of one image size, that size. Raises TrainError / DataError."""
    from gm import data as gmdata  # noqa: PLC0415
    from gm import training  # noqa: PLC0415

    spec = spec or ckpt["train_config"].get("data", "digits")
    data = gmdata.resolve(spec, channels=model.channels)
    if data.shape[0] != model.channels:
        raise training.TrainError(f"the model takes {model.channels}-channel images, --data {spec} has {data.shape[0]}")
    size = getattr(model, "size", None)  # the VAE and the GANs take one image size
    if size is not None and tuple(data.shape[1:]) != (size, size):
        raise training.TrainError(
            f"the model takes {size}x{size} images, --data {spec} has {data.shape[1]}x{data.shape[2]}"
        )
    return data


def _cmd_eval(args: argparse.Namespace) -> int:
    import math  # noqa: PLC0415

    from gm import data as gmdata  # noqa: PLC0415
    from gm import training  # noqa: PLC0415

    try:
        ckpt, model, dev = _load_for_use(args.checkpoint, args.backend, args.device)
        data = _data_for(args.data, ckpt, model)
    except (training.TrainError, gmdata.DataError) as err:
        return _fail(str(err))
    if getattr(model, "kind", None) == "gan":
        return _eval_gan(ckpt, model, data, dev)
    test = training.test_levels(data, model.levels, ckpt["train_config"].get("binarize", "threshold"))
    nll = training.evaluate(model, test, dev, args.batch_size)
    extra = f" ({nll / (math.prod(data.shape) * math.log(2)):.4f} bits/dim)" if model.levels == 2 else ""
    print(f"{ckpt['model']} preset={ckpt['preset']} step={ckpt['step']} data={data.name}: "
          f"test NLL {nll:.4f} {model.metric_name}{extra} over {test.shape[0]} images")  # fmt: skip
    return 0


def _eval_gan(ckpt: dict, model, data, dev) -> int:
    from gm import gan_training  # noqa: PLC0415

    if data.test_labels is None:
        return _fail(f"data {data.name} has no labels: the GANs' metrics are test errors of a classifier")
    value, unit = gan_training.evaluate(model, data, dev)
    print(f"{ckpt['model']} preset={ckpt['preset']} step={ckpt['step']} data={data.name}: "
          f"{model.metric_name} {value:.2f} {unit} over {data.test.shape[0]} images")  # fmt: skip
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from gm import training  # noqa: PLC0415
    from gm.data import DataError  # noqa: PLC0415

    try:
        ckpt, model, dev = _load_for_use(args.checkpoint, args.backend, args.device)
    except training.TrainError as err:
        return _fail(str(err))
    fixed = getattr(model, "size", None)  # the VAE and the GANs decode one image size
    if args.size is not None and fixed is not None and args.size != fixed:
        return _fail(f"--size {args.size}: this model makes {fixed}x{fixed} images (leave --size out)")
    pixel_model = hasattr(model, "layers_at")  # PixelCNN, Row LSTM, Diagonal BiLSTM
    if args.method is not None and not pixel_model:
        return _fail(f"--method {args.method}: only the PixelCNN and PixelRNN models sample pixel by pixel")
    if args.complete is not None and not pixel_model:
        return _fail(f"--complete {args.complete}: only the PixelCNN and PixelRNN models complete images")
    if args.data is not None and args.complete is None:
        return _fail("--data: give --complete ROWS too (the images to complete come from --data)")
    what = "samples"
    if getattr(model, "kind", None) == "gan":
        from gm import gan_training  # noqa: PLC0415

        png = gan_training.sample_png(model, args.n, args.seed, dev)
    else:
        size = args.size or fixed or (28 if model.channels == 1 else 32)
        shape = (model.channels, size, size)
        extra = {"method": args.method} if args.method is not None else {}
        if args.complete is not None:
            try:
                extra["prefix"], shape = _completion_prefix(args, ckpt, model)
            except (training.TrainError, DataError) as err:
                return _fail(str(err))
            what = f"completions of test images (top {args.complete} rows given)"
        png = training.sample_png(model, args.n, shape, args.seed, dev, **extra)
    training.atomic_write_bytes(args.out, png)
    print(f"{args.n} {what} from {ckpt['model']} preset={ckpt['preset']} step={ckpt['step']} -> {args.out}")
    return 0


def _completion_prefix(args: argparse.Namespace, ckpt: dict, model):
    """gm sample --complete ROWS: the top ROWS rows of the first --n test images of --data (levels, binarized as the
    checkpoint trained), and the images' shape (C, H, W)."""
    from gm import training  # noqa: PLC0415

    data = _data_for(args.data, ckpt, model)
    test = training.test_levels(data, model.levels, ckpt["train_config"].get("binarize", "threshold"))
    _, c, h, w = test.shape
    if args.size is not None and (args.size, args.size) != (h, w):
        raise training.TrainError(f"--size {args.size}: --complete takes the data's {h}x{w} images (leave --size out)")
    if args.complete > h:
        raise training.TrainError(f"--complete {args.complete}: the images have {h} rows")
    if args.n > test.shape[0]:
        raise training.TrainError(f"--n {args.n}: the data has {test.shape[0]} test images to complete")
    return test[: args.n, :, : args.complete], (c, h, w)


def _cmd_download(args: argparse.Namespace) -> int:
    from gm.data import DataError, download  # noqa: PLC0415

    try:
        download(args.dataset, args.dir, base_url=args.base_url, timeout_s=args.timeout)
    except DataError as err:
        return _fail(str(err))
    print(f"{args.dataset} is in {args.dir}: train with `gm train MODEL --data {args.dir}`")
    return 0


def _count(least: int):
    """argparse type: an integer >= least (a bad value is argparse's usage error, exit status 2, nothing run)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {least}"
    return parse


def _positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _add_train_parser(sub) -> None:
    from gm.models import MODELS  # noqa: PLC0415

    p = sub.add_parser("train", help="train a model (the likelihood models also under torchrun)",
                       description="Train a model; checkpoints, metrics (JSON lines) and sample grids go to --out.")
    p.add_argument("model", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--preset", default="mnist", help="mnist (default), cifar10, tiny, tiny-rgb; the GANs: mnist, tiny, "
                   "improved_gan also mnist-md, tiny-md, dcgan also cifar10")
    p.add_argument("--data", default=None,
                   help="digits (embedded, default), DIR, mnist:DIR, cifar10:DIR, synthetic[:N[:SIZE]]")
    p.add_argument("--binarize", choices=("threshold", "dynamic"), default=None, help="binary models: fixed threshold "
                   "0.5 (default) or dynamic Bernoulli sampling of each batch")
    p.add_argument("--steps", type=_count(1), default=None, help="optimizer steps in total (default 1000)")
    p.add_argument("--epochs", type=_positive, default=None, help="passes over the training set, instead of --steps")
    p.add_argument("--max-minutes", type=_positive, default=None, help="stop after this much wall time")
    p.add_argument("--batch-size", type=_count(1), default=None,
                   help="global batch (split over torchrun processes); 32, the GANs: their paper's")
    p.add_argument("--lr", type=_positive, default=None, help="Adam learning rate (1e-3; the GANs: their paper's)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each training step from a CUDA graph (GPU, fp32/bf16, one process): removes the "
                        "host's per-kernel launch cost, which bounds small models")
    p.add_argument("--backend", choices=("reference", "cpu", "triton", "cuda"), default=None, help="default: auto")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=None, help="run directory (default runs/MODEL-PRESET)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from OUT/checkpoint.pt (or the CHECKPOINT given)")
    p.add_argument("--seed", type=int, default=None, help="initialisation and data order (0)")
    p.add_argument("--eval-every", type=_count(0), default=500,
                   help="test NLL every this many steps (0: only at the end)")
    p.add_argument("--ckpt-every", type=_count(0), default=500,
                   help="checkpoint every this many steps (and at the end; 0: only at the end)")
    p.add_argument("--sample-every", type=_count(0), default=2000,
                   help="sample grid every this many steps (and at the end; 0: only at the end)")
    p.add_argument("--log-every", type=_count(1), default=10, help="progress and metrics line every this many steps")
    p.add_argument("--n-samples", type=_count(0), default=36, help="images in each sample grid (0: none)")
    p.set_defaults(func=_cmd_train)  # fmt: skip


def _add_use_parsers(sub) -> None:
    pe = sub.add_parser("eval", help="test NLL of a checkpoint (the GANs: their test error)")
    pe.add_argument("checkpoint")
    pe.add_argument("--data", default=None, help="default: the data the checkpoint was trained on")
    pe.add_argument("--batch-size", type=_count(1), default=250)
    pe.add_argument("--backend", choices=("reference", "cpu", "triton", "cuda"), default=None)
    pe.add_argument("--device", default="auto")
    pe.set_defaults(func=_cmd_eval)
    ps = sub.add_parser("sample", help="a PNG grid of samples from a checkpoint")
    ps.add_argument("checkpoint")
    ps.add_argument("--n", type=_count(1), default=16, help="number of samples")
    ps.add_argument("--out", default="samples.png", help="PNG to write")
    ps.add_argument("--size", type=_count(1), default=None, help="image side (default 28 grey, 32 colour)")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--complete", type=_count(0), default=None, metavar="ROWS",
                    help="PixelCNN/PixelRNN: complete the first --n test images of --data from their top ROWS rows "
                         "(the paper's image completions) instead of drawing whole images")
    ps.add_argument("--data", default=None,
                    help="with --complete: the images (a --data spec; default: the data the checkpoint trained on)")
    ps.add_argument("--method", choices=("incremental", "full"), default=None,
                    help="PixelCNN/PixelRNN: one pixel at every layer per step from cached layer state (incremental, "
                         "the default) or the whole model over the image so far for every step (full)")
    ps.add_argument("--backend", choices=("reference", "cpu", "triton", "cuda"), default=None)
    ps.add_argument("--device", default="auto")
    ps.set_defaults(func=_cmd_sample)
    pd = sub.add_parser("download", help="download MNIST or CIFAR-10 with checksum verification")
    pd.add_argument("dataset", choices=("mnist", "cifar10"))
    pd.add_argument("dir")
    pd.add_argument("--base-url", default=None, help="a mirror to fetch from instead of the default")
    pd.add_argument("--timeout", type=_positive, default=60.0, help="seconds per connection")
    pd.set_defaults(func=_cmd_download)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gm", description="gm: kernels and models for the generative models of 2016")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, device and available backends")
    pi.add_argument("--triton-interpret", action="store_true", help="report as if TRITON_INTERPRET=1")
    pi.set_defaults(func=_cmd_info)
    pb = sub.add_parser("bench", help="run the benchmark table (same as python -m bench)")
    pb.add_argument("rest", nargs=argparse.REMAINDER)
    pb.set_defaults(func=_cmd_bench)
    _add_train_parser(sub)
    _add_use_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and not {"-h", "--help"} & set(argv[1:2]):
        # bench's own options (--quick, --ops, ...) pass through untouched: argparse's REMAINDER would eat them.
        return _cmd_bench(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    if args.func in (_cmd_train, _cmd_eval, _cmd_sample):
        from gm._malloc import keep_freed_memory  # noqa: PLC0415

        keep_freed_memory()  # a CPU step's large tensors reuse the heap instead of faulting in fresh pages
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
