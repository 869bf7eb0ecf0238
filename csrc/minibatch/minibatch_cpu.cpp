// C++ CPU kernels for minibatch discrimination (see minibatch.h for the equations).
//
// m is transposed once to x (B, C, N), scaled by log2(e), so that for a fixed (i, b) the loop over j reads C
// contiguous rows and vectorises. OpenMP splits the (b, i) rows; each row is O(N C) work, done by one call of a
// function compiled for x86-64-v4 (AVX-512), v3 (AVX2+FMA) and baseline x86-64 (target_clones, picked at load
// time); its helpers are always inlined so they take the clone's instruction set. C <= 8 runs fully unrolled
// code, larger C a tiled loop. j = i is skipped by splitting the range, so exclude_self is exact.
// Where there are at least as many kernels b as threads (the papers' B = 100 on any CPU) and C <= 8, each thread
// takes whole kernels instead and computes each unordered pair (i, j) once, crediting both rows (c is symmetric,
// the sign antisymmetric): half the pair work of the row-by-row path.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "minibatch/minibatch.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gm {
namespace minibatch {
namespace {

constexpr int64_t kTile = 256;

// ISA levels, not CPU names: "arch=haswell" would test __builtin_cpu_is and never match an AMD CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define GM_MBD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define GM_MBD_INLINE inline __attribute__((always_inline))
#else
#define GM_MBD_CLONES
#define GM_MBD_INLINE inline
#endif

// 2^y for y <= 0: y = n + f, f in [-1/2, 1/2], 2^f by its degree-7 Taylor series in f ln 2 (error < 1e-8 relative),
// 2^n from the exponent bits. y <= -127 gives exactly 0; NaN stays NaN. Branch-free, so the j loop vectorises.
GM_MBD_INLINE float exp2_nonpositive(float y) {
  y = y < -127.0f ? -127.0f : y;
  const float magic = 12582912.0f;  // 1.5 * 2^23: (y + magic) - magic rounds to the nearest integer
  float n = (y + magic) - magic;
  float z = (y - n) * 0.69314718055994531f;
  float p = 1.0f / 5040;
  p = p * z + 1.0f / 720;
  p = p * z + 1.0f / 120;
  p = p * z + 1.0f / 24;
  p = p * z + 1.0f / 6;
  p = p * z + 0.5f;
  p = p * z + 1.0f;
  p = p * z + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp2_nonpositive(double y) { return std::exp2(y); }

// dist[t] = sum_c |x[c, i] - x[c, j0 + t]| for t < len.
template <typename T>
GM_MBD_INLINE void tile_distance(const T* x, int64_t n, int64_t nc, int64_t i, int64_t j0, int64_t len, T* dist) {
  for (int64_t t = 0; t < len; ++t) dist[t] = T(0);
  for (int64_t c = 0; c < nc; ++c) {
    const T* xc = x + c * n + j0;
    const T v = x[c * n + i];
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) dist[t] += std::abs(v - xc[t]);
  }
}

template <typename T>
GM_MBD_INLINE T range_sum(const T* x, int64_t n, int64_t nc, int64_t i, int64_t begin, int64_t end) {
  T dist[kTile];
  T acc = T(0);
  for (int64_t j0 = begin; j0 < end; j0 += kTile) {
    const int64_t len = std::min(kTile, end - j0);
    tile_distance(x, n, nc, i, j0, len, dist);
#pragma omp simd reduction(+ : acc)
    for (int64_t t = 0; t < len; ++t) acc += exp2_nonpositive(-dist[t]);
  }
  return acc;
}

// acc[c] += sum_{j in [begin, end)} (g[i] + g[j]) c(i, j) sign(x[c, i] - x[c, j]).
template <typename T>
GM_MBD_INLINE void range_grad(const T* x, const T* g, int64_t n, int64_t nc, int64_t i, int64_t begin, int64_t end,
                              T* acc) {
  const T gi = g[i];
  T dist[kTile];
  for (int64_t j0 = begin; j0 < end; j0 += kTile) {
    const int64_t len = std::min(kTile, end - j0);
    tile_distance(x, n, nc, i, j0, len, dist);
    const T* gj = g + j0;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) dist[t] = (gi + gj[t]) * exp2_nonpositive(-dist[t]);  // now the weight w
    for (int64_t c = 0; c < nc; ++c) {
      const T* xc = x + c * n + j0;
      const T v = x[c * n + i];
      T s = T(0);
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < len; ++t) s += dist[t] * pair_sign(v - xc[t]);
      acc[c] += s;
    }
  }
}

