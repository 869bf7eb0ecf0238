// Batched tiled transpose and the packing gather (layout/layout.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

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

__device__ __forceinline__ float load_float(float v) { return v; }
__device__ __forceinline__ float load_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float load_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename D>
__device__ __forceinline__ D store_as(float v) {
  if constexpr (std::is_same_v<D, __half>)
    return __float2half_rn(v);
  else if constexpr (std::is_same_v<D, __nv_bfloat16>)
    return __float2bfloat16_rn(v);
  else
    return v;
}

// One output element per thread and step of a grid-stride loop: the index and output streams are coalesced, the
// scattered source reads hit a weight small enough to stay in L2.
template <typename S, typename D>
__global__ void __launch_bounds__(256) gather_kernel(const S* __restrict__ src, const int32_t* __restrict__ idx,
                                                      D* __restrict__ dst, int64_t n, int32_t src_numel) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int32_t j = __ldg(idx + i);
    if constexpr (std::is_same_v<S, D>)
      dst[i] = j < src_numel ? src[j] : store_as<D>(0.f);
    else
      dst[i] = store_as<D>(j < src_numel ? load_float(src[j]) : 0.f);
  }
}

template <typename S, typename D>
void launch_gather(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst, int64_t n, int64_t src_numel,
                   cudaStream_t stream) {
  const int64_t blocks = (n + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
  gather_kernel<S, D><<<grid, 256, 0, stream>>>(ptr<const S>(src), ptr<const int32_t>(idx), ptr<D>(dst), n,
                                                static_cast<int32_t>(src_numel));
}

template <typename S>
void gather_to(DType dst_dtype, std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst, int64_t n,
               int64_t src_numel, cudaStream_t stream) {
  switch (dst_dtype) {
    case DType::f32: return launch_gather<S, float>(src, idx, dst, n, src_numel, stream);
    case DType::f16: return launch_gather<S, __half>(src, idx, dst, n, src_numel, stream);
    case DType::bf16: return launch_gather<S, __nv_bfloat16>(src, idx, dst, n, src_numel, stream);
    default: throw std::invalid_argument("gm layout gather (cuda): dst must be float32, float16 or bfloat16");
  }
}

}  // namespace

void cuda_gather(std::uintptr_t src, std::uintptr_t idx, std::uintptr_t dst, std::int64_t n, std::int64_t src_numel,
                 int src_dtype, int dst_dtype, std::uintptr_t stream) {
  if (n <= 0) return;
  if (src_numel < 0 || src_numel > 0x7fffffff)
    throw std::invalid_argument("gm layout gather (cuda): src_numel must be in [0, 2^31), got " +
                                std::to_string(src_numel));
  const DType out = to_dtype(dst_dtype);
  const cudaStream_t s = to_stream(stream);
  switch (to_dtype(src_dtype)) {
    case DType::f32: gather_to<float>(out, src, idx, dst, n, src_numel, s); break;
    case DType::f16: gather_to<__half>(out, src, idx, dst, n, src_numel, s); break;
    case DType::bf16: gather_to<__nv_bfloat16>(out, src, idx, dst, n, src_numel, s); break;
    default: throw std::invalid_argument("gm layout gather (cuda): src must be float32, float16 or bfloat16");
  }
  GM_CUDA_CHECK_LAUNCH();
}

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
