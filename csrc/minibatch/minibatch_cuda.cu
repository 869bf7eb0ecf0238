// CUDA kernels for minibatch discrimination (equations in minibatch.h).
//
// A block of 8 warps owns 8 kernels b (one per warp) and 32 * kRows rows i (kRows per lane); the m values of its
// rows, pre-scaled by log2(e), and the accumulators stay in registers. j runs in tiles of kTileJ staged through
// shared memory as [j][warp][c], so a warp's reads of one j are broadcasts. Per pair and kernel: 2C FADDs
// (|.| is an operand modifier), one MUFU.EX2 and one FADD, against the 3C "useful" operations. Only tiles that
// meet the block's rows test j != i. Inputs fp32/fp16/bf16 (fp64 too) with fp32 (fp64) accumulation.
// C <= 8 is a template parameter (fully unrolled, registers); larger C reads m from global memory (slow path).
// Small N gives too few blocks to fill the GPU ((N / 128) x (B / 8): 104 at N = 1024, B = 100 on 132 SMs), so the
// j range can be split across gridDim.z blocks: each writes its partial sums (accumulation type) to `part`
// [split][row][...], and reduce_kernel adds the splits into the output.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/tensor_args.h"
#include "minibatch/minibatch.h"

namespace gm {
namespace minibatch {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 4;
constexpr int kBlockRows = 32 * kRows;
constexpr int kTileJ = 64;
constexpr int kMaxFixedC = 8;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 2^(-d): MUFU.EX2 for float (relative error ~2^-22, subnormal results flushed to 0); exp2 for double. The negation
// is inside the asm so ptxas folds it into MUFU's source operand (computed outside, it stayed a separate FADD).
__device__ __forceinline__ float exp2_neg(float d) {
  float t, r;
  asm("neg.f32 %0, %1;" : "=f"(t) : "f"(d));  // not neg.ftz (what -d compiles to): MUFU cannot take that one
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
}
__device__ __forceinline__ double exp2_neg(double d) { return exp2(-d); }

// sum_c |xi[c] - xj[c]| (and the differences in d), starting from two terms so that every FADD takes |.| as free
// source modifiers: C subtractions and C - 1 additions (sm_90 SASS of `dist = 0; dist += |.|`: one more, an add to
// zero).
template <typename A, int C>
__device__ __forceinline__ A l1_dist(const A (&xi)[C], const A (&xj)[C], A (&d)[C]) {
#pragma unroll
  for (int c = 0; c < C; ++c) d[c] = xi[c] - xj[c];
  if constexpr (C == 1) {
    return fabs(d[0]);
  } else {
    A s = fabs(d[0]) + fabs(d[1]);
#pragma unroll
    for (int c = 2; c < C; ++c) s += fabs(d[c]);
    return s;
  }
}

// Shared-memory row of one (j, kernel b): C values padded to 1, 2, 4 or 8 so a row is one or two vector loads.
template <int C>
constexpr int padded_c() {
  return C <= 2 ? C : (C <= 4 ? 4 : 8);
}

template <typename A, int C>
__device__ __forceinline__ void load_row(const A* row, A (&x)[C]) {
  constexpr int CP = padded_c<C>();
  if constexpr (sizeof(A) == 4 && CP >= 4) {
    const float4 lo = *reinterpret_cast<const float4*>(row);
    x[0] = lo.x;
    if constexpr (C > 1) x[1] = lo.y;
    if constexpr (C > 2) x[2] = lo.z;
    if constexpr (C > 3) x[3] = lo.w;
    if constexpr (C > 4) {
      const float4 hi = *reinterpret_cast<const float4*>(row + 4);
      x[4] = hi.x;
      if constexpr (C > 5) x[5] = hi.y;
      if constexpr (C > 6) x[6] = hi.z;
      if constexpr (C > 7) x[7] = hi.w;
    }
  } else {
#pragma unroll
    for (int c = 0; c < C; ++c) x[c] = row[c];
  }
}

template <typename T, typename A>
__device__ __forceinline__ void store(T* p, A v) { *p = from_acc<T>(v); }
template <>
__device__ __forceinline__ void store<double, double>(double* p, double v) { *p = v; }

// Rows of m for this lane and warp: x[r][c] = log2(e) m[i0 + lane + 32 r, b, c] (`pad` outside the batch).
template <typename T, typename A, int C>
__device__ __forceinline__ void load_rows(const T* m, int64_t n, int64_t nb, int64_t i0, int64_t b, int lane,
                                          A (&x)[kRows][C], A pad = A(0)) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + lane + 32 * r;
#pragma unroll
    for (int c = 0; c < C; ++c)
      x[r][c] = (i < n && b < nb) ? A(kLog2e) * to_acc(m[(i * nb + b) * C + c]) : pad;
  }
}

