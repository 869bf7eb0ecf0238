"""Pieces shared by the row and diagonal LSTM case modules: the layer cases' inputs and gm callable (a module per
backend run on the case's parameter leaves), and a case for the scan op alone (gates precomputed, one direction):
what the C++/Triton/CUDA scan kernels do, apart from the layer's convolutions."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.harness import Case, compiled


def layer_functions(make_layer: Callable, x_shape: tuple, dtype: torch.dtype, device: torch.device):
    """(make_inputs, gm) for a layer case: make_inputs() gives x and the layer's parameters as leaves (named with
    "_" for "."); gm(x, backend, **params) runs one module per backend (make_layer(backend)) on those parameters."""
    names = [name for name, _ in make_layer(None).named_parameters()]
    layers = {}

    def make_inputs():
        template = make_layer(None).to(device, dtype)
        inputs = {"x": torch.randn(*x_shape, device=device, dtype=dtype, requires_grad=True)}
        for name, p in template.named_parameters():
            inputs[name.replace(".", "_")] = p.detach().clone().requires_grad_()
        return inputs

    def gm_layer(x, backend, **kw):
        if backend not in layers:
            layers[backend] = make_layer(backend).to(device, dtype)
        return torch.func.functional_call(layers[backend], {n: kw[n.replace(".", "_")] for n in names}, (x,))

    return make_inputs, gm_layer


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
