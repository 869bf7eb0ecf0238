// The MADE output layer fused with the IAF step on CUDA: the tile-skipping tensor-core GEMM of
// masked_linear/masked_linear_gemm.cuh computes m (weight rows d) and s (rows D + d) of 64 columns d side by side
// in one 128-column block tile; the epilogue applies the step math of iaf.h, so m and s never reach memory.
//   forward:  z' and the block's partial log-det sums ld_partial[jb, r] (fp32)
//   backward: recomputes m, s the same way and writes dz and d[m, s]; dhidden and dW then go through the
//             masked_linear kernels in Python.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/tensor_args.h"
#include "iaf/iaf.h"
#include "masked_linear/masked_linear_gemm.cuh"

namespace gm {
namespace iaf {
namespace {

using masked_linear::gemm::BLayout;
using masked_linear::gemm::GemmArgs;
using masked_linear::gemm::kHeadCols;
using masked_linear::gemm::kOutLd;

struct StepEpiArgs {
  const void* bias;  // (2d,) or null
  const void* z;     // (rows, d)
  const void* gz;    // backward: (rows, d)
  const void* gl;    // backward: (rows,)
  void* z_out;       // forward: z'; backward: dz
  void* dout;        // backward: (rows, 2d)
  float* ld_partial; // forward: (col blocks, rows)
  int d;
  int mode;
};

// Warp w handles tile rows 16 w .. 16 w + 15; lane l the columns d0 + l and d0 + l + 32 (m at column l, s at
// column 64 + l of the staged tile). The forward sums the row's log-det terms with a warp shuffle.
template <typename T, bool kBackward>
struct StepEpi {
  using Args = StepEpiArgs;
  static __device__ __forceinline__ void run(const Args& e, const GemmArgs& g, const float* s_out, std::int64_t m0,
                                             int jb) {
    using masked_linear::gemm::from_float;
    using masked_linear::gemm::to_float;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T* bias = static_cast<const T*>(e.bias);
    const T* z = static_cast<const T*>(e.z);
    for (int rr = 0; rr < 16; ++rr) {
      const int ml = warp * 16 + rr;
      const std::int64_t r = m0 + ml;
      if (r >= g.rows) return;  // warp-uniform
      float ld = 0.f;
      const float gl = kBackward ? to_float(static_cast<const T*>(e.gl)[r]) : 0.f;
#pragma unroll
      for (int c = 0; c < kHeadCols / 32; ++c) {
        const int dl = lane + 32 * c, d = jb * kHeadCols + dl;
        if (d >= e.d) continue;
        float mv = s_out[ml * kOutLd + dl], sv = s_out[ml * kOutLd + kHeadCols + dl];
        if (bias != nullptr) {
          mv += to_float(bias[d]);
          sv += to_float(bias[e.d + d]);
        }
        const std::int64_t at = r * e.d + d;
        const float zv = to_float(z[at]);
        if constexpr (kBackward) {
          float dz, dm, ds;
          step_backward<float>(zv, mv, sv, to_float(static_cast<const T*>(e.gz)[at]), gl, e.mode, &dz, &dm, &ds);
          static_cast<T*>(e.z_out)[at] = from_float<T>(dz);
          T* dout = static_cast<T*>(e.dout) + r * 2 * e.d;
          dout[d] = from_float<T>(dm);
          dout[e.d + d] = from_float<T>(ds);
        } else {
          static_cast<T*>(e.z_out)[at] = from_float<T>(step_forward<float>(zv, mv, sv, e.mode, &ld));
        }
      }
      if constexpr (!kBackward) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) ld += __shfl_xor_sync(0xffffffffu, ld, off);
        if (lane == 0) e.ld_partial[static_cast<std::int64_t>(jb) * g.rows + r] = ld;
      }
    }
  }
};

template <typename T, Precision P>
struct ForwardLauncher {
  static void run(const GemmArgs& args, const StepEpiArgs& epi, cudaStream_t stream) {
    masked_linear::gemm::launch_gemm<T, P, BLayout::kRows, StepEpi<T, false>>(args, epi, stream);
  }
};
template <typename T, Precision P>
struct BackwardLauncher {
  static void run(const GemmArgs& args, const StepEpiArgs& epi, cudaStream_t stream) {
    masked_linear::gemm::launch_gemm<T, P, BLayout::kRows, StepEpi<T, true>>(args, epi, stream);
  }
};

GemmArgs fused_args(std::uintptr_t hidden, std::uintptr_t w, std::uintptr_t mask, std::uintptr_t offsets,
                    std::uintptr_t idx, std::uintptr_t mids, int rows, int d, int h_padded, int mask_ld, int dtype) {
  const int row_bytes = h_padded * (to_dtype(dtype) == DType::f32 ? 4 : 2);
  if (row_bytes % 16 != 0 || mask_ld % 16 != 0)
    throw std::invalid_argument("iaf_made_output (cuda): hidden, weight and mask rows must be 16-byte multiples");
  return GemmArgs{ptr<const char>(hidden), ptr<const char>(w), ptr<const unsigned char>(mask),
                  {ptr<const int>(offsets), ptr<const int>(idx), ptr<const int>(mids)},
                  rows, row_bytes, 2 * d, row_bytes, mask_ld, (d + kHeadCols - 1) / kHeadCols, d};
}

}  // namespace

void made_output_forward_cuda(std::uintptr_t hidden, std::uintptr_t w, std::uintptr_t mask, std::uintptr_t bias,
                              std::uintptr_t z, std::uintptr_t z_new, std::uintptr_t ld_partial,
                              std::uintptr_t offsets, std::uintptr_t idx, std::uintptr_t mids, int rows, int d,
                              int h_padded, int mask_ld, int mode, int dtype, int precision, std::uintptr_t stream) {
  const GemmArgs args = fused_args(hidden, w, mask, offsets, idx, mids, rows, d, h_padded, mask_ld, dtype);
  const StepEpiArgs epi{ptr<const void>(bias), ptr<const void>(z), nullptr, nullptr, ptr<void>(z_new), nullptr,
                        ptr<float>(ld_partial), d, mode};
  masked_linear::gemm::dispatch<ForwardLauncher>(dtype, precision, "iaf_made_output", args, epi, to_stream(stream));
}

void made_output_backward_cuda(std::uintptr_t hidden, std::uintptr_t w, std::uintptr_t mask, std::uintptr_t bias,
                               std::uintptr_t z, std::uintptr_t gz, std::uintptr_t gl, std::uintptr_t dz,
                               std::uintptr_t dout, std::uintptr_t offsets, std::uintptr_t idx, std::uintptr_t mids,
                               int rows, int d, int h_padded, int mask_ld, int mode, int dtype, int precision,
                               std::uintptr_t stream) {
  const GemmArgs args = fused_args(hidden, w, mask, offsets, idx, mids, rows, d, h_padded, mask_ld, dtype);
  const StepEpiArgs epi{ptr<const void>(bias), ptr<const void>(z), ptr<const void>(gz), ptr<const void>(gl),
                        ptr<void>(dz), ptr<void>(dout), nullptr, d, mode};
  masked_linear::gemm::dispatch<BackwardLauncher>(dtype, precision, "iaf_made_output", args, epi, to_stream(stream));
}

}  // namespace iaf
}  // namespace gm
