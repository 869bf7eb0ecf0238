"""minibatch_discrimination against the naive N x N x B x C reference, on every backend this machine has."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gm._backend import BackendUnavailable
from gm.ops.minibatch import minibatch_discrimination
from gm.reference.minibatch import minibatch_discrimination as naive
from gm.reference.minibatch import minibatch_discrimination_cdist
from tests._util import DEVICE, assert_rel, fast_backends, poison_empty

BACKENDS = ["reference", *fast_backends(torch.device("cpu"))]
SHAPES = [
    pytest.param((1, 1, 1), id="N1-B1-C1"),
    pytest.param((1, 3, 5), id="N1-B3-C5"),
    pytest.param((3, 2, 5), id="N3-B2-C5"),
    pytest.param((5, 3, 1), id="N5-B3-C1"),
    pytest.param((7, 1, 4), id="N7-B1-C4"),
    pytest.param((6, 2, 9), id="N6-B2-C9"),  # C above the native backends' unrolled sizes
]


def _run(m, grad, backend, exclude_self):
    m = m.detach().requires_grad_()
    o = minibatch_discrimination(m, exclude_self=exclude_self, backend=backend)
    (dm,) = torch.autograd.grad(o, m, grad)
    return o, dm


def _oracle(m, grad, exclude_self):
    """The naive reference and its autograd gradient, in float64 on the same (rounded) input values."""
    m64 = m.detach().double().requires_grad_()
    o = naive(m64, exclude_self=exclude_self)
    (dm,) = torch.autograd.grad(o, m64, grad.double())
    return o, dm


def _check(m, grad, backend, exclude_self, dtype, device=torch.device("cpu")):
    o, dm = _run(m, grad, backend, exclude_self)
    o_ref, dm_ref = _oracle(m, grad, exclude_self)
    assert o.dtype == m.dtype and dm.dtype == m.dtype
    assert_rel(o, o_ref, dtype, "o", device=device)
    assert_rel(dm, dm_ref, dtype, "dm", device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("exclude_self", [True, False], ids=["excl", "incl"])
def test_matches_naive(backend, dtype, shape, exclude_self):
    m = torch.randn(*shape, dtype=dtype)
    grad = torch.randn(shape[0], shape[1], dtype=dtype)
    _check(m, grad, backend, exclude_self, dtype)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
def test_cpu_many_tiles(backend):
    """N above the CPU kernel's j tile (256) and odd, so the tail tile and the split around j = i are exercised."""
    m = torch.randn(301, 3, 5, dtype=torch.float64)
    grad = torch.randn(301, 3, dtype=torch.float64)
    _check(m, grad, backend, True, torch.float64)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available")
@pytest.mark.parametrize("shape", [(21, 3, 5), (16, 2, 1), (13, 4, 8), (9, 1, 3), (30, 2, 2)], ids=str)
@pytest.mark.parametrize("blocks", [(8, 4), (16, 8)], ids=str)
@pytest.mark.parametrize("wide", [False, True], ids=["i32", "i64"])
@pytest.mark.parametrize("exclude_self", [True, False], ids=["excl", "incl"])
def test_triton_row_kernels_every_span(shape, blocks, wide, exclude_self, monkeypatch):
    """The Triton kernels for C <= 8 walk j in spans: the tiles before the program's rows and after them (no mask,
    no j != i test), its own rows (the test; masked where they pass N) and the ragged tail. N across several row
    tiles and BLOCK_J tiles, with and without a tail, C = 1..8, 32- and 64-bit offsets, rows tied across tiles."""
    from gm.kernels import minibatch as k  # noqa: PLC0415

    bi, bj = blocks
    monkeypatch.setattr(k, "_ROWS_FWD_META", dict(BLOCK_I=bi, BLOCK_J=bj))
    monkeypatch.setattr(k, "_ROWS_BWD_META", dict(BLOCK_I=bi, BLOCK_J=bj))
    monkeypatch.setattr(k, "_wide", lambda m: wide)
    m = torch.randn(*shape, dtype=torch.float64)
    m[shape[0] - 1] = m[2]
    grad = torch.randn(*shape[:2], dtype=torch.float64)
    _check(m, grad, "triton", exclude_self, torch.float64)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="gm._C is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("n", "c"), [(1, 3), (2, 1), (5, 8), (301, 5), (300, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("exclude_self", [True, False], ids=["excl", "incl"])
