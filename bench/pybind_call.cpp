// The cost of a pybind11 call's argument conversion, for `python -m bench.host --bindings`: three entry points with
// the argument list of gm._C.masked_conv_gemm_cuda (pointers, sizes, the kept taps, dtype, precision, stream, the
// fused options), doing nothing. `vectors` takes the taps as two sequences converted to std::vector per call, as that
// binding did until session 13; `table` takes them as one object built once (gm._C.masked_conv_taps); `none` takes
// no arguments (the call itself).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

struct Taps {
  int count = 0;
  int dy[64];
  int dx[64];
};

Taps make_taps(const std::vector<int>& dy, const std::vector<int>& dx) {
  if (dy.size() != dx.size() || dy.size() > 64) throw std::invalid_argument("taps: equal lengths up to 64");
  Taps t;
  t.count = static_cast<int>(dy.size());
  for (std::size_t i = 0; i < dy.size(); ++i) t.dy[i] = dy[i], t.dx[i] = dx[i];
  return t;
}

}  // namespace

PYBIND11_MODULE(gm_pybind_call, m) {
  using U = std::uintptr_t;
  py::class_<Taps>(m, "Taps", py::module_local());
  m.def("make_taps", &make_taps);
  m.def(
      "vectors",
      [](U, U, U, U, int, int, int, int, int, const std::vector<int>&, const std::vector<int>&, int, int, U, bool, bool,
         U, U) {},
      py::arg("a"), py::arg("b"), py::arg("bias"), py::arg("out"), py::arg("n"), py::arg("h"), py::arg("w"),
      py::arg("k_channels"), py::arg("n_out"), py::arg("dy"), py::arg("dx"), py::arg("dtype"), py::arg("precision"),
      py::arg("stream"), py::arg("out_nhwc") = false, py::arg("relu_a") = false, py::arg("gate") = 0,
      py::arg("residual") = 0);
  m.def(
      "table", [](U, U, U, U, int, int, int, int, int, const Taps&, int, int, U, bool, bool, U, U) {}, py::arg("a"),
      py::arg("b"), py::arg("bias"), py::arg("out"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("k_channels"),
      py::arg("n_out"), py::arg("taps"), py::arg("dtype"), py::arg("precision"), py::arg("stream"),
      py::arg("out_nhwc"), py::arg("relu_a"), py::arg("gate"), py::arg("residual"));
  m.def("none", []() {});
}
