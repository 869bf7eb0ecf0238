// Minibatch discrimination (Salimans et al. 2016) without the N x N x B x C tensor.
//
//   c_b(i, j) = exp(-sum_c |m[i,b,c] - m[j,b,c]|)             m: (N, B, C) contiguous
//   forward:   o[i, b]     = sum_{j (!= i)} c_b(i, j)           o: (N, B)
//   backward:  dm[i, b, c] = -sum_j (g[i,b] + g[j,b]) c_b(i, j) sign(m[i,b,c] - m[j,b,c]),  sign(0) = 0
//
// Both native backends scale m by log2(e) once, so that c = exp2(-sum_c |x_i - x_j|) (the sign is unchanged),
// loop over j in tiles, and recompute c in the backward: extra memory O(N B C).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define GM_MBD_HD __host__ __device__ __forceinline__
#else
#define GM_MBD_HD inline
#endif

namespace gm {
namespace minibatch {

constexpr double kLog2e = 1.4426950408889634;

// sign(d) with sign(0) = 0 (the subgradient autograd gives abs at 0), NaN -> 0 (NaN reaches the result through c).
template <typename T>
GM_MBD_HD T pair_sign(T d) {
  return static_cast<T>(d > T(0)) - static_cast<T>(d < T(0));
}

// CPU entry points (minibatch_cpu.cpp): float and double.
void forward_cpu_f32(const float* m, float* o, int64_t n, int64_t b, int64_t c, bool exclude_self);
void forward_cpu_f64(const double* m, double* o, int64_t n, int64_t b, int64_t c, bool exclude_self);
void backward_cpu_f32(const float* g, const float* m, float* dm, int64_t n, int64_t b, int64_t c, bool exclude_self);
void backward_cpu_f64(const double* g, const double* m, double* dm, int64_t n, int64_t b, int64_t c,
                      bool exclude_self);

#ifdef GM_WITH_CUDA
// CUDA entry points (minibatch_cuda.cu): m, o, g, dm in `dtype` (f32/f16/bf16; f64 too), fp32 accumulation.
// pair_steps = 0: the rows walk (every ordered pair, deterministic); splits > 1 divides its j range across blocks,
// `part` then holding splits x (the output's size) partial sums in the accumulation type (float32; float64 for
// f64), added into the output by a second kernel. pair_steps > 0: the pair walk (each unordered pair of 128-row
// tiles once, credited to both by atomic adds; `pair_steps` tile pairs a block; C <= 8 only), `part` a float32
// buffer of the output's size for f16/bf16 (unused otherwise).
void forward_cuda(std::uintptr_t m, std::uintptr_t o, int64_t n, int64_t b, int64_t c, bool exclude_self, int dtype,
                  int splits, int pair_steps, std::uintptr_t part, std::uintptr_t stream);
void backward_cuda(std::uintptr_t g, std::uintptr_t m, std::uintptr_t dm, int64_t n, int64_t b, int64_t c,
                   bool exclude_self, int dtype, int splits, int pair_steps, std::uintptr_t part,
                   std::uintptr_t stream);
#endif

}  // namespace minibatch
}  // namespace gm