def test_cpu_pair_walk_matches_row_walk(n, c, dtype, exclude_self, monkeypatch):
    """The CPU kernel's two paths: with at least as many kernels as threads (B = 64 here) it walks each unordered
    pair once and credits both rows; GM_MBD_ROWS=1 forces the row-by-row walk. Both against the naive reference
    (N above the 256-wide j tile, odd and even; C = 1 and 8, the unrolled sizes' ends), and against each other; a NaN
    row and tied rows included."""
    m = torch.randn(n, 64, c, dtype=dtype)
    if n > 2:
        m[1] = m[0]
        m[2, 7, 0] = float("nan")
    grad = torch.randn(n, 64, dtype=dtype)
    monkeypatch.delenv("GM_MBD_ROWS", raising=False)
    pairs = _run(m, grad, "cpu", exclude_self)
    monkeypatch.setenv("GM_MBD_ROWS", "1")
    rows = _run(m, grad, "cpu", exclude_self)
    ref = _oracle(m, grad, exclude_self)
    for what, a, b, r in zip(("o", "dm"), pairs, rows, ref, strict=True):
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(a), nan) and torch.equal(torch.isnan(b), nan), what
        assert_rel(a[~nan], r[~nan], dtype, f"{what} (pairs)", device=torch.device("cpu"))
        assert_rel(b[~nan], r[~nan], dtype, f"{what} (rows)", device=torch.device("cpu"))


def test_exclude_self_is_exact():
    """N = 1 with exclude_self gives exactly 0 (not 1 - 1 rounded) and a zero gradient, on every backend."""
    for backend in BACKENDS:
        o, dm = _run(torch.randn(1, 4, 3), torch.randn(1, 4), backend, True)
        assert torch.equal(o, torch.zeros_like(o)), backend
        assert torch.equal(dm, torch.zeros_like(dm)), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties(backend):
    """Identical rows and coordinates that tie: sign(0) = 0, the subgradient autograd gives abs at 0."""
    m = torch.randn(5, 3, 4, dtype=torch.float64)
    m[1] = m[0]
    m[3, :, 1] = m[2, :, 1]
    m[4, 0] = m[2, 0]
    grad = torch.randn(5, 3, dtype=torch.float64)
    for exclude_self in (True, False):
        _check(m, grad, backend, exclude_self, torch.float64)
    # Two identical rows and nothing else: every pairwise sign is 0, so the gradient is exactly zero.
    two = torch.randn(1, 2, 3, dtype=torch.float64).expand(2, 2, 3).contiguous()
    _, dm = _run(two, torch.randn(2, 2, dtype=torch.float64), backend, True)
    assert torch.equal(dm, torch.zeros_like(dm))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_poisoned_outputs(backend, monkeypatch):
    """NaN-filled fresh buffers: every element of o and dm must be written."""
    m = torch.randn(6, 5, 3)
    grad = torch.randn(6, 5)
    o_ref, dm_ref = _oracle(m, grad, True)
    poison_empty(monkeypatch)
    o, dm = _run(m, grad, backend, True)
    assert_rel(o, o_ref, torch.float32, "o")
    assert_rel(dm, dm_ref, torch.float32, "dm")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_propagates_like_reference(backend):
    m = torch.randn(4, 2, 3, dtype=torch.float64)
    m[2, 1, 0] = float("nan")
    o, _ = _run(m, torch.ones(4, 2, dtype=torch.float64), backend, True)
    o_ref = naive(m)
    assert torch.equal(torch.isnan(o), torch.isnan(o_ref))
    ok = ~torch.isnan(o_ref)
    assert torch.allclose(o[ok], o_ref[ok], rtol=1e-12, atol=0)


