"""python -m bench.targets RUN.jsonl [RUN.jsonl ...] [--device SUBSTR]

Each issue's benchmark target checked against benchmark rows (python -m bench's jsonl): per case and dtype, gm's
best backend (the least forward+backward among its gm[...] rows) against the comparator the issue names, the
ratio against the required one, eager and, where both rows were also replayed from CUDA graphs (--graphs), without
the host's per-launch cost. A case whose comparator did not run (out of memory, not measured) says so instead of a
ratio. Later files' rows replace earlier ones for the same (device, op, case, dtype, impl). The targets are the
issues' (gm issues 2-6); GPU targets are read from GPU rows, the CPU ones from CPU rows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FP32_PEAK_TFLOPS = 50.0  # H200 float32 without tensor cores, measured (shared/ANCHORS.md; bench/NOTES.md)


@dataclass(frozen=True)
class Target:
    issue: int
    op: str
    comparator: str
    required: float
    what: str
    gpu: bool = True
    dtype: str | None = None  # only rows of this dtype
    case: str | None = None  # only cases matching this regular expression


TARGETS = [
    Target(2, "masked_conv2d", "F.conv2d(masked w)", 1.5, "masked_conv2d bf16 fwd+bwd vs cuDNN", dtype="bfloat16"),
    Target(2, "masked_conv2d", "F.conv2d(masked w)", 1.0, "masked_conv2d fp32 fwd+bwd not slower than cuDNN",
           dtype="float32"),  # fmt: skip
    Target(3, "diagonal_bilstm", "reference", 20.0, "DiagonalBiLSTM layer vs the eager reference"),
    Target(3, "diagonal_bilstm", "cuDNN nn.LSTM 63 steps", 1.0, "DiagonalBiLSTM layer not slower than cuDNN's LSTM"),
    Target(3, "row_lstm", "reference", 10.0, "RowLSTM layer vs the eager reference"),
    Target(3, "row_lstm scan", "reference", 5.0, "C++ row scan vs the eager reference (CPU)", gpu=False),
    Target(3, "diagonal_lstm scan", "reference", 5.0, "C++ diagonal scan vs the eager reference (CPU)", gpu=False),
    Target(4, "minibatch_discrimination", "naive (N×N×B×C)", 20.0, "minibatch vs the naive tensor, N >= 1024",
           case=r"N=(1024|2048|[1-9]\d{4,}|[2-9]\d{3}) "),  # fmt: skip
    Target(4, "minibatch_discrimination", "torch.cdist(p=1)", 100.0, "minibatch vs torch.cdist(p=1)"),
    Target(4, "minibatch_discrimination", "naive (N×N×B×C)", 5.0, "minibatch vs the naive tensor at N=512 (CPU)",
           gpu=False, case=r"N=512 "),  # fmt: skip
    Target(5, "iaf_step", "reference", 3.0, "IAF step vs the eager reference"),
    Target(5, "iaf_step", "reference+compile", 1.5, "IAF step vs the reference under torch.compile"),
    Target(5, "masked_linear", "F.linear(masked w)", 1.6, "masked_linear bf16 vs F.linear on the masked weight",
           dtype="bfloat16"),  # fmt: skip
    Target(6, "model:diagonal_bilstm", "reference", 10.0, "Diagonal BiLSTM model training step vs eager reference"),
    Target(6, "model:rowlstm", "reference", 5.0, "Row LSTM model training step vs eager reference"),
    Target(6, "model:pixelcnn", "reference", 1.3, "PixelCNN model training step vs eager reference"),
    Target(6, "model:diagonal_bilstm", "reference+compile", 1.0, "Diagonal BiLSTM model vs compiled reference"),
    Target(6, "model:rowlstm", "reference+compile", 1.0, "Row LSTM model vs compiled reference"),
    Target(6, "model:pixelcnn", "reference+compile", 1.0, "PixelCNN model vs compiled reference"),
]


def load(paths: list[Path]) -> list[dict]:
    """Rows of the files, a later row replacing an earlier one of the same (device, op, case, dtype, impl)."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[(r["device"], r["op"], r["case"], r["dtype"], r["impl"])] = r
    return list(rows.values())


def _is_gpu(device: str) -> bool:
    return not device.lower().startswith("cpu")


def _ratio(base, ours):
    return base / ours if base and ours else None


