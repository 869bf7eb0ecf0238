"""Benchmark harness: each case's gm backends and baselines, forward and forward+backward, side by side in one run.

A case module bench/cases/<op>.py defines `cases(device, quick) -> list[Case]`. For every case the harness times:
  - gm on each fast backend that runs on the device (cuda and triton on a GPU, cpu on the CPU), via `Case.gm(backend=...)`;
  - every baseline in `Case.impls` (eager reference, reference under torch.compile, cuDNN on masked weights, ...).
Timings: medians after warm-up, device events on CUDA (triton.testing.do_bench, which also flushes L2 between repeats;
calls over SLOW_MS take the median of three), perf_counter on the CPU. Forward runs under no_grad; forward+backward back-propagates fixed random output gradients (or
calls .backward() on a scalar loss). Peak memory is the CUDA allocator's peak over one forward+backward, minus what was
allocated before. Results are printed as one table and appended as JSON lines (device, versions, commit) to bench/results/.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WITH_COMPILE = True  # python -m bench --no-compile drops the "+compile" baselines (their compile time is long)
PROFILE = False  # python -m bench --profile: a torch.profiler breakdown of each gm row and the case's baseline
GRAPHS = False  # python -m bench --graphs: also time each implementation's fwd+bwd replayed from a CUDA graph
BACKENDS: tuple[str, ...] | None = None  # python -m bench --backends cuda: only these gm backends (default: all)


@dataclasses.dataclass
class Case:
    op: str
    name: str
    dtype: torch.dtype
    make_inputs: Callable[[], dict]
    gm: Callable[..., object] | None = None  # gm(backend=..., **inputs)
    impls: dict[str, Callable[..., object]] = dataclasses.field(default_factory=dict)
    baseline: str = "reference"
    flops: float | None = None  # useful forward FLOPs
    bytes: float | None = None  # fewest bytes moved by the forward
    backward: bool = True
    gm_backends: tuple[str, ...] | None = None  # restrict gm's backends (None: all that run on the device)


@dataclasses.dataclass
class Row:
    op: str
    case: str
    dtype: str
    impl: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_mib: float | None = None
    tflops_fwd: float | None = None
    gbps_fwd: float | None = None
    speedup_fwd: float | None = None
    speedup_fwdbwd: float | None = None
    error: str | None = None
    # --profile on a GPU: the device kernels' summed time per fwd+bwd (what the step costs the GPU, apart from the
    # host time that fwdbwd_ms also holds; a row whose fwdbwd_ms is far above it is host-bound)
    kernels_fwdbwd_ms: float | None = None
    # on a GPU: the host's time to issue one fwd+bwd (median, each call started with the device idle and not waited
    # for): near fwdbwd_ms, the row is host-bound and its kernels are not what it measures
    host_fwdbwd_ms: float | None = None
    # --graphs on a GPU: fwd+bwd captured once into a CUDA graph and replayed (no host work per step: the GPU's own
    # time, as a training loop under CUDA graphs sees it), or why the capture failed
    graph_fwdbwd_ms: float | None = None
    graph_error: str | None = None
    # the baseline's graph time over this row's, where both were captured: the kernels' speedup without the host
    speedup_graph: float | None = None
    profile: dict | None = None  # --profile: profile_fwd_bwd()'s summary (not saved in the JSON lines)
    seconds: float = 0.0  # wall time this row took to measure (compiles, autotuning, timing, profile)


def pick(device: torch.device, quick: bool, *, quick_choice, gpu_choice, cpu_choice):
    """The shape list (or anything) a case module uses: the quick one, else by device."""
    if quick:
        return quick_choice
    return gpu_choice if device.type == "cuda" else cpu_choice


def compiled(fn: Callable, **kwargs) -> Callable:
    """torch.compile'd version of a reference, for the "reference+compile" baseline."""
    return torch.compile(fn, **kwargs)


