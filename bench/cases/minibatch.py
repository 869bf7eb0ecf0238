"""minibatch_discrimination against the naive N x N x B x C broadcast and torch.cdist(p=1) (shared/ANCHORS.md).

Each implementation maps f (N, 256) through T (256, B*C) to m (N, B, C) and returns o (N, B); flops are the
3 N^2 B C useful forward operations (a subtraction, an absolute value and an addition per pair, kernel and dim).
Baselines whose pairwise tensors would take more than 40% of the device's memory are not run: they report
"OOM (would need X GiB)".
"""

from __future__ import annotations

import os

import torch

from bench.harness import Case, compiled, gm_backends_for, pick
from gm.reference.minibatch import minibatch_discrimination as naive_ref
from gm.reference.minibatch import minibatch_discrimination_cdist as cdist_ref

FEATURES, KERNELS, DIM = 256, 100, 5
BASELINE = "naive (N×N×B×C)"
# gm's CUDA kernels walking every ordered pair (what torch.use_deterministic_algorithms selects), beside auto's pick
# (the pair walk from N ~ 1024): the A/B of the pair walk in one run, and the data to recalibrate
# gm.ops.minibatch's time model (_PAIR_COST, _BLOCK_FIXED).
ROWS_WALK = "cuda rows walk (deterministic)"


class _RowsWalk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m):
        from gm.ops import minibatch as mb  # noqa: PLC0415

        ctx.save_for_backward(m)
        n, b, _ = m.shape
        return mb._cuda_forward(m.contiguous(), True, plan=(mb.cuda_splits(n, b, m.device), 0))

    @staticmethod
    def backward(ctx, grad):
        from gm.ops import minibatch as mb  # noqa: PLC0415

        (m,) = ctx.saved_tensors
        n, b, _ = m.shape
        return mb._cuda_backward(grad.contiguous(), m.contiguous(), True, plan=(mb.cuda_splits(n, b, m.device), 0))


def _device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _guarded(fn, need_bytes: float, device: torch.device):
    """fn, or a stand-in raising MemoryError when it would need more than 40% of the device's memory."""
    if need_bytes <= 0.4 * _device_bytes(device):
        return fn

    def too_big(**_):
        raise MemoryError(f"OOM (would need {need_bytes / 2**30:.0f} GiB)")

    return too_big


def _case(n: int, device: torch.device, dtype: torch.dtype, baselines: bool, gm_backends=None) -> Case:
    def make_inputs():
        f = torch.randn(n, FEATURES, device=device, dtype=dtype, requires_grad=True)
        t = (0.05 * torch.randn(FEATURES, KERNELS * DIM, device=device, dtype=dtype)).requires_grad_()
        return {"f": f, "T": t}

    def m_of(f, T):
        return (f @ T).view(f.shape[0], KERNELS, DIM)

    def gm_op(f, T, backend):
        from gm.ops import minibatch_discrimination  # noqa: PLC0415

        return minibatch_discrimination(m_of(f, T), backend=backend)

    def naive(f, T):
        return naive_ref(m_of(f, T))

    def cdist(f, T):
        return cdist_ref(m_of(f, T))

    def rows_walk(f, T):
        return _RowsWalk.apply(m_of(f, T))

    impls = {}
    if baselines:
        elem = torch.finfo(dtype).bits // 8
        pairwise = float(n) * n * KERNELS * DIM * elem  # one N x N x B x C tensor
        impls[BASELINE] = _guarded(naive, 3 * pairwise, device)  # diff, |diff| and its gradient live at once
        impls["torch.cdist(p=1)"] = _guarded(cdist, 4 * pairwise / DIM, device)  # B x N x N distances and grads
        if device.type == "cuda":
            impls["reference+compile"] = _guarded(compiled(naive), 3 * pairwise, device)
    if device.type == "cuda" and n <= 16384 and "cuda" in gm_backends_for(device):
        impls[ROWS_WALK] = rows_walk
    return Case(
        op="minibatch_discrimination",
        name=f"N={n} B={KERNELS} C={DIM}",
        dtype=dtype,
        make_inputs=make_inputs,
        gm=gm_op,
        impls=impls,
        baseline=BASELINE,
        flops=3.0 * n * n * KERNELS * DIM,
        gm_backends=gm_backends,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    plan = pick(
        device, quick,
        quick_choice=[(256, True)],
        gpu_choice=[(256, True), (1024, True), (2048, True), (4096, False), (16384, False), (65536, False)],
        cpu_choice=[(256, True), (512, True), (1024, True), (8192, False)],
    )  # fmt: skip  (N, with the naive baselines)
    out = []
    for n, b in plan:
        backends = None
        if n > 16384:  # the largest case only on the fastest backend (Triton's fwd+bwd would take ~8 s a call)
            backends = tuple(x for x in gm_backends_for(device) if x == "cuda") or None
        out.append(_case(n, device, torch.float32, baselines=b, gm_backends=backends))
    return out