def check(target: Target, rows: list[dict]) -> list[dict]:
    """One result per (device, case, dtype) the target covers: gm's best backend, the comparator, the ratios."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["op"] != target.op or _is_gpu(r["device"]) != target.gpu:
            continue
        if target.dtype and r["dtype"] != target.dtype or target.case and not re.search(target.case, r["case"] + " "):
            continue
        groups.setdefault((r["device"], r["case"], r["dtype"]), []).append(r)
    for (device, case, dtype), group in groups.items():
        ours = [r for r in group if r["impl"].startswith("gm[") and not r.get("error") and r.get("fwdbwd_ms")]
        base = next((r for r in group if r["impl"] == target.comparator), None)
        res = {"device": device, "case": case, "dtype": dtype, "best": None, "ms": None, "base_ms": None,
               "ratio": None, "graph_ratio": None, "host": None, "note": ""}  # fmt: skip
        if not ours:
            res["note"] = "no gm row ran"
            out.append(res)
            continue
        best = min(ours, key=lambda r: r["fwdbwd_ms"])
        res.update(best=best["impl"], ms=best["fwdbwd_ms"], host=(best.get("host_fwdbwd_ms"), (base or {}).get(
            "host_fwdbwd_ms")))  # fmt: skip
        if base is None or base.get("error") or not base.get("fwdbwd_ms"):
            res["note"] = f"{target.comparator}: " + ((base or {}).get("error") or "not measured")
        else:
            res["base_ms"] = base["fwdbwd_ms"]
            res["ratio"] = _ratio(base["fwdbwd_ms"], best["fwdbwd_ms"])
            graphs = [r for r in ours if r.get("graph_fwdbwd_ms")]
            if graphs and base.get("graph_fwdbwd_ms"):
                res["graph_ratio"] = _ratio(base["graph_fwdbwd_ms"], min(r["graph_fwdbwd_ms"] for r in graphs))
        out.append(res)
    return out


def floor_check(rows: list[dict]) -> list[dict]:
    """Issue 4's arithmetic floor: the best gm forward against 3*N^2*B*C float32 operations at FP32_PEAK_TFLOPS, N >=
    4096 (required within 3x), and whether N=65536 ran."""
    out = []
    for r in rows:
        m = re.match(r"N=(\d+) B=(\d+) C=(\d+)", r["case"])
        if r["op"] != "minibatch_discrimination" or not m or not _is_gpu(r["device"]) or not r["impl"].startswith("gm["):
            continue
        n, b, c = (int(v) for v in m.groups())
        if n < 4096 or r.get("error") or not r.get("fwd_ms"):
            continue
        floor_ms = 3 * n * n * b * c / (FP32_PEAK_TFLOPS * 1e12) * 1e3
        out.append({"device": r["device"], "case": r["case"], "impl": r["impl"], "fwd_ms": r["fwd_ms"],
                    "floor_ms": floor_ms, "x_floor": r["fwd_ms"] / floor_ms})  # fmt: skip
    return out


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def report(rows: list[dict], device_filter: str | None = None) -> str:
    if device_filter:
        rows = [r for r in rows if device_filter.lower() in r["device"].lower()]
    lines = ["| issue | target | device | case | dtype | gm best | ms | comparator ms | ratio | required | met | "
             "ratio, CUDA graphs | host ms (gm / comparator) |", "|" + "---|" * 13]  # fmt: skip
    summary: dict[int, list[bool | None]] = {}
    for t in TARGETS:
        for res in check(t, rows):
            met = None if res["ratio"] is None else res["ratio"] >= t.required
            summary.setdefault(t.issue, []).append(met)
            ratio = f"{res['ratio']:.2f}x" if res["ratio"] is not None else res["note"]
            graph = f"{res['graph_ratio']:.2f}x" if res["graph_ratio"] is not None else "-"
            # the host's issue time of each (GPU runs from session 12 on): near its ms, a row is host-bound
            host = "-" if not res["host"] or res["host"] == (None, None) else " / ".join(_fmt(v) for v in res["host"])
            lines.append(
                f"| {t.issue} | {t.what} | {res['device']} | {res['case']} | {res['dtype']} | {res['best'] or '-'} | "
                f"{_fmt(res['ms'])} | {_fmt(res['base_ms'])} | {ratio} | {t.required:g}x | "
                f"{'-' if met is None else 'yes' if met else 'NO'} | {graph} | {host} |"
            )
    floors = floor_check(rows)
    if floors:
        lines += ["", "| issue 4: forward vs the fp32 floor (N >= 4096, required within 3x) | device | impl | fwd ms | "
                  "floor ms | x floor |", "|---|---|---|---|---|---|"]  # fmt: skip
        for f in floors:
            lines.append(f"| {f['case']} | {f['device']} | {f['impl']} | {f['fwd_ms']:.3f} | {f['floor_ms']:.3f} | "
                         f"{f['x_floor']:.2f}x |")  # fmt: skip
    lines.append("")
    for issue, met in sorted(summary.items()):
        measured = [m for m in met if m is not None]
        lines.append(f"issue {issue}: {sum(measured)} of {len(measured)} measured target rows met"
                     + (f" ({len(met) - len(measured)} without a comparator row)" if len(measured) < len(met) else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", nargs="+", type=Path, help="bench/results/*.jsonl files, oldest first")
    p.add_argument("--device", default=None, help="only devices whose name contains this")
    args = p.parse_args(argv)
    print(report(load(args.runs), args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
