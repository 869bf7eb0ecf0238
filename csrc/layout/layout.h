// Batched 2-D transpose on the GPU: out[b][c][r] = in[b][r][c], elements of 2 or 4 bytes, one 32 x 32 tile per block
// staged through shared memory so reads and writes are both coalesced. NCHW -> NHWC is (rows, cols) = (C, H*W),
// NHWC -> NCHW is (H*W, C); the batch strides let the input be a channel slice of a larger tensor. torch's strided
// copy between the two layouts ran at ~0.6 TB/s on an H200 (bench/NOTES.md).
#pragma once
#include <cstdint>

namespace gm {
namespace layout {

void cuda_transpose(std::uintptr_t in, std::uintptr_t out, std::int64_t batch, std::int64_t rows, std::int64_t cols,
                    std::int64_t in_batch_stride, std::int64_t out_batch_stride, int elem_bytes, std::uintptr_t stream);

// Gather with a zero sentinel and a cast: dst[i] = idx[i] < src_numel ? cast(src[idx[i]]) : 0 for i < n, src and dst
// float32, float16 or bfloat16 (dtype codes of common/tensor_args.h), idx int32 and >= 0. It packs a weight into the
// layout a GEMM reads (the masked convolution's kept taps, the LSTM scans' fragment-ordered w_ss) in one launch, where
// torch needs a concatenation with a zero, a gather and, for another dtype, a cast.
void cuda_gather(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst, std::int64_t n, std::int64_t src_numel,
                 int src_dtype, int dst_dtype, std::uintptr_t stream);

}  // namespace layout
}  // namespace gm
