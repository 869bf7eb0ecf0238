// Batched tiled transpose (layout/layout.h).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/tensor_args.h"
#include "layout/layout.h"

namespace gm {
namespace layout {
namespace {

template <typename E>
__global__ void __launch_bounds__(256) transpose_kernel(const E* __restrict__ in, E* __restrict__ out, int64_t rows,
                                                         int64_t cols, int64_t in_batch_stride,
                                                         int64_t out_batch_stride) {
  __shared__ E tile[32][33];
  const int64_t b = blockIdx.z;
  const int64_t r0 = int64_t(blockIdx.y) * 32, c0 = int64_t(blockIdx.x) * 32;
  const E* src = in + b * in_batch_stride;
  E* dst = out + b * out_batch_stride;
#pragma unroll
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = src[r * cols + c];
  }
  __syncthreads();
#pragma unroll
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) dst[c * rows + r] = tile[threadIdx.x][i];
  }
}

}  // namespace

void cuda_transpose(std::uintptr_t in, std::uintptr_t out, std::int64_t batch, std::int64_t rows, std::int64_t cols,
                    std::int64_t in_batch_stride, std::int64_t out_batch_stride, int elem_bytes, std::uintptr_t stream) {
  if (batch <= 0 || rows <= 0 || cols <= 0) return;
  if (batch > 65535) throw std::invalid_argument("gm layout transpose (cuda): takes a batch of at most 65535");
  const int64_t gy = (rows + 31) / 32, gx = (cols + 31) / 32;
  if (gy > 65535 || gx > 0x7fffffff)
    throw std::invalid_argument("gm layout transpose (cuda): too many rows for one launch");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(batch)), block(32, 8);
  if (elem_bytes == 2)
    transpose_kernel<std::uint16_t><<<grid, block, 0, to_stream(stream)>>>(
        ptr<const std::uint16_t>(in), ptr<std::uint16_t>(out), rows, cols, in_batch_stride, out_batch_stride);
  else if (elem_bytes == 4)
    transpose_kernel<std::uint32_t><<<grid, block, 0, to_stream(stream)>>>(
        ptr<const std::uint32_t>(in), ptr<std::uint32_t>(out), rows, cols, in_batch_stride, out_batch_stride);
  else
    throw std::invalid_argument("gm layout transpose (cuda): takes 2- or 4-byte elements");
  GM_CUDA_CHECK_LAUNCH();
}

}  // namespace layout
}  // namespace gm
