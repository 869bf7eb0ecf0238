// masked_conv2d on CUDA: implicit GEMM over the kept taps only (see gm/ops/masked_conv.py for the math).
//
//   forward / input gradient:  out[n, o, h, w] = bias[o] + sum_t sum_c a[n, h + dy_t, w + dx_t, c] * b[t, o, c]
//     a: (N, H, W, Kp) NHWC, Kp a multiple of 8 (zero-padded channels), b: (T, N_out, Kp), out: (N, N_out, H, W) NCHW,
//     or (N, H, W, N_out) NHWC (a channels-last (N, N_out, H, W) tensor) when out_nhwc.
//     The input gradient is the same GEMM on grad with the taps negated and the packed weight (T, C_in, C_out).
//   weight gradient:  partial[s, t, c, o] = sum_{p in split s} x[p + off_t, c] * grad[p, o]   (float32)
//     x: (N, H, W, Cin_p), grad: (N, H, W, Cout_p) NHWC; the splits are summed afterwards in a fixed order, with the
//     scatter to the weight layout and the cast (cuda_wgrad_unpack; deterministic).
//
// Python (gm/ops/_masked_conv_cuda.py) converts layouts, pads channels, checks dtypes/devices and passes raw pointers.
#pragma once
#include <cstdint>

#include "common/precision.h"

namespace gm {
namespace masked_conv {

// 7x7 keeps 24 taps (mask A) or 25 (mask B): the kept-tap table travels as a kernel argument.
constexpr int kMaxTaps = 25;

struct TapTable {
  int count;
  int dy[kMaxTaps];
  int dx[kMaxTaps];
};

// How float32 operands reach the tensor cores (16-bit dtypes always use kNative): common/precision.h.
using ::gm::Precision;

#ifdef GM_WITH_CUDA
// (N, C, HW) contiguous -> (N, HW, c_padded), channels past C zero; elem_bytes 2 or 4.
void cuda_to_nhwc(std::uintptr_t in, std::uintptr_t out, int n, int c, int c_padded, int hw, int elem_bytes,
                  std::uintptr_t stream);

// dtype: gm::DType code (f32, f16, bf16); precision: Precision code; out_nhwc: out is (N, H, W, n_out).
// The fused (ReLU, conv) layers (gm.nn.relu_conv): relu_a convolves relu(a); gate (out's layout and dtype, or 0)
// zeroes out where gate <= 0, then residual (the same, or 0) is added.
void cuda_conv_gemm(std::uintptr_t a, std::uintptr_t b, std::uintptr_t bias, std::uintptr_t out, int n, int h, int w,
                    int k_channels, int n_out, bool out_nhwc, const TapTable& taps, int dtype, int precision,
                    std::uintptr_t stream, bool relu_a = false, std::uintptr_t gate = 0, std::uintptr_t residual = 0,
                    std::uintptr_t centre = 0);
// centre (int32 pairs, or 0): per 128-channel tile of n_out, the range [lo, hi) of the k_channels that the last kept
// tap (the centre) connects under the colour groups; the GEMM reduces the centre over those alone.

void cuda_weight_grad(std::uintptr_t x, std::uintptr_t grad, std::uintptr_t partial, int n, int h, int w,
                      int c_in_padded, int c_out_padded, int c_in, int c_out, const TapTable& taps,
                      std::int64_t pixels_per_split, int splits, int dtype, int precision, std::uintptr_t stream,
                      bool relu_x = false, std::uintptr_t db_partial = 0, std::uintptr_t centre = 0);
// relu_x: the weight gradient of conv(relu(x)); db_partial ((splits, c_out) float32, or 0): the bias gradient's
// partial sums of each split (the pixel sums of grad), for cuda_wgrad_unpack. centre: cuda_conv_gemm's forward table
// (per 128-channel tile of c_out, the c_in range of the centre); centre-tap tiles outside it get zeros unsummed.

// dw (C_out, C_in, kk) in dtype = sum over splits of partial (splits, taps, C_in, C_out) float32 at tap_at[pos]
// (int32, -1: masked position: zero), times keep (uint8 (taps, C_in, C_out), 0 = forbidden) unless keep is 0.
// db_partial, db (both or neither): the bias gradient (c_out,) in dtype from cuda_weight_grad's partial sums.
void cuda_wgrad_unpack(std::uintptr_t partial, std::uintptr_t tap_at, std::uintptr_t keep, std::uintptr_t dw,
                       int splits, int taps, int c_in, int c_out, int kk, int dtype, std::uintptr_t stream,
                       std::uintptr_t db_partial = 0, std::uintptr_t db = 0);
#endif

}  // namespace masked_conv
}  // namespace gm
