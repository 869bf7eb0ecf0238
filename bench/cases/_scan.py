"""A benchmark case for an LSTM scan op alone (gates precomputed, one direction), shared by the row and diagonal
LSTM case modules: what the C++/Triton/CUDA scan kernels do, apart from the layer's convolutions."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.harness import Case, compiled


def scan_case(op: str, gm_op: Callable, ref_op: Callable, taps: int, n: int, hid: int, size: int,
              dtype: torch.dtype, device: torch.device) -> Case:  # fmt: skip
    def make_inputs():
        gates = torch.randn(n, 4 * hid, size, size, device=device, dtype=dtype, requires_grad=True)
        w_ss = (torch.randn(4 * hid, hid, taps, device=device, dtype=dtype) / (hid * taps) ** 0.5).requires_grad_()
        return {"gates": gates, "w_ss": w_ss}

    impls = {"reference": lambda gates, w_ss: ref_op(gates, w_ss)}
    if device.type == "cuda":
        impls["reference+compile"] = compiled(lambda gates, w_ss: ref_op(gates, w_ss))
    return Case(
        op=op,
        name=f"N={n} h={hid} {size}x{size}",
        dtype=dtype,
        make_inputs=make_inputs,
        gm=lambda gates, w_ss, backend: gm_op(gates, w_ss, backend=backend),
        impls=impls,
        baseline="reference",
        flops=float(n * size * size * (4 * hid) * (hid * taps) * 2),
    )
