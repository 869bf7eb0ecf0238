"""python -m bench.tuned [RUN_autotune.json ...] [--backends RUN.jsonl ...] [--out DIR] [--check]

Merges the Triton autotuner's picks that a GPU run of `python -m bench` saved (bench/results/<run>_autotune.json) into
the table shipped for that GPU, kernels/tuned/<device slug>.json, which tuned() (kernels/_common.py) launches from
without autotuning. Per (kernel, key) a newer run's pick wins; a pick equal to the recorded one keeps the recorded
provenance (a run that launched from the table re-exports its picks unmeasured; GM_TRITON_TUNED=0 measures afresh).
A pick whose kernel is not tuned() in gm.kernels, whose config is not in the kernel's current config list, or whose key
does not have the current key's arguments is dropped (stale), in the new run and in the table alike, and reported.
--check: only report the stale picks of the shipped tables (exit status 1 when there are any).

--backends RUN.jsonl: a run's benchmark rows decide auto's backend on that GPU model (gm._backend.measured_pick):
per gm op and dtype, the backend (cuda or triton) whose eager forward+backward, summed over the run's cases that
measured both, was least; recorded in the table's "backends" section with both sums, the case count and the run's
provenance. A newer run replaces the entries it measured. Eager times, because eager is what auto serves by default.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import sys
from pathlib import Path

PROVENANCE = ("commit", "triton", "torch", "date")


def config_lists() -> dict[str, tuple[list, list[str]]]:
    """{kernel name: (current config list, key names)} of every tuned() kernel in gm.kernels."""
    import gm.kernels as pkg  # noqa: PLC0415
    from gm.kernels import _common  # noqa: PLC0415

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"gm.kernels.{info.name}")
    return dict(_common.CONFIG_LISTS)


def stale_reason(kernel: str, pick: dict, lists: dict) -> str | None:
    """Why `pick` cannot be launched by the current code, or None."""
    from gm.kernels._common import config_fields  # noqa: PLC0415

    if kernel not in lists:
        return "kernel not launched through tuned()"
    configs, key = lists[kernel]
    if config_fields(pick["config"]) not in {config_fields(c) for c in configs}:
        return "config not in the current list"
    values, dtypes = pick["key"][: len(key)], pick["key"][len(key) :]
    if any(v.startswith("torch.") for v in values) or not all(d.startswith("torch.") for d in dtypes):
        return f"key is not ({', '.join(key)}, dtypes...)"
    return None


def split_stale(picks: dict, lists: dict) -> tuple[dict, list[str]]:
    """(picks without the stale ones, one line per stale pick)."""
    kept, stale = {}, []
    for kernel, entries in picks.items():
        for p in entries:
            why = stale_reason(kernel, p, lists)
            if why:
                stale.append(f"{kernel} {p['key']} [{p['config']}]: {why}")
            else:
                kept.setdefault(kernel, []).append(p)
    return kept, stale


# Benchmark rows (op as bench/cases names it) -> the gm op whose auto choice they decide.
BENCH_OPS = {
    "masked_conv2d": "masked_conv2d",
    "row_lstm scan": "row_lstm",
    "diagonal_lstm scan": "diagonal_lstm",
    "minibatch_discrimination": "minibatch_discrimination",
    "masked_linear": "masked_linear",
    "iaf_step": "made_iaf_step",  # the bench's gm row runs gm.ops.made_iaf_step
}


def backend_picks_of(rows: list[dict]) -> dict:
    """{gm op: {dtype: {"backend", "ms": {backend: summed fwd+bwd ms}, "cases", provenance}}} from benchmark rows
    (python -m bench's jsonl): per (op, dtype), the cases where both gm[cuda] and gm[triton] ran without error."""
    measured: dict = {}
    stamp: dict = {}
    for r in rows:
        op, impl = BENCH_OPS.get(r.get("op")), re.fullmatch(r"gm\[(cuda|triton)\]", r.get("impl", ""))
        if op is None or impl is None or r.get("error") or r.get("fwdbwd_ms") is None:
            continue
        measured.setdefault((op, r["dtype"]), {}).setdefault(r["case"], {})[impl.group(1)] = r["fwdbwd_ms"]
        stamp[(op, r["dtype"])] = {k: r.get(k) for k in PROVENANCE}
    picks: dict = {}
    for (op, dtype), cases in sorted(measured.items()):
        both = [c for c in cases.values() if len(c) == 2]
        if not both:
            continue
        ms = {b: round(sum(c[b] for c in both), 4) for b in ("cuda", "triton")}
        picks.setdefault(op, {})[dtype] = {"backend": min(ms, key=ms.get), "ms": ms, "cases": len(both),
                                           **stamp[(op, dtype)]}  # fmt: skip
    return picks


def merge_backends(table: dict, rows: list[dict]) -> dict:
    """`table` with the backend picks of a run's rows merged in (a newer run's entries replace older ones)."""
    merged = {op: dict(v) for op, v in table.get("backends", {}).items()}
    for op, by_dtype in backend_picks_of(rows).items():
        for dtype, entry in by_dtype.items():
            old = merged.get(op, {}).get(dtype)
            if old is None or (old.get("date") or "") <= (entry.get("date") or ""):
                merged.setdefault(op, {})[dtype] = entry
    out = dict(table)
    out.setdefault("device", rows[0]["device"] if rows else None)
    out.setdefault("picks", {})
    out["backends"] = {op: dict(sorted(v.items())) for op, v in sorted(merged.items())}
    return out


def merge(table: dict, run: dict) -> dict:
    """`table` with the picks of `run` ({"env", "picks"}, as python -m bench writes it) merged in."""
    env = run["env"]
    stamp = {k: env.get(k) for k in PROVENANCE}
    merged = {k: {tuple(p["key"]): p for p in v} for k, v in table.get("picks", {}).items()}
    for kernel, entries in run["picks"].items():
        recorded = merged.setdefault(kernel, {})
        for p in entries:
            old = recorded.get(tuple(p["key"]))
            if old is None or (old["config"] != p["config"] and (old.get("date") or "") <= (env.get("date") or "")):
                recorded[tuple(p["key"])] = {"key": p["key"], "config": p["config"], **stamp}
    return {
        "device": env["device"],
        "about": "Triton autotuner picks measured on this GPU, launched by gm.kernels._common.tuned() without "
        "autotuning (GM_TRITON_TUNED=0 ignores them); refreshed by python -m bench.tuned",
        "picks": {k: [v[key] for key in sorted(v)] for k, v in sorted(merged.items()) if v},
        **({"backends": table["backends"]} if "backends" in table else {}),
    }


def dump(table: dict) -> str:
    """The table as JSON with one pick a line (diffs of a refresh show the picks that changed)."""
    kernels = ",\n".join(
        f"  {json.dumps(k)}: [\n" + ",\n".join(f"   {json.dumps(p)}" for p in picks) + "\n  ]"
        for k, picks in table["picks"].items()
    )
    head = "".join(f" {json.dumps(k)}: {json.dumps(v)},\n" for k, v in table.items() if k not in ("picks", "backends"))
    tail = ""
    if "backends" in table:
        ops = ",\n".join(f"  {json.dumps(op)}: {json.dumps(v)}" for op, v in table["backends"].items())
        tail = ',\n "backends": {\n' + ops + "\n }"
    return "{\n" + head + ' "picks": {\n' + kernels + "\n }" + tail + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    from gm.kernels import _common  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m bench.tuned", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", nargs="*", type=Path, help="bench/results/<run>_autotune.json files, oldest first")
    p.add_argument("--backends", nargs="*", type=Path, default=[],
                   help="bench/results/<run>.jsonl files whose gm[cuda] / gm[triton] rows decide auto's backends")
    p.add_argument("--out", type=Path, default=_common.TUNED_DIR, help="tables folder (default: kernels/tuned)")
    p.add_argument("--check", action="store_true", help="only report the stale picks of the tables in --out")
    args = p.parse_args(argv)
    lists = config_lists()
    if args.check:
        stale = []
        for path in sorted(args.out.glob("*.json")):
            stale += [f"{path.name}: {s}" for s in split_stale(json.loads(path.read_text())["picks"], lists)[1]]
        print("\n".join(stale) or "no stale picks")
        return 1 if stale else 0
    for run_path in args.runs:
        run = json.loads(run_path.read_text())
        out = args.out / f"{_common.device_slug(run['env']['device'])}.json"
        table = merge(json.loads(out.read_text()) if out.is_file() else {}, run)
        table["picks"], stale = split_stale(table["picks"], lists)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dump(table))
        count = sum(len(v) for v in table["picks"].values())
        print(f"{out}: {count} picks of {len(table['picks'])} kernels after {run_path.name}")
        for s in stale:
            print(f"  dropped {s}")
    for rows_path in args.backends:
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
        by_device: dict[str, list[dict]] = {}
        for r in rows:
            by_device.setdefault(r["device"], []).append(r)
        for device, device_rows in by_device.items():
            out = args.out / f"{_common.device_slug(device)}.json"
            table = merge_backends(json.loads(out.read_text()) if out.is_file() else {"device": device}, device_rows)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(dump(table))
            picks = [f"{op} {dt}: {e['backend']}" for op, v in table["backends"].items() for dt, e in v.items()]
            print(f"{out}: auto backends after {rows_path.name}: " + ("; ".join(picks) or "none measured"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
