"""Static instruction budgets of the CUDA kernels' hot loops, checked without a GPU (tools/sass_loops.py: nvcc to a
sm_90 cubin, disassembled by the cuobjdump that Triton ships). The scan steps and GEMM stages are issue-bound, so an
edit that adds instructions to them slows them down; these budgets (the counts of session 6 plus ~10%) catch that
in CI. A deliberate change that needs more instructions raises its budget here, with the reason in bench/NOTES.md."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("triton")
if shutil.which("nvcc") is None:
    pytest.skip("needs nvcc", allow_module_level=True)

from tools.sass_loops import cuobjdump, kernels, loops, sass  # noqa: E402

if not Path(cuobjdump()).exists():
    pytest.skip("Triton ships no cuobjdump here", allow_module_level=True)


@functools.cache
def _kernels(source: str) -> dict:
    return kernels(sass(ROOT / source, 90))  # one nvcc compile per source file


def _loops(source: str, kernel: str) -> list[tuple[int, int, dict]]:
    found = [(name, ins) for name, ins in _kernels(source).items() if kernel in name]
    assert len(found) == 1, f"{kernel}: {len(found)} kernels match in {source}"
    return loops(found[0][1])


# (source, mangled-name fragment, which loop, budget): "mma32" the loop with 32 HMMA (a GEMM stage), "longest" the
# outermost loop (a scan step, items included), "mufu" the shortest loop with MUFU (the minibatch pair loop), "shfl"
# the shortest with MUFU and SHFL (the minibatch pair walk's group of j).
BUDGETS = [
    ("csrc/masked_conv/masked_conv_cuda.cu", "masked_conv_gemm_kernelI13__nv_bfloat16LNS_9PrecisionE0ELb0ELb0E",
     "mma32", 175),
    # the colour layers' variant (centre ranges, session 16): 159 at first, the centre chunks' offset costing ~12
    ("csrc/masked_conv/masked_conv_cuda.cu", "masked_conv_gemm_kernelI13__nv_bfloat16LNS_9PrecisionE0ELb0ELb1E",
     "mma32", 175),
    ("csrc/masked_conv/masked_conv_cuda.cu", "masked_conv_wgrad_kernelI13__nv_bfloat16LNS_9PrecisionE0ELb0E", "mma32",
     295),
    # the fused (ReLU, conv) variants (gm.nn.relu_conv): 16 HMNMX2 a k-step on the A fragments, 193 at first; the
    # weight gradient's also carries the bias gradient's column sums (a branch taken by one block in T x C_in/128): 312
    ("csrc/masked_conv/masked_conv_cuda.cu", "masked_conv_gemm_kernelI13__nv_bfloat16LNS_9PrecisionE0ELb1ELb0E",
     "mma32", 215),
    ("csrc/masked_conv/masked_conv_cuda.cu", "masked_conv_gemm_kernelI13__nv_bfloat16LNS_9PrecisionE0ELb1ELb1E",
     "mma32", 225),
    ("csrc/masked_conv/masked_conv_cuda.cu", "masked_conv_wgrad_kernelI13__nv_bfloat16LNS_9PrecisionE0ELb1E", "mma32",
     340),
    ("csrc/diagonal_lstm/diagonal_lstm_cuda.cu", "diagonal_lstm_fwd_tcI13__nv_bfloat16", "longest", 2600),
    ("csrc/diagonal_lstm/diagonal_lstm_cuda.cu", "diagonal_lstm_bwd_tcI13__nv_bfloat16", "longest", 2460),
    (
        "csrc/diagonal_lstm/diagonal_lstm_cuda.cu",
        "lstm_wgrad_tcI13__nv_bfloat16S2_LNS_9PrecisionE0ELb0ELb0E",
        "longest",
        800,
    ),
    (  # its channels-last variant (DiagonalBiLSTM's one-node path): 650 in session 8
        "csrc/diagonal_lstm/diagonal_lstm_cuda.cu",
        "lstm_wgrad_tcI13__nv_bfloat16S2_LNS_9PrecisionE0ELb0ELb1E",
        "longest",
        715,
    ),
    # The row scans, NCHW (the op) then channels-last (RowLSTM's one-node path): 1771 / 1732 forward, 2102 / 2143
    # backward with nvcc 13.0 (NCHW 1791 / 2107 before; the channels-last backward addresses dy, cs and dgates with
    # three pixel strides where NCHW shares one offset: +41).
    ("csrc/row_lstm/row_lstm_cuda.cu", "row_lstm_fwd_tcI13__nv_bfloat16LNS_9PrecisionE0ELb0E", "longest", 2070),
    ("csrc/row_lstm/row_lstm_cuda.cu", "row_lstm_fwd_tcI13__nv_bfloat16LNS_9PrecisionE0ELb1E", "longest", 1900),
    ("csrc/row_lstm/row_lstm_cuda.cu", "row_lstm_bwd_tcI13__nv_bfloat16LNS_9PrecisionE0ELb0E", "longest", 2350),
    ("csrc/row_lstm/row_lstm_cuda.cu", "row_lstm_bwd_tcI13__nv_bfloat16LNS_9PrecisionE0ELb1E", "longest", 2350),
    (  # the row scan's channels-last weight gradient with h0 (RowLSTM's one-node path, learn_init): 923 with nvcc 13.0
        "csrc/row_lstm/row_lstm_cuda.cu",
        "lstm_wgrad_tcI13__nv_bfloat16fLNS_9PrecisionE0ELb1ELb1E",
        "longest",
        1015,
    ),
    (  # and without (h_{-1} = 0): 637, against the NCHW variant's 724
        "csrc/row_lstm/row_lstm_cuda.cu",
        "lstm_wgrad_tcI13__nv_bfloat16fLNS_9PrecisionE0ELb0ELb1E",
        "longest",
        700,
    ),
    ("csrc/minibatch/minibatch_cuda.cu", "minibatch_fwd_kernelIfLi5E", "mufu", 112),
    ("csrc/minibatch/minibatch_cuda.cu", "minibatch_bwd_kernelIfLi5E", "mufu", 152),
    # The pair walk (session 15): 8 j a forward loop (458 instructions: 57 a j against the rows walk's 49), 4 j a
    # backward loop (753: 188 a j against 138), each with its transposing warp sum.
    ("csrc/minibatch/minibatch_cuda.cu", "minibatch_pair_fwd_kernelIfLi5E", "shfl", 505),
    ("csrc/minibatch/minibatch_cuda.cu", "minibatch_pair_bwd_kernelIfLi5E", "shfl", 830),
]


@pytest.mark.parametrize(("source", "kernel", "which", "budget"), BUDGETS, ids=[b[1][:40] for b in BUDGETS])
def test_hot_loop_instruction_budget(source, kernel, which, budget):
    found = _loops(source, kernel)
    if which == "mma32":
        sizes = [length for _, length, mix in found if mix["HMMA"] == 32]
    elif which == "mufu":
        sizes = sorted(length for _, length, mix in found if mix["MUFU"])[:1]
    elif which == "shfl":
        sizes = sorted(length for _, length, mix in found if mix["MUFU"] and mix["SHFL"])[:1]
    else:
        sizes = [max(length for _, length, _ in found)]
    assert sizes, f"{kernel}: no {which} loop found"
    assert max(sizes) <= budget, f"{kernel}: {which} loop of {max(sizes)} instructions, budget {budget}"
