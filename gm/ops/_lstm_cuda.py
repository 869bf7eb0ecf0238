"""Weight packing for the CUDA LSTM scans' tensor-core kernels (csrc/diagonal_lstm/diagonal_lstm_cuda.cu).

A scan step is one small GEMM whose A operand is the state-to-state weight w_ss (4h, h, taps) in one of two forms:
    forward:   (4hp, taps*hp)  row 32 q + 8 gate + u = unit 8 q + u of that gate, column tap*hp + input unit;
               (each 32-row group holds the i, f, o, g rows of 8 units: after the MMAs a thread holds all four gates
               of its cells)
    backward:  (hp, taps*4hp)  row = input unit, column tap*4hp + gate*hp + output unit  (the transpose, per tap)
with h zero-padded to hp, a multiple of 16. The kernels read A straight from global memory in mma.sync fragment order
([m16 tile][k-step][lane][register elements], 16 bytes per lane), so the launcher gathers w_ss into that order through
an index built once per (h, taps, dtype, device): a padded zero stands for every padded position. Both forms come
from one gather, made by the forward and reused by its backward (pack_weights).
"""

from __future__ import annotations

import functools

import torch

from gm._ext import device_guard, ext, gather, packed, stream_of


def padded_hidden(hid: int) -> int:
    return -(-hid // 16) * 16


_DEFAULT_SMEM_OPTIN = 227 * 1024  # sm_80 (163 KB) and sm_90 report theirs; this stands in where torch does not say


def diagonal_smem_bytes(hid: int, height: int, elem: int) -> int:
    """Shared memory of the diagonal scan's larger kernel, the backward (csrc/diagonal_lstm: bwd_smem_bytes): two
    [row][4 hp] gate-gradient buffers of 32-row chunks, a float32 [row][hp + 1] slot array, and 2 KB of exchange
    slots per warp pair (one pair per 16-unit x 32-row item, at most 8)."""
    hp, rows = padded_hidden(hid), 32 * -(-height // 32)
    pairs = min(hp // 16 * (rows // 32), 8)
    return 2 * (rows + 1) * (4 * hp * elem + 16) + rows * (hp + 1) * 4 + pairs * 2 * 256 * 4


def row_smem_bytes(hid: int, width: int, taps: int, elem: int) -> int:
    """Shared memory of the row scan's larger kernel, the backward (csrc/row_lstm: bwd_smem_bytes): two [column][4 hp]
    gate-gradient buffers of 32-column chunks with taps // 2 halo columns each side, a float32 [column][hp + 1] slot
    array, and 2 KB of exchange slots per warp pair (one pair per 16-unit x 32-column item, at most 8)."""
    hp, cols = padded_hidden(hid), 32 * -(-width // 32)
    pairs = min(hp // 16 * (cols // 32), 8)
    return 2 * (cols + 2 * (taps // 2)) * (4 * hp * elem + 16) + cols * (hp + 1) * 4 + pairs * 2 * 256 * 4


@torch.compiler.assume_constant_result
def row_fits(hid: int, width: int, taps: int, elem: int, device_index: int) -> bool:
    """Whether the cuda row scans fit this GPU's shared memory per block (otherwise they raise); as diagonal_fits."""
    return row_smem_bytes(hid, width, taps, elem) <= _smem_optin(device_index)


def cuda_scan_ok(t: torch.Tensor, hid: int, fits) -> bool:
    """auto's test for the cuda scans on gates like `t` (N, 4h, H, W): a CUDA tensor of a dtype they take (not
    float64), an image whose saved state (5h x H x W) stays below 2^31 elements (the kernels' 32-bit offsets: they
    refuse it), and fits(device index) for the kernels' shared memory (diagonal_fits, row_fits)."""
    if t.device.type != "cuda" or t.dtype == torch.float64:
        return False
    if 5 * int(hid) * int(t.shape[2]) * int(t.shape[3]) >= 2**31:
        return False
    index = t.device.index
    return fits(-1 if index is None else index)


def pixel_stride(t: torch.Tensor, name: str) -> int:
    """The pixel stride of an (N, H, W, C) tensor whose channels are contiguous and whose pixels are evenly spaced
    (a dense tensor, or a channel slice of one): what the cuda scans take as gate_stride (the diagonal's always, the
    row's in its channels-last layout). `name` is the argument named when t is refused."""
    n, height, width, c = t.shape
    s = t.stride()
    gs = s[2] if width > 1 else s[1] if height > 1 else s[0] if n > 1 else c  # a size-1 dim may have any stride
    if (s[3] != 1 or gs < c or (width > 1 and s[2] != gs) or (height > 1 and s[1] != width * gs)
            or (n > 1 and s[0] != height * width * gs)):  # fmt: skip
        raise ValueError(f"{name} must be channels-last with evenly spaced pixels, got strides {s} for shape "
                         f"{tuple(t.shape)}")  # fmt: skip
    return gs


def _smem_optin(device_index: int) -> int:
    """Shared memory one block may opt in to on the GPU (device_index -1: the current one)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device_index < 0 else device_index)
    return getattr(props, "shared_memory_per_block_optin", None) or _DEFAULT_SMEM_OPTIN


@torch.compiler.assume_constant_result
def diagonal_fits(hid: int, height: int, elem: int, device_index: int) -> bool:
    """Whether the cuda diagonal scans fit this GPU's shared memory per block (otherwise they raise, and auto picks
    the triton scans, which keep their state in registers and global memory). device_index -1: the current device.
    Evaluated eagerly under torch.compile (a constant of the trace), like gm._backend.resolve."""
    return diagonal_smem_bytes(hid, height, elem) <= _smem_optin(device_index)


def _fragment_index(m: int, k: int, k_step: int) -> torch.Tensor:
    """Flat indices into a row-major (m, k) matrix in mma.sync A-fragment order, [m16 tile][k-step][lane][element]
    (PTX ISA fragment layouts; g = lane / 4, t = lane % 4):
        m16n8k16 (16-bit): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..2t+1), a2 = (g, 2t+8..2t+9), a3 = (g+8, 2t+8..2t+9)
        m16n8k8 (tf32):    a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4)"""
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    if k_step == 16:
        rows = torch.stack([g, g, g + 8, g + 8, g, g, g + 8, g + 8], 1)
        cols = torch.stack([2 * t, 2 * t + 1, 2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9, 2 * t + 8, 2 * t + 9], 1)
    else:
        rows = torch.stack([g, g + 8, g, g + 8], 1)
        cols = torch.stack([t, t, t + 4, t + 4], 1)
    tile = torch.arange(m // 16).view(-1, 1, 1, 1)
    step = torch.arange(k // k_step).view(1, -1, 1, 1)
    return ((tile * 16 + rows) * k + step * k_step + cols).reshape(-1)


def _pack_index_of(hid: int, taps: int, backward: bool, dtype: torch.dtype) -> torch.Tensor:
    """Indices into w_ss.reshape(-1) (index 4h*h*taps, one past it, stands for a zero) giving one pass's packed A operand."""
    hp = padded_hidden(hid)
    zero = 4 * hid * hid * taps
    flat = torch.arange(zero).view(4, hid, hid, taps)  # [gate, out, in, tap]
    if backward:
        a = torch.full((4, hp, hp, taps), zero)  # [gate, out, in, tap]
        a[:, :hid, :hid] = flat
        a = a.permute(2, 3, 0, 1).reshape(hp, taps * 4 * hp)  # [in][tap, gate, out]
    else:
        a = torch.full((4, hp, taps, hp), zero)  # [gate, out, tap, in]
        a[:, :hid, :, :hid] = flat.permute(0, 1, 3, 2)
        a = a.view(4, hp // 8, 8, taps * hp).permute(1, 0, 2, 3).reshape(4 * hp, taps * hp)  # [group, gate, u][tap, in]
    k_step = 32 // dtype.itemsize  # one 32-byte MMA k-step: k16 (16-bit), k8 (tf32)
    return a.reshape(-1)[_fragment_index(*a.shape, k_step)]


@functools.lru_cache(maxsize=64)
def pack_index(hid: int, taps: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Both passes' A operands as one gather: the forward's indices, then the backward's (each 4hp * taps*hp long,
    a multiple of 16 bytes, so the backward's part starts aligned for the kernels' 16-byte fragment loads)."""
    parts = [_pack_index_of(hid, taps, backward, dtype) for backward in (False, True)]
    return torch.cat(parts).to(device=device, dtype=torch.int32)


def _pack(w_ss: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    hid, taps = w_ss.shape[1], w_ss.shape[2]
    both = gather(w_ss, pack_index(hid, taps, dtype, w_ss.device), dtype)  # index 4h*h*taps: a padded zero
    return both.split(both.numel() // 2)


def pack_weights(w_ss: torch.Tensor, dtype: torch.dtype, *, fresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w_ss (4h, h, taps) as the kernels' A operands (forward pass, backward pass) in `dtype`: one gather launch for
    both (gm._ext.gather, the cast included), made by the forward (fresh=True) and reused by its
    backward (gm._ext.packed). Hold them until the kernel is queued (the launchers pass their addresses)."""
    return packed(w_ss, ("lstm_tc", dtype), lambda: _pack(w_ss, dtype), fresh=fresh)


def precision(dtype: torch.dtype, op: str) -> int:
    """common/precision.h code for the scans' MMAs: native for 16-bit types; float32 on tf32 where torch allows it for
    convolution-like ops (torch.backends.cudnn.allow_tf32, as the triton backend and cuDNN's LSTM), else 3xTF32."""
    if dtype in (torch.float16, torch.bfloat16):
        return 0
    if dtype == torch.float32:
        return 1 if torch.backends.cudnn.allow_tf32 else 2
    raise ValueError(f"the cuda backend of {op} takes float16/bfloat16/float32 (tensor cores), got {dtype}: use "
                     f"backend='triton', 'cpu' or 'reference' for it")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Layout conversions for the diagonal scans, which read and write channels-last (csrc/layout: a tiled transpose;
# torch's strided copy between the two layouts ran at ~0.6 TB/s on an H200, about a quarter of a DiagonalBiLSTM
# layer's device time at h=64 fp32 in four copies per direction).


def _transposable(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.element_size() in (2, 4) and 0 < t.shape[0] <= 65535 and t.numel() > 0


def _transpose(t: torch.Tensor, out: torch.Tensor, batch: int, rows: int, cols: int, stream: int | None):
    """out[b, s, r] = t[b, r, s] by csrc/layout's tiled transpose; stream None: t's current stream, under its device
    guard (a caller that launches more on that stream passes it, holding the guard itself)."""
    if stream is None:
        with device_guard(t):
            return _transpose(t, out, batch, rows, cols, stream_of(t))
    ext().layout_transpose_cuda(t.data_ptr(), out.data_ptr(), batch, rows, cols, t.stride(0), rows * cols,
                                t.element_size(), stream)  # fmt: skip
    return out


def to_nhwc(t: torch.Tensor, stream: int | None = None) -> torch.Tensor:
    """(N, C, H, W) as a contiguous (N, H, W, C) tensor: t's storage when it is channels-last already, the tiled
    transpose when each image is an NCHW block (contiguous, or a channel slice), torch's copy otherwise."""
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1)
    if not (_transposable(t) and t.stride()[1:] == (h * w, w, 1)):
        return t.permute(0, 2, 3, 1).contiguous()
    return _transpose(t, torch.empty(n, h, w, c, dtype=t.dtype, device=t.device), n, c, h * w, stream)


def to_nchw(t: torch.Tensor, stream: int | None = None) -> torch.Tensor:
    """A contiguous (N, H, W, C) tensor as a contiguous (N, C, H, W) one, by the tiled transpose."""
    n, h, w, c = t.shape
    if not (_transposable(t) and t.is_contiguous()):
        return t.permute(0, 3, 1, 2).contiguous()
    return _transpose(t, torch.empty(n, c, h, w, dtype=t.dtype, device=t.device), n, h * w, c, stream)
