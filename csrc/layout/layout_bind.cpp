// gm._C entry point of the batched transpose (layout/layout.h).
#include <pybind11/pybind11.h>

#include "common/registry.h"
#include "layout/layout.h"

GM_REGISTER_BINDINGS(m) {
#ifdef GM_WITH_CUDA
  namespace py = pybind11;
  m.def("layout_transpose_cuda", &gm::layout::cuda_transpose,
        "out[b][c][r] = in[b][r][c] for b < batch, r < rows, c < cols (2- or 4-byte elements)", py::arg("src"),
        py::arg("dst"), py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("in_batch_stride"),
        py::arg("out_batch_stride"), py::arg("elem_bytes"), py::arg("stream"));
  m.def("layout_gather_cuda", &gm::layout::cuda_gather,
        "dst[i] = idx[i] < src_numel ? cast(src[idx[i]]) : 0 for i < n (float32/float16/bfloat16, int32 indices)",
        py::arg("src"), py::arg("idx"), py::arg("dst"), py::arg("n"), py::arg("src_numel"), py::arg("src_dtype"),
        py::arg("dst_dtype"), py::arg("stream"));
#else
  (void)m;
#endif
}
