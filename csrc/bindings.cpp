// The pybind11 module gm._C: build facts, then every op's entry points (registered in their own files).
#include <pybind11/pybind11.h>

#include "common/registry.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "gm native kernels (C++ CPU and CUDA); takes raw pointers, never links libtorch";
#ifdef GM_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = GM_CUDA_ARCHS_STR;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
  m.def("omp_max_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("with_openmp") = false;
  m.def("omp_max_threads", []() { return 1; });
#endif
  for (auto& bind : gm::binders()) bind(m);
}
