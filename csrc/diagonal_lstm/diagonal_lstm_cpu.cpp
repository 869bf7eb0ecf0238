// C++ CPU backend of diagonal_lstm: the shared LSTM scan engine (common/lstm_scan_cpu.h) run over the skewed
// columns t = i + j (0 <= t < W + H - 1), one lane per image row i. In column t, lane i is pixel (i, j = t - i);
// its neighbour above, (i-1, j), is lane i-1 of column t-1 and its left neighbour, (i, j-1), lane i of column
// t-1: the state-to-state product is the engine's 2-tap convolution with lane offsets -1 (w_ss[..., 0], above)
// and 0 (w_ss[..., 1], left). Lane i is valid in column t when 0 <= t - i < W; the engine keeps h, c and every
// gradient zero elsewhere ("zero state outside the image", see gm/ops/diagonal_lstm.py). The skew is addressing
// only: the layout below gathers and scatters the pixels of a column (reverse: j counts from the right), from NCHW
// tensors (the op) or channels-last ones (gm.nn.DiagonalBiLSTM's one-node path; there the forward also keeps the
// pre-activations z, which the backward reads instead of the gates).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/lstm_scan_cpu.h"
#include "diagonal_lstm/diagonal_lstm.h"

namespace gm {
namespace diagonal_lstm {
namespace {

// Block transposes between 4 pixels' channels (pixels `ps` elements apart, channels adjacent) and 4 lanes of channel
// rows (rows `ld` apart): rows[ch * ld + k] = px[k * ps + ch] and back, 4 x 4 blocks in 16-byte vectors for float
// (8 shuffles and 8 moves for 16 values, against 32 scalar moves), scalar for the rest and for double.
typedef float F4 __attribute__((vector_size(16)));
typedef int I4 __attribute__((vector_size(16)));

inline void transpose4(F4& a, F4& b, F4& c, F4& d) {
  const F4 t0 = __builtin_shuffle(a, b, I4{0, 4, 1, 5}), t1 = __builtin_shuffle(a, b, I4{2, 6, 3, 7});
  const F4 t2 = __builtin_shuffle(c, d, I4{0, 4, 1, 5}), t3 = __builtin_shuffle(c, d, I4{2, 6, 3, 7});
  a = __builtin_shuffle(t0, t2, I4{0, 1, 4, 5});
  b = __builtin_shuffle(t0, t2, I4{2, 3, 6, 7});
  c = __builtin_shuffle(t1, t3, I4{0, 1, 4, 5});
  d = __builtin_shuffle(t1, t3, I4{2, 3, 6, 7});
}

inline F4 load4(const float* p) {
  F4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store4(float* p, const F4& v) { std::memcpy(p, &v, sizeof(v)); }

template <typename T>
void transpose4_to_rows(const T* px, int64_t ps, int64_t channels, T* rows, int64_t ld) {
  int64_t ch = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; ch + 4 <= channels; ch += 4) {
      F4 a = load4(px + ch), b = load4(px + ps + ch), c = load4(px + 2 * ps + ch), d = load4(px + 3 * ps + ch);
      transpose4(a, b, c, d);
      store4(rows + ch * ld, a);
      store4(rows + (ch + 1) * ld, b);
      store4(rows + (ch + 2) * ld, c);
      store4(rows + (ch + 3) * ld, d);
    }
  }
  for (; ch < channels; ++ch)
    for (int k = 0; k < 4; ++k) rows[ch * ld + k] = px[k * ps + ch];
}

template <typename T>
void transpose4_to_pixels(const T* rows, int64_t ld, int64_t channels, T* px, int64_t ps) {
  int64_t ch = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; ch + 4 <= channels; ch += 4) {
      F4 a = load4(rows + ch * ld), b = load4(rows + (ch + 1) * ld), c = load4(rows + (ch + 2) * ld),
         d = load4(rows + (ch + 3) * ld);
      transpose4(a, b, c, d);
      store4(px + ch, a);
      store4(px + ps + ch, b);
      store4(px + 2 * ps + ch, c);
      store4(px + 3 * ps + ch, d);
    }
  }
  for (; ch < channels; ++ch)
    for (int k = 0; k < 4; ++k) px[k * ps + ch] = rows[ch * ld + k];
}

// Where channel ch of pixel p of image n lies: n * image + p * pixel + ch * channel (elements); pixel == 0: the scan's
// own packed layout, each image's columns one after the other, a column (channels, its valid lanes) lane-major, so
// that a column moves to and from the engine's row buffers by one copy per channel instead of a transpose.
struct Planes {
  int64_t image, pixel, channel;
};

