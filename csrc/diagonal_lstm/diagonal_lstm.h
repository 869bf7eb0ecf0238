// Diagonal LSTM scan of PixelRNN (van den Oord et al. 2016, Sec. 3.2), one direction; gm/ops/diagonal_lstm.py.
//
//   a[g*h + o] = gates[n, g*h + o, i, j] + sum_k w_ss[g*h + o, k, 0] h[k](i-1, j) + w_ss[g*h + o, k, 1] h[k](i, j-1)
//   c(i, j) = sigmoid(a_f) c(i, j-1) + sigmoid(a_i) tanh(a_g);   h(i, j) = sigmoid(a_o) tanh(c(i, j))
//
// gate order i, f, o, g; h, c zero outside the image; j counts columns right to left when `reverse`.
// Shapes: gates, dgates (N, 4h, H, W); w_ss, dw_ss (4h, h, 2); y, dy (N, h, H, W); c (N, h, H, W) in the
// state type (float, double for double), for the CPU kernels NCHW or channels-last (Strides below): the forward
// saves c; the backward recomputes the gate pre-activations from gates + w_ss (y above, y left), or reads the ones
// the forward kept, and walks the pixels in reverse. The CUDA kernels' layouts are below.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GM_DLSTM_HD __host__ __device__ __forceinline__
#else
#define GM_DLSTM_HD inline
#endif

namespace gm {
namespace diagonal_lstm {

GM_DLSTM_HD float exp_of(float x) { return expf(x); }
GM_DLSTM_HD double exp_of(double x) { return exp(x); }

template <typename A>
GM_DLSTM_HD A sigmoid(A x) {
  return A(1) / (A(1) + exp_of(-x));
}

template <typename A>
GM_DLSTM_HD A tanh_of(A x) {
  return A(2) / (A(1) + exp_of(A(-2) * x)) - A(1);  // saturates to +-1 without NaN for large |x|
}

// Offset of pixel (row i, scan column j) inside an (H, W) plane.
GM_DLSTM_HD int64_t pixel(int64_t i, int64_t j, int64_t width, bool reverse) {
  return i * width + (reverse ? width - 1 - j : j);
}

// The LSTM cell: (c, h) from the four pre-activations and the left neighbour's c.
template <typename A>
GM_DLSTM_HD void cell_forward(A a_i, A a_f, A a_o, A a_g, A c_left, A& c, A& h) {
  c = sigmoid(a_f) * c_left + sigmoid(a_i) * tanh_of(a_g);
  h = sigmoid(a_o) * tanh_of(c);
}

// Its adjoint: given dL/dh and dL/dc from later cells, the pre-activation gradients and dL/dc_left.
template <typename A>
GM_DLSTM_HD void cell_backward(A a_i, A a_f, A a_o, A a_g, A c, A c_left, A dh, A dc_next, A& da_i, A& da_f,
                               A& da_o, A& da_g, A& dc_left) {
  const A s_i = sigmoid(a_i), s_f = sigmoid(a_f), s_o = sigmoid(a_o), t_g = tanh_of(a_g), t_c = tanh_of(c);
  const A dc = dc_next + dh * s_o * (A(1) - t_c * t_c);
  da_i = dc * t_g * s_i * (A(1) - s_i);
  da_f = dc * c_left * s_f * (A(1) - s_f);
  da_o = dh * t_c * s_o * (A(1) - s_o);
  da_g = dc * s_i * (A(1) - t_g * t_g);
  dc_left = dc * s_f;
}

// The CPU kernels' tensor layouts: 0 for NCHW (contiguous); > 0 channels-last (N, H, W, C) with pixels that many
// elements apart (images H*W*stride apart, channels adjacent); < 0 the scan's own packed layout (each image's skewed
// columns one after the other, a column's channels lane-major: diagonal_lstm_cpu.cpp's Planes), for state that only
// the CPU backward reads. gates and dgates share one; y (also read back by the backward), c, dy and z (the
// pre-activations, kept only by the channels-last path) have their own.
struct Strides {
  int64_t gates = 0, y = 0, c = 0, dy = 0, z = 0;
};

// CPU entry points (diagonal_lstm_cpu.cpp): float and double, OpenMP over the batch. z: where not null (channels-last
// only), the forward stores the pre-activations there and the backward reads them instead of gates (which may then
// be null) and of recomputing W h.
template <typename T>
void forward_cpu(const T* gates, const T* w_ss, T* y, T* c, T* z, int64_t n, int64_t hid, int64_t height,
                 int64_t width, bool reverse, const Strides& strides);
template <typename T>
void backward_cpu(const T* dy, const T* gates, const T* z, const T* w_ss, const T* y, const T* c, T* dgates, T* dw_ss,
                  int64_t n, int64_t hid, int64_t height, int64_t width, bool reverse, const Strides& strides);

#ifdef GM_WITH_CUDA
// CUDA entry points (diagonal_lstm_cuda.cu), tensor cores: gates/y/dy/dgates channels-last (N, H, W, C) in `dtype`
// (f32, f16, bf16); state (N, H, W, 5h) float32 = [c, sigmoid(a_i), sigmoid(a_f), sigmoid(a_o), tanh(a_g)];
// a_pack: the forward's [w_up | w_left] (4hp x 2hp, gate rows interleaved per 8 units) or the backward's
// [w_up^T | w_left^T] (hp x 8hp), in m16 x k-step fragment order (gm/ops/diagonal_lstm.py packs them);
// precision: common/precision.h (float32 only). One block per batch element.
void forward_cuda(std::uintptr_t gates, std::uintptr_t a_pack, std::uintptr_t y, std::uintptr_t state, int64_t n,
                  int64_t hid, int64_t height, int64_t width, bool reverse, int64_t gate_stride, int dtype,
                  int precision, std::uintptr_t stream);
void backward_cuda(std::uintptr_t dy, std::uintptr_t a_pack, std::uintptr_t state, std::uintptr_t dgates, int64_t n,
                   int64_t hid, int64_t height, int64_t width, bool reverse, int64_t gate_stride, int dtype,
                   int precision, std::uintptr_t stream);
// gate_stride: elements from one pixel's gates (forward) or gate gradients (backward) to the next's, 4h for a
// direction's own tensor, 8h for its half of a DiagonalBiLSTM's (N, H, W, 8h) one (the pointer then at its half).
// dw_ss (4h, h, 2) float32 = sum over pixels of dgates (x) (y above, y left in scan order) in `dtype`, on tensor
// cores (common/lstm_scan_tc.cuh): gate_stride 0, dgates and y NCHW; else both channels-last, dgates' pixels
// gate_stride apart.
void weight_grad_cuda(std::uintptr_t dgates, std::uintptr_t y, std::uintptr_t dw, int64_t n, int64_t hid,
                      int64_t height, int64_t width, bool reverse, int64_t gate_stride, int dtype, int precision,
                      bool deterministic, std::uintptr_t stream);
#endif

}  // namespace diagonal_lstm
}  // namespace gm
