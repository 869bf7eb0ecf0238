"""Training throughput of the likelihood models (PixelCNN, PixelRNN, the IAF VAE): gm's kernels against the same
model on reference ops.

Each case is one training forward (the loss of a batch; the harness runs the backward), so fwd+bwd ms is the cost of
one training step without the optimiser: training images/s = N / (fwd+bwd ms) * 1000. Rows:
  gm[<backend>]         the model built with backend=<backend> (cpu on the CPU; cuda and triton on a GPU), eager
  gm+compile            the model on gm's auto backend under torch.compile
  reference             the model built with backend="reference" (plain PyTorch ops), eager: the baseline
  reference+compile     the same under torch.compile
All models of a case share the same weights. Presets are the paper's ("mnist"; "cifar10" on a GPU); quick=True is a
tiny CPU case.
"""

from __future__ import annotations

import torch

import gm.models as M
from bench.harness import Case, compiled, pick

GPU_CASES = [  # (model, preset, N, dtype)
    ("pixelcnn", "mnist", 64, torch.float32), ("rowlstm", "mnist", 64, torch.float32),
    ("diagonal_bilstm", "mnist", 64, torch.float32),
    ("pixelcnn", "cifar10", 16, torch.float32), ("pixelcnn", "cifar10", 16, torch.bfloat16),
    ("rowlstm", "cifar10", 16, torch.float32), ("diagonal_bilstm", "cifar10", 16, torch.float32),
    ("diagonal_bilstm", "cifar10", 16, torch.bfloat16),
    ("iaf_vae", "mnist", 128, torch.float32), ("iaf_vae", "mnist", 128, torch.bfloat16),
]  # fmt: skip
CPU_CASES = [("pixelcnn", "mnist", 16, torch.float32), ("rowlstm", "mnist", 16, torch.float32),
             ("diagonal_bilstm", "mnist", 16, torch.float32), ("iaf_vae", "mnist", 16, torch.float32)]  # fmt: skip
QUICK_CASES = [("pixelcnn", "tiny", 4, torch.float32), ("diagonal_bilstm", "tiny", 4, torch.float32)]
SIZES = {"mnist": 28, "cifar10": 32, "tiny": 8}
# Compiling a recurrent reference unrolls every scan step of every layer: minutes at the cifar10 preset.
COMPILE_REFERENCE = {"pixelcnn", "rowlstm:mnist", "diagonal_bilstm:mnist", "diagonal_bilstm:tiny", "iaf_vae"}


def _case(name: str, preset: str, n: int, dtype: torch.dtype, device: torch.device) -> Case:
    torch.manual_seed(0)
    template = M.get(name, preset, backend="reference")
    state = template.state_dict()
    size = SIZES[preset]
    models: dict[str, M.PixelModel] = {}

    def model_for(backend):
        if backend not in models:
            m = M.get(name, preset, backend=backend)
            m.load_state_dict(state)
            m.compute_dtype = None if dtype == torch.float32 else dtype
            models[backend] = m.to(device)
        return models[backend]

    def make_inputs():
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, template.levels, (n, template.channels, size, size), generator=g)
        return {"x": x.float().to(device)}

    def gm_loss(x, backend):
        return model_for(backend).loss(x)

    def loss_fn(backend):
        model = model_for(backend)
        return lambda x: model.loss(x)

    impls = {"reference": loss_fn("reference")}
    if name in COMPILE_REFERENCE or f"{name}:{preset}" in COMPILE_REFERENCE:
        impls["reference+compile"] = compiled(loss_fn("reference"))
    impls["gm+compile"] = compiled(loss_fn(None))
    return Case(
        op=f"model:{name}",
        name=f"preset={preset} N={n} {size}x{size}",
        dtype=dtype,
        make_inputs=make_inputs,
        gm=gm_loss,
        impls=impls,
        baseline="reference",
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    chosen = pick(device, quick, quick_choice=QUICK_CASES, gpu_choice=GPU_CASES, cpu_choice=CPU_CASES)
    return [_case(nm, p, n, dt, device) for nm, p, n, dt in chosen]
