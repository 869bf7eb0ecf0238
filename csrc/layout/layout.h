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

}  // namespace layout
}  // namespace gm