// Stage m[j0 .. j0 + kTileJ, b0 .. b0 + kWarps, :] (scaled, `pad` outside) into xs[j][w][c]; and g likewise (0
// outside) when given.
template <typename T, typename A, int C>
__device__ __forceinline__ void stage_tile(const T* m, const T* g, int64_t n, int64_t nb, int64_t j0, int64_t b0,
                                           A (*xs)[kWarps][padded_c<C>()], A (*gs)[kWarps], A pad = A(0)) {
  for (int e = threadIdx.x; e < kTileJ * kWarps * C; e += kThreads) {
    const int jj = e / (kWarps * C), w = (e / C) % kWarps, c = e % C;
    const int64_t j = j0 + jj, b = b0 + w;
    xs[jj][w][c] = (j < n && b < nb) ? A(kLog2e) * to_acc(m[(j * nb + b) * C + c]) : pad;
  }
  if (g != nullptr) {
    for (int e = threadIdx.x; e < kTileJ * kWarps; e += kThreads) {
      const int jj = e / kWarps, w = e % kWarps;
      const int64_t j = j0 + jj, b = b0 + w;
      gs[jj][w] = (j < n && b < nb) ? to_acc(g[j * nb + b]) : A(0);
    }
  }
}

// The rows walk over one staged tile: each j of xs against the lane's kRows rows, credited to the rows alone;
// j = i left out where `check` (self = i0 + lane - j0: the tile index of the lane's row r = 0).
template <typename A, int C>
__device__ __forceinline__ void fwd_rows_tile(const A (*xs)[kWarps][padded_c<C>()], int warp, int jn,
                                              const A (&xi)[kRows][C], A (&acc)[kRows], bool check, int self) {
  for (int jj = 0; jj < jn; ++jj) {
    A xj[C];
    load_row<A, C>(xs[jj][warp], xj);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      A d[C];
      A e = exp2_neg(l1_dist<A, C>(xi[r], xj, d));
      if (check && jj == self + 32 * r) e = A(0);
      acc[r] += e;
    }
  }
}

// The backward's: acc[r][c] += (g_i + g_j) c(i, j) sign(x_i[c] - x_j[c]) (negated when stored).
template <typename A, int C>
__device__ __forceinline__ void bwd_rows_tile(const A (*xs)[kWarps][padded_c<C>()], const A (*gs)[kWarps], int warp,
                                              int jn, const A (&xi)[kRows][C], const A (&gi)[kRows],
                                              A (&acc)[kRows][C], bool check, int self) {
  for (int jj = 0; jj < jn; ++jj) {
    A xj[C];
    load_row<A, C>(xs[jj][warp], xj);
    const A gj = gs[jj][warp];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      A d[C];
      A w = (gi[r] + gj) * exp2_neg(l1_dist<A, C>(xi[r], xj, d));
      if (check && jj == self + 32 * r) w = A(0);
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r][c] += w * pair_sign(d[c]);
    }
  }
}