def test_gradcheck_cpu():
    if "cpu" not in BACKENDS:
        pytest.skip("gm._C is not built")
    m = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    for exclude_self in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, e=exclude_self: minibatch_discrimination(x, exclude_self=e, backend="cpu"), (m,)
        )


def test_opcheck():
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    from gm.ops.minibatch import _minibatch_op  # noqa: PLC0415

    m = torch.randn(4, 3, 2, requires_grad=True)
    torch.library.opcheck(_minibatch_op, (m, True, backend))


def test_half_types_on_cpu_backend():
    if "cpu" not in BACKENDS:
        pytest.skip("gm._C is not built")
    m = torch.randn(9, 4, 5).to(torch.bfloat16)
    grad = torch.randn(9, 4).to(torch.bfloat16)
    _check(m, grad, "cpu", True, torch.bfloat16)


def test_cdist_formulation_matches():
    m = torch.randn(7, 3, 5, dtype=torch.float64)
    for exclude_self in (True, False):
        assert_rel(minibatch_discrimination_cdist(m, exclude_self=exclude_self), naive(m, exclude_self=exclude_self),
                   torch.float64, "cdist")  # fmt: skip


@pytest.mark.parametrize(
    ("m", "match"),
    [
        pytest.param(torch.randn(4, 3), "3 dimensions", id="rank2"),
        pytest.param(torch.randn(2, 4, 3, 1), "3 dimensions", id="rank4"),
        pytest.param(torch.ones(4, 3, 2, dtype=torch.int64), "dtype", id="int"),
        pytest.param(torch.randn(0, 3, 2), "N >= 1", id="N0"),
        pytest.param([[1.0]], "torch.Tensor", id="list"),
    ],
)
def test_bad_input(m, match):
    with pytest.raises(ValueError, match=match):
        minibatch_discrimination(m)


