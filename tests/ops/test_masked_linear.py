"""masked_linear against the masked F.linear reference: outputs, every gradient, tile skipping, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

from gm.ops import _eager as eager
from gm.ops.masked_linear import clear_mask_cache, linear_tile_map, mask_entry, masked_linear
from gm.reference.iaf import masked_linear as reference
from tests._util import assert_rel, fast_backends, poison_empty, rel_err

BACKENDS = ["reference", *fast_backends(torch.device("cpu"))]
SHAPES = [(5, 7, 3), (19, 37, 29), (33, 16, 48)]  # (rows, K, O): odd and round, more than one 16-tile


def _mask(o: int, k: int) -> torch.Tensor:
    """Block-triangular (degree-sorted MADE-like) with a random part: empty, partial and full tiles."""
    deg_o = torch.linspace(1, 9, o).floor()[:, None]
    deg_k = torch.linspace(1, 9, k).floor()[None, :]
    m = (deg_o >= deg_k).float()
    m[: o // 2] *= (torch.rand(o // 2, k) < 0.7).float()
    return m


def _made_hidden_mask(o: int, k: int) -> torch.Tensor:
    """Degree-sorted MADE hidden layer (unit j sees unit i iff deg_j >= deg_i): block-triangular, partly-zero tiles
    only along the staircase."""
    deg_o = 1 + (torch.arange(o) * 63) // o
    deg_k = 1 + (torch.arange(k) * 63) // k
    return (deg_o[:, None] >= deg_k[None, :]).float()


def _made_output_mask(o: int, k: int) -> torch.Tensor:
    """MADE output layer (strict: output d sees hidden units of degree < d), rows cycling over the heads."""
    d = max(o // 2, 1)
    deg_out = 1 + torch.arange(o) % d
    deg_k = 1 + (torch.arange(k) * max(d - 1, 1)) // k
    return (deg_out[:, None] > deg_k[None, :]).float()


def _random_mask(o: int, k: int) -> torch.Tensor:
    return (torch.rand(o, k) < 0.5).float()


MASKS = {"mixed": _mask, "made_hidden": _made_hidden_mask, "made_output": _made_output_mask, "random": _random_mask}


def _inputs(r, k, o, dtype, device="cpu", mask="mixed"):
    x = torch.randn(r, k, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(o, k, dtype=dtype, device=device).div_(k**0.5).requires_grad_()
    b = torch.randn(o, dtype=dtype, device=device, requires_grad=True)
    return x, w, b, MASKS[mask](o, k).to(device)


def _compare(backend, shape, dtype, activation, device=torch.device("cpu"), mask="mixed"):
    x, w, b, m = _inputs(*shape, dtype, device, mask)
    y = masked_linear(x, w, m, b, activation=activation, backend=backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), g)
    y_ref = reference(x.double(), w.double(), m, b.double(), activation=activation)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), g.double())
    assert_rel(y, y_ref, dtype, "y", device)
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert_rel(got, want, dtype, name, device)
    assert (grads[1][m == 0] == 0).all(), "weight gradient must be exactly zero where masked"


@pytest.mark.parametrize("activation", [None, "elu", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}-K{}-O{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, shape, activation):
    _compare(backend, shape, dtype, activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_outputs_are_all_written(backend, monkeypatch):
    poison_empty(monkeypatch)
    clear_mask_cache()
    _compare(backend, (33, 40, 35), torch.float64, "elu")


def test_no_bias_and_leading_dims():
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    w = torch.randn(24, 20, dtype=torch.float64)
    m = _mask(24, 20)
    for backend in BACKENDS:
        y = masked_linear(x, w, m, backend=backend)
        assert_rel(y, reference(x, w, m), torch.float64, backend)


def test_gradcheck_cpu():
    x, w, b, m = _inputs(4, 9, 7, torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b: masked_linear(x, w, m, b, activation="elu", backend="cpu"), (x, w, b)
    )


def test_tile_map_skips_empty_tiles_and_is_cached():
    clear_mask_cache()
    o = k = 64
    deg = torch.arange(o) // 4
    m = (deg[:, None] >= deg[None, :]).float()  # lower block-triangular
    entry = mask_entry(m)
    assert mask_entry(m) is entry
    tm = linear_tile_map(entry, 16, 16)
    assert tm.nonempty == 10  # 4x4 tiles, lower triangle with diagonal
    offsets, idx, mids = tm.rows  # all-ones tiles of a row first, then the partly-zero (diagonal) one
    assert offsets.tolist() == [0, 1, 3, 6, 10]
    assert idx.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert mids.tolist() == [0, 2, 5, 9]
    offsets, idx, mids = tm.cols
    assert offsets.tolist() == [0, 4, 7, 9, 10]
    assert idx.tolist() == [1, 2, 3, 0, 2, 3, 1, 3, 2, 3]
    assert mids.tolist() == [3, 6, 8, 9]
    m.fill_(1)  # an in-place write bumps the version: a new entry, a full map
    entry2 = mask_entry(m)
    assert entry2 is not entry and linear_tile_map(entry2, 16, 16).nonempty == 16


def test_mask_written_in_place_gives_new_result():
    x = torch.randn(5, 20, dtype=torch.float64)
    w = torch.randn(24, 20, dtype=torch.float64)
    m = _mask(24, 20)
    for backend in BACKENDS:
        masked_linear(x, w, m, backend=backend)
    m[:, :] = 1
    for backend in BACKENDS:
        assert_rel(masked_linear(x, w, m, backend=backend), x @ w.t(), torch.float64, backend)


def test_bad_input():
    x, w, b, m = _inputs(4, 9, 7, torch.float32)
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        masked_linear(x, w, m[:, :5], b)
    bad = m.clone()
    bad[0, 0] = 0.5
    with pytest.raises(ValueError, match="binary"):
        masked_linear(x, w, bad, b)
    with pytest.raises(ValueError, match="dtype"):
        masked_linear(x.double(), w, m, b)
    with pytest.raises(ValueError, match="x must have shape"):
        masked_linear(x[:, :5], w, m, b)
    with pytest.raises(ValueError, match="bias"):
        masked_linear(x, w, m, b[:3])
    with pytest.raises(ValueError, match="activation"):
        masked_linear(x, w, m, b, activation="tanh")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", [None, "elu"])
def test_gpu_triton(dtype, activation):
    _compare("triton", (300, 256, 192), dtype, activation, torch.device("cuda"))
    _compare("triton", (77, 130, 70), dtype, activation, torch.device("cuda"))


# (rows, K, O): odd everything (rows padded in Python), one block, a MADE layer, a D=64 output-like layer.
CUDA_SHAPES = [(5, 37, 29), (77, 130, 70), (300, 256, 192), (129, 1024, 1024), (260, 1024, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("activation", [None, "elu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_cuda(dtype, activation, mask, monkeypatch):
    """The CUDA GEMMs (tensor cores; tf32 for float32 by torch's matmul default) with NaN-poisoned outputs: every
    element written, every gradient right, the weight gradient exactly zero where masked (checked in _compare)."""
    poison_empty(monkeypatch)
    clear_mask_cache()
    for shape in CUDA_SHAPES:
        _compare("cuda", shape, dtype, activation, torch.device("cuda"), mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_cuda_planned_equals_the_registered_op(dtype, monkeypatch):
    """The eager cuda path's planned launches (gm.ops._masked_linear_cuda.LayerPlan: the benchmark's 1024x1024 MADE
    layer at N=4096) give bit for bit what the registered op gives on the device: same kernels, same arguments, and
    no buffer freed and reused while a kernel still reads it (the emulator runs launches in order)."""
    clear_mask_cache()
    x, w, b, m = _inputs(4096, 1024, 1024, dtype, "cuda", "made_hidden")
    g = torch.randn(4096, 1024, dtype=dtype, device="cuda")
    outs = {}
    for fast in (True, False):
        monkeypatch.setattr(eager, "EAGER_FAST_PATH", fast)
        runs = []
        for _ in range(2):  # the plan's first call and a cached one
            y = masked_linear(x, w, m, b, activation="elu", backend="cuda")
            runs.append([y, *torch.autograd.grad(y, (x, w, b), g)])
        outs[fast] = runs
    for got, want in zip(outs[True], outs[False], strict=True):
        for a, b_ in zip(got, want, strict=True):
            assert torch.equal(a, b_)

@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [True, False])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_float32_precision(backend, allow_tf32, monkeypatch):
    """tf32 when torch allows it for matmuls; otherwise 3xTF32 (the cuda kernels' hi/lo splits, Triton's tf32x3),
    at the error level of fp32 arithmetic."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    x, w, b, m = _inputs(257, 1024, 384, torch.float32, "cuda", "made_hidden")
    y = masked_linear(x, w, m, b, activation="elu", backend=backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), g)
    y_ref = reference(x.double(), w.double(), m, b.double(), activation="elu")
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), g.double())
    tol = 2e-3 if allow_tf32 else 1e-5
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), (y, *grads), (y_ref, *grads_ref), strict=True):
        assert rel_err(got, want) < tol, f"{name} (allow_tf32={allow_tf32})"


