// CUDA IAF step: forward with one warp per row (warp-shuffle sum of the log-det), backward elementwise
// (grid-stride). Storage float32/float64/float16/bfloat16, math in float (double for float64).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "common/cuda_check.h"
#include "common/tensor_args.h"
#include "iaf/iaf.h"

namespace gm {
namespace iaf {
namespace {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void forward_kernel(const T* __restrict__ z, const T* __restrict__ m, const T* __restrict__ s,
                               T* __restrict__ z_new, T* __restrict__ ld, int64_t rows, int64_t cols, int mode) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t base = row * cols;
  A acc = 0;
  for (int64_t c = lane; c < cols; c += 32) {
    const int64_t i = base + c;
    z_new[i] = from_acc<T>(step_forward<A>(to_acc(z[i]), to_acc(m[i]), to_acc(s[i]), mode, &acc));
  }
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) ld[row] = from_acc<T>(acc);
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ z, const T* __restrict__ m, const T* __restrict__ s,
                                const T* __restrict__ gz, const T* __restrict__ gl, T* __restrict__ dz,
                                T* __restrict__ dm, T* __restrict__ ds, int64_t total, int64_t cols, int mode) {
  using A = typename Acc<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    A a_dz, a_dm, a_ds;
    step_backward<A>(to_acc(z[i]), to_acc(m[i]), to_acc(s[i]), to_acc(gz[i]), to_acc(gl[i / cols]), mode, &a_dz,
                     &a_dm, &a_ds);
    dz[i] = from_acc<T>(a_dz);
    dm[i] = from_acc<T>(a_dm);
    ds[i] = from_acc<T>(a_ds);
  }
}

template <typename T>
void launch_forward(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t z_new, std::uintptr_t ld,
                    int64_t rows, int64_t cols, int mode, cudaStream_t stream) {
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  forward_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      ptr<const T>(z), ptr<const T>(m), ptr<const T>(s), ptr<T>(z_new), ptr<T>(ld), rows, cols, mode);
  GM_CUDA_CHECK_LAUNCH();
}

template <typename T>
void launch_backward(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t gz, std::uintptr_t gl,
                     std::uintptr_t dz, std::uintptr_t dm, std::uintptr_t ds, int64_t rows, int64_t cols, int mode,
                     cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535LL * 8) blocks = 65535LL * 8;
  backward_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      ptr<const T>(z), ptr<const T>(m), ptr<const T>(s), ptr<const T>(gz), ptr<const T>(gl), ptr<T>(dz), ptr<T>(dm),
      ptr<T>(ds), total, cols, mode);
  GM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void step_forward_cuda(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t z_new, std::uintptr_t ld,
                       int64_t rows, int64_t cols, int mode, int dtype, std::uintptr_t stream) {
  cudaStream_t st = to_stream(stream);
  switch (to_dtype(dtype)) {
    case DType::f32: return launch_forward<float>(z, m, s, z_new, ld, rows, cols, mode, st);
    case DType::f64: return launch_forward<double>(z, m, s, z_new, ld, rows, cols, mode, st);
    case DType::f16: return launch_forward<__half>(z, m, s, z_new, ld, rows, cols, mode, st);
    case DType::bf16: return launch_forward<__nv_bfloat16>(z, m, s, z_new, ld, rows, cols, mode, st);
  }
  throw std::invalid_argument("gm._C iaf_step cuda: unknown dtype");
}

void step_backward_cuda(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t gz, std::uintptr_t gl,
                        std::uintptr_t dz, std::uintptr_t dm, std::uintptr_t ds, int64_t rows, int64_t cols, int mode,
                        int dtype, std::uintptr_t stream) {
  cudaStream_t st = to_stream(stream);
  switch (to_dtype(dtype)) {
    case DType::f32: return launch_backward<float>(z, m, s, gz, gl, dz, dm, ds, rows, cols, mode, st);
    case DType::f64: return launch_backward<double>(z, m, s, gz, gl, dz, dm, ds, rows, cols, mode, st);
    case DType::f16: return launch_backward<__half>(z, m, s, gz, gl, dz, dm, ds, rows, cols, mode, st);
    case DType::bf16: return launch_backward<__nv_bfloat16>(z, m, s, gz, gl, dz, dm, ds, rows, cols, mode, st);
  }
  throw std::invalid_argument("gm._C iaf_step cuda: unknown dtype");
}

}  // namespace iaf
}  // namespace gm
