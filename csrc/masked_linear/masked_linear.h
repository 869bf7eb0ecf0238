// masked_linear on CUDA (gm/ops/masked_linear.py has the math and the checks; the GEMMs are in
// masked_linear_gemm.cuh):
//   forward:      y (rows, o) = act(x (rows, k_p) (W ⊙ M)^T + b), over the row CSR of the (128, 64 / elem) tile map
//   input grad:   dx (rows, k) = gp (rows, o_p) (W ⊙ M),          over the column CSR of the (64 / elem, 128) map
//   weight grad:  partial[s] (o, k) fp32 = M ⊙ gp^T x over split s of the rows, 128 x 128 tile flags
//   act grad:     gp = g act'(y) from the saved output y (ELU' = 1 or y + 1, ReLU' = [y > 0])
// Rows of x / gp / weight are zero-padded to 16-byte multiples (k_p, o_p) and the uint8 mask's rows to mask_ld
// (a multiple of 16) by Python, which checks shapes, dtypes and devices first. dtype: gm::DType code (f32, f16,
// bf16); precision: gm::Precision code (float32 only); act: 0 none, 1 ELU, 2 ReLU.
#pragma once
#include <cstdint>

#include "common/precision.h"

namespace gm {
namespace masked_linear {

#ifdef GM_WITH_CUDA
void forward_cuda(std::uintptr_t x, std::uintptr_t w, std::uintptr_t mask, std::uintptr_t bias, std::uintptr_t y,
                  std::uintptr_t offsets, std::uintptr_t idx, std::uintptr_t mids, int rows, int o, int k_padded,
                  int mask_ld, int act, int dtype, int precision, std::uintptr_t stream);
// y_below (rows, k) or 0: the input is the output of an activation act_below (ELU or ReLU) of the layer below, and
// dx comes back as that layer's pre-activation gradient dx * act'(y_below) (dx rounded to the dtype first).
void input_grad_cuda(std::uintptr_t gp, std::uintptr_t w, std::uintptr_t mask, std::uintptr_t dx,
                     std::uintptr_t offsets, std::uintptr_t idx, std::uintptr_t mids, int rows, int o, int o_padded,
                     int k, int k_padded, int mask_ld, std::uintptr_t y_below, int act_below, int dtype,
                     int precision, std::uintptr_t stream);
void weight_grad_cuda(std::uintptr_t gp, std::uintptr_t x, std::uintptr_t mask, std::uintptr_t flags,
                      std::uintptr_t partial, int rows, int o, int o_padded, int k, int k_padded,
                      std::int64_t rows_per_split, int splits, int dtype, int precision, std::uintptr_t stream);
void act_grad_cuda(std::uintptr_t g, std::uintptr_t y, std::uintptr_t out, std::int64_t total, int act, int dtype,
                   std::uintptr_t stream);
// dw (o, k) = the sum of partial's `splits` (o, k) float32 planes (0: none), db (o,) = column sums of gp (rows, o;
// row stride gp_ld elements; 0: none), both cast to dtype: one launch.
void grad_finish_cuda(std::uintptr_t partial, int splits, int o, int k, std::uintptr_t dw, std::uintptr_t gp,
                      int rows, int gp_ld, std::uintptr_t db, int dtype, std::uintptr_t stream);
#endif

}  // namespace masked_linear
}  // namespace gm