template <typename T>
struct SkewLayout {
  int64_t hid, height, width, hw;
  bool reverse;
  Planes pg, py, pc, pdy, pz;  // gates and dgates; y (and the backward's y_in); c; dy; z
  const T* gates = nullptr;
  const T* y_in = nullptr;  // backward: the forward's h and c
  const T* c_in = nullptr;
  const T* dy = nullptr;
  const T* z_in = nullptr;  // backward: the forward's pre-activations (channels-last only)
  T* y = nullptr;  // forward outputs
  T* c = nullptr;
  T* z = nullptr;  // the pre-activations, where kept (channels-last only)
  T* dgates = nullptr;  // backward output
  std::vector<int64_t> first;  // packed planes: the valid pixels of the columns before t

  int64_t lane_lo(int64_t t) const { return std::max<int64_t>(0, t - width + 1); }
  int64_t lane_hi(int64_t t) const { return std::min<int64_t>(height, t + 1); }

  // Pixel offset (i*W + j, reverse: i*W + W-1-j, j = t - i) of lane i of column t.
  int64_t at(int64_t t, int64_t i) const { return pixel(i, t - i, width, reverse); }

  // dst[ch * ld + lane] <- channel ch of image n of src at the pixels of column t, lanes [0, lv), zero where invalid
  // (and everywhere for src null: the zero state before the first column). Channels-last: one pixel's channels are
  // adjacent, so a lane's values are read together (NCHW: a channel's pixels of the column, each its own line).
  void gather(const T* src, const Planes& p, int64_t n, int64_t channels, int64_t t, T* dst, int64_t ld,
              int64_t lv) const {
    const int64_t lo = src != nullptr ? lane_lo(t) : 0, hi = src != nullptr ? std::max(lo, lane_hi(t)) : 0;
    for (int64_t ch = 0; ch < channels; ++ch) {
      std::fill(dst + ch * ld, dst + ch * ld + lo, T(0));
      std::fill(dst + ch * ld + hi, dst + ch * ld + lv, T(0));
    }
    if (hi == lo) return;
    const T* img = src + n * p.image;
    if (p.pixel == 0) {
      const T* col = img + first[t] * channels;
      for (int64_t ch = 0; ch < channels; ++ch) std::memcpy(dst + ch * ld + lo, col + ch * (hi - lo), (hi - lo) * sizeof(T));
    } else if (p.channel == 1) {
      const int64_t step = at(t, lo + 1) - at(t, lo);  // pixel offset from lane i to i+1 (i+1 < hi below)
      int64_t i = lo;
      for (; i + 4 <= hi; i += 4) {  // 4 lanes x 4 channels at a time (float: one transpose in registers)
        const T* px = img + at(t, i) * p.pixel;
        transpose4_to_rows(px, step * p.pixel, channels, dst + i, ld);
      }
      for (; i < hi; ++i) {
        const T* px = img + at(t, i) * p.pixel;
        for (int64_t ch = 0; ch < channels; ++ch) dst[ch * ld + i] = px[ch];
      }
    } else {
      for (int64_t ch = 0; ch < channels; ++ch)
        for (int64_t i = lo; i < hi; ++i) dst[ch * ld + i] = img[ch * p.channel + at(t, i) * p.pixel];
    }
  }
  void scatter(const T* src, int64_t ld, int64_t channels, int64_t t, T* dst, const Planes& p, int64_t n) const {
    T* img = dst + n * p.image;
    if (p.pixel == 0) {
      const int64_t lo = lane_lo(t), len = std::max<int64_t>(0, lane_hi(t) - lo);
      T* col = img + first[t] * channels;
      for (int64_t ch = 0; ch < channels; ++ch) std::memcpy(col + ch * len, src + ch * ld + lo, len * sizeof(T));
    } else if (p.channel == 1) {
      const int64_t lo = lane_lo(t), hi = lane_hi(t);
      const int64_t step = hi - lo > 1 ? at(t, lo + 1) - at(t, lo) : 0;
      int64_t i = lo;
      for (; i + 4 <= hi; i += 4) transpose4_to_pixels(src + i, ld, channels, img + at(t, i) * p.pixel, step * p.pixel);
      for (; i < hi; ++i) {
        T* px = img + at(t, i) * p.pixel;
        for (int64_t ch = 0; ch < channels; ++ch) px[ch] = src[ch * ld + i];
      }
    } else {
      for (int64_t ch = 0; ch < channels; ++ch)
        for (int64_t i = lane_lo(t); i < lane_hi(t); ++i) img[ch * p.channel + at(t, i) * p.pixel] = src[ch * ld + i];
    }
  }

