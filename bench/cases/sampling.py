"""Sampling the likelihood models pixel by pixel: the cached-state method against the full forward per step.

Each case draws N images of the preset's size from a freshly initialised model (the time does not depend on the
weights) with the same generator seed. Rows (forward only: sampling has no backward):
  incremental   model.sample(method="incremental"): one pixel at every layer per step (gm.models.incremental)
  full          model.sample(method="full"): the model on gm's auto backends over rows 0..r for every step, H*W*C
                forward passes: the baseline
"""

from __future__ import annotations

import torch

import gm.models as M
from bench.harness import Case, pick

# (model, preset, N, image side): the mnist presets at their size; the colour presets (three passes a pixel, each
# computing its colour's channels) at 8x8 on the CPU, where the full method's H*W*C whole-model passes at 32x32
# would take many minutes.
GPU_CASES = [("pixelcnn", "mnist", 64, 28), ("rowlstm", "mnist", 64, 28), ("diagonal_bilstm", "mnist", 64, 28),
             ("pixelcnn", "cifar10", 16, 32)]  # fmt: skip
CPU_CASES = [("pixelcnn", "mnist", 16, 28), ("rowlstm", "mnist", 16, 28), ("diagonal_bilstm", "mnist", 16, 28),
             ("pixelcnn", "cifar10", 4, 8), ("rowlstm", "cifar10", 4, 8),
             ("diagonal_bilstm", "cifar10", 4, 8)]  # fmt: skip
QUICK_CASES = [("pixelcnn", "tiny", 2, 6), ("diagonal_bilstm", "tiny-rgb", 2, 4)]


def _case(name: str, preset: str, n: int, size: int, device: torch.device) -> Case:
    torch.manual_seed(0)
    model = M.get(name, preset).to(device).eval()

    def sampler(method):
        def run():
            return model.sample(n, (size, size), generator=torch.Generator().manual_seed(0), method=method)

        return run

    return Case(
        op=f"sample:{name}",
        name=f"preset={preset} N={n} {size}x{size}",
        dtype=torch.float32,
        make_inputs=dict,
        impls={"incremental": sampler("incremental"), "full": sampler("full")},
        baseline="full",
        backward=False,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    chosen = pick(device, quick, quick_choice=QUICK_CASES, gpu_choice=GPU_CASES, cpu_choice=CPU_CASES)
    return [_case(name, preset, n, size, device) for name, preset, n, size in chosen]