// One row (i, b) of the forward; x points at kernel b's (C, N) slab.
template <typename T>
GM_MBD_INLINE T forward_row(const T* x, int64_t n, int64_t nc, int64_t i, bool exclude_self) {
  if (!exclude_self) return range_sum(x, n, nc, i, 0, n);
  return range_sum(x, n, nc, i, 0, i) + range_sum(x, n, nc, i, i + 1, n);
}

// out (C,) = dm[i, b, :]; x is kernel b's (C, N) slab, g its (N,) gradient row.
template <typename T>
GM_MBD_INLINE void backward_row(const T* x, const T* g, int64_t n, int64_t nc, int64_t i, bool exclude_self, T* out) {
  for (int64_t c = 0; c < nc; ++c) out[c] = T(0);
  // The j = i term is g * 1 * sign(0) = 0 either way; splitting keeps Inf/NaN rows exactly like the reference.
  if (exclude_self) {
    range_grad(x, g, n, nc, i, 0, i, out);
    range_grad(x, g, n, nc, i, i + 1, n, out);
  } else {
    range_grad(x, g, n, nc, i, 0, n, out);
  }
  for (int64_t c = 0; c < nc; ++c) out[c] = -out[c];
}

// The same rows with C known at compile time (C <= kMaxFixedC, the common sizes): the c loop unrolls inside the
// vectorised j loop, so distances never leave registers and the exp and the sums are fused into one pass.
constexpr int kMaxFixedC = 8;

template <typename T, int NC>
GM_MBD_INLINE T range_sum_fixed(const T* x, int64_t n, int64_t i, int64_t begin, int64_t end) {
  T xi[NC];
  for (int c = 0; c < NC; ++c) xi[c] = x[c * n + i];
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t j = begin; j < end; ++j) {
    T dist = T(0);
    for (int c = 0; c < NC; ++c) dist += std::abs(xi[c] - x[c * n + j]);
    acc += exp2_nonpositive(-dist);
  }
  return acc;
}

// w[t] = (g_i + g_j) c(i, j) for j = j0 + t, t < len: distances, exp and weights in one vectorised pass.
template <typename T, int NC>
GM_MBD_INLINE void tile_weights(const T* __restrict x, const T* __restrict g, int64_t n, const T* xi, T gi, int64_t j0,
                                int64_t len, T* __restrict w) {
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) {
    T dist = T(0);
    for (int c = 0; c < NC; ++c) dist += std::abs(xi[c] - x[c * n + j0 + t]);
    w[t] = (gi + g[j0 + t]) * exp2_nonpositive(-dist);
  }
}

// Per tile: the weights w_j = (g_i + g_j) c(i, j) in one fused pass, then one vectorised reduction per c (a reduction
// over an array of C accumulators in one simd loop measured 2x slower).
template <typename T, int NC>
GM_MBD_INLINE void range_grad_fixed(const T* x, const T* g, int64_t n, int64_t i, int64_t begin, int64_t end, T* out) {
  T xi[NC];
  for (int c = 0; c < NC; ++c) xi[c] = x[c * n + i];
  const T gi = g[i];
  T w[kTile];
  for (int64_t j0 = begin; j0 < end; j0 += kTile) {
    const int64_t len = std::min(kTile, end - j0);
    tile_weights<T, NC>(x, g, n, xi, gi, j0, len, w);
    for (int c = 0; c < NC; ++c) {
      const T* xc = x + c * n + j0;
      T s = T(0);
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < len; ++t) s += w[t] * pair_sign(xi[c] - xc[t]);
      out[c] += s;
    }
  }
}

template <typename T, int NC = 1>
GM_MBD_INLINE T forward_row_any(const T* x, int64_t n, int64_t nc, int64_t i, bool exclude_self) {
  if constexpr (NC <= kMaxFixedC) {
    if (nc != NC) return forward_row_any<T, NC + 1>(x, n, nc, i, exclude_self);
    if (!exclude_self) return range_sum_fixed<T, NC>(x, n, i, 0, n);
    return range_sum_fixed<T, NC>(x, n, i, 0, i) + range_sum_fixed<T, NC>(x, n, i, i + 1, n);
  } else {
    return forward_row(x, n, nc, i, exclude_self);
  }
}

