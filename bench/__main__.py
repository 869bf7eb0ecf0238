"""python -m bench [--quick] [--ops masked_conv,minibatch,...] [--device cpu|cuda] [--out DIR] [--no-save]
[--no-compile [--compile-ops iaf,...]] [--warm-compile [--shard K/N]]

Times every case in bench/cases/*.py on the present device and prints one table (see bench/harness.py).
--warm-compile times nothing: it runs each torch.compile baseline that the same arguments would time once, forward
and forward+backward, so that inductor's on-disk caches hold its compiled graphs and a later timing run compiles it
from them in seconds (bench/gpu_check.sh runs it in parallel processes, --shard K/N, before the bench stage)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import torch


def _case_names() -> list[str]:
    import bench.cases as pkg  # noqa: PLC0415

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _case_modules(selected: list[str] | None):
    names = _case_names()
    if selected:
        unknown = sorted(set(selected) - set(names))
        if unknown:
            raise SystemExit(f"--ops: unknown {unknown}; known: {names}")
        names = list(dict.fromkeys(selected))  # in the order given: gpu_check.sh runs the most wanted first
    return [(n, importlib.import_module(f"bench.cases.{n}")) for n in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one or two small cases per op")
    p.add_argument("--ops", default="", help="comma-separated case modules (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--compile-ops", default="",
                   help="with --no-compile: the case modules whose torch.compile baselines still run (e.g. iaf: a "
                        "time-boxed GPU run compiles only the baselines an issue target names)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--backends", default=None,
                   help="comma-separated gm backends to time (default: every one that runs on the device), e.g. cuda")
    p.add_argument("--graphs", action="store_true",
                   help="on a GPU, also time each implementation's forward+backward replayed from a CUDA graph (the "
                        "kernels' time without the host's per-launch cost; a failed capture is reported per row)")
    p.add_argument("--warm-compile", action="store_true",
                   help="time nothing: run each torch.compile baseline these arguments select once (fwd, fwd+bwd), "
                        "filling inductor's on-disk caches for a later timing run")
    p.add_argument("--shard", default="0/1", help="with --warm-compile: K/N, this process's share of the baselines")
    p.add_argument("--profile", action="store_true",
                   help="also profile each gm row and the baseline's forward+backward (torch.profiler: wall time, "
                        "device kernel time, top kernels), printed and saved beside the rows as <results>_profile.md")
    args = p.parse_args(argv)
    shard = _shard(p, args.shard)

    from bench import harness  # noqa: PLC0415

    harness.WITH_COMPILE = not args.no_compile
    harness.PROFILE = args.profile
    harness.GRAPHS = args.graphs
    harness.BACKENDS = tuple(b for b in args.backends.split(",") if b) if args.backends else None
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        from gm._malloc import keep_freed_memory  # noqa: PLC0415

        # as `gm train` runs: every row timed in the steady state of a training loop, not while glibc still returns
        # the freed activations and faults fresh pages in each call (which made the CPU model rows swing by 30%)
        keep_freed_memory()
    compile_ops = {s for s in args.compile_ops.split(",") if s}
    unknown = sorted(compile_ops - set(_case_names()))
    if unknown:
        p.error(f"--compile-ops: unknown {unknown}; known: {_case_names()}")
    if args.warm_compile:
        return _warm_compile(harness, device, args, compile_ops, shard)
    env = harness.environment(device)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows = []
    for name, mod in _case_modules([s for s in args.ops.split(",") if s]):
        harness.WITH_COMPILE = not args.no_compile or name in compile_ops
        try:
            cases = mod.cases(device, args.quick)
        except Exception as err:  # a case module that cannot build its cases is reported, the rest still run
            print(f"[{name}] cases() failed: {harness.short_error(err)}", flush=True)
            continue
        for case in cases:
            t0 = time.perf_counter()
            case_rows = harness.run_case(case, device, args.warmup_ms, args.rep_ms)
            rows += case_rows
            print("\n".join(harness.format_table(case_rows).splitlines()[2:]), flush=True)
            # Where a time-boxed GPU run's budget goes (compiles and autotuning count here).
            took = ", ".join(f"{r.impl} {r.seconds:.1f} s" for r in case_rows)
            print(f"  [{case.op} {case.name}: {time.perf_counter() - t0:.1f} s; {took}]", flush=True)
            for r in case_rows:
                if r.profile:
                    print(harness.format_profile(r), flush=True)
            if not args.no_save:  # saved case by case: a run cut off by a time limit keeps what it measured
                path = harness.save(case_rows, env, Path(args.out) if args.out else harness.RESULTS_DIR)
    print()
    print(harness.format_table(rows))
    if not args.no_save and rows:
        print(f"\nsaved {len(rows)} rows to {path}")
        picks = harness.autotune_picks()
        if picks:
            import json  # noqa: PLC0415

            tuned = path.with_name(path.stem + "_autotune.json")
            tuned.write_text(json.dumps({"env": env, "picks": picks}, indent=1))
            print(f"autotuner picks of {len(picks)} kernels in {tuned}")
    return 0


def _shard(p: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        p.error(f"--shard: expected K/N with 0 <= K < N, got {text!r}")
    return k, n


def _warm_compile(harness, device: torch.device, args, compile_ops: set, shard: tuple[int, int]) -> int:
    """--warm-compile: every torch.compile baseline that a timing run with these arguments would time (the "+compile"
    impls of the selected cases, as --no-compile / --compile-ops select them), this shard's share of them in order,
    run once under no_grad and once forward+backward, as the harness runs them: what that compiles (the inference
    and the training graph) lands in inductor's on-disk caches. Prints each one's seconds, or its error."""
    k, n = shard
    index = 0
    for name, mod in _case_modules([s for s in args.ops.split(",") if s]):
        if args.no_compile and name not in compile_ops:
            continue
        try:
            cases = mod.cases(device, args.quick)
        except Exception as err:  # as in a timing run: reported, the rest still run
            print(f"[{name}] cases() failed: {harness.short_error(err)}", flush=True)
            continue
        for case in cases:
            for label, fn in case.impls.items():
                if "compile" not in label:
                    continue
                mine = index % n == k
                index += 1
                if not mine:
                    continue
                t0 = time.perf_counter()
                try:
                    harness.warm(case, fn, device)
                    outcome = f"{time.perf_counter() - t0:.1f} s"
                except Exception as err:  # noqa: BLE001  (the timing run reports it in its row)
                    outcome = harness.short_error(err)
                print(f"warm-compile [{case.op} {case.name} {str(case.dtype).replace('torch.', '')}] {label}: "
                      f"{outcome}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
