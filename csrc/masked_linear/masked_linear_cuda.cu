// masked_linear CUDA entry points: the tile-skipping tensor-core GEMMs of masked_linear_gemm.cuh with the
// bias + activation epilogue, the weight gradient, and the activation-gradient pass shared by both gradients.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/tensor_args.h"
#include "masked_linear/masked_linear.h"
#include "masked_linear/masked_linear_gemm.cuh"

namespace gm {
namespace masked_linear {
namespace {

using gemm::BLayout;
using gemm::GemmArgs;
using gemm::kBN;
using gemm::kOutLd;

enum Act : int { kNone = 0, kElu = 1, kRelu = 2 };

__device__ __forceinline__ float apply_act(float v, int act) {
  if (act == kElu) return v > 0.f ? v : expm1f(v);
  if (act == kRelu) return v > 0.f ? v : 0.f;
  return v;
}

// g * act'(x) written through the output y = act(x): ELU' = 1 or y + 1, ReLU' = [y > 0].
__device__ __forceinline__ float act_grad_of(float g, float y, int act) {
  return act == kElu ? (y > 0.f ? g : g * (y + 1.f)) : (y > 0.f ? g : 0.f);
}

struct LinearEpiArgs {
  void* out;         // (rows, cols) row-major
  const void* bias;  // (cols,) or null
  int cols;
  int act;
  // The input gradient of a layer whose input is the output y (rows, cols) of an activation `y_act`: the epilogue
  // writes that layer's pre-activation gradient g * act'(y) (the value rounded to T first, as the separate pass
  // reads it), so the activation-gradient pass and its round trip through memory are skipped. Null: plain.
  const void* y;
  int y_act;
};

// out[r, c] = act(tile + bias[c]): warp w stores rows 16 w .. 16 w + 15, lanes along the columns.
template <typename T>
struct LinearEpi {
  using Args = LinearEpiArgs;
  static __device__ __forceinline__ void run(const Args& e, const GemmArgs& g, const float* s_out, std::int64_t m0,
                                             int jb) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T* out = static_cast<T*>(e.out);
    const T* bias = static_cast<const T*>(e.bias);
    for (int rr = 0; rr < 16; ++rr) {
      const int ml = warp * 16 + rr;
      const std::int64_t m = m0 + ml;
      if (m >= g.rows) return;
#pragma unroll
      for (int c = 0; c < kBN / 32; ++c) {
        const int n = lane + 32 * c, col = jb * kBN + n;
        if (col >= e.cols) continue;
        float v = s_out[ml * kOutLd + n];
        if (bias != nullptr) v += gemm::to_float(bias[col]);
        if (e.y != nullptr) {
          const float g = gemm::to_float(gemm::from_float<T>(v));
          v = act_grad_of(g, gemm::to_float(static_cast<const T*>(e.y)[m * e.cols + col]), e.y_act);
        }
        out[m * e.cols + col] = gemm::from_float<T>(apply_act(v, e.act));
      }
    }
  }
};

template <typename T, Precision P>
struct ForwardLauncher {
  static void run(const GemmArgs& args, const LinearEpiArgs& epi, cudaStream_t stream) {
    gemm::launch_gemm<T, P, BLayout::kRows, LinearEpi<T>>(args, epi, stream);
  }
};
template <typename T, Precision P>
struct InputGradLauncher {
  static void run(const GemmArgs& args, const LinearEpiArgs& epi, cudaStream_t stream) {
    gemm::launch_gemm<T, P, BLayout::kTrans, LinearEpi<T>>(args, epi, stream);
  }
};
template <typename T, Precision P>
struct WgradLauncher {
  static void run(const gemm::WgradArgs& args, int splits, cudaStream_t stream) {
    gemm::launch_wgrad<T, P>(args, splits, stream);
  }
};

template <typename T>
__global__ void act_grad_kernel(const T* __restrict__ g, const T* __restrict__ y, T* __restrict__ out,
                                std::int64_t total, int act) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    out[i] = gemm::from_float<T>(act_grad_of(gemm::to_float(g[i]), gemm::to_float(y[i]), act));
  }
}

