"""masked_conv2d against cuDNN on masked weights (the PixelCNN shapes of shared/ANCHORS.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Case, compiled, pick
from gm.ops.masked_conv import tap_offsets
from gm.reference.masked_conv import conv_mask
from gm.reference.masked_conv import masked_conv2d as reference

GPU_SHAPES = [  # (k, mask, N, C, dtype, channels_last)
    (7, "A", 128, 256, torch.bfloat16, False),
    (7, "A", 128, 256, torch.bfloat16, True),
    (7, "A", 128, 256, torch.float32, False),
    (3, "B", 128, 256, torch.bfloat16, False),
    (3, "B", 128, 256, torch.bfloat16, True),
    (3, "B", 128, 128, torch.bfloat16, False),
    (7, "A", 64, 128, torch.bfloat16, False),
]
CPU_SHAPES = [
    (7, "A", 8, 64, torch.float32, False),
    (7, "A", 8, 64, torch.float32, True),
    (3, "B", 8, 64, torch.float32, False),
]
QUICK_SHAPES = [(7, "A", 4, 32, torch.float32, False)]


def _case(k: int, mask: str, n: int, c: int, dtype: torch.dtype, channels_last: bool, hw: int, device: torch.device):
    """One case; channels_last: x (and so every output and gradient, gm's and cuDNN's alike) NHWC in memory, as a
    channels-last model runs them (no layout conversion on either side)."""

    def make_inputs():
        x = torch.randn(n, c, hw, hw, device=device, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        w = (torch.randn(c, c, k, k, device=device, dtype=dtype) / (c * k * k) ** 0.5).requires_grad_()
        b = torch.randn(c, device=device, dtype=dtype, requires_grad=True)
        return {"x": x, "weight": w, "bias": b}

    m = conv_mask((c, c, k, k), mask, device=device).to(dtype)

    def cudnn_masked(x, weight, bias):
        return F.conv2d(x, weight * m, bias, padding=k // 2)

    def ref(x, weight, bias):
        return reference(x, weight, bias, mask=mask)

    def gm_op(x, weight, bias, backend):
        from gm.ops import masked_conv2d  # noqa: PLC0415

        return masked_conv2d(x, weight, bias, mask=mask, backend=backend)

    taps = len(tap_offsets(k, k, mask == "B"))
    impls = {"F.conv2d(masked w)": cudnn_masked, "reference": ref}
    if device.type == "cuda":
        impls["reference+compile"] = compiled(ref)
    return Case(
        op="masked_conv2d",
        name=f"{k}x{k} {mask} N={n} C={c} {hw}x{hw}" + (" NHWC" if channels_last else ""),
        dtype=dtype,
        make_inputs=make_inputs,
        gm=gm_op,
        impls=impls,
        baseline="F.conv2d(masked w)",
        flops=2.0 * n * hw * hw * c * c * taps,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    shapes, hw = pick(
        device, quick, quick_choice=(QUICK_SHAPES, 16), gpu_choice=(GPU_SHAPES, 32), cpu_choice=(CPU_SHAPES, 32)
    )
    return [_case(*shape, hw, device) for shape in shapes]
