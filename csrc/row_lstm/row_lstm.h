// Row LSTM scan (PixelRNN, van den Oord et al. 2016, section 3.1): the cell math shared by the C++ CPU and the
// CUDA backends, and the entry points of both.
//
// gates (N, 4h, H, W), gate blocks i, f, o, g; w_ss (4h, h, k), k odd; h0, c0 (N, h, W) or null (zero);
// states hs, cs (N, h, H, W) in the accumulation type T (float; double for double inputs). For each row r:
//   z = gates[:, :, r] + conv1d(h_{r-1}, w_ss, padding k/2)
//   c_r = sig(z_f) c_{r-1} + sig(z_i) tanh(z_g);  h_r = sig(z_o) tanh(c_r)
// Backward (rows bottom to top, dh and dc carried from row r+1; dh includes dy_r):
//   dc += dh sig(o) (1 - tanh(c_r)^2);  dz_i = dc tanh(g) sig'(i);  dz_f = dc c_{r-1} sig'(f)
//   dz_o = dh tanh(c_r) sig'(o);  dz_g = dc sig(i) (1 - tanh(g)^2);  dc_{r-1} = dc sig(f)
//   dh_{r-1}[j, w] = sum_{o,t} w_ss[o, j, t] dz[o, w - t + k/2];  dw_ss[o, j, t] += dz[o, w] h_{r-1}[j, w + t - k/2]
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define GM_ROW_LSTM_HD __host__ __device__ __forceinline__
#else
#define GM_ROW_LSTM_HD inline
#endif

namespace gm {
namespace row_lstm {

template <typename T>
GM_ROW_LSTM_HD T sigmoid(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

// tanh through one exp: 2 sig(2x) - 1 (exact to rounding; saturates correctly for large |x|).
template <typename T>
GM_ROW_LSTM_HD T tanh_via_exp(T x) {
  using std::exp;
  return T(2) / (T(1) + exp(T(-2) * x)) - T(1);
}

// One cell forward: pre-activations z = (i, f, o, g) and c_{r-1} give c_r and h_r.
template <typename T>
GM_ROW_LSTM_HD void cell_forward(T zi, T zf, T zo, T zg, T c_prev, T& c, T& h) {
  c = sigmoid(zf) * c_prev + sigmoid(zi) * tanh_via_exp(zg);
  h = sigmoid(zo) * tanh_via_exp(c);
}

// One cell backward. dh: dL/dh_r (dy_r plus the carry through row r+1); dc: in, dL/dc_r carried from row r+1;
// out, dL/dc_{r-1}. Writes dz[0..3] = dL/dz_{i,f,o,g}.
template <typename T>
GM_ROW_LSTM_HD void cell_backward(T zi, T zf, T zo, T zg, T c_prev, T c, T dh, T& dc, T* dz) {
  const T si = sigmoid(zi), sf = sigmoid(zf), so = sigmoid(zo);
  const T tg = tanh_via_exp(zg), tc = tanh_via_exp(c);
  const T dct = dc + dh * so * (T(1) - tc * tc);
  dz[0] = dct * tg * si * (T(1) - si);
  dz[1] = dct * c_prev * sf * (T(1) - sf);
  dz[2] = dh * tc * so * (T(1) - so);
  dz[3] = dct * si * (T(1) - tg * tg);
  dc = dct * sf;
}

struct Shape {
  int64_t n, hidden, height, width, k;
};

// C++ CPU backend (row_lstm_cpu.cpp): T = float or double for every pointer; h0/c0/dw/dh0/dc0 may be null.
template <typename T>
void forward_cpu(const T* gates, const T* w_ss, const T* h0, const T* c0, T* hs, T* cs, Shape s);
template <typename T>
void backward_cpu(const T* dy, const T* gates, const T* w_ss, const T* h0, const T* c0, const T* hs, const T* cs,
                  T* dgates, T* dw, T* dh0, T* dc0, Shape s);

}  // namespace row_lstm
}  // namespace gm

#ifdef GM_WITH_CUDA
namespace gm {
namespace row_lstm {
// CUDA backend (row_lstm_cuda.cu), tensor cores: gates, h0, c0, dy, y, dgates in the input dtype (f32, f16, bf16:
// the dtype code of gm/_ext.py); hs, cs = [c, sig(z_i), sig(z_f), sig(z_o), tanh(z_g)], dw, dh0, dc0 in float32;
// y may equal hs (float32). a_pack: w_ss packed by gm/ops/_lstm_cuda.py (the forward's or the backward's form);
// precision: common/precision.h. gate_stride 0: gates, dgates (N, 4h, H, W), y, dy, hs (N, h, H, W), cs (N, 5h, H,
// W); else channels-last: gates (forward) or dgates (backward) (N, H, W, 4h) with pixels gate_stride >= 4h elements
// apart, y, dy, hs (N, H, W, h), cs (N, H, W, 5h) (gm.nn.RowLSTM's channels-last path). h0, c0, dh0, dc0 (N, h, W).
void forward_cuda(std::uintptr_t gates, std::uintptr_t a_pack, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t y,
                  std::uintptr_t hs, std::uintptr_t cs, Shape s, int64_t gate_stride, int dtype, int precision,
                  std::uintptr_t stream);
void backward_cuda(std::uintptr_t dy, std::uintptr_t a_pack, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t hs,
                   std::uintptr_t cs, std::uintptr_t dgates, std::uintptr_t dw, std::uintptr_t dh0, std::uintptr_t dc0,
                   Shape s, int64_t gate_stride, int dtype, int precision, bool deterministic,
                   std::uintptr_t stream);
}  // namespace row_lstm
}  // namespace gm
#endif