template <typename T, int C>
__global__ void __launch_bounds__(kThreads) minibatch_fwd_kernel(const T* __restrict__ m, T* __restrict__ o,
                                                                  typename AccOf<T>::type* __restrict__ part,
                                                                  int64_t n, int64_t nb, int64_t j_chunk,
                                                                  bool exclude_self) {
  using A = typename AccOf<T>::type;
  __shared__ __align__(16) A xs[kTileJ][kWarps][padded_c<C>()];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b0 = int64_t(blockIdx.y) * kWarps, b = b0 + warp;
  const int64_t i0 = int64_t(blockIdx.x) * kBlockRows;
  A xi[kRows][C];
  A acc[kRows];
  load_rows<T, A, C>(m, n, nb, i0, b, lane, xi);
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = A(0);
  const int64_t j_begin = int64_t(blockIdx.z) * j_chunk, j_end = min(n, j_begin + j_chunk);

  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileJ) {
    __syncthreads();
    stage_tile<T, A, C>(m, nullptr, j_end, nb, j0, b0, xs, nullptr);
    __syncthreads();
    const int jn = int(min(int64_t(kTileJ), j_end - j0));
    const bool check = exclude_self && j0 < i0 + kBlockRows && i0 < j0 + kTileJ;  // block-uniform
    fwd_rows_tile<A, C>(xs, warp, jn, xi, acc, check, check ? int(i0 + lane - j0) : 0);
  }
  if (b < nb) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + lane + 32 * r;
      if (i >= n) continue;
      if (part != nullptr)
        part[(int64_t(blockIdx.z) * n + i) * nb + b] = acc[r];
      else
        store(o + i * nb + b, acc[r]);
    }
  }
}

