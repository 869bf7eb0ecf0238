// CUDA backend of row_lstm: one launch per pass of the scan on tensor cores, plus a tiled GEMM for dw_ss.
//
// Scan kernels: one thread block per batch element loops over the rows (the state-to-state conv couples neighbouring
// columns and every output channel reads every input channel of the previous row, so a row is finished by one block
// before the next starts: one __syncthreads per row, no grid-wide sync). Each row is one small GEMM on mma.sync
// (common/lstm_scan_tc.cuh):
//   forward:  z (4hp x cols) = A (4hp x k hp) . [h_{r-1} shifted by tap t - k/2, t < k] + gates row r;
//             A's rows permuted so each 32-row group holds the i, f, o, g rows of 8 units (a thread ends up with all
//             four gates of its cells); h_{r-1} lives in shared memory as [k/2 + column][unit] with k/2 zero
//             columns each side (the taps are the same tile at shifted start rows), double-buffered by row parity,
//             rounded to the input dtype (the dot operand, as the triton backend).
//   backward: rows bottom to top, pull form: dh_r (hp x cols) = A^T-form (hp x k 4hp) . [dz_{r+1} shifted by
//             k/2 - t] + dy_r; the gate activations come from cs, where the forward stored them, so nothing is
//             recomputed; dc passes up a column through a per-cell shared slot; a warp pair splits each item's GEMM
//             by K (row_lstm_bwd_tc). After row 0, dh0 is one more product over dz_0, dc0 the slots.
// A is packed by gm/ops/_lstm_cuda.py in fragment order and read from global memory (L1-resident at h <= 64).
// Layouts, one of two per call (kNhwc, a template argument of both scans):
//   NCHW (the op gm.ops.row_lstm): gates, dgates (N, 4h, H, W), y, dy (N, h, H, W) in the input dtype; hs (N, h, H,
//     W) float32 (h before rounding; y is hs for float32); cs (N, 5h, H, W) float32 = [c, sig(z_i), sig(z_f),
//     sig(z_o), tanh(z_g)], the triton backend's layout.
//   channels-last (gm.nn.RowLSTM's one-node path on cuda, which keeps its convolutions' operands NHWC): gates and
//     dgates (N, H, W, 4h) with pixels g.gs >= 4h elements apart (the layer's own conv output: 4h), y, dy, hs
//     (N, H, W, h), cs (N, H, W, 5h) (the diagonal scans' state layout). A thread's cells are one unit at 8 columns,
//     and the 8 lanes of a quad column hold 8 consecutive units: per-pixel contiguous units make each of a warp's
//     state and gate accesses 4 pixel segments of 8 units instead of 8 unit rows of 4 columns.
//   h0, c0 (N, h, W) and dh0, dc0 (N, h, W) float32 in both (read or written once per image).
// bfloat16/float16 on m16n8k16 (activations by tanh.approx), float32 on tf32 m16n8k8 when torch allows tf32 for
// convolutions, else 3xTF32.
// dw_ss[o, i, t] = sum over pixels of dz[o, p] h_{r-1}[i, w + t - k/2]: a (4h x P) @ (P x h*k) GEMM on tensor cores
// (lstm_tc::lstm_wgrad_tc, kind 0: h_{r-1} gathered with the tap shifts from hs and h0, in the scans' layout (its
// kNhwc variant channels-last), pixels split over gridDim.z with atomicAdd into a zeroed float buffer).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/lstm_scan_tc.cuh"
#include "row_lstm/row_lstm.h"

