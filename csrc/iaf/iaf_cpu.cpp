// CPU IAF step: one fused pass over z, m, s (OpenMP over rows), instead of PyTorch's chain of elementwise ops.
#include "iaf/iaf.h"

#include <stdexcept>

#include "common/tensor_args.h"

namespace gm {
namespace iaf {
namespace {

template <typename T>
void forward_impl(const T* z, const T* m, const T* s, T* z_new, T* ld, int64_t rows, int64_t cols, int mode) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * cols;
    T acc = 0;
    for (int64_t c = 0; c < cols; ++c) {
      z_new[base + c] = step_forward<T>(z[base + c], m[base + c], s[base + c], mode, &acc);
    }
    ld[r] = acc;
  }
}

template <typename T>
void backward_impl(const T* z, const T* m, const T* s, const T* gz, const T* gl, T* dz, T* dm, T* ds, int64_t rows,
                   int64_t cols, int mode) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * cols;
    const T g = gl[r];
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = base + c;
      step_backward<T>(z[i], m[i], s[i], gz[i], g, mode, &dz[i], &dm[i], &ds[i]);
    }
  }
}

void check_dtype(int dtype) {
  DType dt = to_dtype(dtype);
  if (dt != DType::f32 && dt != DType::f64)
    throw std::invalid_argument("gm._C iaf_step cpu: float32 or float64 only (Python upcasts 16-bit tensors)");
}

}  // namespace

void step_forward_cpu(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t z_new, std::uintptr_t ld,
                      int64_t rows, int64_t cols, int mode, int dtype) {
  check_dtype(dtype);
  if (to_dtype(dtype) == DType::f32)
    forward_impl(ptr<const float>(z), ptr<const float>(m), ptr<const float>(s), ptr<float>(z_new), ptr<float>(ld),
                 rows, cols, mode);
  else
    forward_impl(ptr<const double>(z), ptr<const double>(m), ptr<const double>(s), ptr<double>(z_new),
                 ptr<double>(ld), rows, cols, mode);
}

void step_backward_cpu(std::uintptr_t z, std::uintptr_t m, std::uintptr_t s, std::uintptr_t gz, std::uintptr_t gl,
                       std::uintptr_t dz, std::uintptr_t dm, std::uintptr_t ds, int64_t rows, int64_t cols, int mode,
                       int dtype) {
  check_dtype(dtype);
  if (to_dtype(dtype) == DType::f32)
    backward_impl(ptr<const float>(z), ptr<const float>(m), ptr<const float>(s), ptr<const float>(gz),
                  ptr<const float>(gl), ptr<float>(dz), ptr<float>(dm), ptr<float>(ds), rows, cols, mode);
  else
    backward_impl(ptr<const double>(z), ptr<const double>(m), ptr<const double>(s), ptr<const double>(gz),
                  ptr<const double>(gl), ptr<double>(dz), ptr<double>(dm), ptr<double>(ds), rows, cols, mode);
}

}  // namespace iaf
}  // namespace gm
