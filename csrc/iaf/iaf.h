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

template <typename A>
GM_IAF_HD A sigmoid(A v) {
  return A(1) / (A(1) + exp_(-v));
}

template <typename A>
GM_IAF_HD A log_sigmoid(A s) {
  A neg_abs = s < A(0) ? s : -s;
  return (s < A(0) ? s : A(0)) - log1p_(exp_(neg_abs));
}

// Returns z'; adds the element's log-det term to *ld.
template <typename A>
GM_IAF_HD A step_forward(A z, A m, A s, int mode, A* ld) {
  if (mode == kGated) {
    *ld += log_sigmoid(s);
    return sigmoid(s) * z + sigmoid(-s) * m;
  }
  *ld -= s;
  return (z - m) * exp_(-s);
}

template <typename A>
GM_IAF_HD void step_backward(A z, A m, A s, A gz, A gl, int mode, A* dz, A* dm, A* ds) {
  if (mode == kGated) {
    A sig = sigmoid(s), one_minus = sigmoid(-s);
    *dz = gz * sig;
    *dm = gz * one_minus;
    *ds = (gz * (z - m) * sig + gl) * one_minus;
    return;
  }
  A e = exp_(-s);
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
#endif

}  // namespace iaf
}  // namespace gm
