"""The Diagonal BiLSTM layer (both directions, residual) against its eager reference and a same-depth cuDNN LSTM.

Shapes of shared/ANCHORS.md: N=32, h=64 and 128, 32x32 (63 skewed columns), in_ch = 2h (PixelRNN's layer input).
The bar is "cuDNN nn.LSTM 63 steps": nn.LSTM(h, h) over a sequence of 63 steps with batch N*32, forward+backward
(its own inputs; the layer's are ignored). On the CPU: the issue's N=8, h=32, 16x16 case.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.cases._scan import layer_functions, scan_case
from bench.harness import Case, compiled, pick
from gm.nn import DiagonalBiLSTM
from gm.reference.diagonal_lstm import diagonal_bilstm

GPU_SHAPES = [(32, 64, 32, torch.float32), (32, 64, 32, torch.bfloat16), (32, 128, 32, torch.float32),
              (32, 128, 32, torch.bfloat16)]  # fmt: skip  (N, h, H=W, dtype)
CPU_SHAPES = [(8, 32, 16, torch.float32)]
QUICK_SHAPES = [(2, 8, 8, torch.float32)]


def _case(n: int, hid: int, size: int, dtype: torch.dtype, device: torch.device, with_cudnn: bool) -> Case:
    in_ch = 2 * hid
    make_inputs, gm_layer = layer_functions(
        lambda backend: DiagonalBiLSTM(in_ch, hid, backend=backend), (n, in_ch, size, size), dtype, device
    )

    def reference(x, **kw):
        w_is, b_is = kw["input_to_state_weight"], kw["input_to_state_bias"]
        h4 = 4 * hid
        return diagonal_bilstm(
            x, w_is[:h4], b_is[:h4], kw["w_ss"], w_is[h4:], b_is[h4:], kw["w_ss_rev"], kw["output_weight"],
            kw["output_bias"],
        )  # fmt: skip

    impls = {"reference": reference}
    if device.type == "cuda":
        impls["reference+compile"] = compiled(reference)
    if with_cudnn:
        lstm = nn.LSTM(hid, hid).to(device, dtype)
        seq = torch.randn(2 * size - 1, n * size, hid, device=device, dtype=dtype, requires_grad=True)
        impls["cuDNN nn.LSTM 63 steps"] = lambda **kw: lstm(seq)[0]

    pixels = n * size * size
    scan = 2 * pixels * (4 * hid) * (2 * hid) * 2  # both directions, 2-tap state-to-state
    convs = pixels * (in_ch * 8 * hid + hid * in_ch) * 2  # unmasked count of the 1x1 convolutions
    return Case(
        op="diagonal_bilstm",
        name=f"N={n} h={hid} {size}x{size}",
        dtype=dtype,
        make_inputs=make_inputs,
        gm=gm_layer,
        impls=impls,
        baseline="reference",
        flops=float(scan + convs),
    )


def _scan_case(n: int, hid: int, size: int, dtype: torch.dtype, device: torch.device) -> Case:
    from gm.ops import diagonal_lstm as gm_op  # noqa: PLC0415
    from gm.reference.diagonal_lstm import diagonal_lstm as ref_op  # noqa: PLC0415

    return scan_case("diagonal_lstm scan", gm_op, ref_op, 2, n, hid, size, dtype, device)

def cases(device: torch.device, quick: bool) -> list[Case]:
    shapes = pick(device, quick, quick_choice=QUICK_SHAPES, gpu_choice=GPU_SHAPES, cpu_choice=CPU_SHAPES)
    layers = [_case(n, hid, size, dtype, device, with_cudnn=device.type == "cuda") for n, hid, size, dtype in shapes]
    return layers + [_scan_case(n, hid, size, dtype, device) for n, hid, size, dtype in shapes]


