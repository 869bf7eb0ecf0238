"""Static look at CUDA kernels without a GPU: `python tools/sass_loops.py FILE.cu [--kernel SUBSTR] [--arch 90]`.

Compiles FILE.cu (nvcc, the build's flags) to a cubin, disassembles it with the cuobjdump that Triton ships, and for
each kernel prints its instruction count and every loop (a backward branch) with its length and instruction mix:
tensor-core MMAs (HMMA), global loads and async copies, shared-memory loads, calls (64-bit integer division is a
call), I2F (the start of a 32-bit integer division). A loop whose MMAs are a small part of its instructions is
issue-bound on everything else: that is how the masked_conv weight gradient's per-stage index math was found
(bench/NOTES.md, session 6). Counts per loop iteration, not timing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_INSN = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\S*)")
_BRA = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
_WATCH = ("HMMA", "LDG", "LDGSTS", "LDSM", "LDS", "STG", "STS", "CALL", "I2F", "MUFU", "BAR")


def cuobjdump() -> str:
    import triton  # noqa: PLC0415

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def sass(source: Path, arch: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        subprocess.run(["nvcc", "-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-DGM_WITH_CUDA",
                        f"-arch=sm_{arch}", f"-I{ROOT / 'csrc'}", "-cubin", "-o", str(cubin), str(source)],
                       check=True)  # fmt: skip
        return subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout


def kernels(text: str) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    name = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = _INSN.match(line)
        if m and name:
            out[name].append((int(m.group(1), 16), m.group(2) + m.group(3), line))
    return out


def loops(insns) -> list[tuple[int, int, Counter]]:
    addrs = [a for a, _, _ in insns]
    found = []
    for i, (addr, op, line) in enumerate(insns):
        m = _BRA.search(line) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in addrs:
            j = addrs.index(int(m.group(1), 16))
            found.append((insns[j][0], i - j + 1, Counter(o.split(".")[0] for _, o, _ in insns[j : i + 1])))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--kernel", default="", help="only kernels whose mangled name contains this")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    for name, insns in kernels(sass(Path(args.source), args.arch)).items():
        if args.kernel not in name:
            continue
        total = Counter(o.split(".")[0] for _, o, _ in insns)
        print(f"{name[:110]}\n  {len(insns)} instructions; " + ", ".join(f"{k} {total[k]}" for k in _WATCH if total[k]))
        for start, length, mix in loops(insns):
            print(
                f"  loop @{start:#06x}: {length} instructions; " + ", ".join(f"{k} {mix[k]}" for k in _WATCH if mix[k])
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
