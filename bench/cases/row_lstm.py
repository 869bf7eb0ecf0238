"""The Row LSTM layer (masked 1x3 input-to-state, row scan, residual 1x1) against its eager reference.

Shapes of the issue: N=32, h=64 and 128, 32x32, in_ch = 2h (PixelRNN's layer input), fp32 and bf16; on the CPU
the issue's N=8, h=32, 16x16. Target: >= 10x the eager reference forward+backward on a GPU, >= 5x on the CPU.
"""

from __future__ import annotations

import torch

from bench.cases._scan import layer_functions, scan_case
from bench.harness import Case, compiled, pick
from gm.nn import RowLSTM
from gm.reference.masked_conv import masked_conv2d
from gm.reference.row_lstm import row_lstm

GPU_SHAPES = [(32, 64, 32, torch.float32), (32, 64, 32, torch.bfloat16), (32, 128, 32, torch.float32),
              (32, 128, 32, torch.bfloat16)]  # fmt: skip  (N, h, H=W, dtype)
CPU_SHAPES = [(8, 32, 16, torch.float32)]
QUICK_SHAPES = [(2, 8, 8, torch.float32)]
K = 3


def _case(n: int, hid: int, size: int, dtype: torch.dtype, device: torch.device) -> Case:
    in_ch = 2 * hid
    make_inputs, gm_layer = layer_functions(
        lambda backend: RowLSTM(in_ch, hid, kernel_size=K, backend=backend), (n, in_ch, size, size), dtype, device
    )

    def reference(x, **kw):
        gates = masked_conv2d(x, kw["input_to_state_weight"], kw["input_to_state_bias"], mask="B")
        h = row_lstm(gates, kw["w_ss"])
        return x + masked_conv2d(h, kw["out_weight"], kw["out_bias"], mask="B")

    impls = {"reference": reference}
    if device.type == "cuda":
        impls["reference+compile"] = compiled(reference)
    pixels = n * size * size
    scan = pixels * (4 * hid) * (hid * K) * 2
    convs = pixels * (in_ch * 4 * hid * K + hid * in_ch) * 2  # unmasked count
    return Case(
        op="row_lstm",
        name=f"N={n} h={hid} {size}x{size}",
        dtype=dtype,
        make_inputs=make_inputs,
        gm=gm_layer,
        impls=impls,
        baseline="reference",
        flops=float(scan + convs),
    )


def _scan_case(n: int, hid: int, size: int, dtype: torch.dtype, device: torch.device) -> Case:
    from gm.ops import row_lstm as gm_op  # noqa: PLC0415
    from gm.reference.row_lstm import row_lstm as ref_op  # noqa: PLC0415

    return scan_case("row_lstm scan", gm_op, ref_op, K, n, hid, size, dtype, device)

def cases(device: torch.device, quick: bool) -> list[Case]:
    shapes = pick(device, quick, quick_choice=QUICK_SHAPES, gpu_choice=GPU_SHAPES, cpu_choice=CPU_SHAPES)
    layers = [_case(n, hid, size, dtype, device) for n, hid, size, dtype in shapes]
    return layers + [_scan_case(n, hid, size, dtype, device) for n, hid, size, dtype in shapes]