def _as_list(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


SLOW_MS = 50.0  # calls slower than this are timed three times (one warm-up, no L2 flush needed) instead of by do_bench
# GPU rows faster than this also get their host issue time (_host_ms: ten more calls each, ~20-50 ms of device time
# a row at the small cases); slower rows are their kernels' time whatever the host does.
HOST_TIMED_MS = 20.0


def _event_ms(fn: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _time_ms(fn: Callable[[], None], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        fn()  # warm-up (compiles, autotunes, allocates)
        first = _event_ms(fn)
        if first > SLOW_MS:  # do_bench would spend at least 7 calls; the eager references take up to seconds each
            return statistics.median([first, _event_ms(fn), _event_ms(fn)])
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (and compile)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _fwd_bwd_fn(fn: Callable, inputs: dict) -> Callable[[], None]:
    outs = _as_list(fn(**inputs))
    scalar = len(outs) == 1 and outs[0].dim() == 0
    grads = None if scalar else [torch.randn_like(o) for o in outs]
    params = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        out = _as_list(fn(**inputs))
        if scalar:
            out[0].backward()
        else:
            torch.autograd.backward([o for o in out if o.requires_grad], [g for o, g in zip(out, grads) if o.requires_grad])
        for p in params:
            p.grad = None

    return run


def warm(case: Case, fn: Callable, device: torch.device) -> None:
    """One forward under no_grad and one forward+backward of `fn` on the case's inputs, timing nothing: what run_impl
    compiles (python -m bench --warm-compile)."""
    inputs = case.make_inputs()
    with torch.no_grad():
        fn(**inputs)
    if case.backward:
        _fwd_bwd_fn(fn, inputs)()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_ms(run: Callable[[], None], device: torch.device, calls: int = 10) -> float:
    """Milliseconds of host time to issue one call of `run` on a GPU: the median over `calls` calls, each started
    after a synchronize and timed without one, so no launch waits for the device (the queue holds ~1000 launches)
    unless the call itself synchronizes, which then shows as host time."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def _peak_mib(run: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _graph_ms(run: Callable[[], None], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Milliseconds per replay of `run` (a fwd+bwd) captured into a CUDA graph: warmed up on a side stream (capture
    needs the autotuners, caches and allocations settled), captured once, replayed by _time_ms."""
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
        return _time_ms(graph.replay, device, warmup_ms, rep_ms)
    finally:
        del graph
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text[:90]


def run_impl(case: Case, label: str, fn: Callable, device: torch.device, warmup_ms: float, rep_ms: float) -> Row:
    row = Row(case.op, case.name, str(case.dtype).replace("torch.", ""), label)
    t_start = time.perf_counter()
    try:
        inputs = case.make_inputs()
        with torch.no_grad():
            row.fwd_ms = _time_ms(lambda: fn(**inputs), device, warmup_ms, rep_ms)
        if case.backward:
            run = _fwd_bwd_fn(fn, inputs)
            row.fwdbwd_ms = _time_ms(run, device, warmup_ms, rep_ms)
            row.peak_mib = _peak_mib(run, device)
            if device.type == "cuda" and row.fwdbwd_ms < HOST_TIMED_MS:
                row.host_fwdbwd_ms = _host_ms(run, device)
            if GRAPHS and device.type == "cuda" and row.fwdbwd_ms < SLOW_MS:  # (not the slow eager references)
                try:
                    row.graph_fwdbwd_ms = _graph_ms(run, device, warmup_ms, rep_ms)
                except Exception as err:  # noqa: BLE001  (an op that cannot be captured is a finding, not a crash)
                    row.graph_error = short_error(err)
            # (not the slow eager references: profiling thousands of launches costs a GPU run tens of seconds)
            if PROFILE and (label.startswith("gm[") or label == case.baseline) and row.fwdbwd_ms < SLOW_MS:
                row.profile = profile_fwd_bwd(run, device)
                if row.profile["kernels_us"] is not None:
                    row.kernels_fwdbwd_ms = row.profile["kernels_us"] / 1e3
        if case.flops:
            row.tflops_fwd = case.flops / (row.fwd_ms * 1e-3) / 1e12
        if case.bytes:
            row.gbps_fwd = case.bytes / (row.fwd_ms * 1e-3) / 1e9
    except Exception as err:  # a baseline that runs out of memory or crashes is a result, not a harness failure
        row.error = short_error(err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.seconds = time.perf_counter() - t_start
    return row


def _self_device_us(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):  # renamed in torch 2.4+
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def _is_device_event(evt) -> bool:
    """A device activity (kernel, memcpy, memset), not a host op: a host op's self device time is the time of the
    kernels it launched, which the kernels' own events count again."""
    from torch.autograd import DeviceType  # noqa: PLC0415

    return getattr(evt, "device_type", None) not in (None, DeviceType.CPU)


def profile_fwd_bwd(run: Callable[[], None], device: torch.device, iters: int = 5, top: int = 8) -> dict:
    """Where one forward+backward's time goes: wall time per iteration (under the profiler, so a little high), the
    summed time of the device activities (GPU kernels, copies; each counted once), the top kernels by device time,
    and the top host ops by self CPU time (on the CPU: only the latter). Wall well above the kernels' sum: the step
    is bound by host work (Python, dispatch, launches), and the host list says which."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    run()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / iters
    events = prof.key_averages()
    device_events = [e for e in events if _is_device_event(e)]
    host_events = [e for e in events if not _is_device_event(e)]

    def ranked(evts, key):
        return [(e.key[:70], e.count / iters, key(e) / iters) for e in sorted(evts, key=key, reverse=True)[:top]
                if key(e) > 0]  # fmt: skip

    return {
        "wall_us": wall * 1e6,
        "kernels_us": sum(_self_device_us(e) for e in device_events) / iters if cuda else None,
        "top": ranked(device_events, _self_device_us) if cuda else [],
        "host": ranked(host_events, lambda e: float(e.self_cpu_time_total)),
    }


def format_profile(row: Row) -> str:
    p = row.profile
    head = f"{row.op} | {row.case} | {row.dtype} | {row.impl}: wall {p['wall_us']:.0f} us per fwd+bwd"
    if p["kernels_us"] is not None:
        head += f", device kernels {p['kernels_us']:.0f} us ({100 * p['kernels_us'] / max(p['wall_us'], 1e-9):.0f}%)"
    lines = [head] + [f"    {us:9.1f} us  x{count:<5.1f} {name}" for name, count, us in p["top"]]
    lines += ["  host (self CPU time):"] + [f"    {us:9.1f} us  x{count:<5.1f} {name}" for name, count, us in p["host"]]
    return "\n".join(lines)


def gm_backends_for(device: torch.device) -> list[str]:
    from gm._backend import availability  # noqa: PLC0415
    from gm._ext import ext_status  # noqa: PLC0415

    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    if BACKENDS is not None:
        wanted = tuple(b for b in wanted if b in BACKENDS)
    out = []
    for b in wanted:
        ok, _ = availability(b, device)
        if ok and b == "cpu":
            ok = ext_status()[0]
        if ok:
            out.append(b)
    return out


def run_case(case: Case, device: torch.device, warmup_ms: float, rep_ms: float) -> list[Row]:
    rows = []
    if case.gm is not None:
        for b in [b for b in (case.gm_backends or gm_backends_for(device)) if BACKENDS is None or b in BACKENDS]:
            rows.append(run_impl(case, f"gm[{b}]", lambda _b=b, **kw: case.gm(backend=_b, **kw), device, warmup_ms, rep_ms))
    for label, fn in case.impls.items():
        if "compile" in label and not WITH_COMPILE:
            continue
        rows.append(run_impl(case, label, fn, device, warmup_ms, rep_ms))
    base = next((r for r in rows if r.impl == case.baseline and r.error is None), None)
    if base is not None:
        for r in rows:
            if r.error is None:
                r.speedup_fwd = base.fwd_ms / r.fwd_ms if r.fwd_ms else None
                if r.fwdbwd_ms and base.fwdbwd_ms:
                    r.speedup_fwdbwd = base.fwdbwd_ms / r.fwdbwd_ms
                if r.graph_fwdbwd_ms and base.graph_fwdbwd_ms:
                    r.speedup_graph = base.graph_fwdbwd_ms / r.graph_fwdbwd_ms
    return rows


def environment(device: torch.device) -> dict:
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("GM_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu:{platform.machine()}x{os.cpu_count()}",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit,
        # False: each Triton kernel ran its first config (GM_TRITON_AUTOTUNE=0), not the autotuner's pick; "picks":
        # the shipped picks where recorded, else the first suitable config (GM_TRITON_AUTOTUNE=picks).
        "triton_autotune": {"0": False, "picks": "picks"}.get(os.environ.get("GM_TRITON_AUTOTUNE", "1"), True),
        # False: Triton's own launch path on every call (GM_TRITON_FAST_LAUNCH=0), not gm.kernels._launch.fast.
        "triton_fast_launch": os.environ.get("GM_TRITON_FAST_LAUNCH", "1") != "0",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[Row]) -> str:
    head = ("| op | case | dtype | impl | fwd ms | fwd+bwd ms | fwd+bwd host ms | speedup fwd | speedup fwd+bwd | "
            "TFLOP/s fwd | GB/s fwd | peak MiB | fwd+bwd CUDA graph ms | speedup CUDA graph |")  # fmt: skip
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if r.error:
            lines.append(f"| {r.op} | {r.case} | {r.dtype} | {r.impl} | {r.error} |  |  |  |  |  |  |  |  |  |")
            continue
        graph = "capture failed" if r.graph_error else _fmt(r.graph_fwdbwd_ms, ".3f")
        lines.append(
            f"| {r.op} | {r.case} | {r.dtype} | {r.impl} | {_fmt(r.fwd_ms, '.3f')} | {_fmt(r.fwdbwd_ms, '.3f')} | "
            f"{_fmt(r.host_fwdbwd_ms, '.3f')} | {_fmt(r.speedup_fwd, '.2f')} | {_fmt(r.speedup_fwdbwd, '.2f')} | "
            f"{_fmt(r.tflops_fwd, '.1f')} | {_fmt(r.gbps_fwd, '.0f')} | {_fmt(r.peak_mib, '.0f')} | {graph} | "
            f"{_fmt(r.speedup_graph, '.2f')} |"
        )
    failed = [r for r in rows if r.graph_error]
    lines += [f"  graph capture failed, {r.impl}: {r.graph_error}" for r in failed]
    return "\n".join(lines)


def save(rows: list[Row], env: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    from gm.kernels._common import device_slug  # noqa: PLC0415  (the tuned tables' names too)

    slug = device_slug(env["device"])
    path = out_dir / f"{env['date'][:10]}_{slug}.jsonl"
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps({**env, **{k: v for k, v in dataclasses.asdict(r).items() if k != "profile"}}) + "\n")
    profiled = [format_profile(r) for r in rows if r.profile]
    if profiled:
        with path.with_name(path.stem + "_profile.md").open("a") as f:
            f.write("\n".join(profiled) + "\n\n")
    return path


def autotune_picks() -> dict:
    """{kernel: [{"key": ..., "config": ...}]}: what Triton's autotuners chose in this process, to shorten the config
    lists (the picks depend on the GPU; saved beside the rows by python -m bench on CUDA)."""
    import importlib  # noqa: PLC0415
    import pkgutil  # noqa: PLC0415

    try:
        import gm.kernels as pkg  # noqa: PLC0415
        from gm.kernels import _common  # noqa: PLC0415
        from triton.runtime.autotuner import Autotuner  # noqa: PLC0415
    except ImportError:
        return {}
    if _common.PICKS_ONLY:  # GM_TRITON_AUTOTUNE=picks timed nothing: its first configs are no picks to ship
        return {}
    picks: dict[str, list] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"gm.kernels.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner) and obj.cache:
                name = getattr(obj.base_fn, "__name__", str(obj.base_fn))
                picks[name] = [{"key": [str(k) for k in key], "config": str(cfg)} for key, cfg in obj.cache.items()]
    return picks