template <typename T, int C>
__global__ void __launch_bounds__(kThreads) minibatch_bwd_kernel(const T* __restrict__ g, const T* __restrict__ m,
                                                                  T* __restrict__ dm,
                                                                  typename AccOf<T>::type* __restrict__ part,
                                                                  int64_t n, int64_t nb, int64_t j_chunk,
                                                                  bool exclude_self) {
  using A = typename AccOf<T>::type;
  __shared__ __align__(16) A xs[kTileJ][kWarps][padded_c<C>()];
  __shared__ A gs[kTileJ][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b0 = int64_t(blockIdx.y) * kWarps, b = b0 + warp;
  const int64_t i0 = int64_t(blockIdx.x) * kBlockRows;
  A xi[kRows][C];
  A acc[kRows][C];
  A gi[kRows];
  load_rows<T, A, C>(m, n, nb, i0, b, lane, xi);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + lane + 32 * r;
    gi[r] = (i < n && b < nb) ? to_acc(g[i * nb + b]) : A(0);
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = A(0);
  }
  const int64_t j_begin = int64_t(blockIdx.z) * j_chunk, j_end = min(n, j_begin + j_chunk);

  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileJ) {
    __syncthreads();
    stage_tile<T, A, C>(m, g, j_end, nb, j0, b0, xs, gs);
    __syncthreads();
    const int jn = int(min(int64_t(kTileJ), j_end - j0));
    const bool check = exclude_self && j0 < i0 + kBlockRows && i0 < j0 + kTileJ;
    bwd_rows_tile<A, C>(xs, gs, warp, jn, xi, gi, acc, check, check ? int(i0 + lane - j0) : 0);
  }
  if (b < nb) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + lane + 32 * r;
      if (i >= n) continue;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (part != nullptr)
          part[((int64_t(blockIdx.z) * n + i) * nb + b) * C + c] = -acc[r][c];
        else
          store(dm + (i * nb + b) * C + c, -acc[r][c]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The pair walk. c_b(i, j) is symmetric and sign(m_i - m_j) antisymmetric, so each unordered pair of 128-row tiles
// is visited once and credited to both: the block's rows (registers, as above) and the staged tile's rows, whose
// share is summed over the warp's lanes. Row tile I meets J = (I + k) mod T for k = 0 .. T / 2 (T tiles; for even T
// the k = T / 2 pair belongs to the lower tile alone), so every tile has T / 2 + 1 partners; k = 0 (I with itself)
// takes the rows walk above. A block takes `steps` consecutive k of one I. Both sides reach the output through
// atomic adds into a zeroed buffer of the accumulation type: not deterministic in the last bits, which is why
// torch.use_deterministic_algorithms selects the rows walk (gm/ops/minibatch.py).
// Rows outside the batch hold the largest finite value (`kFar`) instead of 0: their distance to any real row
// overflows to +inf, so their c is exactly 0 and they add nothing to the real rows' sums, with no test per pair.

template <typename A> struct Far;
template <> struct Far<float> { static constexpr float value = 3.402823466e38f; };
template <> struct Far<double> { static constexpr double value = 1.7976931348623157e308; };

// p[u] summed over the warp's 32 lanes, for u = lane >> (5 - log2 G), and returned: a transposing reduction (each
// exchange halves the values a lane keeps, then plain butterflies): 2 G - 1 + 5 - log2 G shuffles for G sums,
// against 5 G for G separate butterflies.
template <int G, typename A>
__device__ __forceinline__ A warp_transpose_sum(A (&p)[G], int lane) {
  static_assert(G == 2 || G == 4 || G == 8 || G == 16, "G: a power of two from 2 to 16");
  constexpr unsigned kAll = 0xffffffffu;
  int s = 16;
#pragma unroll
  for (int h = G / 2; h >= 1; h /= 2, s /= 2) {
    const bool upper = (lane & s) != 0;
#pragma unroll
    for (int q = 0; q < h; ++q) {
      const A keep = upper ? p[q + h] : p[q];
      const A send = upper ? p[q] : p[q + h];
      p[q] = keep + __shfl_xor_sync(kAll, send, s);
    }
  }
#pragma unroll
  for (; s >= 1; s /= 2) p[0] += __shfl_xor_sync(kAll, p[0], s);
  return p[0];
}

// The block's tile pairs: I and the k range [k_begin, k_end), the last step dropped where it is the upper tile's
// share of the k = T / 2 pair.
struct PairSteps {
  int I, k_begin, k_end;
};
__device__ __forceinline__ PairSteps pair_steps(int tiles, int steps) {
  PairSteps p;
  p.I = int(blockIdx.x % unsigned(tiles));
  p.k_begin = int(blockIdx.x / unsigned(tiles)) * steps;
  p.k_end = min(p.k_begin + steps, tiles / 2 + 1);
  if (tiles % 2 == 0 && p.k_end == tiles / 2 + 1 && p.I >= tiles / 2) --p.k_end;
  return p;
}

constexpr int kFwdGroup = 8;  // j per transposing reduction: forward (one sum per j)
constexpr int kBwdGroup = 4;  // backward (C sums per j: the registers of C x G partial sums)

template <typename T, int C>
__global__ void __launch_bounds__(kThreads) minibatch_pair_fwd_kernel(const T* __restrict__ m,
                                                                       typename AccOf<T>::type* __restrict__ o,
                                                                       int64_t n, int64_t nb, int tiles, int steps,
                                                                       bool exclude_self) {
  using A = typename AccOf<T>::type;
  constexpr int G = kFwdGroup, kShift = G == 8 ? 2 : 3;
  __shared__ __align__(16) A xs[kTileJ][kWarps][padded_c<C>()];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b0 = int64_t(blockIdx.y) * kWarps, b = b0 + warp;
  const PairSteps ps = pair_steps(tiles, steps);
  const int64_t i0 = int64_t(ps.I) * kBlockRows;
  A xi[kRows][C];
  A acc[kRows];
  load_rows<T, A, C>(m, n, nb, i0, b, lane, xi, Far<A>::value);
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = A(0);

  for (int k = ps.k_begin; k < ps.k_end; ++k) {
    const int64_t jt = int64_t((ps.I + k) % tiles) * kBlockRows;
    for (int64_t j0 = jt; j0 < min(n, jt + kBlockRows); j0 += kTileJ) {
      __syncthreads();
      stage_tile<T, A, C>(m, nullptr, n, nb, j0, b0, xs, nullptr, Far<A>::value);
      __syncthreads();
      if (k == 0) {  // the tile with itself: each ordered pair, rows only
        fwd_rows_tile<A, C>(xs, warp, int(min(int64_t(kTileJ), n - j0)), xi, acc, exclude_self,
                            int(i0 + lane - j0));
        continue;
      }
      for (int jg = 0; jg < kTileJ; jg += G) {
        A p[G];
#pragma unroll
        for (int u = 0; u < G; ++u) {
          A xj[C];
          load_row<A, C>(xs[jg + u][warp], xj);
          A e[kRows];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            A d[C];
            e[r] = exp2_neg(l1_dist<A, C>(xi[r], xj, d));
            acc[r] += e[r];
          }
          p[u] = (e[0] + e[1]) + (e[2] + e[3]);
        }
        const A v = warp_transpose_sum<G, A>(p, lane);
        const int64_t j = j0 + jg + (lane >> kShift);
        if ((lane & ((1 << kShift) - 1)) == 0 && j < n && b < nb) atomicAdd(o + j * nb + b, v);
      }
    }
  }
  if (b < nb) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + lane + 32 * r;
      if (i < n) atomicAdd(o + i * nb + b, acc[r]);
    }
  }
}

