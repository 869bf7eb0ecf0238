// Python entry points of diagonal_lstm. Python checks shapes, dtypes and devices and passes the tensors' addresses
// (NCHW contiguous, or channels-last with the pixel strides given); the CPU kernels take float32 and float64 (state in
// the same type).
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "common/registry.h"
#include "common/tensor_args.h"
#include "diagonal_lstm/diagonal_lstm.h"

namespace gm {
namespace diagonal_lstm {
namespace {

void forward_cpu_entry(std::uintptr_t gates, std::uintptr_t w_ss, std::uintptr_t y, std::uintptr_t c,
                       std::uintptr_t z, int64_t n, int64_t hid, int64_t height, int64_t width, bool reverse,
                       int dtype, int64_t s_gates, int64_t s_y, int64_t s_c, int64_t s_z) {
  const Strides st{s_gates, s_y, s_c, 0, s_z};  // the layouts (diagonal_lstm.h); all 0: NCHW
  pybind11::gil_scoped_release nogil;
  switch (to_dtype(dtype)) {
    case DType::f32:
      return forward_cpu(ptr<const float>(gates), ptr<const float>(w_ss), ptr<float>(y), ptr<float>(c), ptr<float>(z),
                         n, hid, height, width, reverse, st);
    case DType::f64:
      return forward_cpu(ptr<const double>(gates), ptr<const double>(w_ss), ptr<double>(y), ptr<double>(c),
                         ptr<double>(z), n, hid, height, width, reverse, st);
    default: throw std::invalid_argument("gm._C.diagonal_lstm_forward_cpu takes float32 or float64");
  }
}

void backward_cpu_entry(std::uintptr_t dy, std::uintptr_t gates, std::uintptr_t z, std::uintptr_t w_ss,
                        std::uintptr_t y, std::uintptr_t c, std::uintptr_t dgates, std::uintptr_t dw_ss, int64_t n,
                        int64_t hid, int64_t height, int64_t width, bool reverse, int dtype, int64_t s_gates,
                        int64_t s_y, int64_t s_c, int64_t s_dy, int64_t s_z) {
  const Strides st{s_gates, s_y, s_c, s_dy, s_z};
  pybind11::gil_scoped_release nogil;
  switch (to_dtype(dtype)) {
    case DType::f32:
      return backward_cpu(ptr<const float>(dy), ptr<const float>(gates), ptr<const float>(z), ptr<const float>(w_ss),
                          ptr<const float>(y), ptr<const float>(c), ptr<float>(dgates), ptr<float>(dw_ss), n, hid,
                          height, width, reverse, st);
    case DType::f64:
      return backward_cpu(ptr<const double>(dy), ptr<const double>(gates), ptr<const double>(z),
                          ptr<const double>(w_ss), ptr<const double>(y), ptr<const double>(c), ptr<double>(dgates),
                          ptr<double>(dw_ss), n, hid, height, width, reverse, st);
    default: throw std::invalid_argument("gm._C.diagonal_lstm_backward_cpu takes float32 or float64");
  }
}

}  // namespace
}  // namespace diagonal_lstm
}  // namespace gm

GM_REGISTER_BINDINGS(m) {
  namespace dl = gm::diagonal_lstm;
  m.def("diagonal_lstm_forward_cpu", &dl::forward_cpu_entry, "diagonal LSTM scan forward (CPU)");
  m.def("diagonal_lstm_backward_cpu", &dl::backward_cpu_entry, "diagonal LSTM scan backward (CPU)");
#ifdef GM_WITH_CUDA
  m.def("diagonal_lstm_forward_cuda", &dl::forward_cuda, "diagonal LSTM scan forward (CUDA)");
  m.def("diagonal_lstm_backward_cuda", &dl::backward_cuda, "diagonal LSTM scan backward (CUDA)");
  m.def("diagonal_lstm_weight_grad_cuda", &dl::weight_grad_cuda, "diagonal LSTM state-to-state weight gradient (CUDA)");
#endif
}
