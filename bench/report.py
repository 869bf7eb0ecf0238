"""Rewrites the README's results section from bench/results/*.jsonl: `python -m bench.report [--check]`.

For each (device, op, case, dtype) the newest run's rows are kept; gm rows are shown beside the case's baselines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- results -->"


def load_rows(results_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(results_dir.glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    newest: dict[tuple, str] = {}
    for r in rows:
        key = (r["device"], r["op"], r["case"], r["dtype"])
        newest[key] = max(newest.get(key, ""), r["date"])
    return [r for r in rows if r["date"] == newest[(r["device"], r["op"], r["case"], r["dtype"])]]


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render(rows: list[dict]) -> str:
    out = []
    for device in sorted({r["device"] for r in rows}):
        dev_rows = [r for r in rows if r["device"] == device]

        # The table may draw on several runs (each (op, case, dtype) from its newest): name each run and its ops.
        def run_of(r):
            return (r["date"], r["torch"], r["triton"], r["commit"], r.get("triton_autotune"), r.get("triton_fast_launch"))

        runs: dict[tuple, list[str]] = {}
        for r in sorted(dev_rows, key=lambda r: r["date"]):
            ops = runs.setdefault(run_of(r), [])
            if r["op"] not in ops:
                ops.append(r["op"])
        number = {key: i + 1 for i, key in enumerate(runs)}
        lines = {}
        for key in runs:
            date, torch_v, triton_v, commit, autotune, fast_launch = key
            tuned = {False: ", Triton kernels on their first config (autotune off)",
                     "picks": ", Triton kernels on the shipped picks, else their first config (no autotuning)"}.get(
                autotune, "")  # fmt: skip
            tuned += {False: ", Triton's own launch path (fast launch off)"}.get(fast_launch, "")
            lines[key] = f"torch {torch_v}, triton {triton_v}, commit {commit}, {date}{tuned}"
        several = len(runs) > 1
        if several:
            out.append(f"**{device}**, rows from {len(runs)} runs (the run column):\n")
            out += [f"{number[key]}. {line}: {', '.join(runs[key])}" for key, line in lines.items()] + [""]
        else:
            out.append(f"**{device}** ({next(iter(lines.values()))})\n")
        # Optional columns, each shown where some row has it: the host's time to issue a fwd+bwd (GPU runs: a row
        # whose fwd+bwd ms is near it is host-bound), the device kernels' time per fwd+bwd (runs with
        # --profile on a GPU: a host-bound row's wall time is far above it), the fwd+bwd replayed from a CUDA graph
        # (--graphs: no host cost per launch), and the run a row comes from when the table draws on several.
        extras = []
        if any(r.get("host_fwdbwd_ms") is not None for r in dev_rows):  # GPU runs: the host's issue time
            extras.append(("fwd+bwd host ms", lambda r: _ms(r.get("host_fwdbwd_ms"))))
        if any(r.get("kernels_fwdbwd_ms") is not None for r in dev_rows):
            extras.append(("fwd+bwd device kernels ms", lambda r: _ms(r.get("kernels_fwdbwd_ms"))))
        if any(r.get("graph_fwdbwd_ms") is not None or r.get("graph_error") for r in dev_rows):
            extras.append(("fwd+bwd CUDA graph ms",
                           lambda r: "capture failed" if r.get("graph_error") else _ms(r.get("graph_fwdbwd_ms"))))  # fmt: skip
        if any(r.get("speedup_graph") is not None for r in dev_rows):  # the kernels' speedup, no host cost
            extras.append(("speedup, CUDA graphs", lambda r: _x(r.get("speedup_graph"))))
        if several:
            extras.append(("run", lambda r: str(number[run_of(r)])))
        extra_head = "".join(f" {name} |" for name, _ in extras)
        out.append(f"| op | case | dtype | impl | fwd ms | fwd+bwd ms |{extra_head} speedup fwd+bwd vs baseline | "
                   f"TFLOP/s fwd |")  # fmt: skip
        out.append(f"|---|---|---|---|---|---|{'---|' * len(extras)}---|---|")
        for r in dev_rows:
            if r.get("error"):
                blank = "".join(f" {get(r)} |" if name == "run" else " |" for name, get in extras)
                out.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['impl']} | {r['error']} | |{blank} | |")
                continue
            tf = "-" if r.get("tflops_fwd") is None else f"{r['tflops_fwd']:.1f}"
            extra = "".join(f" {get(r)} |" for _, get in extras)
            out.append(
                f"| {r['op']} | {r['case']} | {r['dtype']} | {r['impl']} | {_ms(r['fwd_ms'])} | {_ms(r['fwdbwd_ms'])} |"
                f"{extra} {_x(r.get('speedup_fwdbwd'))} | {tf} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--print", action="store_true", help="print the section instead of rewriting the README")
    p.add_argument("--check", action="store_true", help="exit 1 when the README's section is not what the results give")
    args = p.parse_args(argv)
    section = render(load_rows(Path(args.results)))
    if args.print:
        print(section)
        return 0
    readme = Path(args.readme)
    text = readme.read_text()
    if MARK not in text:
        print(f"{readme} has no {MARK} marker", file=sys.stderr)
        return 1
    head = text[: text.index(MARK) + len(MARK)]
    new = head + "\n\n" + section + "\n"
    if args.check:
        if new != text:
            print(f"{readme}'s results section is stale: run python -m bench.report", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
