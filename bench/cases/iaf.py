"""IAF step on a MADE (2 hidden layers of 1024, ELU, gated update + log-det) and masked_linear on a degree-sorted
MADE mask, against eager PyTorch on masked dense weights (shared/ANCHORS.md: 1.31 / 1.34 ms fwd+bwd at N=4096,
D=64 / 256, fp32, H200; bf16 autocast slower)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Case, compiled, pick
from gm.nn.made import hidden_degrees, made_masks
from gm.reference.iaf import iaf_step as ref_step

GPU_IAF = [(4096, d, 1024, dt) for d in (64, 256) for dt in (torch.float32, torch.bfloat16)]  # (N, D, hidden, dtype)
# The dev CPU (2 cores): the original small case, and the 2x1024 MADE (D=64) at an eighth of its batch.
CPU_IAF = [(512, 64, 256, torch.float32), (512, 64, 1024, torch.float32)]
QUICK_IAF = [(256, 16, 64, torch.float32)]


def _iaf_case(n: int, d: int, hidden: int, dtype: torch.dtype, device: torch.device) -> Case:
    masks = [mk.to(device, dtype) for mk in made_masks(d, hidden, 2, "natural", heads=2)]
    shapes = [mk.shape for mk in masks]

    def make_inputs():
        out = {"z": torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)}
        for i, (o, k) in enumerate(shapes):
            out[f"w{i}"] = (torch.randn(o, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
            out[f"b{i}"] = torch.zeros(o, device=device, dtype=dtype, requires_grad=True)
        return out

    def reference(z, w0, b0, w1, b1, w2, b2):
        h = F.elu(F.linear(z, w0 * masks[0], b0))
        h = F.elu(F.linear(h, w1 * masks[1], b1))
        out = F.linear(h, w2 * masks[2], b2)
        return ref_step(z, out[:, :d], out[:, d:], mode="gated")

    def reference_autocast(z, w0, b0, w1, b1, w2, b2):
        # fp32 master tensors under bf16 autocast, as a PyTorch user would train (the casts are part of the cost).
        args = [t.float() for t in (z, w0, b0, w1, b1, w2, b2)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return reference(*args)

    def gm_step(z, w0, b0, w1, b1, w2, b2, backend):
        # What gm.nn.IAFStep runs: the whole step as one op (one autograd node in eager mode).
        from gm.ops import made_iaf_step  # noqa: PLC0415

        return made_iaf_step(z, [w0, w1, w2], masks, [b0, b1, b2], mode="gated", backend=backend)

    impls = {"reference": reference}
    if dtype == torch.bfloat16:
        impls["reference(autocast)"] = reference_autocast
    if device.type == "cuda":
        impls["reference+compile"] = compiled(reference)
    kept = sum(float(mk.sum()) for mk in masks)
    return Case(
        op="iaf_step",
        name=f"MADE 2x{hidden} N={n} D={d}",
        dtype=dtype,
        make_inputs=make_inputs,
        gm=gm_step,
        impls=impls,
        baseline="reference",
        flops=2.0 * n * kept,
        gm_backends=None,  # all that run here: cuda and triton on a GPU (csrc/masked_linear, csrc/iaf), cpu here
    )


def _masked_linear_case(n: int, width: int, d: int, dtype: torch.dtype, device: torch.device) -> Case:
    deg = hidden_degrees(width, d)
    mask = (deg[:, None] >= deg[None, :]).to(device=device, dtype=dtype)

    def make_inputs():
        x = torch.randn(n, width, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(width, width, device=device, dtype=dtype) / width**0.5).requires_grad_()
        b = torch.zeros(width, device=device, dtype=dtype, requires_grad=True)
        return {"x": x, "weight": w, "bias": b}

    def dense(x, weight, bias):
        return F.linear(x, weight * mask, bias)

    def gm_linear(x, weight, bias, backend):
        from gm.ops import masked_linear  # noqa: PLC0415

        return masked_linear(x, weight, mask, bias, backend=backend)

    impls = {"F.linear(masked w)": dense}
    if device.type == "cuda":
        impls["reference+compile"] = compiled(dense)
    return Case(
        op="masked_linear",
        name=f"MADE mask D={d} N={n} {width}x{width}",
        dtype=dtype,
        make_inputs=make_inputs,
        gm=gm_linear,
        impls=impls,
        baseline="F.linear(masked w)",
        flops=2.0 * n * float(mask.sum()),
        gm_backends=None,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    iaf, linear = pick(
        device, quick,
        quick_choice=(QUICK_IAF, (256, 128, 16, torch.float32)),
        gpu_choice=(GPU_IAF, (4096, 1024, 64, torch.bfloat16)),
        cpu_choice=(CPU_IAF, (1024, 512, 64, torch.float32)),
    )  # fmt: skip  (IAF cases, masked_linear (N, width, D, dtype))
    return [_iaf_case(*s, device) for s in iaf] + [_masked_linear_case(*linear, device)]
