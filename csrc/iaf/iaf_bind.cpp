// gm._C entry points of the IAF step (raw pointers; Python checks everything first).
#include "common/registry.h"
#include "iaf/iaf.h"

GM_REGISTER_BINDINGS(m) {
  m.def("iaf_step_forward_cpu", &gm::iaf::step_forward_cpu, "IAF step forward (CPU): z, m, s, z_new, ld, rows, cols, "
        "mode (0 gated, 1 affine), dtype");
  m.def("iaf_step_backward_cpu", &gm::iaf::step_backward_cpu,
        "IAF step backward (CPU): z, m, s, gz, gl, dz, dm, ds, rows, cols, mode, dtype");
#ifdef GM_WITH_CUDA
  m.def("iaf_step_forward_cuda", &gm::iaf::step_forward_cuda,
        "IAF step forward (CUDA): z, m, s, z_new, ld, rows, cols, mode, dtype, stream");
  m.def("iaf_step_backward_cuda", &gm::iaf::step_backward_cuda,
        "IAF step backward (CUDA): z, m, s, gz, gl, dz, dm, ds, rows, cols, mode, dtype, stream");
  m.def("iaf_made_output_forward_cuda", &gm::iaf::made_output_forward_cuda,
        "fused MADE output layer + IAF step, forward (CUDA): hidden, w, mask, bias, z, z_new, ld_partial, offsets, "
        "idx, mids, rows, d, h_padded, mask_ld, mode, dtype, precision, stream");
  m.def("iaf_made_output_backward_cuda", &gm::iaf::made_output_backward_cuda,
        "fused MADE output layer + IAF step, backward (CUDA): hidden, w, mask, bias, z, gz, gl, dz, dout, offsets, "
        "idx, mids, rows, d, h_padded, mask_ld, mode, dtype, precision, stream");
#endif
}
