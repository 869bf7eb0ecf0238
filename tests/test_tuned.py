"""kernels._common.tuned: with autotuning off, the first config that the prune keeps for the call is launched; with it
on, the current GPU's shipped pick for the launch's key (kernels/tuned/<device>.json) is launched without timing, any
other launch is autotuned; the shipped tables only hold picks of the current config lists (python -m bench.tuned)."""

from __future__ import annotations

import json
import types

import pytest

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from gm.kernels import _common  # noqa: E402


class _FakeKernel:
    arg_names = ["x_ptr", "n"]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))

        return launch


def _configs():
    small = _common.suits(triton.Config(dict(BLOCK=16), num_warps=2, num_stages=1), (8,))
    return [_common.suits(triton.Config(dict(BLOCK=128), num_warps=8, num_stages=3), (2, 4)), small]


@pytest.mark.parametrize(("itemsize", "block", "warps"), [(2, 128, 8), (8, 16, 2)])
def test_first_suitable_config_per_call(monkeypatch, itemsize, block, warps):
    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    kernel = _FakeKernel()
    launchable, meta = _common.tuned(kernel, _configs(), ["n"], dict(BLOCK=4), prune=_common.by_element_size)
    assert meta == {}
    x = types.SimpleNamespace(element_size=lambda: itemsize)
    launchable[lambda m: (100 // m["BLOCK"] + m["n"],)](x, 5)
    (grid, args, kwargs), = kernel.launches
    assert kwargs == dict(BLOCK=block, num_warps=warps, num_stages=3 if block == 128 else 1)
    assert grid == (100 // block + 5,)  # the grid sees the named arguments and the chosen config


def test_no_prune_launches_the_first_config(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    kernel = _FakeKernel()
    launchable, meta = _common.tuned(kernel, _configs(), ["n"], dict(BLOCK=4))
    assert launchable is kernel and meta == dict(BLOCK=128, num_warps=8, num_stages=3)


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    tl.store(y_ptr + i, 2 * tl.load(x_ptr + i, mask=ok), mask=ok)


def test_first_suitable_launches_a_real_kernel(monkeypatch):
    """The wrapper's launch goes through Triton's own launcher with the chosen config's meta-parameters (run under
    the interpreter here; on a GPU this is the GM_TRITON_AUTOTUNE=0 path of every pruned kernel)."""
    import torch  # noqa: PLC0415

    if not _common.INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 (set by the test suite's conftest) on a machine without a GPU")
    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    launchable, _ = _common.tuned(_scale_kernel, _configs(), ["n"], dict(BLOCK=4), prune=_common.by_element_size)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(300, dtype=dtype)
        y = torch.empty_like(x)
        launchable[lambda m: (triton.cdiv(m["n"], m["BLOCK"]),)](x, y, x.numel())
        assert torch.equal(y, 2 * x)


def test_float32_dot_precision_follows_torch_tf32_flags(monkeypatch):
    """float32 dots: tf32 where torch allows it for the op's kind, else tf32x3 (tensor cores, fp32-level error),
    never "ieee" (CUDA-core FMA loops); other dtypes and the interpreter take "ieee" (it ignores the setting)."""
    monkeypatch.setattr(_common, "INTERPRETED", False)
    import torch  # noqa: PLC0415

    for conv, flag in ((True, torch.backends.cudnn), (False, torch.backends.cuda.matmul)):
        saved = flag.allow_tf32  # torch's flag objects take plain assignment only
        try:
            flag.allow_tf32 = True
            assert _common.dot_precision(torch.float32, conv=conv) == "tf32"
            flag.allow_tf32 = False
            assert _common.dot_precision(torch.float32, conv=conv) == "tf32x3"
            assert _common.dot_precision(torch.bfloat16, conv=conv) == "ieee"
            assert _common.dot_precision(torch.float64, conv=conv) == "ieee"
        finally:
            flag.allow_tf32 = saved
    monkeypatch.setattr(_common, "INTERPRETED", True)
    assert _common.dot_precision(torch.float32, conv=False) == "ieee"


# ---------------------------------------------------------------------------------------------------------------------
# Shipped tables of autotuner picks, on Triton's own Autotuner with a stand-in kernel and a mocked GPU name.


def _fake_kernel_fn(x_ptr, n):
    """The function the autotuner's picks of the stand-in kernel are recorded under (Autotuner.base_fn)."""


class _FakeJit:
    """A stand-in for a @triton.jit function under triton.autotune: records each launch's arguments and meta."""

    arg_names = ["x_ptr", "n"]

    def __init__(self):
        self.fn = _fake_kernel_fn
        self.launches = []

    def run(self, *args, grid, warmup, **kwargs):
        self.launches.append((args, kwargs))


def _three_configs():
    """Two configs for 2- and 4-byte inputs, one for 8-byte ones (by_element_size keeps two or one)."""
    return [_common.suits(triton.Config(dict(BLOCK=b), num_warps=w, num_stages=1), sizes)
            for b, w, sizes in [(128, 8, (2, 4)), (64, 4, (2, 4)), (16, 2, (8,))]]  # fmt: skip


def _pick(n, dtype, config):
    return {"key": [str(n), dtype], "config": config, "commit": "abc", "triton": "3.6.0", "date": "2026-01-01T00:00Z"}


@pytest.fixture
def gpu_table(monkeypatch, tmp_path):
    """tuned() as on a GPU named "Fake GPU X1" whose shipped table the test writes (`write(picks)`); each launch that
    is autotuned is recorded in `timed` (timings: the smaller BLOCK wins)."""
    import torch  # noqa: PLC0415

    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    monkeypatch.setattr(_common, "TUNED", True)
    monkeypatch.setattr(_common, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU X1")
    _common.tuned_table.cache_clear()
    env = types.SimpleNamespace(timed=[], kernel=_FakeJit())

    def write(picks):
        table = {"device": "Fake GPU X1", "picks": {"_fake_kernel_fn": picks}}
        (tmp_path / "fake-gpu-x1.json").write_text(json.dumps(table))
        _common.tuned_table.cache_clear()

    def make(configs=None, prune=_common.by_element_size):
        launchable, meta = _common.tuned(env.kernel, configs or _three_configs(), ["n"], dict(BLOCK=4), prune=prune)
        assert meta == {}

        def bench(*args, config, **kwargs):
            env.timed.append(config.kwargs["BLOCK"])
            return [float(config.kwargs["BLOCK"])] * 3

        launchable._bench = bench
        return launchable

    env.write, env.make = write, make
    yield env
    _common.tuned_table.cache_clear()


def _tensor(itemsize):
    import torch  # noqa: PLC0415

    dtype = {2: torch.float16, 4: torch.float32, 8: torch.float64}[itemsize]
    return types.SimpleNamespace(dtype=dtype, element_size=lambda: itemsize)


def test_recorded_pick_launches_without_autotuning(gpu_table):
    """A key recorded for this GPU, as Triton 3.6 wrote it (no "ir_override" in the config string): its config is
    launched and enters Triton's cache (best_config, the bench's export see it); nothing is timed."""
    gpu_table.write([_pick(5, "torch.float16", "BLOCK: 128, num_warps: 8, num_ctas: 1, num_stages: 1, maxnreg: None")])
    launchable = gpu_table.make()
    launchable[(1,)](_tensor(2), 5)
    launchable[(1,)](_tensor(2), 5)
    assert gpu_table.timed == []
    assert [kw["BLOCK"] for _, kw in gpu_table.kernel.launches] == [128, 128]
    assert gpu_table.kernel.launches[0][1]["num_warps"] == 8
    assert launchable.best_config.kwargs == dict(BLOCK=128)


@pytest.mark.parametrize(
    ("n", "itemsize", "config"),
    [
        (6, 2, "BLOCK: 128, num_warps: 8, num_ctas: 1, num_stages: 1, maxnreg: None"),  # another n
        (5, 4, "BLOCK: 128, num_warps: 8, num_ctas: 1, num_stages: 1, maxnreg: None"),  # another dtype
        (5, 2, "BLOCK: 256, num_warps: 8, num_ctas: 1, num_stages: 1, maxnreg: None"),  # not in the current list
        (5, 2, "BLOCK: 128, num_warps: 4, num_ctas: 1, num_stages: 1, maxnreg: None"),  # a field differs
    ],
    ids=["key-n", "key-dtype", "config-gone", "config-warps"],
)
def test_other_launches_are_autotuned(gpu_table, n, itemsize, config):
    gpu_table.write([_pick(5, "torch.float16", config)])
    launchable = gpu_table.make()
    launchable[(1,)](_tensor(itemsize), n)
    assert sorted(gpu_table.timed) == [64, 128]  # both configs that suit 2- and 4-byte inputs were timed
    assert [kw["BLOCK"] for _, kw in gpu_table.kernel.launches] == [64]


def test_pick_the_prune_drops_is_autotuned(gpu_table):
    """The float64-only config recorded for a float16 key (a stale or hand-edited table) is not launched."""
    gpu_table.write([_pick(5, "torch.float16", "BLOCK: 16, num_warps: 2, num_ctas: 1, num_stages: 1, maxnreg: None")])
    launchable = gpu_table.make()
    launchable[(1,)](_tensor(2), 5)
    assert sorted(gpu_table.timed) == [64, 128]


def test_no_table_for_this_gpu_and_switched_off(gpu_table, monkeypatch):
    launchable = gpu_table.make()  # no table written for "Fake GPU X1"
    launchable[(1,)](_tensor(2), 5)
    assert sorted(gpu_table.timed) == [64, 128]
    from triton.runtime.autotuner import Autotuner  # noqa: PLC0415

    monkeypatch.setattr(_common, "TUNED", False)
    assert type(gpu_table.make()) is Autotuner  # GM_TRITON_TUNED=0: triton.autotune as it is


@pytest.mark.parametrize("tuned", [True, False], ids=["tables", "GM_TRITON_TUNED=0"])
def test_picks_only_mode_times_nothing(gpu_table, monkeypatch, tuned):
    """GM_TRITON_AUTOTUNE=picks: a recorded key launches its pick (with the tables on), any other launch the first
    config its prune keeps; nothing is timed, and each key's choice enters Triton's cache as a pick does."""
    monkeypatch.setattr(_common, "PICKS_ONLY", True)
    monkeypatch.setattr(_common, "TUNED", tuned)
    gpu_table.write([_pick(5, "torch.float16", "BLOCK: 64, num_warps: 4, num_ctas: 1, num_stages: 1, maxnreg: None")])
    launchable = gpu_table.make()
    launchable[(1,)](_tensor(2), 5)  # recorded
    launchable[(1,)](_tensor(2), 6)  # not recorded: the first config suiting 2-byte inputs
    launchable[(1,)](_tensor(8), 6)  # float64: the first (only) config suiting 8-byte inputs
    assert gpu_table.timed == []
    assert [kw["BLOCK"] for _, kw in gpu_table.kernel.launches] == [64 if tuned else 128, 128, 16]
    assert len(launchable.cache) == 3


def test_key_is_tritons_own(gpu_table):
    """The pick is looked up under the key the installed Triton computes (key arguments passed by keyword too, then
    the dtypes), as the bench exports it: str of each element."""
    launchable = gpu_table.make()
    launchable[(1,)](_tensor(4), n=7)
    assert [[str(k) for k in key] for key in launchable.cache] == [["7", "torch.float32"]]
    assert gpu_table.timed
    gpu_table.timed.clear()
    gpu_table.write([_pick(7, "torch.float32", str(_three_configs()[0]))])  # Triton 3.9's string, "ir_override" too
    launchable = gpu_table.make()
    launchable[(1,)](_tensor(4), n=7)
    assert gpu_table.timed == [] and gpu_table.kernel.launches[-1][1]["BLOCK"] == 128


def test_config_strings_match_across_triton_versions():
    config = triton.Config(dict(BLOCK_M=128, BLOCK_K=32), num_warps=4, num_stages=4)
    triton36 = "BLOCK_M: 128, BLOCK_K: 32, num_warps: 4, num_ctas: 1, num_stages: 4, maxnreg: None"
    triton39 = triton36 + ", ir_override: None"
    assert _common.config_fields(config) == _common.config_fields(triton36) == _common.config_fields(triton39)
    assert _common.config_fields(config) != _common.config_fields(triton36.replace("num_stages: 4", "num_stages: 3"))


def test_device_slug_is_the_bench_results_name(tmp_path):
    from bench import harness  # noqa: PLC0415

    path = harness.save([], {"device": "NVIDIA H200 (PCIe) ", "date": "2026-01-01T00:00:00Z"}, tmp_path)
    assert path.name == f"2026-01-01_{_common.device_slug('NVIDIA H200 (PCIe) ')}.jsonl"
    assert _common.device_slug("NVIDIA H200") == "nvidia-h200"


def test_shipped_tables_hold_only_current_picks():
    """Every shipped pick names a tuned() kernel of gm.kernels, a config of its current list and a key of its current
    key arguments (then dtypes); a stale pick would never launch: rerun python -m bench.tuned on the run's picks."""
    from bench import tuned as bench_tuned  # noqa: PLC0415

    tables = sorted(_common.TUNED_DIR.glob("*.json"))
    assert tables, "no table ships in kernels/tuned"
    lists = bench_tuned.config_lists()
    for path in tables:
        table = json.loads(path.read_text())
        assert _common.device_slug(table["device"]) == path.stem
        assert table["picks"]
        kept, stale = bench_tuned.split_stale(table["picks"], lists)
        assert stale == [], f"{path.name}: stale picks:\n" + "\n".join(stale)
        for picks in table["picks"].values():
            assert all(p["commit"] and p["triton"] and p["date"] for p in picks)
        assert bench_tuned.dump(table) == path.read_text()  # as bench.tuned writes it


def test_refresh_merges_newer_picks_and_drops_stale(tmp_path, capsys):
    from bench import tuned as bench_tuned  # noqa: PLC0415

    lists = {"k": ([triton.Config(dict(B=b)) for b in (16, 32, 64)], ["n"])}
    cfg = {b: str(triton.Config(dict(B=b))) for b in (16, 32, 64, 128)}

    def run(date, picks):
        env = {"device": "Fake GPU X1", "commit": date[:4], "triton": "3.9.0", "torch": "2", "date": date}
        return {"env": env, "picks": {"k": [{"key": [str(n), "torch.float32"], "config": cfg[b]} for n, b in picks]}}

    table = bench_tuned.merge({}, run("2026-01-02", [(1, 16), (2, 16), (3, 16)]))
    table = bench_tuned.merge(table, run("2026-01-03", [(1, 32), (2, 16), (4, 128)]))  # newer: 1 changes, 2 same
    table = bench_tuned.merge(table, run("2026-01-01", [(3, 64)]))  # older than the pick recorded for n=3
    picks = {p["key"][0]: (p["config"], p["date"]) for p in table["picks"]["k"]}
    assert picks == {"1": (cfg[32], "2026-01-03"), "2": (cfg[16], "2026-01-02"), "3": (cfg[16], "2026-01-02"),
                     "4": (cfg[128], "2026-01-03")}  # fmt: skip
    kept, stale = bench_tuned.split_stale(table["picks"], lists)
    assert [p["key"][0] for p in kept["k"]] == ["1", "2", "3"] and len(stale) == 1 and "not in the current" in stale[0]
    bad_key = {"k": [{"key": ["torch.float32"], "config": cfg[16]}], "gone": [{"key": ["1"], "config": cfg[16]}]}
    reasons = [s.rsplit(": ", 1)[1] for s in bench_tuned.split_stale(bad_key, lists)[1]]
    assert reasons == ["key is not (n, dtypes...)", "kernel not launched through tuned()"]


def test_refresh_command_writes_the_table(tmp_path, capsys):
    from bench import tuned as bench_tuned  # noqa: PLC0415

    fwd = "masked_conv_fwd_kernel"
    configs, key = bench_tuned.config_lists()[fwd]
    pick = {"key": ["1"] * len(key) + ["torch.float32"], "config": str(configs[0])}
    env = {"device": "Fake GPU X1", "commit": "c", "triton": "3.9.0", "torch": "2", "date": "2026-01-01T00:00:00Z"}
    run_file = tmp_path / "run_autotune.json"
    run_file.write_text(json.dumps({"env": env, "picks": {fwd: [pick], "not_a_kernel": [pick]}}))
    assert bench_tuned.main([str(run_file), "--out", str(tmp_path / "tables")]) == 0
    table = json.loads((tmp_path / "tables" / "fake-gpu-x1.json").read_text())
    assert table["picks"] == {fwd: [{**pick, "commit": "c", "triton": "3.9.0", "torch": "2", "date": env["date"]}]}
    assert "dropped not_a_kernel" in capsys.readouterr().out
    assert bench_tuned.main(["--check", "--out", str(tmp_path / "tables")]) == 0


def _row(op, case, dtype, impl, ms, date="2026-01-02T00:00:00Z", error=None):
    return {"device": "Fake GPU X1", "commit": date[:10], "triton": "3.9.0", "torch": "2", "date": date, "op": op,
            "case": case, "dtype": dtype, "impl": impl, "fwdbwd_ms": ms, "error": error}  # fmt: skip


def test_backend_picks_from_bench_rows():
    """Per gm op and dtype: the backend with the least forward+backward summed over the cases that measured both;
    errors, baselines and one-sided cases left out; bench op names mapped to the gm op auto resolves."""
    from bench import tuned as bench_tuned  # noqa: PLC0415

    rows = [
        _row("masked_conv2d", "a", "bfloat16", "gm[cuda]", 2.0), _row("masked_conv2d", "a", "bfloat16", "gm[triton]", 1.0),
        _row("masked_conv2d", "b", "bfloat16", "gm[cuda]", 1.0), _row("masked_conv2d", "b", "bfloat16", "gm[triton]", 1.5),
        _row("masked_conv2d", "c", "bfloat16", "gm[cuda]", 0.1),  # triton did not run it: left out
        _row("masked_conv2d", "a", "bfloat16", "F.conv2d(masked w)", 0.5),  # a baseline
        _row("masked_conv2d", "a", "float32", "gm[cuda]", 1.0), _row("masked_conv2d", "a", "float32", "gm[triton]", 0.5,
                                                                     error="OutOfMemoryError"),
        _row("iaf_step", "x", "float32", "gm[cuda]", 3.0), _row("iaf_step", "x", "float32", "gm[triton]", 2.0),
        _row("diagonal_bilstm", "x", "float32", "gm[cuda]", 3.0),  # a layer row: not an op's choice
    ]  # fmt: skip
    picks = bench_tuned.backend_picks_of(rows)
    assert set(picks) == {"masked_conv2d", "made_iaf_step"}
    conv = picks["masked_conv2d"]["bfloat16"]
    assert (conv["backend"], conv["ms"], conv["cases"]) == ("triton", {"cuda": 3.0, "triton": 2.5}, 2)
    assert conv["commit"] == "2026-01-02" and "float32" not in picks["masked_conv2d"]
    assert picks["made_iaf_step"]["float32"]["backend"] == "triton"


def test_backend_picks_merge_and_survive_a_refresh(tmp_path):
    """A newer run replaces the entries it measured and keeps the others; an autotune refresh keeps the section; the
    command writes what gm._backend reads."""
    from bench import tuned as bench_tuned  # noqa: PLC0415

    old = [_row("row_lstm scan", "a", "float32", "gm[cuda]", 1.0), _row("row_lstm scan", "a", "float32", "gm[triton]", 2.0),
           _row("minibatch_discrimination", "n", "float32", "gm[cuda]", 1.0),
           _row("minibatch_discrimination", "n", "float32", "gm[triton]", 2.0)]  # fmt: skip
    new = [_row(op, "a", "float32", impl, ms, date="2026-02-01T00:00:00Z")
           for op, impl, ms in (("row_lstm scan", "gm[cuda]", 3.0), ("row_lstm scan", "gm[triton]", 2.0))]
    table = bench_tuned.merge_backends(bench_tuned.merge_backends({}, old), new)
    assert table["backends"]["row_lstm"]["float32"]["backend"] == "triton"  # the newer measurement
    assert table["backends"]["minibatch_discrimination"]["float32"]["backend"] == "cuda"  # kept
    assert bench_tuned.merge_backends(table, old) == table  # an older run changes nothing
    env = {"device": "Fake GPU X1", "commit": "c", "triton": "3.9.0", "torch": "2", "date": "2026-03-01"}
    refreshed = bench_tuned.merge(table, {"env": env, "picks": {}})
    assert refreshed["backends"] == table["backends"]
    assert json.loads(bench_tuned.dump(refreshed)) == refreshed
    rows_file = tmp_path / "run.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in old + new))
    assert bench_tuned.main(["--backends", str(rows_file), "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "fake-gpu-x1.json").read_text())
    assert written["backends"] == table["backends"] and written["picks"] == {}


def test_info_names_the_tables(monkeypatch):
    import gm  # noqa: PLC0415

    tables = _common.shipped_tables()
    assert tables and all(n > 0 for n in tables.values())
    monkeypatch.setattr(_common, "current_device_slug", lambda: None)
    assert gm.info(print_out=False)["triton_tuned"].startswith("no GPU here; tables ship for nvidia-h200 (")
    monkeypatch.setattr(_common, "current_device_slug", lambda: "nvidia-h200")
    line = gm.info(print_out=False)["triton_tuned"]
    assert line.startswith(f"kernels/tuned/nvidia-h200.json: {tables['nvidia-h200']} picks")
    monkeypatch.setattr(_common, "current_device_slug", lambda: "other-gpu")
    assert gm.info(print_out=False)["triton_tuned"].startswith("none for other-gpu")


@pytest.mark.gpu
def test_gpu_shipped_pick_is_launched_untimed(monkeypatch):
    """On an H200, with autotuning on (whatever GM_TRITON_AUTOTUNE says: the GPU tests run with it off): the minibatch
    forward at a shape run 3 recorded (N=1024, B=100, C=5, fp32) launches the shipped pick without timing any config,
    so the key Triton computes on this GPU's Triton matches the table's strings."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available() or _common.current_device_slug() not in _common.shipped_tables():
        pytest.skip("needs a GPU with a shipped table (an H200)")
    from gm.kernels import minibatch as km  # noqa: PLC0415

    monkeypatch.setattr(_common, "AUTOTUNE", True)
    monkeypatch.setattr(_common, "TUNED", True)
    fwd, meta = _common.tuned(km.minibatch_fwd_kernel, km._configs(False), km._KEY, km._INTERP)
    timed = []
    real_bench = fwd._bench
    fwd._bench = lambda *a, **k: timed.append(1) or real_bench(*a, **k)
    monkeypatch.setattr(km, "_fwd", fwd)
    monkeypatch.setattr(km, "_FWD_META", meta)
    m = torch.randn(1024, 100, 5, device="cuda")
    out = km.forward(m, True)
    torch.cuda.synchronize()
    assert timed == [] and torch.isfinite(out).all()


def test_autotuner_times_configs_with_gms_do_bench(gpu_table, monkeypatch):
    """Autotuning times each config with triton.testing.do_bench at AUTOTUNE_MS (10 ms warm-up, 40 ms of repetitions
    unless GM_TRITON_AUTOTUNE_MS says otherwise), not Triton's 25 and 100."""
    import triton.testing  # noqa: PLC0415

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append(kw) or [1.0, 1.0, 1.0])
    launchable = gpu_table.make()
    assert launchable.do_bench is _common.autotune_bench
    launchable.do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8))
    assert calls == [dict(warmup=_common.AUTOTUNE_MS[0], rep=_common.AUTOTUNE_MS[1], quantiles=(0.5, 0.2, 0.8))]
    assert _common.AUTOTUNE_MS == (10.0, 40.0) or "GM_TRITON_AUTOTUNE_MS" in __import__("os").environ


def test_picks_only_run_exports_no_picks(monkeypatch):
    """A bench run under GM_TRITON_AUTOTUNE=picks timed nothing: it saves no autotuner picks (its first configs would
    otherwise enter the shipped tables as if measured)."""
    from bench import harness  # noqa: PLC0415

    monkeypatch.setattr(_common, "PICKS_ONLY", True)
    assert harness.autotune_picks() == {}


_KEY_ARITY = r"""
import collections, json, sys
import bench.aot as aot
from gm.kernels import _common
aot.Collector.compile = lambda self, *a, **k: None  # nothing compiled: only the launches' keys are wanted
seen = collections.defaultdict(set)
real = _common.launch_key

def spy(autotuner, kwargs):
    key = real(autotuner, kwargs)
    seen[autotuner.base_fn.__name__].add(len(key))
    return key

_common.launch_key = spy
aot.main(["--quick", "--ops", sys.argv[1], "--picks", sys.argv[2]])
print("ARITY " + json.dumps({k: sorted(v) for k, v in seen.items()}))
"""


@pytest.mark.slow
def test_shipped_picks_have_the_arity_of_todays_launch_keys(tmp_path):
    """Each shipped pick's key has as many entries as the key Triton computes for that kernel's launches now (its
    key arguments, then one dtype per tensor argument), found by driving the benchmark's quick cases through
    bench.aot --picks with compiles skipped. A kernel that gains a tensor argument changes that count and silently
    kills every shipped pick of it: session 10's residual, gate and bias-sum arguments did so to masked_conv's
    forward and weight-gradient picks, which session 11 rewrote (the new arguments' dtypes appended)."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    for path in sorted(_common.TUNED_DIR.glob("*.json")):
        picks = json.loads(path.read_text())["picks"]
        ops = "masked_conv,row_lstm,diagonal_lstm,minibatch,iaf"
        run = subprocess.run([sys.executable, "-c", _KEY_ARITY, ops, path.stem], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=600)  # fmt: skip
        line = next((x for x in run.stdout.splitlines() if x.startswith("ARITY ")), None)
        assert line is not None, run.stderr[-3000:]
        arity = json.loads(line[len("ARITY "):])
        for kernel, entries in picks.items():
            assert kernel in arity, f"{path.name}: {kernel} was not launched by the quick cases"
            lengths = {len(p["key"]) for p in entries}
            assert lengths <= set(arity[kernel]), f"{path.name}: {kernel} keys of {lengths}, launches {arity[kernel]}"
