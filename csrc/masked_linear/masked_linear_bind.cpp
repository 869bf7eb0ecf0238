// gm._C entry points of masked_linear. The cpu backend is PyTorch (see gm/ops/masked_linear.py), so only the CUDA
// kernels are bound here (raw pointers; Python checks and pads everything first).
#include "common/registry.h"
#include "masked_linear/masked_linear.h"

GM_REGISTER_BINDINGS(m) {
#ifdef GM_WITH_CUDA
  m.def("masked_linear_forward_cuda", &gm::masked_linear::forward_cuda,
        "y = act(x (W*M)^T + b) over the row CSR of the tile map: x, w, mask, bias, y, offsets, idx, mids, rows, o, "
        "k_padded, mask_ld, act, dtype, precision, stream");
  m.def("masked_linear_input_grad_cuda", &gm::masked_linear::input_grad_cuda,
        "dx = gp (W*M) over the column CSR of the tile map: gp, w, mask, dx, offsets, idx, mids, rows, o, o_padded, "
        "k, k_padded, mask_ld, y_below, act_below (dx * act'(y_below) when y_below), dtype, precision, stream");
  m.def("masked_linear_weight_grad_cuda", &gm::masked_linear::weight_grad_cuda,
        "partial[s] = M * (gp^T x) over row split s, fp32: gp, x, mask, flags, partial, rows, o, o_padded, k, "
        "k_padded, rows_per_split, splits, dtype, precision, stream");
  m.def("masked_linear_grad_finish_cuda", &gm::masked_linear::grad_finish_cuda,
        "dw = sum of the fp32 split partials, db = column sums of gp, cast, one launch: partial, splits, o, k, dw, gp, "
        "rows, gp_ld, db, dtype, stream");
  m.def("masked_linear_act_grad_cuda", &gm::masked_linear::act_grad_cuda,
        "gp = g * act'(y) from the output y: g, y, out, total, act (1 ELU, 2 ReLU), dtype, stream");
#else
  (void)m;
#endif
}
