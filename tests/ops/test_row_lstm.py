"""gm.ops.row_lstm against gm.reference.row_lstm on every backend here: forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from gm.ops.row_lstm import _row_lstm_op, row_lstm
from gm.reference.row_lstm import row_lstm as ref_row_lstm
from gm.reference.row_lstm import row_lstm_backward as ref_row_lstm_backward
from tests._util import HAS_GPU, assert_auto_picks_triton, assert_rel, fast_backends, poison_empty

CPU = torch.device("cpu")
BACKENDS_HERE = ["reference", *fast_backends(CPU)]

# (N, h, H, W, k, with initial state)
CASES = [
    pytest.param((2, 3, 4, 5, 3, False), id="N2-h3-4x5-k3"),
    pytest.param((1, 5, 3, 1, 5, True), id="N1-h5-3x1-k5-init"),
    pytest.param((3, 4, 5, 7, 1, True), id="N3-h4-5x7-k1-init"),
    pytest.param((2, 8, 2, 6, 5, False), id="N2-h8-2x6-k5"),
    pytest.param((1, 3, 7, 3, 3, True), id="N1-h3-7x3-k3-init"),
    # Interpreted, the triton scans use 4-unit x 4-column blocks: three unit blocks (the last partial), two column
    # blocks, the dh0/dc0 pass over several blocks.
    pytest.param((2, 9, 3, 6, 3, True), id="N2-h9-3x6-k3-init"),
]


def _inputs(n, hidden, height, width, k, init, dtype, device=CPU):
    gates = torch.randn(n, 4 * hidden, height, width, dtype=dtype, device=device)
    w_ss = torch.randn(4 * hidden, hidden, k, dtype=dtype, device=device) / (hidden * k) ** 0.5
    h0 = torch.randn(n, hidden, width, dtype=dtype, device=device) if init else None
    c0 = torch.randn(n, hidden, width, dtype=dtype, device=device) if init else None
    return [t.requires_grad_(True) if t is not None else None for t in (gates, w_ss, h0, c0)]


def _run(fn, gates, w_ss, h0, c0, dy, **kw):
    y = fn(gates, w_ss, h0=h0, c0=c0, **kw)
    leaves = [t for t in (gates, w_ss, h0, c0) if t is not None]
    return (y, *torch.autograd.grad(y, leaves, dy))


def _compare(backend, dtype, case, device, monkeypatch, poison=True):
    gates, w_ss, h0, c0 = _inputs(*case, dtype, device)
    dy = torch.randn(case[0], case[1], case[2], case[3], dtype=dtype, device=device)
    # Oracle: autograd through the plain loop, in float64 on the same (rounded) inputs.
    ref_leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (gates, w_ss, h0, c0)]
    expected = _run(ref_row_lstm, *ref_leaves, dy.double())
    if poison:
        poison_empty(monkeypatch)
    got = _run(row_lstm, gates, w_ss, h0, c0, dy, backend=backend)
    names = ["y", "dgates", "dw_ss"] + (["dh0", "dc0"] if h0 is not None else [])
    for name, out, exp in zip(names, got, expected, strict=True):
        assert out.dtype == dtype, f"{name}: dtype {out.dtype}"
        assert_rel(out, exp, dtype, f"{backend} {name}", device=device)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_matches_reference(backend, dtype, case, monkeypatch):
    _compare(backend, dtype, case, CPU, monkeypatch)


def test_reference_backward_is_autograd():
    gates, w_ss, h0, c0 = _inputs(2, 3, 4, 5, 3, True, torch.float64)
    dy = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    expected = _run(ref_row_lstm, gates, w_ss, h0, c0, dy)[1:]
    got = ref_row_lstm_backward(dy, gates.detach(), w_ss.detach(), h0.detach(), c0.detach())
    for out, exp in zip(got, expected, strict=True):
        assert_rel(out, exp, torch.float64, device=CPU)


@pytest.mark.skipif("cpu" not in BACKENDS_HERE, reason="gm._C not built")
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "init"])
def test_gradcheck_cpu(init):
    gates, w_ss, h0, c0 = _inputs(2, 3, 3, 4, 3, init, torch.float64)

    def fn(gates, w_ss, h0, c0):
        return row_lstm(gates, w_ss, h0=h0, c0=c0, backend="cpu")

    assert torch.autograd.gradcheck(fn, (gates, w_ss, h0, c0))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_causal_rows(backend):
    """Output row r sees gate rows <= r only, and at row r itself only its own column."""
    n, hidden, height, width = 1, 3, 4, 5
    gates, w_ss, _, _ = _inputs(n, hidden, height, width, 3, False, torch.float64)
    y = row_lstm(gates, w_ss, backend=backend)
    for r in range(height):
        for w in range(width):
            (g,) = torch.autograd.grad(y[0, :, r, w].sum(), gates, retain_graph=True)
            assert (g[:, :, r + 1 :] == 0).all(), f"row {r} col {w} sees later rows"
            same_row = g[:, :, r].clone()
            same_row[:, :, w] = 0
            assert (same_row == 0).all(), f"row {r} col {w} sees other columns of its own row"
            assert g[:, :, r, w].abs().sum() > 0


def test_only_requested_grads():
    gates, w_ss, h0, c0 = _inputs(1, 3, 2, 4, 3, True, torch.float64)
    w_ss.requires_grad_(False)
    y = row_lstm(gates, w_ss, h0=h0, c0=c0, backend=BACKENDS_HERE[-1])
    y.sum().backward()
    assert w_ss.grad is None and gates.grad is not None and h0.grad is not None and c0.grad is not None


@pytest.mark.parametrize("backend", [b for b in BACKENDS_HERE if b in ("reference", "cpu", "triton")])
def test_opcheck(backend):
    """The fake implementation matches each backend's outputs (triton's cs also holds the gate activations)."""
    gates, w_ss, h0, c0 = _inputs(1, 2, 3, 4, 3, True, torch.float32)
    torch.library.opcheck(_row_lstm_op, (gates, w_ss, h0, c0, backend))
    torch.library.opcheck(_row_lstm_op, (gates, w_ss, None, None, backend))


def test_bad_input():
    g = torch.randn(1, 8, 3, 4)
    w = torch.randn(8, 2, 3)
    with pytest.raises(ValueError, match="gates must have 4\\*h channels"):
        row_lstm(torch.randn(1, 6, 3, 4), torch.randn(6, 1, 3))
    with pytest.raises(ValueError, match="w_ss must have shape"):
        row_lstm(g, torch.randn(8, 3, 3))
    with pytest.raises(ValueError, match="odd kernel width"):
        row_lstm(g, torch.randn(8, 2, 2))
    with pytest.raises(ValueError, match="w_ss has dtype"):
        row_lstm(g, w.double())
    with pytest.raises(ValueError, match="w_ss is on meta"):
        row_lstm(g, w.to("meta"))
    with pytest.raises(ValueError, match="h0 must have shape"):
        row_lstm(g, w, h0=torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match="c0 has dtype"):
        row_lstm(g, w, c0=torch.randn(1, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="gates must have 4 dimensions"):
        row_lstm(torch.randn(8, 3, 4), w)
    with pytest.raises(ValueError, match="gates must have dtype"):
        row_lstm(g.int(), w.int())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize(
    "case",
    [(2, 32, 16, 16, 3, False), (3, 8, 5, 7, 5, True), (1, 64, 9, 32, 3, True), (2, 3, 4, 1, 1, False),
     (1, 40, 3, 45, 3, True)],
    ids=["N2-h32-16x16", "N3-h8-5x7-k5-init", "N1-h64-9x32-init", "N2-h3-4x1-k1", "N1-h40-3x45-init"],
)
def test_gpu_matches_reference(backend, dtype, case, monkeypatch):
    assert HAS_GPU
    _compare(backend, dtype, case, torch.device("cuda"), monkeypatch)


def _force_config(monkeypatch, i: int) -> None:
    """Make the triton launchers run config i of each kernel's autotune list (autotuning may pick any of them;
    GM_TRITON_AUTOTUNE=0 runs only the first): the block shapes, and on a GPU num_warps/num_stages too."""
    import gm.kernels.row_lstm as kt  # noqa: PLC0415

    def meta(cfg):
        extra = {} if kt.INTERPRETED else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        return {**cfg.kwargs, **extra}

    fwd = kt._scan_configs(kt._FWD_SHAPES)
    bwd = kt._scan_configs(kt._BWD_SHAPES)
    wgrad = kt._wgrad_configs()
    monkeypatch.setattr(kt, "_fwd", kt.row_lstm_fwd_kernel)
    monkeypatch.setattr(kt, "_FWD_META", meta(fwd[i % len(fwd)]))
    monkeypatch.setattr(kt, "_bwd", kt.row_lstm_bwd_kernel)
    monkeypatch.setattr(kt, "_BWD_META", meta(bwd[i % len(bwd)]))
    monkeypatch.setattr(kt, "_wgrad", kt.row_lstm_wgrad_kernel)
    monkeypatch.setattr(kt, "_WGRAD_META", meta(wgrad[i % len(wgrad)]))


@pytest.mark.skipif("triton" not in BACKENDS_HERE, reason="triton backend not available here")
@pytest.mark.parametrize("i", range(7), ids=lambda i: f"config{i}")
def test_triton_every_config(i, monkeypatch):
    """The GPU configs' block shapes (one block larger than the whole problem: masked edges everywhere)."""
    _force_config(monkeypatch, i)
    _compare("triton", torch.float32, (1, 5, 3, 7, 3, True), CPU, monkeypatch)


