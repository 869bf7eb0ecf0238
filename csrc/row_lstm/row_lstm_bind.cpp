// Python entry points of row_lstm (gm/ops/row_lstm.py checks shapes, dtypes and devices before calling).
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "common/registry.h"
#include "common/tensor_args.h"
#include "row_lstm/row_lstm.h"

namespace gm {
namespace row_lstm {
namespace {

using U = std::uintptr_t;

Shape make_shape(int64_t n, int64_t hidden, int64_t height, int64_t width, int64_t k) {
  return Shape{n, hidden, height, width, k};
}

template <typename T>
void forward_cpu_typed(U g, U w, U h0, U c0, U hs, U cs, Shape s) {
  forward_cpu<T>(ptr<const T>(g), ptr<const T>(w), ptr<const T>(h0), ptr<const T>(c0), ptr<T>(hs), ptr<T>(cs), s);
}

template <typename T>
void backward_cpu_typed(U dy, U g, U w, U h0, U c0, U hs, U cs, U dg, U dw, U dh0, U dc0, Shape s) {
  backward_cpu<T>(ptr<const T>(dy), ptr<const T>(g), ptr<const T>(w), ptr<const T>(h0), ptr<const T>(c0),
                  ptr<const T>(hs), ptr<const T>(cs), ptr<T>(dg), ptr<T>(dw), ptr<T>(dh0), ptr<T>(dc0), s);
}

void forward_cpu_entry(U g, U w, U h0, U c0, U hs, U cs, int64_t n, int64_t hidden, int64_t height, int64_t width,
                       int64_t k, int dtype) {
  const Shape s = make_shape(n, hidden, height, width, k);
  pybind11::gil_scoped_release release;
  switch (to_dtype(dtype)) {
    case DType::f32: return forward_cpu_typed<float>(g, w, h0, c0, hs, cs, s);
    case DType::f64: return forward_cpu_typed<double>(g, w, h0, c0, hs, cs, s);
    default: throw std::invalid_argument("row_lstm_forward_cpu takes float32 or float64 (Python widens the rest)");
  }
}

void backward_cpu_entry(U dy, U g, U w, U h0, U c0, U hs, U cs, U dg, U dw, U dh0, U dc0, int64_t n, int64_t hidden,
                        int64_t height, int64_t width, int64_t k, int dtype) {
  const Shape s = make_shape(n, hidden, height, width, k);
  pybind11::gil_scoped_release release;
  switch (to_dtype(dtype)) {
    case DType::f32: return backward_cpu_typed<float>(dy, g, w, h0, c0, hs, cs, dg, dw, dh0, dc0, s);
    case DType::f64: return backward_cpu_typed<double>(dy, g, w, h0, c0, hs, cs, dg, dw, dh0, dc0, s);
    default: throw std::invalid_argument("row_lstm_backward_cpu takes float32 or float64 (Python widens the rest)");
  }
}

#ifdef GM_WITH_CUDA
// gate_stride 0: the NCHW layouts; else channels-last, the gates' (backward: dgates') pixels that far apart.
void forward_cuda_entry(U g, U a_pack, U h0, U c0, U y, U hs, U cs, int64_t n, int64_t hidden, int64_t height,
                        int64_t width, int64_t k, int64_t gate_stride, int dtype, int precision, U stream) {
  forward_cuda(g, a_pack, h0, c0, y, hs, cs, make_shape(n, hidden, height, width, k), gate_stride, dtype, precision,
               stream);
}

void backward_cuda_entry(U dy, U a_pack, U h0, U c0, U hs, U cs, U dg, U dw, U dh0, U dc0, int64_t n, int64_t hidden,
                         int64_t height, int64_t width, int64_t k, int64_t gate_stride, int dtype, int precision,
                         bool deterministic, U stream) {
  backward_cuda(dy, a_pack, h0, c0, hs, cs, dg, dw, dh0, dc0, make_shape(n, hidden, height, width, k), gate_stride,
                dtype, precision, deterministic, stream);
}
#endif

}  // namespace
}  // namespace row_lstm
}  // namespace gm

GM_REGISTER_BINDINGS(m) {
  using namespace gm::row_lstm;
  m.def("row_lstm_forward_cpu", &forward_cpu_entry, "Row LSTM scan forward (C++ CPU, OpenMP over the batch)");
  m.def("row_lstm_backward_cpu", &backward_cpu_entry, "Row LSTM scan backward (C++ CPU, OpenMP over the batch)");
#ifdef GM_WITH_CUDA
  m.def("row_lstm_forward_cuda", &forward_cuda_entry, "Row LSTM scan forward (CUDA)");
  m.def("row_lstm_backward_cuda", &backward_cuda_entry, "Row LSTM scan backward (CUDA)");
#endif
}
