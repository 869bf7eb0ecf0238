"""Static instruction budgets of Triton kernels' hot loops (masked_conv's GEMMs, the LSTM scans' weight gradient), checked without a GPU: the kernel is compiled for sm_90 by
the installed Triton (bench.aot's driver stand-in, in a subprocess without the interpreter) and its main loop counted
in SASS (bench.aot.hot_loop). A GEMM k-step of a 128x128x64 16-bit tile on 8 warps has ~512 tensor-core cycles of
work per block; each instruction a warp issues per k-step costs 2 of the SM's 4 issue slots' cycles at two blocks per
SM, so loops much past ~250 instructions are issue-bound (bench/NOTES.md, session 8: the masked_conv weight gradient
ran 360 with runtime divisions in its pixel math, now ~160). Budgets are the counts with the pinned Triton plus ~10%."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("triton")

_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton.language as tl
from triton.runtime import driver
from bench.aot import _FakeDriver, hot_loop
driver.set_active(_FakeDriver(90))
from gm.kernels import masked_conv as k

N, C, HW, T = 128, 256, 32, 24  # 7x7 mask A, C=256, 32x32, bf16: the PixelCNN bench case
x = torch.empty(N, HW, HW, C, dtype=torch.bfloat16).permute(0, 3, 1, 2)
packed = torch.empty(T, C, C, dtype=torch.bfloat16)
part = torch.empty(4, T, C, C)
cfg = dict(num_warps=8, num_stages=3, grid=(1,), warmup=True)
common = dict(KH=7, KW=7, WIDE=False, ACC=tl.float32, PRECISION="ieee")
fwd = k.masked_conv_fwd_kernel.run(
    x, packed, packed, x, x, x, packed, N, HW, HW, C, C, T, *x.stride(), FLIP=False, HAS_BIAS=True,
    BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, **common, **cfg)
wgrad = k.masked_conv_wgrad_kernel.run(
    x, x, part, part, part, N, HW, HW, C, C, T, BLOCK_C=128, BLOCK_O=128, BLOCK_P=64, **common, **cfg)
# The colour layers' variant (centre ranges, gm.ops.masked_conv.centre_ranges) at the same shape.
ranges = torch.empty(C, 2, dtype=torch.int32)
fwd_centre = k.masked_conv_fwd_kernel.run(
    x, packed, packed, x, x, x, ranges, N, HW, HW, C, C, T, *x.stride(), FLIP=False, HAS_BIAS=True,
    BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, CENTRE=True, **common, **cfg)
from gm.kernels import row_lstm as r

# The PixelRNN scans' weight gradient (N=32, h=64, 32x32, bf16): the Row LSTM's 3 taps from float32 states, the
# Diagonal LSTM's 2 from bf16 outputs.
dg = torch.empty(32, 256, 32, 32, dtype=torch.bfloat16)
wg = dict(ACC=tl.float32, DOT=tl.bfloat16, PRECISION="ieee", BLOCK_O=128, BLOCK_J=128, BLOCK_P=32, **cfg)
row = r.row_lstm_wgrad_kernel.run(dg, torch.empty(32, 64, 32, 32), dg, part, 32, 64, 32, 32, K=3, HAS_H0=False,
                                  WIDE=False, TAPS=0, **wg)
diag = r.row_lstm_wgrad_kernel.run(dg, dg, dg, part, 32, 64, 32, 32, K=2, HAS_H0=False, WIDE=False, TAPS=1, **wg)
# The Row LSTM's channels-last variant (gm.nn.RowLSTM's one-node path on triton): dgates (N, H, W, 4h), hs (N, H, W, h).
dg_cl = torch.empty(32, 32, 32, 256, dtype=torch.bfloat16)
row_cl = r.row_lstm_wgrad_kernel.run(dg_cl, torch.empty(32, 32, 32, 64), dg_cl, part, 32, 64, 32, 32, K=3,
                                     HAS_H0=False, WIDE=False, TAPS=0, CL=True, GS=256, **wg)
# The Diagonal LSTM's (gm.nn.DiagonalBiLSTM's one-node path on triton): a direction's half of the (N, H, W, 8h) gate
# gradients, y (N, H, W, h).
dg8 = torch.empty(32, 32, 32, 512, dtype=torch.bfloat16)
diag_cl = r.row_lstm_wgrad_kernel.run(dg8[..., :256], torch.empty(32, 32, 32, 64, dtype=torch.bfloat16), dg8, part,
                                      32, 64, 32, 32, K=2, HAS_H0=False, WIDE=False, TAPS=1, CL=True, GS=512, **wg)
kernels = (("fwd", fwd), ("fwd_centre", fwd_centre), ("wgrad", wgrad), ("row_wgrad", row), ("diagonal_wgrad", diag), ("row_wgrad_nhwc", row_cl),
           ("diagonal_wgrad_nhwc", diag_cl))
print(json.dumps({name: hot_loop(kern.asm["cubin"]) for name, kern in kernels}))
"""