template <typename T, int C>
__global__ void __launch_bounds__(kThreads) minibatch_pair_bwd_kernel(const T* __restrict__ g,
                                                                       const T* __restrict__ m,
                                                                       typename AccOf<T>::type* __restrict__ dm,
                                                                       int64_t n, int64_t nb, int tiles, int steps,
                                                                       bool exclude_self) {
  using A = typename AccOf<T>::type;
  constexpr int G = kBwdGroup, kShift = G == 8 ? 2 : 3;
  __shared__ __align__(16) A xs[kTileJ][kWarps][padded_c<C>()];
  __shared__ A gs[kTileJ][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b0 = int64_t(blockIdx.y) * kWarps, b = b0 + warp;
  const PairSteps ps = pair_steps(tiles, steps);
  const int64_t i0 = int64_t(ps.I) * kBlockRows;
  A xi[kRows][C];
  A acc[kRows][C];
  A gi[kRows];
  load_rows<T, A, C>(m, n, nb, i0, b, lane, xi, Far<A>::value);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + lane + 32 * r;
    gi[r] = (i < n && b < nb) ? to_acc(g[i * nb + b]) : A(0);
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = A(0);
  }

  for (int k = ps.k_begin; k < ps.k_end; ++k) {
    const int64_t jt = int64_t((ps.I + k) % tiles) * kBlockRows;
    for (int64_t j0 = jt; j0 < min(n, jt + kBlockRows); j0 += kTileJ) {
      __syncthreads();
      stage_tile<T, A, C>(m, g, n, nb, j0, b0, xs, gs, Far<A>::value);
      __syncthreads();
      if (k == 0) {
        bwd_rows_tile<A, C>(xs, gs, warp, int(min(int64_t(kTileJ), n - j0)), xi, gi, acc, exclude_self,
                            int(i0 + lane - j0));
        continue;
      }
      for (int jg = 0; jg < kTileJ; jg += G) {
        A p[C][G];  // sum over the lane's rows of (g_i + g_j) c(i, j) sign(x_i - x_j), per dim and j
#pragma unroll
        for (int u = 0; u < G; ++u) {
          A xj[C];
          load_row<A, C>(xs[jg + u][warp], xj);
          const A gj = gs[jg + u][warp];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            A d[C];
            const A w = (gi[r] + gj) * exp2_neg(l1_dist<A, C>(xi[r], xj, d));
#pragma unroll
            for (int c = 0; c < C; ++c) {
              const A t = w * pair_sign(d[c]);
              acc[r][c] += t;
              p[c][u] = r == 0 ? t : p[c][u] + t;
            }
          }
        }
        const int64_t j = j0 + jg + (lane >> kShift);
        const bool writer = (lane & ((1 << kShift) - 1)) == 0 && j < n && b < nb;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const A v = warp_transpose_sum<G, A>(p[c], lane);
          if (writer) atomicAdd(dm + (j * nb + b) * C + c, v);  // dm[j] = -sum_i ... sign(x_j - x_i): +v
        }
      }
    }
  }
  if (b < nb) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + lane + 32 * r;
      if (i >= n) continue;
#pragma unroll
      for (int c = 0; c < C; ++c) atomicAdd(dm + (i * nb + b) * C + c, -acc[r][c]);
    }
  }
}

