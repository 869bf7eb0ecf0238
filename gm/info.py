"""gm.info(): versions, device, and which backends can run here (and why not)."""

from __future__ import annotations

import os
import platform

import torch

from gm._backend import BACKENDS, availability, triton_interpreted, triton_status
from gm._ext import cuda_status, ext_status


def info_dict() -> dict:
    import gm  # noqa: PLC0415

    ext_ok, ext_why = ext_status()
    cuda_ok, cuda_why = cuda_status()
    triton_ok, triton_why = triton_status()
    d = {
        "gm": gm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})",
        "extension": "built" if ext_ok else f"missing: {ext_why}",
        "extension_cuda": "yes" if cuda_ok else f"no: {cuda_why}",
        "triton": "missing: " + triton_why if not triton_ok else _triton_version(),
        "triton_mode": "interpreted (TRITON_INTERPRET=1)" if triton_interpreted() else _triton_launch(),
    }
    if triton_ok:
        d["triton_tuned"] = _tuned_tables()
    if ext_ok:
        from gm._ext import ext  # noqa: PLC0415

        d["extension_cuda_archs"] = ext().cuda_archs or "-"
        d["openmp_threads"] = ext().omp_max_threads()
    d["auto_backends"] = _auto_backends()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for b in BACKENDS:
        ok, why = availability(b, device)
        if ok and b == "cpu":
            ok, why = ext_ok, ext_why
        d[f"backend.{b}"] = "available" if ok else f"unavailable: {why}"
    return d


def _triton_launch() -> str:
    """Compiled mode and the launch path (gm.kernels._launch)."""
    if os.environ.get("GM_TRITON_FAST_LAUNCH", "1") == "0":
        return "compiled, Triton's own launch path (GM_TRITON_FAST_LAUNCH=0)"
    return "compiled, gm's fast launch path after each launch signature's first call"


def _tuned_tables() -> str:
    """Whether a table of autotuner picks (launched by gm.kernels._common.tuned) ships for this GPU, and which do."""
    from gm.kernels import _common  # noqa: PLC0415

    tables = _common.shipped_tables()
    listed = ", ".join(f"{slug} ({n} picks)" for slug, n in tables.items())
    ships = f"tables ship for {listed}" if tables else "no table ships"
    slug = _common.current_device_slug()
    if slug is None:
        return f"no GPU here; {ships}"
    if slug not in tables:
        return f"none for {slug}: each launch shape is autotuned at first use; {ships}"
    kernels = len(_common.tuned_table(slug).get("picks", {}))
    off = {"GM_TRITON_AUTOTUNE": _common.AUTOTUNE, "GM_TRITON_TUNED": _common.TUNED}
    unused = "".join(f" (unused: {var}=0)" for var, on in off.items() if not on)
    if _common.PICKS_ONLY:
        unused += " (GM_TRITON_AUTOTUNE=picks: elsewhere each kernel's first suitable config, nothing timed)"
    return f"kernels/tuned/{slug}.json: {tables[slug]} picks of {kernels} kernels{unused}"


def _auto_backends() -> str:
    """Which backends auto takes on this GPU model by measurement (gm._backend.measured_pick), if any recorded."""
    import os  # noqa: PLC0415

    from gm._backend import _slug_of, backend_picks  # noqa: PLC0415

    if not torch.cuda.is_available():
        return "by rule (no GPU here)"
    slug = _slug_of(torch.cuda.current_device())
    picks = backend_picks(slug)
    if not picks:
        return f"by rule: no measurements recorded for {slug} (python -m bench.tuned --backends RUN.jsonl)"
    listed = "; ".join(f"{op} {dt} {e['backend']}" for op, v in picks.items() for dt, e in v.items())
    off = " (unused: GM_BACKEND_PICKS=0)" if os.environ.get("GM_BACKEND_PICKS", "1") == "0" else ""
    return f"measured (kernels/tuned/{slug}.json){off}: {listed}"


def _triton_version() -> str:
    import triton  # noqa: PLC0415

    return triton.__version__


def info(print_out: bool = True) -> dict:
    """Print (and return) versions, device and backend availability."""
    d = info_dict()
    if print_out:
        width = max(len(k) for k in d)
        for k, v in d.items():
            print(f"{k:<{width}}  {v}")
    return d
