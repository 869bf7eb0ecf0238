"""Developer tools that are not part of the gm package (tools/cuda_emu: the host emulator for the CUDA kernels)."""