template <typename T, int NC = 1>
GM_MBD_INLINE void backward_row_any(const T* x, const T* g, int64_t n, int64_t nc, int64_t i, bool exclude_self,
                                    T* out) {
  if constexpr (NC <= kMaxFixedC) {
    if (nc != NC) return backward_row_any<T, NC + 1>(x, g, n, nc, i, exclude_self, out);
    for (int c = 0; c < NC; ++c) out[c] = T(0);
    if (exclude_self) {
      range_grad_fixed<T, NC>(x, g, n, i, 0, i, out);
      range_grad_fixed<T, NC>(x, g, n, i, i + 1, n, out);
    } else {
      range_grad_fixed<T, NC>(x, g, n, i, 0, n, out);
    }
    for (int c = 0; c < NC; ++c) out[c] = -out[c];
  } else {
    backward_row(x, g, n, nc, i, exclude_self, out);
  }
}

// The symmetric slab walks: one thread, one kernel's (C, N) slab x, rows i in order, pairs j > i. The forward
// adds c(i, j) to row i's sum and to o_row[j]; the backward adds v = w sign(x_i - x_j), w = (g_i + g_j) c(i, j), to
// row i's sum and to acc[c, j], so that dm[i] = acc[:, i] (the pairs (i', i), i' < i, seen from row i': v is
// -(row i's term)) minus row i's own sum. The j = i term (exclude_self=False) is computed as the row path computes
// it: 1 (NaN for a NaN row) forward, 0 (NaN for a NaN row) backward.
template <typename T, int NC>
GM_MBD_INLINE T self_distance(const T* xi) {
  T d = T(0);
  for (int c = 0; c < NC; ++c) d += std::abs(xi[c] - xi[c]);
  return d;
}

template <typename T, int NC>
GM_MBD_INLINE void forward_slab_sym(const T* __restrict x, int64_t n, bool exclude_self, T* __restrict orow) {
  for (int64_t j = 0; j < n; ++j) orow[j] = T(0);
  for (int64_t i = 0; i < n; ++i) {
    T xi[NC];
    for (int c = 0; c < NC; ++c) xi[c] = x[c * n + i];
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t j = i + 1; j < n; ++j) {
      T dist = T(0);
      for (int c = 0; c < NC; ++c) dist += std::abs(xi[c] - x[c * n + j]);
      const T e = exp2_nonpositive(-dist);
      acc += e;
      orow[j] += e;
    }
    if (!exclude_self) acc += exp2_nonpositive(-self_distance<T, NC>(xi));
    orow[i] += acc;
  }
}

// Rows go in pairs (a, b) = (i, i + 1): both walk j > b in one pass over x[:, j], g[j] and acc[:, j] (half the loops,
// loads and accumulator updates of walking them one by one); the pair (a, b) itself is done first, by itself.
template <typename T, int NC>
GM_MBD_INLINE void finish_grad_row(const T* xr, T gr, bool exclude_self, const T* acc, int64_t n, int64_t r, T* own,
                                   T* dm) {
  if (!exclude_self) {
    const T wrr = (gr + gr) * exp2_nonpositive(-self_distance<T, NC>(xr));
    for (int c = 0; c < NC; ++c) own[c] += wrr * pair_sign(xr[c] - xr[c]);
  }
  for (int c = 0; c < NC; ++c) dm[c] = acc[c * n + r] - own[c];
}

template <typename T, int NC>
GM_MBD_INLINE void backward_slab_sym(const T* __restrict x, const T* __restrict g, int64_t n, bool exclude_self,
                                     T* __restrict acc, T* __restrict dm, int64_t dm_stride) {
  for (int64_t k = 0; k < NC * n; ++k) acc[k] = T(0);
  T wa[kTile], wb[kTile];
  int64_t i = 0;
  for (; i + 1 < n; i += 2) {
    const int64_t a = i, b = i + 1;
    T xa[NC], xb[NC], own_a[NC], own_b[NC];
    for (int c = 0; c < NC; ++c) xa[c] = x[c * n + a], xb[c] = x[c * n + b], own_a[c] = own_b[c] = T(0);
    const T ga = g[a], gb = g[b];
    T dab = T(0);
    for (int c = 0; c < NC; ++c) dab += std::abs(xa[c] - xb[c]);
    const T wab = (ga + gb) * exp2_nonpositive(-dab);
    for (int c = 0; c < NC; ++c) {
      const T v = wab * pair_sign(xa[c] - xb[c]);
      own_a[c] += v;
      acc[c * n + b] += v;
    }
    for (int64_t j0 = b + 1; j0 < n; j0 += kTile) {
      const int64_t len = std::min(kTile, n - j0);
      tile_weights<T, NC>(x, g, n, xa, ga, j0, len, wa);
      tile_weights<T, NC>(x, g, n, xb, gb, j0, len, wb);
      for (int c = 0; c < NC; ++c) {
        const T* xc = x + c * n + j0;
        T* ac = acc + c * n + j0;
        T sa = T(0), sb = T(0);
#pragma omp simd reduction(+ : sa, sb)
        for (int64_t t = 0; t < len; ++t) {
          const T va = wa[t] * pair_sign(xa[c] - xc[t]);
          const T vb = wb[t] * pair_sign(xb[c] - xc[t]);
          sa += va;
          sb += vb;
          ac[t] += va + vb;
        }
        own_a[c] += sa;
        own_b[c] += sb;
      }
    }
    finish_grad_row<T, NC>(xa, ga, exclude_self, acc, n, a, own_a, dm + a * dm_stride);
    finish_grad_row<T, NC>(xb, gb, exclude_self, acc, n, b, own_b, dm + b * dm_stride);
  }
  if (i < n) {  // the last row of an odd N: its pairs were all credited by the rows before it
    T xr[NC], own[NC];
    for (int c = 0; c < NC; ++c) xr[c] = x[c * n + i], own[c] = T(0);
    finish_grad_row<T, NC>(xr, g[i], exclude_self, acc, n, i, own, dm + i * dm_stride);
  }
}