def test_unavailable_backend_says_why():
    with pytest.raises(BackendUnavailable, match="cuda"):
        minibatch_discrimination(torch.randn(3, 2, 2), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        minibatch_discrimination(torch.randn(3, 2, 2), backend="numpy")


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch
    from gm.ops.minibatch import minibatch_discrimination

    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    m = torch.randn(4096, 100, 5, requires_grad=True)
    grad = torch.randn(4096, 100)
    small = torch.randn(8, 100, 5, requires_grad=True)  # load the extension and start the thread pool first
    minibatch_discrimination(small, backend="cpu").backward(torch.ones(8, 100))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = status_kib("VmRSS")
    o = minibatch_discrimination(m, backend="cpu")
    o.backward(grad)
    print((status_kib("VmHWM") - before) * 1024, float(o.detach().mean()), float(m.grad.abs().mean()))
    """
)


def test_memory_n4096_cpu():
    """N = 4096, B = 100, C = 5 forward + backward on the cpu backend (the naive tensor would be 33 GB): completes
    with under 64 MB of extra resident memory: the peak resident size of a fresh process (VmHWM, reset just before
    the call) minus its resident size before the call."""
    if "cpu" not in BACKENDS:
        pytest.skip("gm._C is not built")
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    extra, mean_o, mean_grad = proc.stdout.split()
    assert float(mean_o) > 0 and float(mean_grad) > 0
    assert int(extra) < 64 * 2**20, f"peak extra memory {int(extra) / 2**20:.1f} MiB >= 64 MiB"


# ----------------------------------------------------------------------------------------------------------------
# GPU: cuda and triton in float32 and bfloat16 (skipped without a GPU).


GPU_BACKENDS = [b for b in ("cuda", "triton") if DEVICE.type == "cuda" and b in fast_backends(DEVICE)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", [(300, 20, 5), (129, 9, 3), (1, 3, 5), (70, 5, 1), (40, 3, 11)],
                         ids=["N300-B20-C5", "N129-B9-C3", "N1", "C1", "C11"])  # fmt: skip
@pytest.mark.parametrize("exclude_self", [True, False], ids=["excl", "incl"])
def test_gpu_matches_naive(backend, dtype, shape, exclude_self, monkeypatch):
    if backend not in GPU_BACKENDS:
        pytest.skip(f"backend {backend} is not available")
    m = torch.randn(*shape, device="cuda").to(dtype)
    grad = torch.randn(shape[0], shape[1], device="cuda").to(dtype)
    poison_empty(monkeypatch)
    _check(m, grad, backend, exclude_self, dtype, device=torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_n(backend):
    """N = 4099 (many i blocks and j tiles, a ragged tail) against the cdist formulation in float64."""
    if backend not in GPU_BACKENDS:
        pytest.skip(f"backend {backend} is not available")
    m = torch.randn(4099, 3, 5, device="cuda")
    o = minibatch_discrimination(m, backend=backend)
    assert_rel(o, minibatch_discrimination_cdist(m.double()), torch.float32, "o", device=torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize(("shape", "steps"), [((1000, 20, 5), 1), ((1100, 9, 3), 3), ((300, 13, 8), 2)],
                         ids=["N1000-s1", "N1100-B9-C3-s3", "N300-C8-s2"])  # fmt: skip
@pytest.mark.parametrize("exclude_self", [True, False], ids=["excl", "incl"])
def test_gpu_cuda_pair_walk_matches_naive(dtype, shape, steps, exclude_self, monkeypatch):
    """The CUDA pair walk (each unordered pair of 128-row tiles once, both sides added atomically), forced at small
    N where the time model would take the rows walk: odd and even tile counts, several pairs a block, a ragged
    last tile; tied rows across two tiles."""
    if "cuda" not in GPU_BACKENDS:
        pytest.skip("backend cuda is not available")
    from gm.ops import minibatch as mb  # noqa: PLC0415

    monkeypatch.setattr(mb, "FORCE_PAIR_STEPS", steps)
    m = torch.randn(*shape, device="cuda").to(dtype)
    m[shape[0] - 2] = m[5]
    grad = torch.randn(shape[0], shape[1], device="cuda").to(dtype)
    poison_empty(monkeypatch)
    _check(m, grad, "cuda", exclude_self, dtype, device=torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_cuda_walks_agree_and_deterministic_mode_repeats(monkeypatch):
    """At N = 4099 (the time model's pick: the pair walk) the result agrees with the rows walk to float32 rounding;
    under torch.use_deterministic_algorithms the rows walk runs, and two calls are bit for bit equal."""
    if "cuda" not in GPU_BACKENDS:
        pytest.skip("backend cuda is not available")
    from gm.ops import minibatch as mb  # noqa: PLC0415

    n, b, c = 4099, 100, 5
    assert mb.cuda_plan(n, b, c, torch.device("cuda"), backward=False)[1] > 0
    m = torch.randn(n, b, c, device="cuda")
    grad = torch.randn(n, b, device="cuda")
    o_pairs, dm_pairs = _run(m, grad, "cuda", True)
    monkeypatch.setattr(mb, "FORCE_PAIR_STEPS", 0)
    o_rows, dm_rows = _run(m, grad, "cuda", True)
    assert_rel(o_pairs, o_rows.double(), torch.float32, "o", device=torch.device("cuda"))
    assert_rel(dm_pairs, dm_rows.double(), torch.float32, "dm", device=torch.device("cuda"))
    monkeypatch.setattr(mb, "FORCE_PAIR_STEPS", None)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert mb.cuda_plan(n, b, c, torch.device("cuda"), backward=True)[1] == 0
        first, second = _run(m, grad, "cuda", True), _run(m, grad, "cuda", True)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(first[0], o_rows) and torch.equal(first[1], dm_rows)
