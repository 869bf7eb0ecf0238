// C++ CPU backend of row_lstm: the shared LSTM scan engine (common/lstm_scan_cpu.h) with lanes = the W columns of
// a row and taps at offsets t - k/2. The layout below only copies rows between the NCHW tensors and the engine's
// (channel, lane) row buffers; the cell math is row_lstm.h's, vectorised over the lanes by the engine.
#include <algorithm>
#include <cstring>

#include "common/lstm_scan_cpu.h"
#include "row_lstm/row_lstm.h"

namespace gm {
namespace row_lstm {
namespace {

template <typename T>
struct RowLayout {
  Shape s;
  const T* gates = nullptr;
  const T* h0 = nullptr;
  const T* c0 = nullptr;
  const T* hs_in = nullptr;  // backward: the forward's saved states
  const T* cs_in = nullptr;
  const T* dy = nullptr;
  T* hs = nullptr;  // forward outputs
  T* cs = nullptr;
  T* dgates = nullptr;  // backward outputs
  T* dh0 = nullptr;
  T* dc0 = nullptr;

  int64_t lane_lo(int64_t) const { return 0; }
  int64_t lane_hi(int64_t) const { return s.width; }

  // dst[0, lv) <- src[0, W) and zeros (src null: all zeros).
  void copy_in(const T* src, T* dst, int64_t lv) const {
    if (src != nullptr) std::memcpy(dst, src, s.width * sizeof(T));
    std::fill(dst + (src != nullptr ? s.width : 0), dst + lv, T(0));
  }
  // Row r of an (N, C, H, W) tensor, channels [0, C), or of an (N, C, W) one when r < 0.
  const T* at(const T* base, int64_t n, int64_t c, int64_t channels, int64_t r) const {
    if (base == nullptr) return nullptr;
    return r < 0 ? base + (n * channels + c) * s.width : base + ((n * channels + c) * s.height + r) * s.width;
  }

  void load_gates(int64_t n, int64_t r, T* dst, int64_t ld, int64_t lv) const {
    for (int64_t o = 0; o < 4 * s.hidden; ++o) copy_in(at(gates, n, o, 4 * s.hidden, r), dst + o * ld, lv);
  }
  void load_h(int64_t n, int64_t r, T* dst, int64_t ld, int64_t lv) const {
    for (int64_t j = 0; j < s.hidden; ++j) copy_in(at(r < 0 ? h0 : hs_in, n, j, s.hidden, r), dst + j * ld, lv);
  }
  void load_c(int64_t n, int64_t r, T* dst, int64_t ld, int64_t lv) const {
    for (int64_t j = 0; j < s.hidden; ++j) copy_in(at(r < 0 ? c0 : cs_in, n, j, s.hidden, r), dst + j * ld, lv);
  }
  void load_dy(int64_t n, int64_t r, T* dst, int64_t ld, int64_t lv) const {
    for (int64_t j = 0; j < s.hidden; ++j) copy_in(at(dy, n, j, s.hidden, r), dst + j * ld, lv);
  }
  void store_state(int64_t n, int64_t r, const T* h, int64_t ldh, const T* c, int64_t ldc) const {
    for (int64_t j = 0; j < s.hidden; ++j) {
      std::memcpy(hs + ((n * s.hidden + j) * s.height + r) * s.width, h + j * ldh, s.width * sizeof(T));
      std::memcpy(cs + ((n * s.hidden + j) * s.height + r) * s.width, c + j * ldc, s.width * sizeof(T));
    }
  }
  void store_dgates(int64_t n, int64_t r, const T* dz, int64_t ld) const {
    for (int64_t o = 0; o < 4 * s.hidden; ++o)
      std::memcpy(dgates + ((n * 4 * s.hidden + o) * s.height + r) * s.width, dz + o * ld, s.width * sizeof(T));
  }
  void store_initial_grads(int64_t n, const T* dh, const T* dc, int64_t ld) const {
    for (int64_t j = 0; j < s.hidden; ++j) {
      if (dh0 != nullptr) std::memcpy(dh0 + (n * s.hidden + j) * s.width, dh + j * ld, s.width * sizeof(T));
      if (dc0 != nullptr) std::memcpy(dc0 + (n * s.hidden + j) * s.width, dc + j * ld, s.width * sizeof(T));
    }
  }
};

lstm_scan::Dims dims_of(const Shape& s) {
  lstm_scan::Dims d;
  d.n = s.n;
  d.hid = s.hidden;
  d.rows = s.height;
  d.lanes = s.width;
  for (int64_t t = 0; t < s.k; ++t) d.taps.push_back(static_cast<int>(t - s.k / 2));
  return d;
}

template <typename T>
void forward_impl(const T* gates, const T* w_ss, const T* h0, const T* c0, T* hs, T* cs, Shape s) {
  RowLayout<T> lay;
  lay.s = s;
  lay.gates = gates;
  lay.h0 = h0;
  lay.c0 = c0;
  lay.hs = hs;
  lay.cs = cs;
  lstm_scan::scan_forward(lay, dims_of(s), w_ss);
}

template <typename T>
void backward_impl(const T* dy, const T* gates, const T* w_ss, const T* h0, const T* c0, const T* hs, const T* cs,
                   T* dgates, T* dw, T* dh0, T* dc0, Shape s) {
  RowLayout<T> lay;
  lay.s = s;
  lay.gates = gates;
  lay.h0 = h0;
  lay.c0 = c0;
  lay.hs_in = hs;
  lay.cs_in = cs;
  lay.dy = dy;
  lay.dgates = dgates;
  lay.dh0 = dh0;
  lay.dc0 = dc0;
  lstm_scan::scan_backward(lay, dims_of(s), w_ss, dw);
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
