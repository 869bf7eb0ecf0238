"""Source rewriting that lets g++ compile gm's CUDA files (.cu, .cuh) against the emulator headers.

Only the constructs C++ has no spelling for are rewritten; everything else compiles as written:

- `kernel<<<grid, block, smem, stream>>>(args)` -> `::gm_emu::launch(kernel, "kernel", "file:line", grid, block,
  smem, stream)(args)`
- `extern __shared__ T name[];` -> a pointer to the launch's dynamic shared memory
- `__shared__ T name[...];` -> block-shared static storage, registered so it is poisoned before every block
- `asm [volatile]("op.a.b %0, [%1], {%2, %3};" : outputs : inputs)` -> `::gm_emu::ptx::op_a_b(...)`, operands in
  template order (see include/gm_emu/ptx.h); an instruction with no emulation raises TranslateError naming it.

Line numbers are kept (a rewrite never adds or removes newlines) and a #line directive names the original file, so
compiler errors and emulator messages point at csrc/.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
PTX_HEADER = HERE / "include" / "gm_emu" / "ptx.h"


class TranslateError(ValueError):
    pass


def _line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def _skip_string(src: str, i: int) -> int:
    """Index just past the string or char literal starting at src[i]."""
    quote = src[i]
    i += 1
    while src[i] != quote:
        i += 2 if src[i] == "\\" else 1
    return i + 1


def _mask(src: str) -> str:
    """src with the insides of comments and string/char literals blanked (same length, newlines kept), so the
    rewrites never match text in a comment or a string."""
    out, i, n = list(src), 0, len(src)

    def blank(a: int, b: int) -> None:
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif src[i] in "\"'" and not (src[i] == "'" and i > 0 and src[i - 1].isalnum()):  # 1'000 digit separators
            j = _skip_string(src, i)
            blank(i + 1, j - 1)
            i = j
        else:
            i += 1
    return "".join(out)


def _sub(pattern: re.Pattern, src: str, fn) -> str:
    """pattern.sub on the code of src (matches found in the masked text; fn(match, group) builds the replacement,
    group(k) giving the original text of group k)."""
    out, pos = [], 0
    for m in pattern.finditer(_mask(src)):
        out.append(src[pos : m.start()])
        out.append(fn(m, lambda k, m=m: src[m.start(k) : m.end(k)] if m.start(k) >= 0 else ""))
        pos = m.end()
    out.append(src[pos:])
    return "".join(out)


def _matching_paren(src: str, i: int) -> int:
    """Index of the ')' matching the '(' at src[i]."""
    depth = 0
    while True:
        c = src[i]
        if c in "\"'":
            i = _skip_string(src, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i
        i += 1


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside brackets and string literals."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


# ---------------------------------------------------------------------------------------------------------------- asm


def supported_ptx() -> set[str]:
    return set(re.findall(r"^inline void (\w+)\(", PTX_HEADER.read_text(), flags=re.M)) | set(
        re.findall(r"^GM_EMU_MMA\((\w+),", PTX_HEADER.read_text(), flags=re.M)
    )


def _unquote(lits: str) -> str:
    """Concatenate adjacent C string literals."""
    out = []
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"', lits):
        out.append(m.group(1).encode().decode("unicode_escape"))
    return "".join(out)


def _operands(section: str, where: str) -> list[str]:
    out = []
    for item in _split_top(section, ","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r'"([=+&]*)([a-z]+)"\s*\((.*)\)', item, flags=re.S)
        if not m:
            raise TranslateError(f"{where}: cannot read asm operand {item!r}")
        out.append(f"({m.group(3).strip()})")
    return out


def _asm_call(inner: str, where: str, known: set[str]) -> str:
    sections = _split_top(inner, ":")
    template = _unquote(sections[0]).strip()
    outputs = _operands(sections[1], where) if len(sections) > 1 else []
    inputs = _operands(sections[2], where) if len(sections) > 2 else []
    ops = outputs + inputs
    instrs = [s.strip() for s in template.replace("\n", ";").split(";") if s.strip()]
    if len(instrs) != 1:
        raise TranslateError(f"{where}: asm with {len(instrs)} instructions is not emulated: {template!r}")
    head, _, rest = instrs[0].partition(" ")
    name = head.replace(".", "_")
    if name not in known:
        raise TranslateError(
            f"{where}: PTX instruction {head!r} has no emulation: add `gm_emu::ptx::{name}` to {PTX_HEADER}"
        )

    def operand(tok: str) -> list[str]:
        tok = tok.strip()
        if tok.startswith("{") and tok.endswith("}"):
            return [x for t in tok[1:-1].split(",") for x in operand(t)]
        if tok.startswith("[") and tok.endswith("]"):
            tok = tok[1:-1].strip()
        m = re.fullmatch(r"%(\d+)", tok)
        if m:
            return [ops[int(m.group(1))]]
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok):
            return [tok]
        raise TranslateError(f"{where}: asm operand {tok!r} of {head!r} is not emulated")

    args = [a for tok in _split_top(rest, ",") if tok.strip() for a in operand(tok)]
    return f"::gm_emu::ptx::{name}({', '.join(args)})"


def _rewrite_asm(src: str, path: str, known: set[str]) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\basm\s*(?:volatile\s*|__volatile__\s*)?\(", _mask(src)):
        if m.start() < pos:
            continue
        open_paren = m.end() - 1
        close = _matching_paren(src, open_paren)
        where = f"{path}:{_line_of(src, m.start())}"
        call = _asm_call(src[open_paren + 1 : close], where, known)
        out.append(src[pos : m.start()])
        out.append(call + "\n" * src.count("\n", m.start(), close + 1))
        pos = close + 1
    out.append(src[pos:])
    return "".join(out)


# ---------------------------------------------------------------------------------------------------- shared, launch

_ALIGN = r"(?:__align__\(\s*\d+\s*\)\s*)?"
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+" + _ALIGN + r"([A-Za-z_][\w:<>, ]*?)\s+" + _ALIGN + r"(\w+)\s*\[\s*\]\s*;"
)
_STATIC_SHARED = re.compile(r"__shared__\s+(" + _ALIGN + r")([A-Za-z_][\w:<>, ]*?)\s+(\w+)((?:\s*\[[^\];]+\])*)\s*;")
_LAUNCH = re.compile(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def _rewrite_shared(src: str) -> str:
    src = _sub(
        _EXTERN_SHARED,
        src,
        lambda m, g: f"{g(1)}* const {g(2)} = reinterpret_cast<{g(1)}*>(::gm_emu::dynamic_smem());",
    )

    def static(m: re.Match, g) -> str:
        align, type_, name, dims = g(1), g(2), g(3), g(4)
        return (
            f"{align}static {type_} {name}{dims}; [[maybe_unused]] static const bool gm_emu_smem_{name}_ = "
            f"::gm_emu::register_static_smem(&{name}, sizeof({name}));"
        )

    return _sub(_STATIC_SHARED, src, static)


def _rewrite_launches(src: str, path: str) -> str:
    def launch(m: re.Match, g) -> str:
        name, cfg = g(1), g(2)
        where = f"{path}:{_line_of(src, m.start())}"
        newlines = "\n" * m.group(0).count("\n")
        cfg = " ".join(cfg.split())
        return f'::gm_emu::launch({name}, "{name}", "{where}", {cfg})({newlines}'

    return _sub(_LAUNCH, src, launch)


def translate(src: str, path: str, known: set[str] | None = None, always: bool = True) -> str:
    """The emulator's version of one CUDA source file (`path` names it in messages and #line). A file with nothing
    to rewrite comes back unchanged unless `always` (a .cu file always gets the emulator's cuda_runtime.h, which
    nvcc would have included implicitly)."""
    known = supported_ptx() if known is None else known
    out = _rewrite_asm(src, path, known)
    out = _rewrite_shared(out)
    out = _rewrite_launches(out, path)
    masked = _mask(out)
    leftovers = ((r"\b__shared__\b", "__shared__ declaration"), (r"<<<", "kernel launch"), (r"\basm\b", "asm"))
    for pattern, what in leftovers:
        m = re.search(pattern, masked)
        if m:
            raise TranslateError(f"{path}:{_line_of(out, m.start())}: a {what} the emulator's translator does not read")
    if src.count("\n") != out.count("\n"):
        raise TranslateError(f"{path}: translation changed the line count (a rewrite bug)")
    if out == src and not always:
        return src
    return f'#include <cuda_runtime.h>\n#line 1 "{path}"\n' + out
