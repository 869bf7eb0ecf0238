"""Build gm's native module with the CUDA kernels emulated on the host.

The whole csrc/ tree is staged into a build directory: .cu/.cuh files (and any header with CUDA-only syntax) go
through translate.py, everything else is copied as is. Every csrc .cpp and .cu file is then compiled with g++
against the stand-in CUDA headers in include/ (with GM_WITH_CUDA defined, as the real CUDA build), together with the
emulator runtime (src/runtime.cpp) and its binding (src/emu_bind.cpp), into a pybind11 module with the same entry
points as gm._C. Objects are cached by content hash, so an unchanged tree relinks nothing and a one-file edit
recompiles one file.

    python -m tools.cuda_emu.build            # prints the module's path
    python -m tools.cuda_emu.build --jobs 4 --cache /tmp/emu
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tools.cuda_emu"

from .translate import supported_ptx, translate  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
CUDA_SUFFIXES = (".cu", ".cuh")
HEADER_SUFFIXES = (".h", ".hpp", ".cuh")

# Emulated kernels and the runtime are optimised (they run); the CPU twins and pybind glue are only linked.
FAST_FLAGS = ["-O1"]
LINK_ONLY_FLAGS = ["-O0"]


class BuildUnavailable(RuntimeError):
    """The emulator cannot be built on this machine (the reason says why)."""


def default_cache() -> Path:
    """GM_EMU_CACHE, else ~/.cache/gm/cuda_emu (XDG_CACHE_HOME honoured), else a temp directory if that is not
    writable."""
    env = os.environ.get("GM_EMU_CACHE")
    if env:
        return Path(env)
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gm" / "cuda_emu"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"gm-cuda-emu-{os.getuid()}"


KEEP_DAYS = 14  # cached objects and libraries unused this long are removed after a build


def _prune(cache: Path, used: list[Path]) -> None:
    now = time.time()
    for p in used:
        os.utime(p, (now, now))
    for p in [*cache.glob("obj/*.o"), *cache.glob("lib/*/_C*")]:
        try:
            if now - p.stat().st_mtime > KEEP_DAYS * 86400:
                p.unlink()
        except OSError:
            pass


def unavailable_reason() -> str | None:
    """Why the emulator cannot build here, or None."""
    if not sys.platform.startswith("linux"):
        return f"the emulator's fibers use glibc ucontext (Linux only), this is {sys.platform}"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH"
    try:
        import pybind11  # noqa: F401, PLC0415
    except ImportError:
        return "pybind11 is not installed"
    return None


def _compiler() -> list[str]:
    return os.environ.get("CXX", "g++").split()


def _compiler_id(cxx: list[str]) -> str:
    return subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=True).stdout


Mutations = dict[str, "tuple[str, str] | list[tuple[str, str]]"]


def stage(dst: Path, mutations: Mutations | None = None) -> dict[str, str]:
    """Write the emulator's view of csrc/ under dst/csrc; returns {relative path: staged text}.

    mutations: {"csrc/<path>": (old, new) or [(old, new), ...]} text replacements applied before translation (each
    old must occur exactly once), for tests that prove the emulator catches a seeded bug."""
    mutations = dict(mutations or {})
    known = supported_ptx()
    staged = {}
    for path in sorted(CSRC.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text()
        if rel in mutations:
            edits = mutations.pop(rel)
            for old, new in [edits] if isinstance(edits, tuple) else edits:
                if text.count(old) != 1:
                    raise ValueError(f"mutation of {rel}: {old!r} occurs {text.count(old)} times, expected once")
                text = text.replace(old, new)
        if path.suffix in CUDA_SUFFIXES or path.suffix in HEADER_SUFFIXES:
            text = translate(text, rel, known, always=path.suffix == ".cu")
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        staged[rel] = text
    if mutations:
        raise ValueError(f"mutations name files that are not in csrc/: {sorted(mutations)}")
    return staged


_QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)


def _csrc_deps(rel: str, text: str, staged: dict[str, str]) -> list[str]:
    """The staged csrc files `text` (the file `rel`) includes with "...", transitively (the emulator's own headers
    are hashed for every unit)."""
    seen: set[str] = set()
    todo = [(rel, text)]
    while todo:
        where, body = todo.pop()
        for inc in _QUOTED_INCLUDE.findall(body):
            for cand in (posixpath.normpath(posixpath.join(posixpath.dirname(where), inc)), f"csrc/{inc}"):
                if cand in staged:
                    if cand not in seen:
                        seen.add(cand)
                        todo.append((cand, staged[cand]))
                    break
    return sorted(seen)


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:24]


def build(
    cache: Path | None = None,
    *,
    mutations: Mutations | None = None,
    jobs: int | None = None,
    verbose: bool = False,
) -> Path:
    """Compile (or reuse) the emulated module; returns the path of its shared library."""
    why = unavailable_reason()
    if why:
        raise BuildUnavailable(why)
    import pybind11  # noqa: PLC0415

    cache = Path(cache) if cache is not None else default_cache()
    (cache / "obj").mkdir(parents=True, exist_ok=True)
    cxx = _compiler()
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"

    with tempfile.TemporaryDirectory(prefix="gm-cuda-emu-") as tmp:
        root = Path(tmp)
        staged = stage(root, mutations)
        include = HERE / "include"
        emu_headers = _digest(*(f"{p.relative_to(HERE)}\n{p.read_text()}" for p in sorted(include.rglob("*.h"))))
        common = [
            "-std=c++17",
            "-fPIC",
            "-fopenmp",
            "-w",
            "-DGM_WITH_CUDA",
            '-DGM_CUDA_ARCHS_STR="emulated"',
            f"-I{include}",
            f"-I{root / 'csrc'}",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
        ]
        units = []  # (source path, relative name, flags, text)
        for rel, text in staged.items():
            if rel.endswith(".cu"):
                units.append((root / rel, rel, [*FAST_FLAGS, "-x", "c++"], text))
            elif rel.endswith(".cpp"):
                units.append((root / rel, rel, LINK_ONLY_FLAGS, text))
        for name, flags in (("runtime.cpp", FAST_FLAGS), ("emu_bind.cpp", LINK_ONLY_FLAGS)):
            src = HERE / "src" / name
            units.append((src, f"tools/cuda_emu/src/{name}", flags, src.read_text()))

        ident = _compiler_id(cxx)
        objects = []
        todo = []
        for src, rel, flags, text in units:
            # The staging directory's name changes every build: the key names the flags without it.
            stable = [f for f in common + flags if not f.startswith(f"-I{root}")]
            deps = [f"{d}\n{staged[d]}" for d in _csrc_deps(rel, text, staged)]
            key = _digest(ident, " ".join(stable), emu_headers, rel, text, *deps)
            obj = cache / "obj" / f"{src.stem}-{key}.o"
            objects.append(obj)
            if not obj.exists():
                todo.append((src, flags, obj))

        def compile_one(item):
            src, flags, obj = item
            tmp_obj = obj.with_suffix(f".{os.getpid()}.tmp")
            cmd = [*cxx, *common, *flags, "-c", str(src), "-o", str(tmp_obj)]
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                tmp_obj.unlink(missing_ok=True)
                return f"{src}:\n{res.stderr[-6000:]}"
            os.replace(tmp_obj, obj)
            return None

        workers = jobs or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = [e for e in pool.map(compile_one, todo) if e]
        if errors:
            raise RuntimeError("gm CUDA emulator: compilation failed\n" + "\n".join(errors))

    lib_dir = cache / "lib" / _digest(*(o.name for o in objects))
    lib = lib_dir / f"_C{ext_suffix}"
    if not lib.exists():
        lib_dir.mkdir(parents=True, exist_ok=True)
        tmp_lib = lib_dir / f"_C.{os.getpid()}.tmp"
        cmd = [*cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(tmp_lib)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"gm CUDA emulator: link failed\n{res.stderr[-6000:]}")
        os.replace(tmp_lib, lib)
    _prune(cache, [*objects, lib])
    return lib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None, help=f"object/library cache (default {default_cache()})")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the compiler commands")
    args = ap.parse_args(argv)
    print(build(args.cache, jobs=args.jobs, verbose=args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
