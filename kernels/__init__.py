"""Triton kernels, one file per operation (installed as gm.kernels).

On a machine without a CUDA GPU, Triton can only run under its interpreter, which must be chosen before triton
is imported: importing gm.kernels there sets TRITON_INTERPRET=1 unless the variable is already set.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
