// gm._C entry points of masked_conv2d. The CPU backend of this op is PyTorch on cropped weights (see
// gm/ops/masked_conv.py), so only the CUDA kernels are bound here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/registry.h"
#include "masked_conv/masked_conv.h"

#ifdef GM_WITH_CUDA
namespace {

gm::masked_conv::TapTable make_taps(const std::vector<int>& dy, const std::vector<int>& dx) {
  if (dy.size() != dx.size()) throw std::invalid_argument("masked_conv2d: dy and dx must have the same length");
  if (dy.empty() || dy.size() > static_cast<std::size_t>(gm::masked_conv::kMaxTaps))
    throw std::invalid_argument("masked_conv2d: between 1 and " + std::to_string(gm::masked_conv::kMaxTaps) +
                                " kept taps, got " + std::to_string(dy.size()));
  gm::masked_conv::TapTable taps{};
  taps.count = static_cast<int>(dy.size());
  for (std::size_t i = 0; i < dy.size(); ++i) {
    taps.dy[i] = dy[i];
    taps.dx[i] = dx[i];
  }
  return taps;
}

}  // namespace
#endif

GM_REGISTER_BINDINGS(m) {
#ifdef GM_WITH_CUDA
  namespace py = pybind11;
  m.def("masked_conv_to_nhwc_cuda", &gm::masked_conv::cuda_to_nhwc,
        "NCHW-contiguous (N, C, H*W) -> NHWC (N, H*W, c_padded) with zero channels past C", py::arg("src"),
        py::arg("dst"), py::arg("n"), py::arg("c"), py::arg("c_padded"), py::arg("hw"), py::arg("elem_bytes"),
        py::arg("stream"));
  // The tap table is built once per layer (masked_conv_taps) and passed as an object: converting two Python
  // sequences to vectors on every launch, and keyword arguments, cost ~1.7 us of a ~2 us call (python -m bench.host
  // --bindings times a replica of this signature).
  // The launch entry points take every argument positionally.
  // module_local: the CUDA emulator's module (tools/cuda_emu) binds the same C++ type in the same process.
  py::class_<gm::masked_conv::TapTable>(m, "MaskedConvTaps", "the kept taps' (dy, dx) offsets, as the kernels take them",
                                        py::module_local())
      .def_property_readonly("count", [](const gm::masked_conv::TapTable& t) { return t.count; });
  m.def("masked_conv_taps", &make_taps, "the tap table of kept-tap offsets dy, dx (equal lengths, 1 to kMaxTaps)",
        py::arg("dy"), py::arg("dx"));
  m.def("masked_conv_gemm_cuda",
        [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t bias, std::uintptr_t out, int n, int h, int w,
           int k_channels, int n_out, const gm::masked_conv::TapTable& taps, int dtype, int precision,
           std::uintptr_t stream, bool out_nhwc, bool relu_a, std::uintptr_t gate, std::uintptr_t residual,
           std::uintptr_t centre) {
          gm::masked_conv::cuda_conv_gemm(a, b, bias, out, n, h, w, k_channels, n_out, out_nhwc, taps, dtype,
                                          precision, stream, relu_a, gate, residual, centre);
        },
        "masked_conv2d forward / input gradient (implicit GEMM): a (N,H,W,Kp) NHWC, b (T,n_out,Kp), out (N,n_out,H,W) "
        "NCHW, or (N,H,W,n_out) NHWC (channels-last) when out_nhwc; relu_a: relu(a); gate, residual: 0 or pointers; "
        "centre: 0 or int32 (lo, hi) per 128-channel tile of n_out, the channels the centre tap connects",
        py::arg("a"), py::arg("b"), py::arg("bias"), py::arg("out"), py::arg("n"), py::arg("h"), py::arg("w"),
        py::arg("k_channels"), py::arg("n_out"), py::arg("taps"), py::arg("dtype"), py::arg("precision"),
        py::arg("stream"), py::arg("out_nhwc"), py::arg("relu_a"), py::arg("gate"), py::arg("residual"),
        py::arg("centre"));
  m.def("masked_conv_wgrad_cuda", &gm::masked_conv::cuda_weight_grad,
        "masked_conv2d packed weight gradient partial sums (splits, T, C_in, C_out) float32; db_partial: 0 or the "
        "bias gradient's (splits, C_out) float32 partial sums; centre: 0 or the forward's centre table",
        py::arg("x"), py::arg("grad"), py::arg("partial"), py::arg("n"), py::arg("h"), py::arg("w"),
        py::arg("c_in_padded"), py::arg("c_out_padded"), py::arg("c_in"), py::arg("c_out"), py::arg("taps"),
        py::arg("pixels_per_split"), py::arg("splits"), py::arg("dtype"), py::arg("precision"), py::arg("stream"),
        py::arg("relu_x"), py::arg("db_partial"), py::arg("centre"));
  m.def("masked_conv_wgrad_unpack_cuda", &gm::masked_conv::cuda_wgrad_unpack,
        "masked_conv2d weight gradient (C_out, C_in, kh*kw) from the split partial sums: sum, scatter, zero masked taps, "
        "cast",
        py::arg("partial"), py::arg("tap_at"), py::arg("keep"), py::arg("dw"), py::arg("splits"), py::arg("taps"),
        py::arg("c_in"), py::arg("c_out"), py::arg("kk"), py::arg("dtype"), py::arg("stream"), py::arg("db_partial"),
        py::arg("db"));
#else
  (void)m;
#endif
}
