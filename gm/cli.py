"""The command line: `gm info | bench` (train, eval and sample arrive with the models)."""

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
    from bench.__main__ import main as bench_main  # noqa: PLC0415

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gm", description="gm: kernels and models for the generative models of 2016")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, device and available backends")
    pi.add_argument("--triton-interpret", action="store_true", help="report as if TRITON_INTERPRET=1")
    pi.set_defaults(func=_cmd_info)
    pb = sub.add_parser("bench", help="run the benchmark table (same as python -m bench)")
    pb.add_argument("rest", nargs=argparse.REMAINDER)
    pb.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