@pytest.mark.skipif("triton" not in BACKENDS_HERE, reason="triton backend not available here")
def test_triton_int64_offsets(monkeypatch):
    """The 64-bit in-image offsets that images past 2**31 / 5h elements take (forced here at a small size): the same
    results as the reference, h0/c0 included."""
    import triton.language as tl  # noqa: PLC0415
    from gm.kernels import row_lstm as k  # noqa: PLC0415

    monkeypatch.setattr(k, "_index_dtype", lambda *args: tl.int64)
    _compare("triton", torch.float32, (1, 5, 3, 7, 3, True), CPU, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("i", range(7), ids=lambda i: f"config{i}")
def test_gpu_triton_every_config(i, dtype, monkeypatch):
    """Every autotune config of the scans and the weight-gradient GEMM on the GPU, at the benchmark's width and
    both hidden sizes' block counts (h=80: one full and one partial 64-unit block, two 128-channel chunks)."""
    assert HAS_GPU
    _force_config(monkeypatch, i)
    _compare("triton", dtype, (2, 80, 5, 32, 3, True), torch.device("cuda"), monkeypatch)


@pytest.mark.gpu
def test_gpu_auto_picks_triton(monkeypatch):
    gates = torch.randn(2, 16, 5, 6, device="cuda")
    w_ss = 0.1 * torch.randn(16, 4, 3, device="cuda")

    def call(mod):
        assert mod.row_lstm(gates, w_ss).shape == (2, 4, 5, 6)

    assert_auto_picks_triton("gm.ops.row_lstm", call, monkeypatch)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_channels_last_scans_refuse_other_layouts(backend):
    """gm.ops.row_lstm's channels-last helpers (gm.nn.RowLSTM's one-node path on cuda and triton) take gates and gate
    gradients (N, H, W, 4h) with contiguous channels and evenly spaced pixels (gm.ops._lstm_cuda.pixel_stride: the
    kernels' gate stride), and refuse any other layout by the argument's name before they reach a kernel."""
    from gm.ops.row_lstm import BACKWARD_CHANNELS_LAST, FORWARD_CHANNELS_LAST  # noqa: PLC0415

    if backend == "triton" and "triton" not in BACKENDS_HERE:
        pytest.skip("triton backend not available here")
    forward, backward = FORWARD_CHANNELS_LAST[backend], BACKWARD_CHANNELS_LAST[backend]
    w = torch.randn(8, 2, 3)
    with pytest.raises(ValueError, match="gates must be channels-last"):
        forward(torch.randn(1, 8, 3, 4).permute(0, 2, 3, 1), w)  # NCHW storage
    with pytest.raises(ValueError, match="gates must be channels-last"):
        forward(torch.randn(1, 3, 5, 8)[:, :, :4], w)  # rows of 4 pixels 5 apart
    dy, state = torch.randn(1, 3, 4, 2), torch.empty(0)
    with pytest.raises(ValueError, match="dgates must be channels-last"):
        backward(dy, torch.empty(1, 8, 3, 4).permute(0, 2, 3, 1), w, None, None, state, state, True)


@pytest.mark.skipif("triton" not in BACKENDS_HERE, reason="triton backend not available here")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("gate_pad", [0, 5], ids=["dense", "slice"])
def test_triton_channels_last_scans_equal_the_op(case, dtype, gate_pad):
    """gm.ops.row_lstm.triton_forward_channels_last / triton_backward_channels_last (gm.nn.RowLSTM's channels-last
    node on triton) give the triton op's bits: y, the gate gradients (written in place into a channel slice of a
    wider (N, H, W, 4h + gate_pad) tensor, whose other channels stay NaN), dw_ss, dh0 and dc0."""
    from gm.ops.row_lstm import triton_backward_channels_last, triton_forward_channels_last  # noqa: PLC0415

    _check_channels_last_scans(triton_forward_channels_last, triton_backward_channels_last, case, dtype, gate_pad)


@pytest.mark.skipif("triton" not in BACKENDS_HERE, reason="triton backend not available here")
@pytest.mark.parametrize("i", range(7), ids=lambda i: f"config{i}")
def test_triton_channels_last_every_config(i, monkeypatch):
    """The channels-last scans and weight gradient in the GPU configs' block shapes, as test_triton_every_config."""
    from gm.ops.row_lstm import triton_backward_channels_last, triton_forward_channels_last  # noqa: PLC0415

    _force_config(monkeypatch, i)
    _check_channels_last_scans(triton_forward_channels_last, triton_backward_channels_last, (1, 5, 3, 7, 3, True),
                               torch.float32, 3)  # fmt: skip


@pytest.mark.skipif("triton" not in BACKENDS_HERE, reason="triton backend not available here")
def test_triton_channels_last_int64_offsets(monkeypatch):
    """The channels-last scans and weight gradient with 64-bit offsets (WIDE and IDX int64, forced at a small size)."""
    import triton.language as tl  # noqa: PLC0415
    from gm.kernels import row_lstm as k  # noqa: PLC0415

    from gm.ops.row_lstm import triton_backward_channels_last, triton_forward_channels_last  # noqa: PLC0415

    case = (1, 5, 3, 7, 3, True)
    monkeypatch.setattr(k, "_index_dtype", lambda *args: tl.int64)
    monkeypatch.setattr(k, "int32_offsets", lambda *tensors: False)
    _check_channels_last_scans(triton_forward_channels_last, triton_backward_channels_last, case,
                               torch.float32, 3)  # fmt: skip


def _check_channels_last_scans(forward, backward, case, dtype, gate_pad):
    """The channels-last helpers against the row_lstm op on the same backend, bit for bit."""
    n, hid, height, width = case[:4]
    gates, w_ss, h0, c0 = _inputs(*case, dtype)
    dy = torch.randn(n, hid, height, width, dtype=dtype)
    expected = _run(row_lstm, gates, w_ss, h0, c0, dy, backend="triton")
    wide = torch.full((n, height, width, 4 * hid + gate_pad), float("nan"), dtype=dtype)
    gates_cl = wide[..., : 4 * hid]
    gates_cl.copy_(gates.detach().permute(0, 2, 3, 1))
    w, h0, c0 = (t.detach() if t is not None else None for t in (w_ss, h0, c0))
    y, hs, cs = forward(gates_cl, w, h0, c0)
    assert y.shape == (n, height, width, hid) and cs.shape == (n, height, width, 5 * hid) and y.is_contiguous()
    dwide = torch.full_like(wide, float("nan"))
    dgates = dwide[..., : 4 * hid]
    grads = backward(dy.permute(0, 2, 3, 1), dgates, w, h0, c0, hs, cs, True)
    got = [y.permute(0, 3, 1, 2), dgates.permute(0, 3, 1, 2), *(g for g in grads if g is not None)]
    names = ["y", "dgates", "dw_ss"] + (["dh0", "dc0"] if h0 is not None else [])
    for name, a, b in zip(names, got, expected, strict=True):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{name}: max difference {(a.double() - b.double()).abs().max()}"
    assert dwide[..., 4 * hid :].isnan().all(), "a write outside the gate gradients' channel slice"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["row_lstm", "diagonal_lstm"])
def test_gpu_cuda_weight_gradient_repeats_bit_for_bit_in_deterministic_mode(op):
    """The cuda scans' weight gradient sums pixel splits with atomic adds; under torch.use_deterministic_algorithms it
    takes one split, and two backward passes give the same bits (N=32, h=64, 32x32: 32768 pixels, ~9 splits
    otherwise)."""
    if "cuda" not in fast_backends(torch.device("cuda")):
        pytest.skip("backend cuda is not available")
    from gm.ops import diagonal_lstm  # noqa: PLC0415

    fn = row_lstm if op == "row_lstm" else diagonal_lstm
    taps = 3 if op == "row_lstm" else 2
    g = torch.randn(32, 256, 32, 32, device="cuda", requires_grad=True)
    w = (torch.randn(256, 64, taps, device="cuda") / 16).requires_grad_()
    dy = torch.randn(32, 64, 32, 32, device="cuda")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (torch.autograd.grad(fn(g, w, backend="cuda"), w, dy)[0] for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(first, second)
    loose = torch.autograd.grad(fn(g, w, backend="cuda"), w, dy)[0]  # the split sums: equal to rounding
    assert_rel(loose, first.double(), torch.float32, "dw", device=torch.device("cuda"))