template <typename T, int NC = 1>
GM_MBD_INLINE void forward_slab_any(const T* x, int64_t n, int64_t nc, bool ex, T* orow) {
  if constexpr (NC < kMaxFixedC) {
    if (nc != NC) return forward_slab_any<T, NC + 1>(x, n, nc, ex, orow);
  }
  forward_slab_sym<T, NC>(x, n, ex, orow);
}

template <typename T, int NC = 1>
GM_MBD_INLINE void backward_slab_any(const T* x, const T* g, int64_t n, int64_t nc, bool ex, T* acc, T* dm,
                                     int64_t dm_stride) {
  if constexpr (NC < kMaxFixedC) {
    if (nc != NC) return backward_slab_any<T, NC + 1>(x, g, n, nc, ex, acc, dm, dm_stride);
  }
  backward_slab_sym<T, NC>(x, g, n, ex, acc, dm, dm_stride);
}

GM_MBD_CLONES void forward_slab_f32(const float* x, int64_t n, int64_t nc, bool ex, float* orow) {
  forward_slab_any<float>(x, n, nc, ex, orow);
}
GM_MBD_CLONES void backward_slab_f32(const float* x, const float* g, int64_t n, int64_t nc, bool ex, float* acc,
                                     float* dm, int64_t dm_stride) {
  backward_slab_any<float>(x, g, n, nc, ex, acc, dm, dm_stride);
}
void forward_slab_f64(const double* x, int64_t n, int64_t nc, bool ex, double* orow) {
  forward_slab_any<double>(x, n, nc, ex, orow);
}
void backward_slab_f64(const double* x, const double* g, int64_t n, int64_t nc, bool ex, double* acc, double* dm,
                       int64_t dm_stride) {
  backward_slab_any<double>(x, g, n, nc, ex, acc, dm, dm_stride);
}
inline void slab(const float* x, int64_t n, int64_t nc, bool ex, float* orow) { forward_slab_f32(x, n, nc, ex, orow); }
inline void slab(const double* x, int64_t n, int64_t nc, bool ex, double* orow) {
  forward_slab_f64(x, n, nc, ex, orow);
}
inline void slab_grad(const float* x, const float* g, int64_t n, int64_t nc, bool ex, float* acc, float* dm,
                      int64_t st) {
  backward_slab_f32(x, g, n, nc, ex, acc, dm, st);
}
inline void slab_grad(const double* x, const double* g, int64_t n, int64_t nc, bool ex, double* acc, double* dm,
                      int64_t st) {
  backward_slab_f64(x, g, n, nc, ex, acc, dm, st);
}

// Whether the symmetric slab walk takes the call: C unrolled, and a kernel for every thread (with fewer kernels the
// row-by-row path keeps every thread busy). GM_MBD_ROWS=1 forces the row path (tests compare the two).
inline bool use_slabs(int64_t nb, int64_t nc) {
  if (nc > kMaxFixedC) return false;
  if (const char* v = std::getenv("GM_MBD_ROWS"); v != nullptr && v[0] == '1') return false;
#ifdef _OPENMP
  return nb >= omp_get_max_threads();
#else
  return true;
#endif
}

