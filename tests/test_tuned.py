"""kernels._common.tuned with autotuning off: the first config that the prune keeps for the call is launched."""

from __future__ import annotations

import types

import pytest

triton = pytest.importorskip("triton")

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
