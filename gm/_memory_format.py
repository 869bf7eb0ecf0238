"""The memory format an op's 4-D output takes: channels-last when its input is, so a model that runs channels-last
(NHWC in memory) end to end pays no layout conversion between layers (gm's convolution kernels read and write
[pixel][channel] tiles; an NCHW tensor costs them a transpose each way)."""

from __future__ import annotations

import torch


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether t (N, C, H, W) is laid out channels-last: channels-last contiguous with a unit channel stride, and not
    also plainly contiguous unless it has one channel. The unit-stride test settles the tensors that are both (one
    channel, or a 1x1 image) the way torch's own suggest_memory_format does: `x.contiguous(memory_format=
    torch.channels_last)` of an (N, 1, H, W) image reads as channels-last, a plain (N, 1, H, W) tensor does not."""
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return False
    if t.shape[1] == 1:
        return t.stride(1) == 1 and t.shape[2] * t.shape[3] > 1
    return not t.is_contiguous()


def format_of(t: torch.Tensor) -> torch.memory_format:
    """torch.channels_last where is_channels_last(t), else torch.contiguous_format."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def nhwc(t: torch.Tensor, backend: str) -> torch.Tensor:
    """t (N, C, H, W) as a contiguous (N, H, W, C) tensor (t's storage when it is channels-last already), by the
    backend's tiled transpose (cuda: gm.ops._lstm_cuda.to_nhwc; triton: gm.kernels._layout.channels_last; cpu:
    torch's copy). The PixelRNN layers' channels-last one-node paths convert their input and incoming gradient with
    it."""
    if backend == "cpu":
        return t.permute(0, 2, 3, 1).contiguous()
    if backend == "cuda":
        from gm.ops._lstm_cuda import to_nhwc  # noqa: PLC0415

        return to_nhwc(t)
    from gm.kernels._layout import channels_last  # noqa: PLC0415

    return channels_last(t).permute(0, 2, 3, 1)