GM_MBD_CLONES float forward_row_f32(const float* x, int64_t n, int64_t nc, int64_t i, bool ex) {
  return forward_row_any<float>(x, n, nc, i, ex);
}
GM_MBD_CLONES void backward_row_f32(const float* x, const float* g, int64_t n, int64_t nc, int64_t i, bool ex,
                                    float* out) {
  backward_row_any<float>(x, g, n, nc, i, ex, out);
}
double forward_row_f64(const double* x, int64_t n, int64_t nc, int64_t i, bool ex) {
  return forward_row_any<double>(x, n, nc, i, ex);
}
void backward_row_f64(const double* x, const double* g, int64_t n, int64_t nc, int64_t i, bool ex, double* out) {
  backward_row_any<double>(x, g, n, nc, i, ex, out);
}

inline float row(const float* x, int64_t n, int64_t nc, int64_t i, bool ex) { return forward_row_f32(x, n, nc, i, ex); }
inline double row(const double* x, int64_t n, int64_t nc, int64_t i, bool ex) {
  return forward_row_f64(x, n, nc, i, ex);
}
inline void row_grad(const float* x, const float* g, int64_t n, int64_t nc, int64_t i, bool ex, float* out) {
  backward_row_f32(x, g, n, nc, i, ex, out);
}
inline void row_grad(const double* x, const double* g, int64_t n, int64_t nc, int64_t i, bool ex, double* out) {
  backward_row_f64(x, g, n, nc, i, ex, out);
}

// x[b, c, j] = log2(e) * m[j, b, c]
template <typename T>
std::vector<T> transpose_scaled(const T* m, int64_t n, int64_t nb, int64_t nc) {
  std::vector<T> x(static_cast<size_t>(n * nb * nc));
  const T scale = static_cast<T>(kLog2e);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t j = 0; j < n; ++j) x[(b * nc + c) * n + j] = scale * m[(j * nb + b) * nc + c];
  return x;
}

template <typename T>
void forward(const T* m, T* o, int64_t n, int64_t nb, int64_t nc, bool exclude_self) {
  const std::vector<T> x = transpose_scaled(m, n, nb, nc);
  if (use_slabs(nb, nc)) {
#pragma omp parallel
    {
      std::vector<T> orow(static_cast<size_t>(n));
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < nb; ++b) {
        slab(x.data() + b * nc * n, n, nc, exclude_self, orow.data());
        for (int64_t i = 0; i < n; ++i) o[i * nb + b] = orow[i];
      }
    }
    return;
  }
#pragma omp parallel for schedule(static) collapse(2)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = 0; i < n; ++i) o[i * nb + b] = row(x.data() + b * nc * n, n, nc, i, exclude_self);
}

template <typename T>
void backward(const T* g, const T* m, T* dm, int64_t n, int64_t nb, int64_t nc, bool exclude_self) {
  const std::vector<T> x = transpose_scaled(m, n, nb, nc);
  std::vector<T> gt(static_cast<size_t>(n * nb));  // g transposed to (B, N)
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < nb; ++b) gt[b * n + j] = g[j * nb + b];
  // c(i, j) and sign(x_i - x_j) are those of m (x = log2(e) m, c = exp2 of x distances): no extra factor.
  if (use_slabs(nb, nc)) {
#pragma omp parallel
    {
      std::vector<T> acc(static_cast<size_t>(nc * n));
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < nb; ++b)
        slab_grad(x.data() + b * nc * n, gt.data() + b * n, n, nc, exclude_self, acc.data(), dm + b * nc, nb * nc);
    }
    return;
  }
#pragma omp parallel for schedule(static) collapse(2)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = 0; i < n; ++i)
      row_grad(x.data() + b * nc * n, gt.data() + b * n, n, nc, i, exclude_self, dm + (i * nb + b) * nc);
}

}  // namespace

void forward_cpu_f32(const float* m, float* o, int64_t n, int64_t b, int64_t c, bool ex) { forward(m, o, n, b, c, ex); }
void forward_cpu_f64(const double* m, double* o, int64_t n, int64_t b, int64_t c, bool ex) {
  forward(m, o, n, b, c, ex);
}
void backward_cpu_f32(const float* g, const float* m, float* dm, int64_t n, int64_t b, int64_t c, bool ex) {
  backward(g, m, dm, n, b, c, ex);
}
void backward_cpu_f64(const double* g, const double* m, double* dm, int64_t n, int64_t b, int64_t c, bool ex) {
  backward(g, m, dm, n, b, c, ex);
}

}  // namespace minibatch
}  // namespace gm
