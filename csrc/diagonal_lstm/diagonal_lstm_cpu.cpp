// Diagonal LSTM on the CPU: one call for the whole scan, OpenMP over the batch.
//
// Pixel (i, j) needs only (i-1, j) and (i, j-1), so raster order (rows top to bottom, columns in scan order)
// respects every dependency: the skew is only needed where the cells of a diagonal run in parallel (GPU).
// Per pixel the state-to-state product is one (4h x 2h) matrix-vector product: row o of w_ss (h, 2) interleaves
// the taps, matching x = [h_up[0], h_left[0], h_up[1], h_left[1], ...]; the forward reads it transposed.
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "diagonal_lstm/diagonal_lstm.h"

namespace gm {
namespace diagonal_lstm {
namespace {

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

struct Geometry {
  int64_t hid, height, width, hw;
  bool reverse;
};

// x = interleaved (h above, h left) of pixel p from y (zero outside the image).
template <typename T>
void gather_neighbours(const T* y, int64_t i, int64_t j, int64_t p, const Geometry& g, T* x) {
  const int64_t p_left = j > 0 ? pixel(i, j - 1, g.width, g.reverse) : 0;
  for (int64_t k = 0; k < g.hid; ++k) {
    x[2 * k] = i > 0 ? y[k * g.hw + p - g.width] : T(0);
    x[2 * k + 1] = j > 0 ? y[k * g.hw + p_left] : T(0);
  }
}

// a[o] = gates[o, p] + sum_q w_ss[o, q] x[q] for the 4h gate rows, with w_t = w_ss^T (2h, 4h): the inner loop runs
// over o, so it vectorises without reassociating a reduction.
template <typename T>
void preactivations(const T* gates, const T* w_t, const T* x, int64_t p, const Geometry& g, T* a) {
  const int64_t g4 = 4 * g.hid;
  for (int64_t o = 0; o < g4; ++o) a[o] = gates[o * g.hw + p];
  for (int64_t q = 0; q < 2 * g.hid; ++q) {
    const T xq = x[q];
    const T* wr = w_t + q * g4;
#pragma omp simd
    for (int64_t o = 0; o < g4; ++o) a[o] += wr[o] * xq;
  }
}

// w_ss (4h, 2h) transposed to (2h, 4h).
template <typename T>
std::vector<T> transpose_weight(const T* w_ss, int64_t hid) {
  const int64_t g4 = 4 * hid, k2 = 2 * hid;
  std::vector<T> w_t(g4 * k2);
  for (int64_t o = 0; o < g4; ++o)
    for (int64_t q = 0; q < k2; ++q) w_t[q * g4 + o] = w_ss[o * k2 + q];
  return w_t;
}

template <typename T>
void forward_one(const T* gates, const T* w_t, T* y, T* c, const Geometry& g, T* x, T* a) {
  for (int64_t i = 0; i < g.height; ++i) {
    for (int64_t j = 0; j < g.width; ++j) {
      const int64_t p = pixel(i, j, g.width, g.reverse);
      const int64_t p_left = j > 0 ? pixel(i, j - 1, g.width, g.reverse) : 0;
      gather_neighbours(y, i, j, p, g, x);
      preactivations(gates, w_t, x, p, g, a);
      for (int64_t k = 0; k < g.hid; ++k) {
        const T c_left = j > 0 ? c[k * g.hw + p_left] : T(0);
        cell_forward(a[k], a[g.hid + k], a[2 * g.hid + k], a[3 * g.hid + k], c_left, c[k * g.hw + p],
                     y[k * g.hw + p]);
      }
    }
  }
}

// Scratch of one thread for the backward of one batch element.
template <typename T>
struct BackwardScratch {
  std::vector<T> x, a, da, dx, dh;  // dh: dL/dh from later pixels, (h, H*W)
  BackwardScratch(const Geometry& g)
      : x(2 * g.hid), a(4 * g.hid), da(4 * g.hid), dx(2 * g.hid), dh(g.hid * g.hw) {}
};

template <typename T>
void backward_one(const T* dy, const T* gates, const T* w_ss, const T* w_t, const T* y, const T* c, T* dgates,
                  T* dw, const Geometry& g, BackwardScratch<T>& s) {
  const int64_t hid = g.hid, k2 = 2 * hid;
  std::fill(s.dh.begin(), s.dh.end(), T(0));
  std::vector<T> dc_row(hid);
  for (int64_t i = g.height - 1; i >= 0; --i) {
    std::fill(dc_row.begin(), dc_row.end(), T(0));
    for (int64_t j = g.width - 1; j >= 0; --j) {
      const int64_t p = pixel(i, j, g.width, g.reverse);
      const int64_t p_left = j > 0 ? pixel(i, j - 1, g.width, g.reverse) : 0;
      gather_neighbours(y, i, j, p, g, s.x.data());
      preactivations(gates, w_t, s.x.data(), p, g, s.a.data());
      for (int64_t k = 0; k < hid; ++k) {
        const T c_left = j > 0 ? c[k * g.hw + p_left] : T(0);
        const T dh = dy[k * g.hw + p] + s.dh[k * g.hw + p];
        T* da = s.da.data();
        cell_backward(s.a[k], s.a[hid + k], s.a[2 * hid + k], s.a[3 * hid + k], c[k * g.hw + p], c_left, dh,
                      dc_row[k], da[k], da[hid + k], da[2 * hid + k], da[3 * hid + k], dc_row[k]);
      }
      std::fill(s.dx.begin(), s.dx.end(), T(0));
      for (int64_t o = 0; o < 4 * hid; ++o) {
        const T d = s.da[o];
        dgates[o * g.hw + p] = d;
        const T* wr = w_ss + o * k2;
        T* dwr = dw + o * k2;
#pragma omp simd
        for (int64_t q = 0; q < k2; ++q) {
          s.dx[q] += wr[q] * d;
          dwr[q] += d * s.x[q];
        }
      }
      for (int64_t k = 0; k < hid; ++k) {
        if (i > 0) s.dh[k * g.hw + p - g.width] += s.dx[2 * k];
        if (j > 0) s.dh[k * g.hw + p_left] += s.dx[2 * k + 1];
      }
    }
  }
}

}  // namespace

template <typename T>
void forward_cpu(const T* gates, const T* w_ss, T* y, T* c, int64_t n, int64_t hid, int64_t height, int64_t width,
                 bool reverse) {
  const Geometry g{hid, height, width, height * width, reverse};
  const std::vector<T> w_t = transpose_weight(w_ss, hid);
#pragma omp parallel
  {
    std::vector<T> x(2 * hid), a(4 * hid);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      forward_one(gates + b * 4 * hid * g.hw, w_t.data(), y + b * hid * g.hw, c + b * hid * g.hw, g, x.data(), a.data());
    }
  }
}

template <typename T>
void backward_cpu(const T* dy, const T* gates, const T* w_ss, const T* y, const T* c, T* dgates, T* dw_ss, int64_t n,
                  int64_t hid, int64_t height, int64_t width, bool reverse) {
  const Geometry g{hid, height, width, height * width, reverse};
  const int64_t w_size = 8 * hid * hid;
  const std::vector<T> w_t = transpose_weight(w_ss, hid);
  // One dw_ss partial per thread, summed in thread order afterwards: deterministic for a fixed thread count.
  std::vector<T> partial(static_cast<size_t>(thread_count()) * w_size, T(0));
#pragma omp parallel
  {
    BackwardScratch<T> s(g);
    T* dw = partial.data() + thread_id() * w_size;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      const int64_t off = b * hid * g.hw;
      backward_one(dy + off, gates + 4 * off, w_ss, w_t.data(), y + off, c + off, dgates + 4 * off, dw, g, s);
    }
  }
  std::fill(dw_ss, dw_ss + w_size, T(0));
  for (int t = 0; t < thread_count(); ++t)
    for (int64_t q = 0; q < w_size; ++q) dw_ss[q] += partial[t * w_size + q];
}

template void forward_cpu<float>(const float*, const float*, float*, float*, int64_t, int64_t, int64_t, int64_t, bool);
template void forward_cpu<double>(const double*, const double*, double*, double*, int64_t, int64_t, int64_t, int64_t,
                                  bool);
template void backward_cpu<float>(const float*, const float*, const float*, const float*, const float*, float*, float*,
                                  int64_t, int64_t, int64_t, int64_t, bool);
template void backward_cpu<double>(const double*, const double*, const double*, const double*, const double*, double*,
                                   double*, int64_t, int64_t, int64_t, int64_t, bool);

}  // namespace diagonal_lstm
}  // namespace gm