// The weight and bias gradients finished in one launch: blocks [0, w_blocks) add the weight gradient's row-split
// partial sums (split order, float32) and cast them; the others each sum 32 columns of gp over all rows for the bias
// gradient (warp w takes rows w, w + 8, ...; the eight warp sums added in order: deterministic) and cast them.
template <typename T>
__global__ void grad_finish_kernel(const float* __restrict__ partial, int splits, std::int64_t ok,
                                   T* __restrict__ dw, const T* __restrict__ gp, int rows, int o, int gp_ld,
                                   T* __restrict__ db, int w_blocks) {
  if (static_cast<int>(blockIdx.x) < w_blocks) {
    const std::int64_t stride = static_cast<std::int64_t>(w_blocks) * blockDim.x;
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < ok; i += stride) {
      float s = 0.f;
      for (int sp = 0; sp < splits; ++sp) s += partial[sp * ok + i];
      dw[i] = gemm::from_float<T>(s);
    }
    return;
  }
  __shared__ float warp_sums[8][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = (static_cast<int>(blockIdx.x) - w_blocks) * 32 + lane;
  float s = 0.f;
  if (col < o)
    for (int r = warp; r < rows; r += 8) s += gemm::to_float(gp[static_cast<std::int64_t>(r) * gp_ld + col]);
  warp_sums[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && col < o) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) t += warp_sums[w][lane];
    db[col] = gemm::from_float<T>(t);
  }
}

int elem_bytes(int dtype) { return to_dtype(dtype) == DType::f32 ? 4 : 2; }

void check_row_bytes(const char* what, int bytes) {
  if (bytes % 16 != 0) throw std::invalid_argument(std::string("masked_linear (cuda): ") + what +
                                                   " rows must be padded to a 16-byte multiple");
}

}  // namespace

void forward_cuda(std::uintptr_t x, std::uintptr_t w, std::uintptr_t mask, std::uintptr_t bias, std::uintptr_t y,
                  std::uintptr_t offsets, std::uintptr_t idx, std::uintptr_t mids, int rows, int o, int k_padded,
                  int mask_ld, int act, int dtype, int precision, std::uintptr_t stream) {
  const int row_bytes = k_padded * elem_bytes(dtype);
  check_row_bytes("x and weight", row_bytes);
  check_row_bytes("mask", mask_ld);
  const GemmArgs args{ptr<const char>(x), ptr<const char>(w), ptr<const unsigned char>(mask),
                      {ptr<const int>(offsets), ptr<const int>(idx), ptr<const int>(mids)},
                      rows, row_bytes, o, row_bytes, mask_ld, (o + kBN - 1) / kBN, 0};
  const LinearEpiArgs epi{ptr<void>(y), ptr<const void>(bias), o, act};
  gemm::dispatch<ForwardLauncher>(dtype, precision, "masked_linear", args, epi, to_stream(stream));
}

void input_grad_cuda(std::uintptr_t gp, std::uintptr_t w, std::uintptr_t mask, std::uintptr_t dx,
                     std::uintptr_t offsets, std::uintptr_t idx, std::uintptr_t mids, int rows, int o, int o_padded,
                     int k, int k_padded, int mask_ld, std::uintptr_t y_below, int act_below, int dtype,
                     int precision, std::uintptr_t stream) {
  if (y_below != 0 && act_below != kElu && act_below != kRelu)
    throw std::invalid_argument("masked_linear (cuda): the input gradient's activation gradient takes ELU or ReLU");
  const int elem = elem_bytes(dtype);
  check_row_bytes("grad", o_padded * elem);
  check_row_bytes("weight", k_padded * elem);
  check_row_bytes("mask", mask_ld);
  const GemmArgs args{ptr<const char>(gp), ptr<const char>(w), ptr<const unsigned char>(mask),
                      {ptr<const int>(offsets), ptr<const int>(idx), ptr<const int>(mids)},
                      rows, o_padded * elem, o, k_padded * elem, mask_ld, (k + kBN - 1) / kBN, 0};
  const LinearEpiArgs epi{ptr<void>(dx), nullptr, k, kNone, ptr<const void>(y_below), act_below};
  gemm::dispatch<InputGradLauncher>(dtype, precision, "masked_linear", args, epi, to_stream(stream));
}