# (kernel, budget): instructions per warp and k-step of the loop with the tensor-core instructions. The scans' weight
# gradient: 563 (row) and 476 (diagonal) a k-step before session 8's tap-major tiles, 271 and 199 after; the row's
# channels-last variant 173 (both tiles contiguous along their channels, no per-channel plane offsets), the
# Diagonal LSTM's 106 (two taps). The forward's centre-range variant (session 16): 177 against the plain 176.
BUDGETS = {"fwd": 195, "fwd_centre": 195, "wgrad": 180, "row_wgrad": 300, "diagonal_wgrad": 220, "row_wgrad_nhwc": 190,
           "diagonal_wgrad_nhwc": 120}  # fmt: skip


def _compile_and_count(script: str) -> dict:
    """Runs `script` (compiles kernels for sm_90, prints a JSON line of counts) outside the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    if res.returncode != 0 and "cuobjdump" in res.stderr:
        pytest.skip("Triton ships no cuobjdump here")
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def counts() -> dict:
    return _compile_and_count(_SCRIPT)


@pytest.mark.parametrize("kernel", sorted(BUDGETS))
def test_hot_loop_budget(counts, kernel):
    text = counts[kernel]  # "N (M MMA)"
    assert "MMA" in text, f"{kernel}: no tensor-core loop found ({text})"
    length = int(text.split()[0])
    assert length <= BUDGETS[kernel], f"{kernel}: hot loop of {length} SASS instructions per k-step, " \
        f"budget {BUDGETS[kernel]}"


# The minibatch kernels for C <= 8 (N = 4096, B = 100, C = 5, fp32, their first configs): the shortest loop with
# MUFU is a j tile of a span without masks. Instructions per pair and thread (sm_90, Triton 3.9 / 3.6): forward 12.8 /
# 13.9 at (512, 8, 4), backward 36.9 / 36.8 at (512, 4, 4); the C > 8 kernels they replaced for C <= 8 took 23-29
# and 79-105 (tile sums across threads: SHFL and BAR in every loop), the CUDA kernels 12.25 and 34.5.
_MB_SCRIPT = r"""
import json, os, subprocess, tempfile
os.environ["TRITON_INTERPRET"] = "0"
from pathlib import Path
import torch
import triton.language as tl
from triton.runtime import driver
from bench.aot import _FakeDriver
driver.set_active(_FakeDriver(90))
from gm.kernels import minibatch as k
from tools.sass_loops import cuobjdump, kernels, loops

N, B, C = 4096, 100, 5
m, o = torch.empty(N, B, C), torch.empty(N, B)
cfg = dict(num_stages=1, grid=(1,), warmup=True)
common = dict(C=C, EXCLUDE_SELF=True, ACC=tl.float32, WIDE=False)
fwd = k.minibatch_rows_fwd_kernel.run(m, o, N, B, *m.stride(), BLOCK_I=512, BLOCK_J=8, num_warps=4, **common, **cfg)
bwd = k.minibatch_rows_bwd_kernel.run(o, m, m, N, B, *m.stride(), BLOCK_I=512, BLOCK_J=4, num_warps=4, **common,
                                      **cfg)
out = {}
for name, kern, pairs in (("fwd", fwd, 512 * 8 / 128), ("bwd", bwd, 512 * 4 / 128)):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kern.asm["cubin"])
        sass = subprocess.run([cuobjdump(), "-sass", str(path)], capture_output=True, text=True).stdout
    found = [(length, mix) for ins in kernels(sass).values() for _, length, mix in loops(ins) if mix["MUFU"]]
    length, mix = min(found, key=lambda f: f[0])
    out[name] = {"per_pair": length / pairs, "shfl": mix["SHFL"], "bar": mix["BAR"]}
print(json.dumps(out))
"""
MB_BUDGETS = {"fwd": 14.5, "bwd": 40.5}  # instructions per pair and thread: the counts above plus ~5-10%


@pytest.fixture(scope="module")
def mb_counts() -> dict:
    return _compile_and_count(_MB_SCRIPT)


@pytest.mark.parametrize("kernel", sorted(MB_BUDGETS))
def test_minibatch_pair_loop_budget(mb_counts, kernel):
    got = mb_counts[kernel]
    assert got["shfl"] == 0 and got["bar"] == 0, f"minibatch {kernel}: the j sums left the thread ({got})"
    assert got["per_pair"] <= MB_BUDGETS[kernel], f"minibatch {kernel}: {got['per_pair']:.1f} SASS instructions " \
        f"per pair, budget {MB_BUDGETS[kernel]}"