// Slow path for C > kMaxFixedC: one thread per (i, b), m read from global memory (cached), C at run time.
template <typename T>
__global__ void minibatch_generic_kernel(const T* __restrict__ g, const T* __restrict__ m, T* __restrict__ out,
                                         int64_t n, int64_t nb, int64_t nc, bool exclude_self) {
  using A = typename AccOf<T>::type;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * nb) return;
  const int64_t i = idx / nb, b = idx % nb;
  const T* mi = m + (i * nb + b) * nc;
  if (g == nullptr) {
    A acc = A(0);
    for (int64_t j = 0; j < n; ++j) {
      if (exclude_self && j == i) continue;
      const T* mj = m + (j * nb + b) * nc;
      A d = A(0);
      for (int64_t c = 0; c < nc; ++c) d += fabs(A(kLog2e) * (to_acc(mi[c]) - to_acc(mj[c])));
      acc += exp2_neg(d);
    }
    store(out + idx, acc);
    return;
  }
  const A gi = to_acc(g[idx]);
  for (int64_t c = 0; c < nc; ++c) {  // recompute c(i, j) per c: C x the exps, acceptable on this path
    A acc = A(0);
    for (int64_t j = 0; j < n; ++j) {
      if (exclude_self && j == i) continue;
      const T* mj = m + (j * nb + b) * nc;
      A d = A(0);
      for (int64_t k = 0; k < nc; ++k) d += fabs(A(kLog2e) * (to_acc(mi[k]) - to_acc(mj[k])));
      acc += (gi + to_acc(g[j * nb + b])) * exp2_neg(d) * pair_sign(to_acc(mi[c]) - to_acc(mj[c]));
    }
    store(out + idx * nc + c, -acc);
  }
}

// out[e] = sum over the splits of part[split][e], in the accumulation type, rounded once.
template <typename T>
__global__ void reduce_kernel(const typename AccOf<T>::type* __restrict__ part, T* __restrict__ out, int64_t total,
                              int splits) {
  using A = typename AccOf<T>::type;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    A sum = A(0);
    for (int s = 0; s < splits; ++s) sum += part[int64_t(s) * total + e];
    store(out + e, sum);
  }
}

// The pair walk's launch: `steps` tile pairs a block, both sides added atomically into the zeroed output (float32
// and float64) or into `part` (float32, N x B (x C)) and rounded into the output by reduce_kernel (16-bit types).
template <typename T, int C>
void launch_pairs(const T* g, const T* m, T* out, int64_t n, int64_t nb, bool exclude_self, int steps,
                  typename AccOf<T>::type* part, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr bool kDirect = std::is_same<T, A>::value;
  if (steps < 1 || (!kDirect && part == nullptr))
    throw std::invalid_argument("gm minibatch (cuda): the pair walk takes steps >= 1 (and a float32 buffer for "
                                "16-bit types)");
  const int64_t tiles = (n + kBlockRows - 1) / kBlockRows;
  const int64_t per_tile = (tiles / 2 + 1 + steps - 1) / steps;  // blocks per row tile
  if (tiles * per_tile > 2147483647LL) throw std::invalid_argument("gm minibatch (cuda): N too large for the grid");
  const dim3 grid(unsigned(tiles * per_tile), unsigned((nb + kWarps - 1) / kWarps));
  if (grid.y > 65535) throw std::invalid_argument("gm minibatch (cuda): B must be below 524280");
  const int64_t total = n * nb * (g == nullptr ? 1 : C);
  A* acc = kDirect ? reinterpret_cast<A*>(out) : part;
  GM_CUDA_CHECK(cudaMemsetAsync(acc, 0, size_t(total) * sizeof(A), stream));
  if (g == nullptr)
    minibatch_pair_fwd_kernel<T, C><<<grid, kThreads, 0, stream>>>(m, acc, n, nb, int(tiles), steps, exclude_self);
  else
    minibatch_pair_bwd_kernel<T, C><<<grid, kThreads, 0, stream>>>(g, m, acc, n, nb, int(tiles), steps,
                                                                    exclude_self);
  GM_CUDA_CHECK_LAUNCH();
  if (!kDirect) {
    const unsigned blocks = unsigned(std::min<int64_t>((total + 255) / 256, 4096));
    reduce_kernel<T><<<blocks, 256, 0, stream>>>(part, out, total, 1);
    GM_CUDA_CHECK_LAUNCH();
  }
}

