// C++ CPU backend of row_lstm: one call per pass for the whole scan, OpenMP over the batch.
//
// Per batch element, the state of a row lives transposed, (W, h) and (W, 4h), so that every inner loop runs over
// the 4h output channels, contiguous: the state-to-state conv of a row is a rank-1 update per (column, tap,
// input channel) of the (W, 4h) pre-activations with a row of the transposed weight wt (k*h, 4h). The previous
// h sits in a zero-padded (W + k - 1, h) buffer, so the taps need no bounds tests. The backward recomputes the
// pre-activations from the saved h_{r-1} (see gm/ops/row_lstm.py), accumulates dw_ss per thread in wt's layout
// and sums the threads' copies at the end. (Measured on a 2-core AVX-512 machine: AVX2/AVX-512 target clones
// and a vectorised exp for the cell did not make this faster; the rank-1 loops already vectorise.)
#include <algorithm>
#include <cstring>
#include <vector>

#include "row_lstm/row_lstm.h"

namespace gm {
namespace row_lstm {
namespace {

template <typename T>
struct Scratch {
  std::vector<T> hpad;  // (W + k - 1, h): h_{r-1} with k/2 zero columns each side
  std::vector<T> z;     // (W, 4h): pre-activations of the row
  std::vector<T> c;     // (W, h): c_{r-1} (forward) or dc carry (backward)
  std::vector<T> dh;    // (W, h): dh carry (backward)
  Scratch(const Shape& s)
      : hpad((s.width + s.k - 1) * s.hidden), z(s.width * 4 * s.hidden), c(s.width * s.hidden), dh(s.width * s.hidden) {}
};

// wt[(t*h + j)*4h + o] = w_ss[(o*h + j)*k + t]
template <typename T>
std::vector<T> transpose_weight(const T* w_ss, const Shape& s) {
  const int64_t g4 = 4 * s.hidden;
  std::vector<T> wt(s.k * s.hidden * g4);
  for (int64_t o = 0; o < g4; ++o)
    for (int64_t j = 0; j < s.hidden; ++j)
      for (int64_t t = 0; t < s.k; ++t) wt[(t * s.hidden + j) * g4 + o] = w_ss[(o * s.hidden + j) * s.k + t];
  return wt;
}

// hpad <- h_{r-1} of batch element n: row r-1 of hs, or h0 (or zero) for r = 0. Padding columns stay zero.
template <typename T>
void load_prev_h(T* hpad, const T* hs, const T* h0, int64_t n, int64_t r, const Shape& s) {
  const int64_t p = s.k / 2;
  for (int64_t j = 0; j < s.hidden; ++j) {
    const T* src = r > 0 ? hs + ((n * s.hidden + j) * s.height + r - 1) * s.width
                         : (h0 != nullptr ? h0 + (n * s.hidden + j) * s.width : nullptr);
    for (int64_t w = 0; w < s.width; ++w) hpad[(w + p) * s.hidden + j] = src != nullptr ? src[w] : T(0);
  }
}

// z (W, 4h) <- gates[n, :, r, :]^T + conv(h_{r-1}).
template <typename T>
inline __attribute__((always_inline)) void row_preacts(T* __restrict z, const T* __restrict hpad,
                                                       const T* __restrict wt, const T* gates, int64_t n, int64_t r,
                                                       const Shape& s) {
  const int64_t g4 = 4 * s.hidden;
  for (int64_t o = 0; o < g4; ++o) {
    const T* g = gates + ((n * g4 + o) * s.height + r) * s.width;
    for (int64_t w = 0; w < s.width; ++w) z[w * g4 + o] = g[w];
  }
  for (int64_t w = 0; w < s.width; ++w) {
    T* __restrict zw = z + w * g4;
    for (int64_t t = 0; t < s.k; ++t)
      for (int64_t j = 0; j < s.hidden; ++j) {
        const T a = hpad[(w + t) * s.hidden + j];
        const T* __restrict wrow = wt + (t * s.hidden + j) * g4;
        for (int64_t o = 0; o < g4; ++o) zw[o] += a * wrow[o];
      }
  }
}

template <typename T>
inline __attribute__((always_inline)) void forward_one(const T* gates, const T* wt, const T* h0, const T* c0, T* hs,
                                                       T* cs, int64_t n, const Shape& s, Scratch<T>& b) {
  const int64_t h = s.hidden, p = s.k / 2;
  std::fill(b.hpad.begin(), b.hpad.end(), T(0));
  load_prev_h(b.hpad.data(), hs, h0, n, 0, s);
  for (int64_t j = 0; j < h; ++j)
    for (int64_t w = 0; w < s.width; ++w) b.c[w * h + j] = c0 != nullptr ? c0[(n * h + j) * s.width + w] : T(0);
  for (int64_t r = 0; r < s.height; ++r) {
    row_preacts(b.z.data(), b.hpad.data(), wt, gates, n, r, s);
    for (int64_t j = 0; j < h; ++j) {
      const int64_t out = ((n * h + j) * s.height + r) * s.width;
      for (int64_t w = 0; w < s.width; ++w) {
        const T* zw = b.z.data() + w * 4 * h;
        T c, hn;
        cell_forward(zw[j], zw[h + j], zw[2 * h + j], zw[3 * h + j], b.c[w * h + j], c, hn);
        b.c[w * h + j] = c;
        b.hpad[(w + p) * h + j] = hn;  // the preacts of this row are done: hpad becomes h_r
        hs[out + w] = hn;
        cs[out + w] = c;
      }
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void backward_one(const T* dy, const T* gates, const T* wt, const T* h0,
                                                        const T* c0, const T* hs, const T* cs, T* dgates, T* dwt,
                                                        T* dh0, T* dc0, int64_t n, const Shape& s, Scratch<T>& b) {
  const int64_t h = s.hidden, g4 = 4 * h, p = s.k / 2;
  T* __restrict z = b.z.data();
  T* __restrict dc = b.c.data();
  T* __restrict dh = b.dh.data();
  std::fill(b.hpad.begin(), b.hpad.end(), T(0));
  std::fill(b.c.begin(), b.c.end(), T(0));
  std::fill(b.dh.begin(), b.dh.end(), T(0));
  for (int64_t r = s.height - 1; r >= 0; --r) {
    load_prev_h(b.hpad.data(), hs, h0, n, r, s);
    row_preacts(z, b.hpad.data(), wt, gates, n, r, s);
    for (int64_t j = 0; j < h; ++j) {  // cell backward; z becomes dz in place
      const int64_t at = ((n * h + j) * s.height + r) * s.width;
      for (int64_t w = 0; w < s.width; ++w) {
        T* zw = z + w * g4;
        const T c_prev = r > 0 ? cs[at - s.width + w] : (c0 != nullptr ? c0[(n * h + j) * s.width + w] : T(0));
        T dz[4];
        cell_backward(zw[j], zw[h + j], zw[2 * h + j], zw[3 * h + j], c_prev, cs[at + w], dh[w * h + j] + dy[at + w],
                      dc[w * h + j], dz);
        for (int q = 0; q < 4; ++q) zw[q * h + j] = dz[q];
      }
    }
    for (int64_t o = 0; o < g4; ++o) {
      T* dg = dgates + ((n * g4 + o) * s.height + r) * s.width;
      for (int64_t w = 0; w < s.width; ++w) dg[w] = z[w * g4 + o];
    }
    for (int64_t w = 0; w < s.width; ++w) {  // dw_ss and dh_{r-1}, one (column, tap, channel) at a time
      const T* __restrict zw = z + w * g4;
      for (int64_t t = 0; t < s.k; ++t)
        for (int64_t j = 0; j < h; ++j) {
          const T a = b.hpad[(w + t) * h + j];
          T* __restrict dwrow = dwt + (t * h + j) * g4;
          for (int64_t o = 0; o < g4; ++o) dwrow[o] += a * zw[o];
        }
    }
    for (int64_t w = 0; w < s.width; ++w)  // dh_{r-1}[j, w] = sum_{t, o} wt[t, j, o] dz[w - t + p, o]
      for (int64_t j = 0; j < h; ++j) {
        T acc = T(0);
        for (int64_t t = 0; t < s.k; ++t) {
          const int64_t src = w - t + p;
          if (src < 0 || src >= s.width) continue;
          const T* __restrict wrow = wt + (t * h + j) * g4;
          const T* __restrict zs = z + src * g4;
#pragma omp simd reduction(+ : acc)
          for (int64_t o = 0; o < g4; ++o) acc += wrow[o] * zs[o];
        }
        dh[w * h + j] = acc;
      }
  }
  for (int64_t j = 0; j < h; ++j)
    for (int64_t w = 0; w < s.width; ++w) {
      if (dh0 != nullptr) dh0[(n * h + j) * s.width + w] = dh[w * h + j];
      if (dc0 != nullptr) dc0[(n * h + j) * s.width + w] = dc[w * h + j];
    }
}

template <typename T>
void forward_impl(const T* gates, const T* w_ss, const T* h0, const T* c0, T* hs, T* cs, Shape s) {
  const std::vector<T> wt = transpose_weight(w_ss, s);
#pragma omp parallel
  {
    Scratch<T> b(s);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < s.n; ++n) forward_one(gates, wt.data(), h0, c0, hs, cs, n, s, b);
  }
}

template <typename T>
void backward_impl(const T* dy, const T* gates, const T* w_ss, const T* h0, const T* c0, const T* hs, const T* cs,
                   T* dgates, T* dw, T* dh0, T* dc0, Shape s) {
  const std::vector<T> wt = transpose_weight(w_ss, s);
  const int64_t g4 = 4 * s.hidden, wsize = s.k * s.hidden * g4;
  std::vector<T> dwt(wsize, T(0));
#pragma omp parallel
  {
    Scratch<T> b(s);
    std::vector<T> dwt_local(wsize, T(0));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < s.n; ++n)
      backward_one(dy, gates, wt.data(), h0, c0, hs, cs, dgates, dwt_local.data(), dh0, dc0, n, s, b);
#pragma omp critical
    for (int64_t i = 0; i < wsize; ++i) dwt[i] += dwt_local[i];
  }
  if (dw != nullptr)
    for (int64_t o = 0; o < g4; ++o)
      for (int64_t j = 0; j < s.hidden; ++j)
        for (int64_t t = 0; t < s.k; ++t) dw[(o * s.hidden + j) * s.k + t] = dwt[(t * s.hidden + j) * g4 + o];
}

}  // namespace

template <>
void forward_cpu<float>(const float* g, const float* w, const float* h0, const float* c0, float* hs, float* cs,
                        Shape s) {
  forward_impl(g, w, h0, c0, hs, cs, s);
}
template <>
void forward_cpu<double>(const double* g, const double* w, const double* h0, const double* c0, double* hs, double* cs,
                         Shape s) {
  forward_impl(g, w, h0, c0, hs, cs, s);
}
template <>
void backward_cpu<float>(const float* dy, const float* g, const float* w, const float* h0, const float* c0,
                         const float* hs, const float* cs, float* dg, float* dw, float* dh0, float* dc0, Shape s) {
  backward_impl(dy, g, w, h0, c0, hs, cs, dg, dw, dh0, dc0, s);
}
template <>
void backward_cpu<double>(const double* dy, const double* g, const double* w, const double* h0, const double* c0,
                          const double* hs, const double* cs, double* dg, double* dw, double* dh0, double* dc0,
                          Shape s) {
  backward_impl(dy, g, w, h0, c0, hs, cs, dg, dw, dh0, dc0, s);
}

}  // namespace row_lstm
}  // namespace gm
