"""iaf_step and the fused iaf_made_output against the plain-PyTorch references: values, every gradient, stability."""

from __future__ import annotations

import importlib

import pytest
import torch

from gm.ops import _eager as eager
from gm.ops.iaf import iaf_made_output, iaf_step
from gm.ops.masked_linear import mask_entry
from gm.reference import iaf as ref
from tests._util import assert_rel, fast_backends, poison_empty, rel_err

BACKENDS = ["reference", *fast_backends(torch.device("cpu"))]
FUSED_BACKENDS = [b for b in BACKENDS if b != "cuda"]
MODES = ["gated", "affine"]
STEP_SHAPES = [(5, 7), (3, 2, 3, 5), (4, 40)]


def _step_compare(backend, shape, dtype, mode, device=torch.device("cpu"), scale=1.0):
    z, m, s = (torch.randn(*shape, dtype=dtype, device=device).mul_(scale).requires_grad_() for _ in range(3))
    z_new, ld = iaf_step(z, m, s, mode=mode, backend=backend)
    gz, gl = torch.randn_like(z_new), torch.randn_like(ld)
    grads = torch.autograd.grad((z_new * gz).sum() + (ld * gl).sum(), (z, m, s))
    zd, md, sd = (t.detach().double().requires_grad_() for t in (z, m, s))
    z_ref, ld_ref = ref.iaf_step(zd, md, sd, mode=mode)
    grads_ref = torch.autograd.grad((z_ref * gz.double()).sum() + (ld_ref * gl.double()).sum(), (zd, md, sd))
    assert ld.shape == (shape[0],)
    assert_rel(z_new, z_ref, dtype, "z_new", device)
    assert_rel(ld, ld_ref, dtype, "logdet", device)
    for name, got, want in zip(("dz", "dm", "ds"), grads, grads_ref):
        assert_rel(got, want, dtype, name, device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_matches_reference(backend, dtype, shape, mode):
    _step_compare(backend, shape, dtype, mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_is_stable_for_large_s(backend):
    s = torch.tensor([[-1e4, -100.0, -30.0, 0.0, 30.0, 1e4]], dtype=torch.float32, requires_grad=True)
    z = torch.ones_like(s, requires_grad=True)
    m = torch.zeros_like(s, requires_grad=True)
    z_new, ld = iaf_step(z, m, s, mode="gated", backend=backend)
    want = torch.nn.functional.logsigmoid(s.double()).sum()
    assert torch.isfinite(ld).all() and abs(ld.item() - want.item()) <= 1e-5 * abs(want.item())
    (z_new.sum() + ld.sum()).backward()
    for t in (z, m, s):
        assert torch.isfinite(t.grad).all()


def _fused_inputs(n, h, d, dtype, device="cpu", mode="gated", random_mask=False):
    hidden = torch.randn(n, h, dtype=dtype, device=device, requires_grad=True)
    scale = 1.0 if mode == "gated" else 0.3  # keep exp(-s) moderate in affine mode
    w = torch.randn(2 * d, h, dtype=dtype, device=device).mul_(scale / h**0.5).requires_grad_()
    b = torch.randn(2 * d, dtype=dtype, device=device).mul_(scale).requires_grad_()
    z = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
    deg_in = torch.arange(1, d + 1)
    deg_h = 1 + (torch.arange(h) * max(d - 1, 1)) // h
    mask = (deg_in[:, None] > deg_h[None, :]).float().repeat(2, 1)
    if random_mask:  # any 0/1 mask, the heads' masks different
        mask = (torch.rand(2 * d, h) < 0.5).float()
    return hidden, w, mask.to(device), b, z


def _fused_compare(backend, shape, dtype, mode, device=torch.device("cpu"), bias=True, random_mask=False):
    hidden, w, mask, b, z = _fused_inputs(*shape, dtype, device, mode, random_mask)
    b = b if bias else None
    z_new, ld = iaf_made_output(hidden, w, mask, b, z, mode=mode, backend=backend)
    gz, gl = torch.randn_like(z_new), torch.randn_like(ld)
    leaves = [t for t in (hidden, w, b, z) if t is not None]
    grads = torch.autograd.grad((z_new * gz).sum() + (ld * gl).sum(), leaves)
    dbl = [t.detach().double().requires_grad_() for t in leaves]
    args = dict(zip(("hidden", "w", "b", "z") if bias else ("hidden", "w", "z"), dbl))
    z_ref, ld_ref = ref.iaf_made_output(args["hidden"], args["w"], mask, args.get("b"), args["z"], mode=mode)
    grads_ref = torch.autograd.grad((z_ref * gz.double()).sum() + (ld_ref * gl.double()).sum(), dbl)
    assert_rel(z_new, z_ref, dtype, "z_new", device)
    assert_rel(ld, ld_ref, dtype, "logdet", device)
    for name, got, want in zip(args, grads, grads_ref):
        assert_rel(got, want, dtype, "d" + name, device)
    assert (grads[1][mask == 0] == 0).all(), "weight gradient must be exactly zero where masked"


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "reference"])
def test_made_output_nan_weights_under_the_mask_stay_out(backend):
    """Masked-out weights are left out, not multiplied by zero (NaN * 0 is NaN): outputs and the hidden gradient
    finite and equal to the reference on the clean weight."""
    hidden, w, mask, b, z = _fused_inputs(19, 37, 21, torch.float32, random_mask=True)
    w_nan = w.detach().clone()
    w_nan[mask == 0] = float("nan")
    z_new, ld = iaf_made_output(hidden, w_nan, mask, b, z, mode="gated", backend=backend)
    (dh,) = torch.autograd.grad(z_new.sum() + ld.sum(), hidden)
    h64 = hidden.detach().double().requires_grad_()
    z_ref, ld_ref = ref.iaf_made_output(h64, w.detach().double(), mask, b.detach().double(), z.detach().double(),
                                        mode="gated")  # fmt: skip
    (dh_ref,) = torch.autograd.grad(z_ref.sum() + ld_ref.sum(), h64)
    cpu = torch.device("cpu")
    assert_rel(z_new, z_ref, torch.float32, "z_new", cpu)
    assert_rel(ld, ld_ref, torch.float32, "logdet", cpu)
    assert_rel(dh, dh_ref, torch.float32, "dhidden", cpu)