// pair_steps > 0: the pair walk with that many tile pairs a block; 0: the rows walk, its j range in `splits` parts.
template <typename T, int C = 1>
void launch(const T* g, const T* m, T* out, int64_t n, int64_t nb, int64_t nc, bool exclude_self, int splits,
            int pair_steps, typename AccOf<T>::type* part, cudaStream_t stream) {
  if constexpr (C <= kMaxFixedC) {
    if (nc != C) return launch<T, C + 1>(g, m, out, n, nb, nc, exclude_self, splits, pair_steps, part, stream);
    if (pair_steps > 0) return launch_pairs<T, C>(g, m, out, n, nb, exclude_self, pair_steps, part, stream);
    if (splits < 1 || splits > 65535 || (splits > 1 && part == nullptr))
      throw std::invalid_argument("gm minibatch (cuda): splits must be 1..65535, with a partial-sum buffer if > 1");
    const int64_t j_chunk = ((n + splits - 1) / splits + kTileJ - 1) / kTileJ * kTileJ;  // whole j tiles
    const unsigned z = unsigned((n + j_chunk - 1) / j_chunk);
    const dim3 grid(unsigned((n + kBlockRows - 1) / kBlockRows), unsigned((nb + kWarps - 1) / kWarps), z);
    if (grid.y > 65535) throw std::invalid_argument("gm minibatch (cuda): B must be below 524280");
    typename AccOf<T>::type* p = z > 1 ? part : nullptr;
    if (g == nullptr)
      minibatch_fwd_kernel<T, C><<<grid, kThreads, 0, stream>>>(m, out, p, n, nb, j_chunk, exclude_self);
    else
      minibatch_bwd_kernel<T, C><<<grid, kThreads, 0, stream>>>(g, m, out, p, n, nb, j_chunk, exclude_self);
    GM_CUDA_CHECK_LAUNCH();
    if (z > 1) {
      const int64_t total = n * nb * (g == nullptr ? 1 : C);
      const unsigned blocks = unsigned(std::min<int64_t>((total + 255) / 256, 4096));
      reduce_kernel<T><<<blocks, 256, 0, stream>>>(part, out, total, int(z));
      GM_CUDA_CHECK_LAUNCH();
    }
  } else {
    const int64_t total = n * nb;
    minibatch_generic_kernel<T><<<unsigned((total + 255) / 256), 256, 0, stream>>>(g, m, out, n, nb, nc,
                                                                                   exclude_self);
    GM_CUDA_CHECK_LAUNCH();
  }
}

void dispatch(std::uintptr_t g, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t nb, int64_t nc,
              bool exclude_self, int dtype, int splits, int pair_steps, std::uintptr_t part, std::uintptr_t stream) {
  if (n <= 0 || nb <= 0 || nc <= 0) return;
  const cudaStream_t s = to_stream(stream);
  switch (to_dtype(dtype)) {
    case DType::f32:
      return launch(ptr<const float>(g), ptr<const float>(m), ptr<float>(out), n, nb, nc, exclude_self, splits,
                    pair_steps, ptr<float>(part), s);
    case DType::f64:
      return launch(ptr<const double>(g), ptr<const double>(m), ptr<double>(out), n, nb, nc, exclude_self, splits,
                    pair_steps, ptr<double>(part), s);
    case DType::f16:
      return launch(ptr<const __half>(g), ptr<const __half>(m), ptr<__half>(out), n, nb, nc, exclude_self, splits,
                    pair_steps, ptr<float>(part), s);
    case DType::bf16:
      return launch(ptr<const __nv_bfloat16>(g), ptr<const __nv_bfloat16>(m), ptr<__nv_bfloat16>(out), n, nb, nc,
                    exclude_self, splits, pair_steps, ptr<float>(part), s);
  }
}

}  // namespace

void forward_cuda(std::uintptr_t m, std::uintptr_t o, int64_t n, int64_t b, int64_t c, bool exclude_self, int dtype,
                  int splits, int pair_steps, std::uintptr_t part, std::uintptr_t stream) {
  dispatch(0, m, o, n, b, c, exclude_self, dtype, splits, pair_steps, part, stream);
}

void backward_cuda(std::uintptr_t g, std::uintptr_t m, std::uintptr_t dm, int64_t n, int64_t b, int64_t c,
                   bool exclude_self, int dtype, int splits, int pair_steps, std::uintptr_t part,
                   std::uintptr_t stream) {
  dispatch(g, m, dm, n, b, c, exclude_self, dtype, splits, pair_steps, part, stream);
}

}  // namespace minibatch
}  // namespace gm