void weight_grad_cuda(std::uintptr_t gp, std::uintptr_t x, std::uintptr_t mask, std::uintptr_t flags,
                      std::uintptr_t partial, int rows, int o, int o_padded, int k, int k_padded,
                      std::int64_t rows_per_split, int splits, int dtype, int precision, std::uintptr_t stream) {
  const int elem = elem_bytes(dtype);
  check_row_bytes("grad", o_padded * elem);
  check_row_bytes("x", k_padded * elem);
  if (splits > 65535) throw std::invalid_argument("masked_linear (cuda): at most 65535 row splits");
  const gemm::WgradArgs args{ptr<const char>(gp), ptr<const char>(x), ptr<const unsigned char>(mask),
                             ptr<const int>(flags), ptr<float>(partial), rows, o, k, o_padded * elem, k_padded * elem,
                             rows_per_split};
  gemm::dispatch<WgradLauncher>(dtype, precision, "masked_linear", args, splits, to_stream(stream));
}

void grad_finish_cuda(std::uintptr_t partial, int splits, int o, int k, std::uintptr_t dw, std::uintptr_t gp,
                      int rows, int gp_ld, std::uintptr_t db, int dtype, std::uintptr_t stream) {
  const int threads = 256;  // eight warps: the bias blocks' layout
  const std::int64_t ok = static_cast<std::int64_t>(o) * k;
  const int w_blocks = dw == 0 || ok == 0 ? 0 : static_cast<int>(std::min<std::int64_t>((ok + threads - 1) / threads, 1024));
  const int b_blocks = db == 0 ? 0 : (o + 31) / 32;
  if (w_blocks + b_blocks == 0) return;
  const cudaStream_t st = to_stream(stream);
  const dim3 grid(static_cast<unsigned>(w_blocks + b_blocks));
  switch (to_dtype(dtype)) {
    case DType::f32:
      grad_finish_kernel<float><<<grid, threads, 0, st>>>(ptr<const float>(partial), splits, ok, ptr<float>(dw),
                                                           ptr<const float>(gp), rows, o, gp_ld, ptr<float>(db),
                                                           w_blocks);
      break;
    case DType::f16:
      grad_finish_kernel<__half><<<grid, threads, 0, st>>>(ptr<const float>(partial), splits, ok, ptr<__half>(dw),
                                                            ptr<const __half>(gp), rows, o, gp_ld, ptr<__half>(db),
                                                            w_blocks);
      break;
    case DType::bf16:
      grad_finish_kernel<__nv_bfloat16><<<grid, threads, 0, st>>>(
          ptr<const float>(partial), splits, ok, ptr<__nv_bfloat16>(dw), ptr<const __nv_bfloat16>(gp), rows, o, gp_ld,
          ptr<__nv_bfloat16>(db), w_blocks);
      break;
    default:
      throw std::invalid_argument("masked_linear (cuda): takes float16, bfloat16 or float32");
  }
  GM_CUDA_CHECK_LAUNCH();
}

void act_grad_cuda(std::uintptr_t g, std::uintptr_t y, std::uintptr_t out, std::int64_t total, int act, int dtype,
                   std::uintptr_t stream) {
  if (total == 0) return;
  if (act != kElu && act != kRelu) throw std::invalid_argument("masked_linear (cuda): act_grad takes ELU or ReLU");
  const int threads = 256;
  const std::int64_t blocks = (total + threads - 1) / threads < 65535LL * 8 ? (total + threads - 1) / threads
                                                                             : 65535LL * 8;
  const cudaStream_t st = to_stream(stream);
  switch (to_dtype(dtype)) {
    case DType::f32:
      act_grad_kernel<float><<<static_cast<unsigned>(blocks), threads, 0, st>>>(
          ptr<const float>(g), ptr<const float>(y), ptr<float>(out), total, act);
      break;
    case DType::f16:
      act_grad_kernel<__half><<<static_cast<unsigned>(blocks), threads, 0, st>>>(
          ptr<const __half>(g), ptr<const __half>(y), ptr<__half>(out), total, act);
      break;
    case DType::bf16:
      act_grad_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), threads, 0, st>>>(
          ptr<const __nv_bfloat16>(g), ptr<const __nv_bfloat16>(y), ptr<__nv_bfloat16>(out), total, act);
      break;
    default:
      throw std::invalid_argument("masked_linear (cuda): takes float16, bfloat16 or float32");
  }
  GM_CUDA_CHECK_LAUNCH();
}

}  // namespace masked_linear
}  // namespace gm