  void load_gates(int64_t n, int64_t t, T* dst, int64_t ld, int64_t lv) const {
    gather(gates, pg, n, 4 * hid, t, dst, ld, lv);
  }
  void load_h(int64_t n, int64_t t, T* dst, int64_t ld, int64_t lv) const {
    gather(y_in, py, n, hid, t, dst, ld, lv);  // t = -1: no valid lane
  }
  void load_c(int64_t n, int64_t t, T* dst, int64_t ld, int64_t lv) const { gather(c_in, pc, n, hid, t, dst, ld, lv); }
  void load_dy(int64_t n, int64_t t, T* dst, int64_t ld, int64_t lv) const { gather(dy, pdy, n, hid, t, dst, ld, lv); }
  void store_state(int64_t n, int64_t t, const T* h, int64_t ldh, const T* cc, int64_t ldc) const {
    scatter(h, ldh, hid, t, y, py, n);
    scatter(cc, ldc, hid, t, c, pc, n);
  }
  void store_dgates(int64_t n, int64_t t, const T* dz, int64_t ld) const { scatter(dz, ld, 4 * hid, t, dgates, pg, n); }
  void store_initial_grads(int64_t, const T*, const T*, int64_t) const {}
  bool saves_preact() const { return z != nullptr || z_in != nullptr; }
  void store_preact(int64_t n, int64_t t, const T* zr, int64_t ld) const { scatter(zr, ld, 4 * hid, t, z, pz, n); }
  void load_preact(int64_t n, int64_t t, T* dst, int64_t ld, int64_t lv) const {
    gather(z_in, pz, n, 4 * hid, t, dst, ld, lv);
  }
};

// NCHW planes of `channels` channels, channels-last ones with pixels `stride` elements apart (stride > 0), or packed
// ones (stride < 0).
Planes planes(int64_t channels, int64_t hw, int64_t stride) {
  if (stride < 0) return Planes{channels * hw, 0, 0};
  return stride > 0 ? Planes{hw * stride, stride, 1} : Planes{channels * hw, 1, hw};
}

template <typename T>
SkewLayout<T> layout_of(int64_t hid, int64_t height, int64_t width, bool reverse, const Strides& st) {
  SkewLayout<T> lay;
  lay.hid = hid;
  lay.height = height;
  lay.width = width;
  lay.hw = height * width;
  lay.reverse = reverse;
  lay.pg = planes(4 * hid, lay.hw, st.gates);
  lay.py = planes(hid, lay.hw, st.y);
  lay.pc = planes(hid, lay.hw, st.c);
  lay.pdy = planes(hid, lay.hw, st.dy);
  lay.pz = planes(4 * hid, lay.hw, st.z);
  lay.first.assign(height + width, 0);
  for (int64_t t = 0; t + 1 < height + width; ++t) lay.first[t + 1] = lay.first[t] + lay.lane_hi(t) - lay.lane_lo(t);
  return lay;
}

lstm_scan::Dims dims_of(int64_t n, int64_t hid, int64_t height, int64_t width) {
  lstm_scan::Dims d;
  d.n = n;
  d.hid = hid;
  d.rows = width + height - 1;
  d.lanes = height;
  d.taps = {-1, 0};  // w_ss[..., 0]: the pixel above (lane i-1); w_ss[..., 1]: the pixel to the left (lane i)
  return d;
}

}  // namespace

template <typename T>
void forward_cpu(const T* gates, const T* w_ss, T* y, T* c, T* z, int64_t n, int64_t hid, int64_t height,
                 int64_t width, bool reverse, const Strides& st) {
  if (n * height * width == 0) return;
  SkewLayout<T> lay = layout_of<T>(hid, height, width, reverse, st);
  lay.gates = gates;
  lay.y = y;
  lay.c = c;
  lay.z = z;
  lstm_scan::scan_forward(lay, dims_of(n, hid, height, width), w_ss);
}

template <typename T>
void backward_cpu(const T* dy, const T* gates, const T* z, const T* w_ss, const T* y, const T* c, T* dgates, T* dw_ss,
                  int64_t n, int64_t hid, int64_t height, int64_t width, bool reverse, const Strides& st) {
  if (n * height * width == 0) {
    std::fill(dw_ss, dw_ss + 8 * hid * hid, T(0));
    return;
  }
  SkewLayout<T> lay = layout_of<T>(hid, height, width, reverse, st);
  lay.gates = gates;
  lay.z_in = z;
  lay.y_in = y;
  lay.c_in = c;
  lay.dy = dy;
  lay.dgates = dgates;
  lstm_scan::scan_backward(lay, dims_of(n, hid, height, width), w_ss, dw_ss);
}

template void forward_cpu<float>(const float*, const float*, float*, float*, float*, int64_t, int64_t, int64_t,
                                 int64_t, bool, const Strides&);
template void forward_cpu<double>(const double*, const double*, double*, double*, double*, int64_t, int64_t, int64_t,
                                  int64_t, bool, const Strides&);
template void backward_cpu<float>(const float*, const float*, const float*, const float*, const float*, const float*,
                                  float*, float*, int64_t, int64_t, int64_t, int64_t, bool, const Strides&);
template void backward_cpu<double>(const double*, const double*, const double*, const double*, const double*,
                                   const double*, double*, double*, int64_t, int64_t, int64_t, int64_t, bool,
                                   const Strides&);

}  // namespace diagonal_lstm
}  // namespace gm