@pytest.mark.gpu
def test_gpu_cuda_is_auto_and_float64_goes_to_triton():
    from gm._backend import resolve  # noqa: PLC0415

    x, w, b, m = _inputs(8, 16, 16, torch.float32, "cuda")
    assert resolve(None, x.device, native_cpu=False, cuda_kernels=True) == "cuda"
    assert_rel(masked_linear(x, w, m, b), reference(x.double(), w.double(), m, b.double()), torch.float32, "auto")
    xd, wd, bd = (t.detach().double() for t in (x, w, b))
    assert_rel(masked_linear(xd, wd, m, bd), reference(xd, wd, m, bd), torch.float64, "float64 auto")
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        masked_linear(xd, wd, m, bd, backend="cuda")


@pytest.mark.gpu
def test_gpu_cuda_skips_empty_tiles_without_reading_their_weights():
    """NaN weights under all-zero mask tiles never reach the result (those tiles are not loaded); NaN weights in
    the masked part of partly-zero tiles are zeroed before the MMA."""
    clear_mask_cache()
    x, w, b, m = _inputs(64, 512, 256, torch.bfloat16, "cuda", "made_hidden")
    w_nan = w.detach().clone()
    w_nan[m == 0] = float("nan")
    y = masked_linear(x, w_nan, m, b, backend="cuda")
    assert torch.isfinite(y).all()
    assert_rel(y, reference(x.double(), w.double(), m, b.double()), torch.bfloat16, "y", torch.device("cuda"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_nan_weights_under_the_mask_stay_out(backend):
    """Masked-out weights are never part of the product (not multiplied by zero: NaN * 0 is NaN): forward and
    the input gradient are finite and match the reference on the clean weight."""
    clear_mask_cache()
    dtype = torch.float32
    x, w, b, m = _inputs(33, 40, 35, dtype, "cpu", "made_hidden")
    w_nan = w.detach().clone()
    w_nan[m == 0] = float("nan")
    x = x.detach().requires_grad_()
    y = masked_linear(x, w_nan, m, b, activation="elu", backend=backend)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    y_ref = reference(x64, w.detach().double(), m, b.detach().double(), activation="elu")
    (dx_ref,) = torch.autograd.grad(y_ref, x64, torch.ones_like(y_ref))
    assert_rel(y, y_ref, dtype, "y", device=torch.device("cpu"))
    assert_rel(dx, dx_ref, dtype, "dx", device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# cpu backend: GEMMs over the mask's non-zero blocks (gm.ops.masked_linear.CpuPlan).


@pytest.fixture
def fine_blocks(monkeypatch):
    """A cost model without per-call cost or padding: the cpu plan cuts masks as finely as it can (16-row blocks),
    so small test shapes run many blocks."""
    ml = importlib.import_module("gm.ops.masked_linear")  # gm.ops.masked_linear is also the function's name
    monkeypatch.setattr(ml, "CPU_FIXED_MACS", 0.0)
    monkeypatch.setattr(ml, "CPU_PAD", 0)
    clear_mask_cache()
    yield
    clear_mask_cache()


def _check_plan(m: torch.Tensor, plan) -> None:
    """Row blocks cover every row once and every one of the mask; column blocks likewise for the columns."""
    nz = m != 0
    o, k = m.shape
    covered = torch.zeros(o, k, dtype=torch.int32)
    for r0, r1, k0, k1, z0, z1 in plan.rows:
        covered[r0:r1] += 1
        assert not nz[r0:r1, :k0].any() and not nz[r0:r1, k1:].any()
        assert k0 <= z0 <= z1 <= k1 and nz[r0:r1, k0:z0].all() and nz[r0:r1, z1:k1].all()
    assert (covered == 1).all()
    covered.zero_()
    for c0, c1, o0, o1 in plan.cols:
        covered[:, c0:c1] += 1
        assert not nz[:o0, c0:c1].any() and not nz[o1:, c0:c1].any()
    assert (covered == 1).all()


@pytest.mark.parametrize("mask", list(MASKS))
def test_cpu_plan_covers_the_mask(mask, fine_blocks):
    from gm.ops.masked_linear import cpu_plan  # noqa: PLC0415

    m = MASKS[mask](70, 90)
    plan = cpu_plan(mask_entry(m), 64)
    _check_plan(m, plan)
    assert cpu_plan(mask_entry(m), 100) is plan  # cached per power-of-two batch bucket
    if mask == "made_hidden":
        assert len(plan.rows) > 1 and plan.area < 0.75


def test_cpu_plan_default_cost_model_on_made_masks():
    """With the fitted cost model a large MADE hidden mask is cut (about half its area skipped), a random mask is
    one dense block, and a tiny batch gets one block (the per-call cost dominates)."""
    from gm.ops.masked_linear import cpu_plan  # noqa: PLC0415

    clear_mask_cache()
    m = _made_hidden_mask(512, 512)
    plan = cpu_plan(mask_entry(m), 1024)
    _check_plan(m, plan)
    assert len(plan.rows) > 1 and plan.area < 0.7
    r = _random_mask(512, 512)
    assert [blk[:4] for blk in cpu_plan(mask_entry(r), 1024).rows] == [(0, 512, 0, 512)]
    assert len(cpu_plan(mask_entry(m), 2).rows) == 1
    clear_mask_cache()


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("activation", [None, "elu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_blocks_match_reference(dtype, activation, mask, fine_blocks, monkeypatch):
    poison_empty(monkeypatch)
    for shape in [(33, 70, 50), (5, 37, 29), (8, 16, 96)]:
        _compare("cpu", shape, dtype, activation, mask=mask)


def test_cpu_blocks_empty_rows_and_columns(fine_blocks, monkeypatch):
    """Rows of the mask with no one give y = act(bias); columns with no one give dx = 0; an all-zero mask; no rows."""
    poison_empty(monkeypatch)
    x, w, b, _ = _inputs(9, 64, 48, torch.float64)
    for m in (_made_hidden_mask(48, 64), torch.zeros(48, 64)):
        m = m.clone()
        m[:20] = 0
        m[:, 40:] = 0
        for act in (None, "elu"):
            y = masked_linear(x, w, m, b, activation=act, backend="cpu")
            g = torch.randn_like(y)
            got = torch.autograd.grad(y, (x, w, b), g)
            y_ref = reference(x, w, m, b, activation=act)
            want = torch.autograd.grad(y_ref, (x, w, b), g)
            assert_rel(y, y_ref, torch.float64, "y")
            for name, a, e in zip(("dx", "dw", "db"), got, want, strict=True):
                assert_rel(a, e, torch.float64, name)
            assert (got[1][m == 0] == 0).all() and (got[0][:, 40:] == 0).all()
    x0 = torch.randn(0, 64, dtype=torch.float64, requires_grad=True)
    y0 = masked_linear(x0, w, _made_hidden_mask(48, 64), b, backend="cpu")
    assert y0.shape == (0, 48)
    y0.sum().backward()
    assert x0.grad.shape == (0, 64)


def test_cpu_blocks_gradcheck(fine_blocks):
    x, w, b, _ = _inputs(3, 40, 36, torch.float64)
    m = _made_hidden_mask(36, 40)
    assert torch.autograd.gradcheck(
        lambda x, w, b: masked_linear(x, w, m, b, activation="elu", backend="cpu"), (x, w, b)
    )


def test_opcheck_cpu(fine_blocks):
    x, w, b, _ = _inputs(5, 40, 36, torch.float32)
    m = _made_hidden_mask(36, 40)
    torch.library.opcheck(torch.ops.gm.masked_linear.default, (x, w, m, b, "elu", "cpu"))


@pytest.mark.parametrize("activation", [None, "elu"])
def test_cpu_eager_path_equals_custom_op(activation, fine_blocks, monkeypatch):
    """Eager cpu calls run through an autograd.Function instead of the custom op: bit-identical results."""
    x, w, b, _ = _inputs(7, 40, 36, torch.float32)
    m = _made_hidden_mask(36, 40)
    g = torch.randn(7, 36)
    runs = []
    for fast in (True, False):
        monkeypatch.setattr(eager, "EAGER_FAST_PATH", fast)
        y = masked_linear(x, w, m, b, activation=activation, backend="cpu")
        runs.append((y, *torch.autograd.grad(y, (x, w, b), g)))
        with torch.no_grad():
            runs.append((masked_linear(x, w, m, b, activation=activation, backend="cpu"),))
    for a, e in zip(runs[0] + runs[1], runs[2] + runs[3], strict=True):
        assert torch.equal(a, e)


def test_cpu_eager_path_is_skipped_under_modes():
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    from gm.ops._eager import eager_ok as eager_cpu  # noqa: PLC0415

    x = torch.randn(3, 4)
    assert eager_cpu(x, None, torch.nn.Parameter(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not eager_cpu(x)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert not eager_cpu(fx)
        m = _made_hidden_mask(5, 4)
        y = masked_linear(fx, mode.from_tensor(torch.randn(5, 4)), mode.from_tensor(m), backend="cpu")
        assert y.shape == (3, 5)


def test_torch_compile_fullgraph_cpu():
    """Under torch.compile the cpu backend goes through the registered op (fake + autograd registrations)."""
    x, w, b, _ = _inputs(6, 24, 20, torch.float32)
    m = _made_hidden_mask(20, 24)

    def f(x, w, b):
        return masked_linear(x, w, m, b, activation="elu", backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, y_ref = compiled(x, w, b), f(x, w, b)
    torch.testing.assert_close(y, y_ref)
    for a, e in zip(torch.autograd.grad(y.sum(), (x, w, b)), torch.autograd.grad(y_ref.sum(), (x, w, b)), strict=True):
        torch.testing.assert_close(a, e)
