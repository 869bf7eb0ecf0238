// Building blocks of the tensor-core LSTM scans (csrc/row_lstm, csrc/diagonal_lstm): one block per image runs every
// step of a scan; each step is one small GEMM, A (weights, packed by gm/ops/_lstm_cuda.py in mma.sync fragment order
// and read from global memory: one 16-byte load per lane, m16 tile and k-step) times B (the previous step's state or
// gate gradients, in a shared [position][channel] array read with ldmatrix), over 32-position warp items. The taps
// of the state-to-state convolution are the same B tile at shifted start rows. Device-only; include from .cu files.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "common/mma_sync.cuh"
#include "common/precision.h"
#include "common/tensor_args.h"

namespace gm {
namespace lstm_tc {

constexpr int kMaxWarps = 16;
constexpr int kItemRows = 32;  // positions (image rows or columns) per warp item: four n8 tiles

// A fragments of (m16 tile, k-step) for this lane.
template <int kM>
__device__ __forceinline__ void load_a(std::uint32_t (&af)[kM][4], const uint4* __restrict__ a_pack, int mtile0,
                                       int ksteps, int ks, int lane) {
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const uint4 v = __ldg(a_pack + (int64_t(mtile0 + m) * ksteps + ks) * 32 + lane);
    af[m][0] = v.x;
    af[m][1] = v.y;
    af[m][2] = v.z;
    af[m][3] = v.w;
  }
}

// acc[kM][4][4] = A[m16 tiles mtile0 .. +kM) . B over `taps` taps of `tap_steps` k-steps each; tap q reads the 32
// positions from buffer row first_row + dir * q of `buf` (row_bytes a row). Fragment e of acc[m][j] holds A row
// 16 m + lane / 4 + 8 (e / 2) and position 8 j + 2 (lane % 4) + e % 2.
template <typename T, Precision P, int kM>
__device__ __forceinline__ void step_gemm(float (&acc)[kM][4][4], const uint4* __restrict__ a_pack, int mtile0,
                                          std::uint32_t buf, int row_bytes, int first_row, int dir, int taps,
                                          int tap_steps, int lane) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;
  const int ksteps = taps * tap_steps;
  for (int ks = 0; ks < ksteps; ++ks) {
    const int tap = ks / tap_steps;
    std::uint32_t af[kM][4], bf[4][2];
    load_a<kM>(af, a_pack, mtile0, ksteps, ks, lane);
    mma::row_fragments_b(bf, buf, row_bytes, first_row + dir * tap, ks - tap * tap_steps, lane);
    mma::mma_tiles<T, P, kM, 4>(acc, af, bf);
  }
}

// Zero `bytes` (a multiple of 4) of shared memory with the whole block.
__device__ __forceinline__ void zero_shared(unsigned char* p, int bytes) {
  for (int e = threadIdx.x; e < bytes / 4; e += blockDim.x) reinterpret_cast<std::uint32_t*>(p)[e] = 0u;
}

// Row bytes of a [position][channels] state array: 16 bytes of padding put 8 consecutive rows on distinct banks.
__host__ __device__ __forceinline__ int row_bytes(int channels, size_t elem) {
  return static_cast<int>(channels * elem + 16);
}

inline int threads_for(int items) { return 32 * (items < kMaxWarps ? items : kMaxWarps); }

template <typename K>
void set_smem(K kernel, size_t bytes, const char* what) {
  int device = 0, limit = 0;
  GM_CUDA_CHECK(cudaGetDevice(&device));
  GM_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<size_t>(limit))
    throw std::invalid_argument(std::string("gm ") + what + " needs " + std::to_string(bytes) +
                                " bytes of shared memory, more than this GPU's " + std::to_string(limit) +
                                " per block: use the triton backend, or a smaller hidden size or image");
  GM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// dtype x precision dispatch: float16/bfloat16 run natively, float32 as tf32 or 3xTF32.
// Launch<T, P>::run(args...) is called.
template <template <typename, Precision> class Launch, typename... Args>
void dispatch(const char* op, int dtype, int precision, Args... args) {
  switch (to_dtype(dtype)) {
    case DType::f16: return Launch<__half, Precision::kNative>::run(args...);
    case DType::bf16: return Launch<__nv_bfloat16, Precision::kNative>::run(args...);
    case DType::f32:
      if (static_cast<Precision>(precision) == Precision::kTf32) return Launch<float, Precision::kTf32>::run(args...);
      return Launch<float, Precision::kTf32x3>::run(args...);
    default: throw std::invalid_argument(std::string("gm ") + op + " (cuda) takes float16, bfloat16 or float32");
  }
}

}  // namespace lstm_tc
}  // namespace gm