FUSED_SHAPES = [(5, 7, 3), (19, 37, 21), (33, 48, 16)]  # (N, H, D)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "N{}-H{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_made_output_matches_reference(backend, dtype, shape, mode):
    _fused_compare(backend, shape, dtype, mode)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_made_output_without_bias(backend):
    _fused_compare(backend, (6, 20, 9), torch.float64, "gated", bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_outputs_are_all_written(backend, monkeypatch):
    poison_empty(monkeypatch)
    _step_compare(backend, (7, 45), torch.float64, "gated")
    if backend in FUSED_BACKENDS:
        _fused_compare(backend, (21, 35, 19), torch.float64, "gated")


def test_gradcheck_cpu():
    z, m, s = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda z, m, s: iaf_step(z, m, s, mode=mode, backend="cpu"), (z, m, s))
    hidden, w, mask, b, z = _fused_inputs(4, 6, 3, torch.float64)
    for mode in MODES:
        assert torch.autograd.gradcheck(
            lambda h, w, b, z: iaf_made_output(h, w, mask, b, z, mode=mode, backend="cpu"), (hidden, w, b, z)
        )


def test_bad_input():
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="m must have z's shape"):
        iaf_step(z, torch.randn(4, 6), torch.randn(4, 5))
    with pytest.raises(ValueError, match="s must have z's shape"):
        iaf_step(z, z, torch.randn(3, 5))
    with pytest.raises(ValueError, match="mode"):
        iaf_step(z, z, z, mode="additive")
    with pytest.raises(ValueError, match="dtype"):
        iaf_step(z, z.double(), z)
    hidden, w, mask, b, zz = _fused_inputs(4, 6, 3, torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(2D, H\)"):
        iaf_made_output(hidden, w[:5], mask[:5], b, zz)
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        iaf_made_output(hidden, w, mask[:, :4], b, zz)
    bad = mask.clone()
    bad[0, 0] = 2
    with pytest.raises(ValueError, match="binary"):
        iaf_made_output(hidden, w, bad, b, zz)
    with pytest.raises(ValueError, match="batch size"):
        iaf_made_output(hidden, w, mask, b, zz[:3])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="gm._C not built")
@pytest.mark.parametrize("mode", MODES)
def test_native_cpu_twin_matches_reference(mode):
    """The C++ host twin of the CUDA kernel's math (csrc/iaf/iaf.h), measured slower than PyTorch on the CPU."""
    from gm.ops.iaf import _torch_step_backward, native_cpu_step, native_cpu_step_backward

    z, m, s, gz = (torch.randn(7, 33, dtype=torch.float64) * 3 for _ in range(4))
    gl = torch.randn(7, dtype=torch.float64)
    z_new, ld = native_cpu_step(z, m, s, mode)
    z_ref, ld_ref = ref.iaf_step(z, m, s, mode=mode)
    assert_rel(z_new, z_ref, torch.float64, "z_new")
    assert_rel(ld, ld_ref, torch.float64, "logdet")
    for got, want in zip(native_cpu_step_backward(z, m, s, gz, gl, mode), _torch_step_backward(z, m, s, gz, gl, mode)):
        assert_rel(got, want, torch.float64, "grad")


