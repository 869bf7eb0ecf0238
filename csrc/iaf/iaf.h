// IAF step math shared by the CPU (iaf_cpu.cpp) and CUDA (iaf_cuda.cu) kernels. Kingma, Salimans et al. 2016:
//   gated:  σ = sigmoid(s), z' = σ z + (1 − σ) m, logdet term log σ = min(s, 0) − log1p(exp(−|s|))
//   affine: z' = (z − m) exp(−s),                 logdet term −s
// Backward (gz = dL/dz', gl = dL/dlogdet of the row):
//   gated:  dz = gz σ, dm = gz (1 − σ), ds = (gz (z − m) σ + gl)(1 − σ), with 1 − σ = sigmoid(−s)
//   affine: dz = gz e^{−s}, dm = −dz, ds = −gz z' − gl
// Tensors are contiguous (R, F); Python checks shapes, dtypes and devices first.
#pragma once
#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define GM_IAF_HD __host__ __device__ __forceinline__
#else
#define GM_IAF_HD inline
#endif

namespace gm {
namespace iaf {

enum Mode : int { kGated = 0, kAffine = 1 };

GM_IAF_HD float exp_(float v) { return expf(v); }
GM_IAF_HD double exp_(double v) { return exp(v); }
GM_IAF_HD float log1p_(float v) { return log1pf(v); }
GM_IAF_HD double log1p_(double v) { return log1p(v); }

// One exp and one log1p per element: e = exp(−|s|) gives σ(s), σ(−s) = 1 − σ(s) and log σ(s) without overflow.
template <typename A>
struct Gate {
  A sig, one_minus, log_sig;
};

template <typename A>
GM_IAF_HD Gate<A> gate(A s) {
  const bool pos = s >= A(0);
  const A e = exp_(pos ? -s : s);
  const A inv = A(1) / (A(1) + e);
  Gate<A> g;
  g.sig = pos ? inv : e * inv;
  g.one_minus = pos ? e * inv : inv;
  g.log_sig = (pos ? A(0) : s) - log1p_(e);
  return g;
}

// Returns z'; adds the element's log-det term to *ld.
template <typename A>
GM_IAF_HD A step_forward(A z, A m, A s, int mode, A* ld) {
  if (mode == kGated) {
    const Gate<A> g = gate(s);
    *ld += g.log_sig;
    return g.sig * z + g.one_minus * m;
  }
  *ld -= s;
  return (z - m) * exp_(-s);
}

template <typename A>
GM_IAF_HD void step_backward(A z, A m, A s, A gz, A gl, int mode, A* dz, A* dm, A* ds) {
  if (mode == kGated) {
    const Gate<A> g = gate(s);
    *dz = gz * g.sig;
    *dm = gz * g.one_minus;
    *ds = (gz * (z - m) * g.sig + gl) * g.one_minus;
    return;
  }
  const A e = exp_(-s);
  *dz = gz * e;
  *dm = -*dz;
  *ds = -gz * ((z - m) * e) - gl;
}

// CPU entry points (float32 and float64; Python upcasts 16-bit CPU tensors). dtype: gm::DType code.
void step_forward_cpu(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t z_new, std::uintptr_t ld,
                      int64_t rows, int64_t cols, int mode, int dtype);
void step_backward_cpu(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t gz, std::uintptr_t gl,
                       std::uintptr_t dz, std::uintptr_t dm, std::uintptr_t ds, int64_t rows, int64_t cols, int mode,
                       int dtype);

#ifdef GM_WITH_CUDA
// CUDA entry points: float32, float64, float16, bfloat16 storage; fp32 math (fp64 for fp64).
void step_forward_cuda(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t z_new, std::uintptr_t ld,
                       int64_t rows, int64_t cols, int mode, int dtype, std::uintptr_t stream);
void step_backward_cuda(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t gz, std::uintptr_t gl,
                        std::uintptr_t dz, std::uintptr_t dm, std::uintptr_t ds, int64_t rows, int64_t cols, int mode,
                        int dtype, std::uintptr_t stream);

// The MADE output layer fused with the step (iaf_made_output_cuda.cu): [m, s] = hidden (W ⊙ M)^T + b computed on
// tensor cores over the non-empty tiles of the (64, 64 / elem) two-head tile map, the step in the epilogue.
// hidden (rows, h_padded), weight (2d, h_padded), mask uint8 (2d, mask_ld), rows zero-padded to 16-byte multiples.
// Forward writes z_new (rows, d) and ld_partial (ceil(d / 64), rows) fp32 (summed in Python); backward writes
// dz (rows, d) and dout = d[m, s] (rows, 2d). float16/bfloat16/float32 (precision: gm::Precision code).
void made_output_forward_cuda(std::uintptr_t hidden, std::uintptr_t w, std::uintptr_t mask, std::uintptr_t bias,
                              std::uintptr_t z, std::uintptr_t z_new, std::uintptr_t ld_partial,
                              std::uintptr_t offsets, std::uintptr_t idx, std::uintptr_t mids, int rows, int d,
                              int h_padded, int mask_ld, int mode, int dtype, int precision, std::uintptr_t stream);
void made_output_backward_cuda(std::uintptr_t hidden, std::uintptr_t w, std::uintptr_t mask, std::uintptr_t bias,
                               std::uintptr_t z, std::uintptr_t gz, std::uintptr_t gl, std::uintptr_t dz,
                               std::uintptr_t dout, std::uintptr_t offsets, std::uintptr_t idx, std::uintptr_t mids,
                               int rows, int d, int h_padded, int mask_ld, int mode, int dtype, int precision,
                               std::uintptr_t stream);
#endif

}  // namespace iaf
}  // namespace gm