namespace gm {
namespace row_lstm {
namespace {

using lstm_tc::act_sigmoid;
using lstm_tc::act_tanh;
using lstm_tc::kItemRows;
using lstm_tc::kMaxWarps;
using lstm_tc::step_gemm;
using lstm_tc::zero_shared;
using mma::from_float;
using mma::kStepBytes;
using mma::smem_addr;
using mma::to_float;

struct Geometry {
  int hid, hp, height, width, k, chunks;  // chunks: 32-column groups
  int gs;  // elements from one pixel's gates (forward) or gate gradients (backward) to the next's, channels-last;
           // 4h in the NCHW layout (where an image's gates are then hw * gs elements, as channels-last)
  __device__ int cols() const { return kItemRows * chunks; }
  __device__ int pad() const { return k / 2; }
};

// Element offsets inside one image in either layout, 32-bit (make_geometry bounds every image's tensors below 2^31
// elements): channel c of pixel p at c * hw + p NCHW, at p * pixel_stride + c channels-last (pixel_stride: the
// tensor's channels per pixel, or gs for the gates).
template <bool kNhwc>
struct ImageOffsets {
  int hw;
  __device__ int at(int channel, int pix, int pixel_stride) const {
    return kNhwc ? pix * pixel_stride + channel : channel * hw + pix;
  }
  __device__ int channel_step() const { return kNhwc ? 1 : hw; }  // from one channel of a pixel to the next
};

template <typename T>
__device__ __forceinline__ float to_state(const T* p, int64_t i) {
  return p != nullptr ? to_float(p[i]) : 0.f;
}

template <typename T, Precision P, bool kNhwc>
__global__ void __launch_bounds__(kMaxWarps * 32)
    row_lstm_fwd_tc(const T* __restrict__ gates, const uint4* __restrict__ a_pack, const T* __restrict__ h0,
                    const T* __restrict__ c0, T* __restrict__ y, float* __restrict__ hs, float* __restrict__ cs,
                    Geometry g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int cols = g.cols(), pad = g.pad(), hp = g.hp, hid = g.hid, W = g.width;
  const int row_bytes = lstm_tc::row_bytes(hp, sizeof(T)), row_elems = row_bytes / int(sizeof(T));
  const int buf_bytes = (cols + 2 * pad) * row_bytes;
  float* c_buf = reinterpret_cast<float*>(smem_raw + 2 * buf_bytes);  // [column][hp + 1]
  const int c_stride = hp + 1;
  zero_shared(smem_raw, 2 * buf_bytes + cols * c_stride * 4);
  __syncthreads();
  const int64_t n = blockIdx.x, hw = int64_t(g.height) * W;
  const ImageOffsets<kNhwc> im{static_cast<int>(hw)};
  const int block = hid * im.channel_step();  // from gate block q (or cs value q) to q + 1
  // h_{-1} = h0 (rounded to the dot dtype) and c_{-1} = c0, or zero.
  T* s0 = reinterpret_cast<T*>(smem_raw);
  for (int e = threadIdx.x; e < hid * W; e += blockDim.x) {
    const int unit = e / W, col = e % W;
    s0[(pad + col) * row_elems + unit] = from_float<T>(to_state(h0, (n * hid + unit) * W + col));
    c_buf[col * c_stride + unit] = to_state(c0, (n * hid + unit) * W + col);
  }
  __syncthreads();

  const T* gates_n = gates + n * hw * g.gs;
  float* hs_n = hs + n * hid * hw;
  float* cs_n = cs + n * 5 * hid * hw;
  T* y_n = y != nullptr ? y + n * hid * hw : nullptr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int groups = hp / 8, items = groups * g.chunks;
  const int tap_steps = hp * int(sizeof(T)) / kStepBytes;
  const std::uint32_t s_base = smem_addr(smem_raw);
  for (int r = 0; r < g.height; ++r) {
    const std::uint32_t rd = s_base + (r & 1) * buf_bytes;
    T* wr = reinterpret_cast<T*>(smem_raw + ((r + 1) & 1) * buf_bytes);
    for (int item = warp; item < items; item += warps) {
      const int group = item % groups, col0 = (item / groups) * kItemRows;
      const int unit = group * 8 + gq;
      const bool real = unit < hid;
      const int plane = r * W;  // offset of row r inside an (H, W) plane (32-bit: per-image offsets fit, checked at launch)
      float gv[4][4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + 8 * j + 2 * tq + e;
          const bool in = real && col < W;
          const T* at = gates_n + (in ? im.at(unit, plane + col, g.gs) : 0);
#pragma unroll
          for (int q = 0; q < 4; ++q) gv[q][j][e] = in ? to_float(__ldcs(at + q * block)) : 0.f;  // read once
        }
      float acc[2][4][4];
      // Tap t reads column col + t - k/2, at buffer row col + t.
      step_gemm<T, P, 2>(acc, a_pack, 2 * group, rd, row_bytes, col0, 1, g.k, tap_steps, lane);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + 8 * j + 2 * tq + e;
          float* c_at = c_buf + col * c_stride + unit;
          float h = 0.f;
          if (real && col < W) {
            // m16 tile 0 holds gates i (rows 0-7) and f (rows 8-15) of the group's units, tile 1 gates o and g.
            const float s_i = act_sigmoid<T>(acc[0][j][e] + gv[0][j][e]);
            const float s_f = act_sigmoid<T>(acc[0][j][2 + e] + gv[1][j][e]);
            const float s_o = act_sigmoid<T>(acc[1][j][e] + gv[2][j][e]);
            const float t_g = act_tanh<T>(acc[1][j][2 + e] + gv[3][j][e]);
            const float c = s_f * *c_at + s_i * t_g;
            h = s_o * act_tanh<T>(c);
            *c_at = c;
            const int at = im.at(unit, plane + col, hid);
            hs_n[at] = h;
            if (y_n != nullptr) y_n[at] = from_float<T>(h);
            float* st = cs_n + im.at(unit, plane + col, 5 * hid);
            st[0] = c;
            st[block] = s_i;
            st[2 * block] = s_f;
            st[3 * block] = s_o;
            st[4 * block] = t_g;
          }
          wr[(pad + col) * row_elems + unit] = from_float<T>(h);
        }
    }
    __syncthreads();
  }
}

// Backward items (16 units x 32 columns) run on warp pairs splitting the row's GEMM by K (half of every tap's
// k-steps each, lstm_tc::half_k_gemm): the two exchange the partial dh of the columns the other finishes through
// shared memory, and each finishes 16 of the item's 32 columns, its cells' saved state loaded before the GEMM.
template <typename T, Precision P, bool kNhwc>
__global__ void __launch_bounds__(kMaxWarps * 32)
    row_lstm_bwd_tc(const T* __restrict__ dy, const uint4* __restrict__ a_pack, const T* __restrict__ c0,
                    const float* __restrict__ cs, T* __restrict__ dgates, float* __restrict__ dh0,
                    float* __restrict__ dc0, Geometry g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int cols = g.cols(), pad = g.pad(), hp = g.hp, hid = g.hid, W = g.width;
  const int row_bytes = lstm_tc::row_bytes(4 * hp, sizeof(T)), row_elems = row_bytes / int(sizeof(T));
  const int buf_bytes = (cols + 2 * pad) * row_bytes;
  float* dc_buf = reinterpret_cast<float*>(smem_raw + 2 * buf_bytes);  // [column][hp + 1]: dc * sig(f)
  const int c_stride = hp + 1;
  float* xchg = dc_buf + cols * c_stride;  // [pair][kh][register][lane]: the partial dh a warp hands its partner
  zero_shared(smem_raw, 2 * buf_bytes + cols * c_stride * 4);
  __syncthreads();

  const int64_t n = blockIdx.x, hw = int64_t(g.height) * W;
  const ImageOffsets<kNhwc> im{static_cast<int>(hw)};
  const int row_above = kNhwc ? W * 5 * hid : W;  // from a pixel's cs to that of the pixel above
  // (The gate-block stride hid * im.channel_step() is written out where used: hoisted as the forward's `block`, it
  // cost the NCHW backward 26 SASS instructions a row, sm_90 bf16.)
  const T* dy_n = dy + n * hid * hw;
  const float* cs_n = cs + n * 5 * hid * hw;
  // (NCHW: n 4h hw in the order the kernel had before its channels-last variant, whose SASS is then as it was)
  T* dg_n = dgates + (kNhwc ? n * hw * g.gs : n * 4 * hid * hw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int tiles = hp / 16, items = tiles * g.chunks, pairs = lstm_tc::bwd_pairs(items);
  const int pair = warp >> 1, kh = warp & 1;  // kh: this warp's half of the k-steps, and its columns (j = 2 kh, 2 kh + 1)
  const int tap_steps = 4 * hp * int(sizeof(T)) / kStepBytes;
  const std::uint32_t s_base = smem_addr(smem_raw);
  float* x_mine = xchg + (pair * 2 + kh) * lstm_tc::kXchgFloats + lane;
  const float* x_other = xchg + (pair * 2 + (kh ^ 1)) * lstm_tc::kXchgFloats + lane;
  // Tap t pulls dz_{r+1} from column col - t + k/2, at buffer row col + 2 (k/2) - t = col + k - 1 - t.
  for (int r = g.height - 1; r >= 0; --r) {
    const std::uint32_t rd = s_base + ((r + 1) & 1) * buf_bytes;  // dz of row r + 1
    T* wr = reinterpret_cast<T*>(smem_raw + (r & 1) * buf_bytes);
    const int plane = r * W;
    for (int base = 0; base < items; base += pairs) {  // every warp runs every round: the barriers below match
      const int item = base + pair;
      const bool active = item < items;
      const int tile = item % tiles, col0 = (item / tiles) * kItemRows;
      // This thread's 8 cells (c, the four activations, c of the row above or c0, dy), loaded unconditionally
      // before the GEMM (zero outside the image) so the loads issue together and their latency hides behind it.
      float in[2][2][2][7];  // [half (unit + 8)][j - 2 kh][e][value]
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int unit = tile * 16 + gq + 8 * half, col = col0 + 8 * (2 * kh + jj) + 2 * tq + e;
            const bool ok = active && unit < hid && col < W;
            const float* st = cs_n + (ok ? im.at(unit, plane + col, 5 * hid) : 0);
            const int at_dy = ok ? im.at(unit, plane + col, hid) : 0;
#pragma unroll
            for (int q = 0; q < 5; ++q) in[half][jj][e][q] = ok ? st[q * hid * im.channel_step()] : 0.f;
            in[half][jj][e][5] = !ok ? 0.f : r > 0 ? st[-row_above] : to_state(c0, (n * hid + unit) * W + col);
            in[half][jj][e][6] = ok ? to_float(dy_n[at_dy]) : 0.f;
          }
      float acc[1][4][4];
      if (active) {
        lstm_tc::half_k_gemm<T, P, 1>(acc, a_pack, tile, rd, row_bytes, col0 + g.k - 1, -1, g.k, tap_steps, kh, lane);
        lstm_tc::pair_put(acc, kh, x_mine);
      }
      __syncthreads();  // the partners' partial sums are in shared memory
      if (active) {
        float dh_acc[2][4];  // this warp's columns: j = 2 kh + jj
        lstm_tc::pair_sum(acc, kh, x_other, dh_acc);
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int jj = 0; jj < 2; ++jj)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int unit = tile * 16 + gq + 8 * half, col = col0 + 8 * (2 * kh + jj) + 2 * tq + e;
              float* dc_at = dc_buf + col * c_stride + unit;
              float dz[4] = {0.f, 0.f, 0.f, 0.f};
              if (unit < hid && col < W) {
                *dc_at = lstm_tc::cell_backward<T>(in[half][jj][e], dh_acc[jj][2 * half + e], *dc_at, dz);
                const int at = im.at(unit, plane + col, g.gs);
#pragma unroll
                for (int q = 0; q < 4; ++q) dg_n[at + q * hid * im.channel_step()] = from_float<T>(dz[q]);
              }
              T* row = wr + (pad + col) * row_elems + unit;
#pragma unroll
              for (int q = 0; q < 4; ++q) row[q * hp] = from_float<T>(dz[q]);
            }
      }
      if (base + pairs < items) __syncthreads();  // this round's exchange slots are read before the next round's writes
    }
    __syncthreads();  // dz of row r complete for every warp; the buffer of row r + 1 is free
  }
  if (dh0 == nullptr && dc0 == nullptr) return;
  // dh0 = the transposed conv of dz_0 (buffer 0 after the last row), dc0 = the slots.
  for (int item = warp; item < items; item += warps) {
    const int tile = item % tiles, col0 = (item / tiles) * kItemRows;
    float acc[1][4][4];
    if (dh0 != nullptr) step_gemm<T, P, 1>(acc, a_pack, tile, s_base, row_bytes, col0 + g.k - 1, -1, g.k, tap_steps, lane);
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int unit = tile * 16 + gq + 8 * half, col = col0 + 8 * j + 2 * tq + e;
          if (unit >= hid || col >= W) continue;
          const int64_t at = (n * hid + unit) * W + col;
          if (dh0 != nullptr) dh0[at] = acc[0][j][2 * half + e];
          if (dc0 != nullptr) dc0[at] = dc_buf[col * c_stride + unit];
        }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch.

// gate_stride 0: the NCHW layout; else channels-last with that pixel stride (see forward_cuda).
Geometry make_geometry(const Shape& s, int64_t gate_stride) {
  const int64_t pixels = s.height * s.width;
  if (5 * s.hidden * pixels >= (int64_t(1) << 31))
    throw std::invalid_argument("gm row_lstm (cuda): an image's saved state (5h x H x W = " +
                                std::to_string(5 * s.hidden * pixels) +
                                " elements) must stay below 2^31 for the kernels' 32-bit offsets: use the triton backend");
  const int64_t gs = gate_stride > 0 ? gate_stride : 4 * s.hidden;
  if (gs < 4 * s.hidden || gs * pixels >= (int64_t(1) << 31))
    throw std::invalid_argument("gm row_lstm (cuda): gate_stride must be at least 4h = " +
                                std::to_string(4 * s.hidden) +
                                " and an image's gates (gate_stride x H x W) below 2^31 elements, got " +
                                std::to_string(gate_stride));
  return Geometry{static_cast<int>(s.hidden), static_cast<int>((s.hidden + 15) / 16 * 16), static_cast<int>(s.height),
                  static_cast<int>(s.width), static_cast<int>(s.k),
                  static_cast<int>((s.width + kItemRows - 1) / kItemRows), static_cast<int>(gs)};
}

size_t smem_bytes(const Geometry& g, int gates_per_row, size_t elem) {
  const size_t cols = size_t(kItemRows) * g.chunks;
  return 2 * (cols + 2 * (g.k / 2)) * lstm_tc::row_bytes(gates_per_row * g.hp, elem) +
         cols * (g.hp + 1) * sizeof(float);
}

// The backward's: smem_bytes with four gate blocks per row, plus the warp pairs' exchange slots.
size_t bwd_smem_bytes(const Geometry& g, size_t elem) {
  return smem_bytes(g, 4, elem) +
         size_t(2 * lstm_tc::bwd_pairs(g.hp / 16 * g.chunks)) * lstm_tc::kXchgFloats * sizeof(float);
}

template <typename T, Precision P>
struct Forward {
  static void run(std::uintptr_t gates, std::uintptr_t a_pack, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t y,
                  std::uintptr_t hs, std::uintptr_t cs, Shape s, int64_t gate_stride, cudaStream_t stream) {
    if (s.n == 0 || s.height == 0 || s.width == 0) return;
    const Geometry g = make_geometry(s, gate_stride);
    auto kernel = gate_stride > 0 ? row_lstm_fwd_tc<T, P, true> : row_lstm_fwd_tc<T, P, false>;
    const size_t smem = smem_bytes(g, 1, sizeof(T));
    lstm_tc::set_smem(kernel, smem, "row_lstm (cuda): the forward scan");
    kernel<<<static_cast<unsigned>(s.n), lstm_tc::threads_for(g.hp / 8 * g.chunks), smem, stream>>>(
        ptr<const T>(gates), ptr<const uint4>(a_pack), ptr<const T>(h0), ptr<const T>(c0),
        y == hs ? nullptr : ptr<T>(y), ptr<float>(hs), ptr<float>(cs), g);
    GM_CUDA_CHECK_LAUNCH();
  }
};

template <typename T, Precision P>
struct Backward {
  static void run(std::uintptr_t dy, std::uintptr_t a_pack, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t hs,
                  std::uintptr_t cs, std::uintptr_t dg, std::uintptr_t dw, std::uintptr_t dh0, std::uintptr_t dc0,
                  Shape s, int64_t gate_stride, bool deterministic, cudaStream_t stream) {
    if (s.n == 0 || s.height == 0 || s.width == 0) {
      const size_t states = sizeof(float) * s.n * s.hidden * s.width;
      if (dw != 0) GM_CUDA_CHECK(cudaMemsetAsync(ptr<float>(dw), 0, sizeof(float) * 4 * s.hidden * s.hidden * s.k, stream));
      if (dh0 != 0) GM_CUDA_CHECK(cudaMemsetAsync(ptr<float>(dh0), 0, states, stream));
      if (dc0 != 0) GM_CUDA_CHECK(cudaMemsetAsync(ptr<float>(dc0), 0, states, stream));
      return;
    }
    const Geometry g = make_geometry(s, gate_stride);
    const bool nhwc = gate_stride > 0;
    auto kernel = nhwc ? row_lstm_bwd_tc<T, P, true> : row_lstm_bwd_tc<T, P, false>;
    const size_t smem = bwd_smem_bytes(g, sizeof(T));
    lstm_tc::set_smem(kernel, smem, "row_lstm (cuda): the backward scan");
    kernel<<<static_cast<unsigned>(s.n), 64 * lstm_tc::bwd_pairs(g.hp / 16 * g.chunks), smem, stream>>>(
        ptr<const T>(dy), ptr<const uint4>(a_pack), ptr<const T>(c0), ptr<const float>(cs), ptr<T>(dg),
        ptr<float>(dh0), ptr<float>(dc0), g);
    GM_CUDA_CHECK_LAUNCH();
    if (dw == 0) return;
    // Channels-last: dgates' pixels gs apart, hs's h (kind 0: taps along the width of the row above, h0 at row -1).
    const lstm_tc::WgradArgs wa{s.n, g.hid, g.height, g.width, g.k, 0, g.k / 2, 0, g.gs, g.hid};
    lstm_tc::launch_wgrad<T, float, P>(ptr<const T>(dg), ptr<const float>(hs), ptr<const T>(h0), ptr<float>(dw), wa,
                                       stream, nhwc, deterministic);
  }
};

}  // namespace

void forward_cuda(std::uintptr_t gates, std::uintptr_t a_pack, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t y,
                  std::uintptr_t hs, std::uintptr_t cs, Shape s, int64_t gate_stride, int dtype, int precision,
                  std::uintptr_t stream) {
  lstm_tc::dispatch<Forward>("row_lstm", dtype, precision, gates, a_pack, h0, c0, y, hs, cs, s, gate_stride,
                             to_stream(stream));
}

void backward_cuda(std::uintptr_t dy, std::uintptr_t a_pack, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t hs,
                   std::uintptr_t cs, std::uintptr_t dgates, std::uintptr_t dw, std::uintptr_t dh0, std::uintptr_t dc0,
                   Shape s, int64_t gate_stride, int dtype, int precision, bool deterministic,
                   std::uintptr_t stream) {
  lstm_tc::dispatch<Backward>("row_lstm", dtype, precision, dy, a_pack, h0, c0, hs, cs, dgates, dw, dh0, dc0, s,
                              gate_stride, deterministic, to_stream(stream));
}

}  // namespace row_lstm
}  // namespace gm