def test_opcheck_cpu():
    z, m, s = (torch.randn(3, 5, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.gm.iaf_step.default, (z, m, s, "gated", "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_step(backend, dtype, mode):
    _step_compare(backend, (300, 64), dtype, mode, torch.device("cuda"))
    _step_compare(backend, (5, 3, 33, 17), dtype, mode, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_gpu_made_output_triton(dtype, mode):
    _fused_compare("triton", (300, 256, 64), dtype, mode, torch.device("cuda"))
    _fused_compare("triton", (77, 130, 70), dtype, mode, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("random_mask", [False, True], ids=["made", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_gpu_made_output_cuda(dtype, mode, random_mask, monkeypatch):
    """The fused CUDA output layer (m and s in one tile, the step in the epilogue) with NaN-poisoned outputs; odd
    sizes (H padded in Python, D not a multiple of the 64-column block) and the IAF sizes."""
    poison_empty(monkeypatch)
    for shape in [(5, 7, 3), (77, 130, 70), (300, 256, 64), (260, 1024, 256)]:
        _fused_compare("cuda", shape, dtype, mode, torch.device("cuda"), random_mask=random_mask)
    _fused_compare("cuda", (33, 48, 16), dtype, mode, torch.device("cuda"), bias=False, random_mask=random_mask)


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [True, False])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_made_output_float32_precision(backend, allow_tf32, monkeypatch):
    """The fused output layer in float32: tf32 when torch allows it for matmuls, else 3xTF32 (the cuda kernels'
    hi/lo splits, Triton's tf32x3) at fp32-level error, forward and every gradient."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    hidden, w, mask, b, z = _fused_inputs(257, 1024, 64, torch.float32, "cuda")
    leaves = (hidden, w, b, z)
    got = iaf_made_output(hidden, w, mask, b, z, backend=backend)
    gouts = [torch.randn_like(t) for t in got]
    got_grads = torch.autograd.grad(got, leaves, gouts)
    dbl = [t.detach().double().requires_grad_() for t in leaves]
    want = ref.iaf_made_output(dbl[0], dbl[1], mask, dbl[2], dbl[3])
    want_grads = torch.autograd.grad(want, dbl, [g.double() for g in gouts])
    tol = 2e-3 if allow_tf32 else 1e-5
    names = ("z_new", "logdet", "dhidden", "dweight", "dbias", "dz")
    for name, g, r in zip(names, (*got, *got_grads), (*want, *want_grads), strict=True):
        assert rel_err(g, r) < tol, f"{name} (allow_tf32={allow_tf32})"


@pytest.mark.gpu
def test_gpu_made_output_cuda_is_auto():
    from gm._backend import resolve  # noqa: PLC0415
    from gm.ops.iaf import CUDA_FUSED_READY  # noqa: PLC0415

    assert CUDA_FUSED_READY and resolve(None, torch.device("cuda"), native_cpu=False) == "cuda"
    hidden, w, mask, b, z = _fused_inputs(64, 256, 64, torch.float32, "cuda")
    got = iaf_made_output(hidden, w, mask, b, z)
    want = ref.iaf_made_output(hidden.double(), w.double(), mask, b.double(), z.double())
    assert_rel(got[0], want[0], torch.float32, "z_new")
    assert_rel(got[1], want[1], torch.float32, "logdet")


# ----------------------------------------------------------------------------------------------------------------
# cpu backend of the fused output layer: GEMMs over the mask's non-zero blocks, [m, s] saved for the backward.


@pytest.fixture
def fine_blocks(monkeypatch):
    """Cost model without per-call cost, padding or copy cost: the cpu plan cuts the mask into 16-row blocks and
    the fused output layer runs interleaved wherever that saves anything."""
    ml = importlib.import_module("gm.ops.masked_linear")
    monkeypatch.setattr(ml, "CPU_FIXED_MACS", 0.0)
    monkeypatch.setattr(ml, "CPU_PAD", 0)
    monkeypatch.setattr(importlib.import_module("gm.ops.iaf"), "CPU_COPY_MACS", 0)
    ml.clear_mask_cache()
    yield
    ml.clear_mask_cache()


def test_cpu_made_output_layout_default_cost_model():
    """A 2x1024 MADE's output mask (D=64) at N=512 runs interleaved, in blocks; a random mask runs dense."""
    from gm.ops.iaf import _cpu_fused_layout  # noqa: PLC0415

    _, _, mask, _, _ = _fused_inputs(2, 1024, 64, torch.float32)
    interleaved, plan = _cpu_fused_layout(mask_entry(mask), 512)
    assert interleaved and len(plan.rows) > 1 and plan.area < 0.8
    interleaved, plan = _cpu_fused_layout(mask_entry((torch.rand(128, 1024) < 0.5).float()), 512)
    assert len(plan.rows) == 1 and plan.area == 1.0


@pytest.mark.parametrize("random_mask", [False, True], ids=["made", "random"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_made_output_blocks(dtype, mode, random_mask, fine_blocks, monkeypatch):
    poison_empty(monkeypatch)
    for shape in [(19, 70, 40), (5, 33, 9)]:
        _fused_compare("cpu", shape, dtype, mode, random_mask=random_mask)
    _fused_compare("cpu", (7, 40, 24), dtype, mode, bias=False, random_mask=random_mask)


def test_cpu_made_output_saves_m_and_s(fine_blocks):
    """The cpu forward returns [m, s] for the backward (rows interleaved m_0, s_0, m_1, ... for a MADE output
    mask, whose heads repeat one staircase); the backward without it (recomputing) agrees."""
    from gm.ops.iaf import _cpu_fused_layout, _cpu_made_output_backward, _made_output_op  # noqa: PLC0415

    hidden, w, mask, b, z = (t.detach() for t in _fused_inputs(9, 48, 20, torch.float64))
    z_new, ld, saved = _made_output_op(hidden, w, mask, b, z, "gated", "cpu")
    interleaved, plan = _cpu_fused_layout(mask_entry(mask), 9)
    assert interleaved and len(plan.rows) > 1
    want = ref.masked_linear(hidden, w, mask, b)
    assert_rel(saved, want.view(9, 2, 5, 4).transpose(1, 2).reshape(9, 40), torch.float64, "saved")  # groups of 4
    assert _made_output_op(hidden, w, mask, b, z, "gated", "reference")[2].numel() == 0
    gz, gl = torch.randn_like(z), torch.randn(9, dtype=torch.float64)
    with_saved = _cpu_made_output_backward(hidden, w, mask, b, z, gz, gl, "gated", True, True, True, saved)
    recomputed = _cpu_made_output_backward(hidden, w, mask, b, z, gz, gl, "gated", True, True, True,
                                           hidden.new_empty(0))  # fmt: skip
    for a, e in zip(with_saved, recomputed, strict=True):
        assert torch.equal(a, e)


def test_opcheck_made_output_cpu(fine_blocks):
    hidden, w, mask, b, z = _fused_inputs(6, 40, 12, torch.float32)
    for backend in ("cpu", "reference"):
        torch.library.opcheck(torch.ops.gm.iaf_made_output.default, (hidden, w, mask, b, z, "gated", backend))


def test_cpu_made_output_eager_path_equals_custom_op(fine_blocks, monkeypatch):
    """Eager cpu calls run through an autograd.Function instead of the custom op: bit-identical results."""
    hidden, w, mask, b, z = _fused_inputs(9, 48, 20, torch.float32)
    gz, gl = torch.randn(9, 20), torch.randn(9)
    runs = []
    for fast in (True, False):
        monkeypatch.setattr(eager, "EAGER_FAST_PATH", fast)
        z_new, ld = iaf_made_output(hidden, w, mask, b, z, backend="cpu")
        grads = torch.autograd.grad((z_new * gz).sum() + (ld * gl).sum(), (hidden, w, b, z))
        with torch.no_grad():
            nograd = iaf_made_output(hidden, w, mask, b, z, backend="cpu")
        runs.append((z_new, ld, *grads, *nograd))
    for a, e in zip(*runs, strict=True):
        assert torch.equal(a, e)


def test_torch_compile_fullgraph_made_output_cpu():
    hidden, w, mask, b, z = _fused_inputs(6, 40, 12, torch.float32)

    def f(hidden, w, b, z):
        return iaf_made_output(hidden, w, mask, b, z, backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(hidden, w, b, z), f(hidden, w, b, z)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)
    leaves = (hidden, w, b, z)
    ga = torch.autograd.grad(got[0].sum() + got[1].sum(), leaves)
    ge = torch.autograd.grad(want[0].sum() + want[1].sum(), leaves)
    for a, e in zip(ga, ge, strict=True):
        torch.testing.assert_close(a, e)
