"""python -m bench.tuned [RUN_autotune.json ...] [--out DIR] [--check]

Merges the Triton autotuner's picks that a GPU run of `python -m bench` saved (bench/results/<run>_autotune.json) into
the table shipped for that GPU, kernels/tuned/<device slug>.json, which tuned() (kernels/_common.py) launches from
without autotuning. Per (kernel, key) a newer run's pick wins; a pick equal to the recorded one keeps the recorded
provenance (a run that launched from the table re-exports its picks unmeasured; GM_TRITON_TUNED=0 measures afresh).
A pick whose kernel is not tuned() in gm.kernels, whose config is not in the kernel's current config list, or whose key
does not have the current key's arguments is dropped (stale), in the new run and in the table alike, and reported.
--check: only report the stale picks of the shipped tables (exit status 1 when there are any).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
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
    }


def dump(table: dict) -> str:
    """The table as JSON with one pick a line (diffs of a refresh show the picks that changed)."""
    kernels = ",\n".join(
        f"  {json.dumps(k)}: [\n" + ",\n".join(f"   {json.dumps(p)}" for p in picks) + "\n  ]"
        for k, picks in table["picks"].items()
    )
    head = "".join(f" {json.dumps(k)}: {json.dumps(v)},\n" for k, v in table.items() if k != "picks")
    return "{\n" + head + ' "picks": {\n' + kernels + "\n }\n}\n"


def main(argv: list[str] | None = None) -> int:
    from gm.kernels import _common  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m bench.tuned", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", nargs="*", type=Path, help="bench/results/<run>_autotune.json files, oldest first")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
