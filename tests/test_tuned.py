"""kernels._common.tuned with autotuning off: the first config that the prune keeps for the call is launched."""

from __future__ import annotations

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
