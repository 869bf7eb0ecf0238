// Python entry points of minibatch discrimination. Python checks shapes, dtypes and devices and passes contiguous
// tensors' addresses; the CPU kernels take float32 and float64.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "common/registry.h"
#include "common/tensor_args.h"
#include "minibatch/minibatch.h"

namespace gm {
namespace minibatch {
namespace {

void forward_cpu_entry(std::uintptr_t m, std::uintptr_t o, int64_t n, int64_t b, int64_t c, bool exclude_self,
                       int dtype) {
  pybind11::gil_scoped_release nogil;
  switch (to_dtype(dtype)) {
    case DType::f32: return forward_cpu_f32(ptr<const float>(m), ptr<float>(o), n, b, c, exclude_self);
    case DType::f64: return forward_cpu_f64(ptr<const double>(m), ptr<double>(o), n, b, c, exclude_self);
    default: throw std::invalid_argument("gm._C.minibatch_fwd_cpu takes float32 or float64");
  }
}

void backward_cpu_entry(std::uintptr_t g, std::uintptr_t m, std::uintptr_t dm, int64_t n, int64_t b, int64_t c,
                        bool exclude_self, int dtype) {
  pybind11::gil_scoped_release nogil;
  switch (to_dtype(dtype)) {
    case DType::f32:
      return backward_cpu_f32(ptr<const float>(g), ptr<const float>(m), ptr<float>(dm), n, b, c, exclude_self);
    case DType::f64:
      return backward_cpu_f64(ptr<const double>(g), ptr<const double>(m), ptr<double>(dm), n, b, c, exclude_self);
    default: throw std::invalid_argument("gm._C.minibatch_bwd_cpu takes float32 or float64");
  }
}

}  // namespace
}  // namespace minibatch
}  // namespace gm

GM_REGISTER_BINDINGS(m) {
  namespace mb = gm::minibatch;
  m.def("minibatch_fwd_cpu", &mb::forward_cpu_entry, "minibatch discrimination forward (CPU)");
  m.def("minibatch_bwd_cpu", &mb::backward_cpu_entry, "minibatch discrimination backward (CPU)");
#ifdef GM_WITH_CUDA
  m.def("minibatch_fwd_cuda", &mb::forward_cuda, "minibatch discrimination forward (CUDA)");
  m.def("minibatch_bwd_cuda", &mb::backward_cuda, "minibatch discrimination backward (CUDA)");
#endif
}
