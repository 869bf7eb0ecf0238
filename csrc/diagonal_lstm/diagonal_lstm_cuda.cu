// Diagonal LSTM on CUDA tensor cores: one block per batch element runs the whole scan (the W+H-1 skewed columns),
// one launch per pass; see diagonal_lstm.h for the equations and gm/ops/diagonal_lstm.py for the layouts.
//
// Forward, skewed step t (image row i handles pixel (i, t - i); columns mirrored when reverse). The recurrence is one
// small GEMM per step,
//     A (4hp x 2hp) . S (2hp x rows) = the four gates' state terms of every (unit, image row),
// A = [w_up | w_left] with its rows permuted so that each 32-row group holds the i, f, o, g rows of 8 units (an m16
// tile pair: after the MMAs a thread holds all four gates of its cells), S = [h(row - 1); h(row)] of step t - 1.
// h of the previous step lives in shared memory as [buffer row][unit] (row r + 1 holds image row r, row 0 stays zero:
// the up tap is the same tile one row earlier), double-buffered by step parity: one barrier per step. The B
// fragments come from it by ldmatrix; the A fragments from global memory, packed by the launcher in fragment order
// (one 16-byte load per lane and k-step, L1-resident at h <= 64). A warp owns 8 units x 32 image rows (one "item");
// c stays in shared memory at a slot only its thread touches.
//
// The forward stores y and the state the backward reads, per pixel [c, sigmoid(a_i), sigmoid(a_f), sigmoid(a_o),
// tanh(a_g)] (5h floats), so no gate pre-activation is ever recomputed. Backward walks the steps in reverse, in pull
// form: dh(i, t) = dy + w_up^T . da(i + 1, t + 1) + w_left^T . da(i, t + 1), one (hp x 8hp) . (8hp x rows) GEMM per
// step over da of step t + 1 (shared memory, [image row][gate, unit], double-buffered); a pair of warps owns 16 units x
// 32 rows (split by K, see diagonal_lstm_bwd_tc) and dc * sigmoid(f) passes to the left neighbour through a
// per-cell shared slot.
//
// Gates, y, dy, dgates are channels-last (N, H, W, C); the state is (N, H, W, 5h) float32. bfloat16/float16 run on
// m16n8k16 tensor cores with float32 accumulation (h and da rounded to the input dtype, the values y and dgates hold);
// float32 on tf32 m16n8k8 when torch allows tf32 for convolutions, else 3xTF32 (fp32-level error); 16-bit inputs
// take tanh.approx for their activations (lstm_tc::act_tanh). The launcher pads h to hp, a multiple of 16. dw_ss is
// lstm_tc::lstm_wgrad_tc on NCHW dgates and y (weight_grad_cuda).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/lstm_scan_tc.cuh"
#include "diagonal_lstm/diagonal_lstm.h"

namespace gm {
namespace diagonal_lstm {
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
  int hid, hp, height, width, chunks;  // chunks: 32-row groups of image rows
  bool reverse;
  int gs;  // elements from one pixel's gates (forward) or gate gradients (backward) to the next: 4h, or 8h where
           // both directions' halves share one (N, H, W, 8h) tensor (gm.nn.DiagonalBiLSTM's channels-last path)
  __device__ int rows() const { return kItemRows * chunks; }
  __device__ bool inside(int i, int t) const { return i < height && t - i >= 0 && t - i < width; }
  // Pixel of (row i, step t) inside the image, 32-bit: every per-image offset fits (checked at launch), and 64-bit
  // index math was half of a step's instructions (sm_90 SASS: ~1350 of 2700 per warp and step in the forward).
  __device__ int pix(int i, int t) const { return i * width + (reverse ? width - 1 - (t - i) : t - i); }
};

template <typename T, Precision P>
__global__ void __launch_bounds__(kMaxWarps * 32)
    diagonal_lstm_fwd_tc(const T* __restrict__ gates, const uint4* __restrict__ a_pack, T* __restrict__ y,
                         float* __restrict__ state, Geometry g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = g.rows(), hp = g.hp, hid = g.hid;
  const int row_bytes = lstm_tc::row_bytes(hp, sizeof(T));
  const int buf_bytes = (rows + 1) * row_bytes;
  float* c_buf = reinterpret_cast<float*>(smem_raw + 2 * buf_bytes);  // [image row][hp + 1]
  const int c_stride = hp + 1;
  zero_shared(smem_raw, 2 * buf_bytes + rows * c_stride * 4);
  __syncthreads();

  const int64_t n = blockIdx.x, hw = int64_t(g.height) * g.width;
  const T* gates_n = gates + n * hw * g.gs;
  T* y_n = y + n * hw * hid;
  float* st_n = state + n * hw * 5 * hid;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int groups = hp / 8, items = groups * g.chunks;
  const int tap_steps = hp * int(sizeof(T)) / kStepBytes;
  const std::uint32_t s_base = smem_addr(smem_raw);

  for (int t = 0; t < g.width + g.height - 1; ++t) {
    const std::uint32_t rd = s_base + (t & 1) * buf_bytes;
    T* wr = reinterpret_cast<T*>(smem_raw + ((t + 1) & 1) * buf_bytes);
    for (int item = warp; item < items; item += warps) {
      const int group = item % groups, row0 = (item / groups) * kItemRows;
      const int unit = group * 8 + gq;
      const bool real = unit < hid;
      // This thread's cells: unit x image rows row0 + 8 j + 2 tq + e. Their gate inputs first (independent of the
      // recurrence, so their latency overlaps the MMAs).
      float gv[4][4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = row0 + 8 * j + 2 * tq + e;
          const bool in = real && g.inside(i, t);
          const T* at = gates_n + (in ? g.pix(i, t) * g.gs + unit : 0);
#pragma unroll
          for (int q = 0; q < 4; ++q) gv[q][j][e] = in ? to_float(__ldcs(at + q * hid)) : 0.f;  // read once
        }
      float acc[2][4][4];
      // Up tap: image row i - 1 sits at buffer row i; left tap: image row i at buffer row i + 1.
      step_gemm<T, P, 2>(acc, a_pack, 2 * group, rd, row_bytes, row0, 1, 2, tap_steps, lane);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = row0 + 8 * j + 2 * tq + e;
          float* c_at = c_buf + i * c_stride + unit;
          float c = 0.f, h = 0.f;
          if (real && g.inside(i, t)) {
            // m16 tile 0 holds gates i (rows 0-7) and f (rows 8-15) of the group's units, tile 1 gates o and g.
            const float s_i = act_sigmoid<T>(acc[0][j][e] + gv[0][j][e]);
            const float s_f = act_sigmoid<T>(acc[0][j][2 + e] + gv[1][j][e]);
            const float s_o = act_sigmoid<T>(acc[1][j][e] + gv[2][j][e]);
            const float t_g = act_tanh<T>(acc[1][j][2 + e] + gv[3][j][e]);
            c = s_f * *c_at + s_i * t_g;
            const T h_t = from_float<T>(s_o * act_tanh<T>(c));
            h = to_float(h_t);
            const int p = g.pix(i, t);
            y_n[p * hid + unit] = h_t;
            float* st = st_n + p * 5 * hid + unit;
            st[0] = c;
            st[hid] = s_i;
            st[2 * hid] = s_f;
            st[3 * hid] = s_o;
            st[4 * hid] = t_g;
          }
          *c_at = c;
          wr[(i + 1) * (row_bytes / int(sizeof(T))) + unit] = from_float<T>(h);
        }
    }
    __syncthreads();
  }
}

// Backward items run on warp pairs, split by K (lstm_tc::half_k_gemm: half of each tap's k-steps per warp),
// the two exchange the partial dh of the rows the other finishes through shared memory, and each finishes 16 of the
// item's 32 rows. Per warp and step that halves the MMAs and the cell math, and twice the warps issue them: the
// single-warp item was issue-bound (sm_90 SASS: ~4100 instructions per warp and step on 4 warps at h = 64, against
// the forward's ~2300 on 8).
using lstm_tc::bwd_pairs;
using lstm_tc::kXchgFloats;

template <typename T, Precision P>
__global__ void __launch_bounds__(kMaxWarps * 32)
    diagonal_lstm_bwd_tc(const T* __restrict__ dy, const uint4* __restrict__ a_pack, const float* __restrict__ state,
                         T* __restrict__ dgates, Geometry g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = g.rows(), hp = g.hp, hid = g.hid;
  const int row_elems = 4 * hp + 16 / int(sizeof(T));
  const int row_bytes = row_elems * int(sizeof(T));
  const int buf_bytes = (rows + 1) * row_bytes;
  float* dc_buf = reinterpret_cast<float*>(smem_raw + 2 * buf_bytes);  // [image row][hp + 1]: dc * sigmoid(f)
  const int c_stride = hp + 1;
  const int tiles = hp / 16, items = tiles * g.chunks, pairs = bwd_pairs(items);
  float* xchg = dc_buf + rows * c_stride;  // [pair][kh][register][lane]: the partial dh a warp hands its partner
  zero_shared(smem_raw, 2 * buf_bytes + rows * c_stride * 4);
  __syncthreads();

  const int64_t n = blockIdx.x, hw = int64_t(g.height) * g.width;
  const T* dy_n = dy + n * hw * hid;
  const float* st_n = state + n * hw * 5 * hid;
  T* dg_n = dgates + n * hw * g.gs;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pair = warp >> 1, kh = warp & 1;  // kh: this warp's half of the k-steps, and its rows (j = 2 kh, 2 kh + 1)
  const int gq = lane >> 2, tq = lane & 3;
  const int tap_steps = 4 * hp * int(sizeof(T)) / kStepBytes;
  const std::uint32_t s_base = smem_addr(smem_raw);
  float* x_mine = xchg + (pair * 2 + kh) * kXchgFloats + lane;
  const float* x_other = xchg + (pair * 2 + (kh ^ 1)) * kXchgFloats + lane;

  for (int t = g.width + g.height - 2; t >= 0; --t) {
    const std::uint32_t rd = s_base + ((t + 1) & 1) * buf_bytes;  // da of step t + 1
    T* wr = reinterpret_cast<T*>(smem_raw + (t & 1) * buf_bytes);
    for (int base = 0; base < items; base += pairs) {  // every warp runs every round: the barriers below match
      const int item = base + pair;
      const bool active = item < items;
      const int tile = item % tiles, row0 = (item / tiles) * kItemRows;
      // What the forward saved for this thread's 8 cells (c, the four activations, c of the left neighbour, dy),
      // loaded before the GEMM so their latency hides behind it: unconditionally (zero outside the image), so the
      // loads issue together; read once, so they stream past L1 (ld.global.cs) and leave it to the packed weights.
      float in[2][2][2][7];  // [half (unit + 8)][j - 2 kh][e][value]
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int unit = tile * 16 + gq + 8 * half, i = row0 + 8 * (2 * kh + jj) + 2 * tq + e;
            const bool ok = active && unit < hid && g.inside(i, t), left = ok && t - i > 0;
            const float* st = st_n + (ok ? g.pix(i, t) * 5 * hid + unit : 0);
            const float* st_left = st_n + (left ? g.pix(i, t - 1) * 5 * hid + unit : 0);
#pragma unroll
            for (int q = 0; q < 5; ++q) in[half][jj][e][q] = ok ? __ldcs(st + q * hid) : 0.f;
            in[half][jj][e][5] = left ? __ldcs(st_left) : 0.f;
            in[half][jj][e][6] = ok ? to_float(__ldcs(dy_n + (g.pix(i, t) * hid + unit))) : 0.f;
          }
      float acc[1][4][4];
      if (active) {
        // Tap 0 (w_up^T) reads da of the pixel below: buffer row i + 1; tap 1 (w_left^T) the pixel right: row i.
        lstm_tc::half_k_gemm<T, P, 1>(acc, a_pack, tile, rd, row_bytes, row0 + 1, -1, 2, tap_steps, kh, lane);
        lstm_tc::pair_put(acc, kh, x_mine);
      }
      __syncthreads();  // the partners' partial sums are in shared memory
      if (active) {
        float dh_acc[2][4];  // this warp's rows: j = 2 kh + jj
        lstm_tc::pair_sum(acc, kh, x_other, dh_acc);
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int jj = 0; jj < 2; ++jj)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = 2 * kh + jj;
              const int unit = tile * 16 + gq + 8 * half, i = row0 + 8 * j + 2 * tq + e;
              float* dc_at = dc_buf + i * c_stride + unit;
              float da[4] = {0.f, 0.f, 0.f, 0.f}, dc_pass = 0.f;
              if (unit < hid && g.inside(i, t)) {
                dc_pass = lstm_tc::cell_backward<T>(in[half][jj][e], dh_acc[jj][2 * half + e], *dc_at, da);
                T* dg = dg_n + g.pix(i, t) * g.gs + unit;
#pragma unroll
                for (int q = 0; q < 4; ++q) dg[q * hid] = from_float<T>(da[q]);
              }
              *dc_at = dc_pass;
              T* row = wr + i * row_elems + unit;
#pragma unroll
              for (int q = 0; q < 4; ++q) row[q * hp] = from_float<T>(da[q]);
            }
      }
      if (base + pairs < items) __syncthreads();  // this round's exchange slots are read before the next round's writes
    }
    __syncthreads();  // da of step t complete for every warp; the buffer of step t + 1 is free
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch.

Geometry make_geometry(int64_t hid, int64_t height, int64_t width, bool reverse, int64_t gate_stride) {
  if (5 * hid * height * width >= (int64_t(1) << 31))
    throw std::invalid_argument("gm diagonal_lstm (cuda): an image's saved state (5h x H x W = " +
                                std::to_string(5 * hid * height * width) +
                                " elements) must stay below 2^31 for the kernels' 32-bit offsets: use the triton backend");
  if (gate_stride < 4 * hid || gate_stride * height * width >= (int64_t(1) << 31))
    throw std::invalid_argument("gm diagonal_lstm (cuda): gate_stride must be at least 4h = " + std::to_string(4 * hid) +
                                " and an image's gates (gate_stride x H x W) below 2^31 elements, got " +
                                std::to_string(gate_stride));
  const int hp = static_cast<int>((hid + 15) / 16 * 16);
  const int chunks = static_cast<int>((height + kItemRows - 1) / kItemRows);
  return Geometry{static_cast<int>(hid), hp, static_cast<int>(height), static_cast<int>(width), chunks, reverse,
                  static_cast<int>(gate_stride)};
}

size_t smem_bytes(const Geometry& g, int gates_per_row, size_t elem) {
  const size_t rows = size_t(kItemRows) * g.chunks;
  return 2 * (rows + 1) * lstm_tc::row_bytes(gates_per_row * g.hp, elem) + rows * (g.hp + 1) * sizeof(float);
}

// The backward's: smem_bytes with four gate blocks per row, plus the warp pairs' exchange slots.
size_t bwd_smem_bytes(const Geometry& g, size_t elem) {
  return smem_bytes(g, 4, elem) + size_t(2 * bwd_pairs(g.hp / 16 * g.chunks)) * kXchgFloats * sizeof(float);
}

template <typename T, Precision P>
struct Forward {
  static void run(std::uintptr_t gates, std::uintptr_t a_pack, std::uintptr_t y, std::uintptr_t state, int64_t n,
                  Geometry g, cudaStream_t stream) {
    auto kernel = diagonal_lstm_fwd_tc<T, P>;
    const size_t smem = smem_bytes(g, 1, sizeof(T));
    lstm_tc::set_smem(kernel, smem, "diagonal_lstm (cuda): the forward scan");
    kernel<<<static_cast<unsigned>(n), lstm_tc::threads_for(g.hp / 8 * g.chunks), smem, stream>>>(
        ptr<const T>(gates), ptr<const uint4>(a_pack), ptr<T>(y), ptr<float>(state), g);
    GM_CUDA_CHECK_LAUNCH();
  }
};

template <typename T, Precision P>
struct WeightGrad {
  static void run(std::uintptr_t dgates, std::uintptr_t y, std::uintptr_t dw, int64_t n, Geometry g, bool nhwc,
                  bool deterministic, cudaStream_t stream) {
    const lstm_tc::WgradArgs wa{n, g.hid, g.height, g.width, 2, 1, g.reverse ? 1 : -1, 0, g.gs, g.hid};
    lstm_tc::launch_wgrad<T, T, P>(ptr<const T>(dgates), ptr<const T>(y), nullptr, ptr<float>(dw), wa, stream, nhwc,
                                   deterministic);
  }
};

template <typename T, Precision P>
struct Backward {
  static void run(std::uintptr_t dy, std::uintptr_t a_pack, std::uintptr_t state, std::uintptr_t dgates, int64_t n,
                  Geometry g, cudaStream_t stream) {
    auto kernel = diagonal_lstm_bwd_tc<T, P>;
    const size_t smem = bwd_smem_bytes(g, sizeof(T));
    lstm_tc::set_smem(kernel, smem, "diagonal_lstm (cuda): the backward scan");
    kernel<<<static_cast<unsigned>(n), 64 * bwd_pairs(g.hp / 16 * g.chunks), smem, stream>>>(
        ptr<const T>(dy), ptr<const uint4>(a_pack), ptr<const float>(state), ptr<T>(dgates), g);
    GM_CUDA_CHECK_LAUNCH();
  }
};

}  // namespace

void forward_cuda(std::uintptr_t gates, std::uintptr_t a_pack, std::uintptr_t y, std::uintptr_t state, int64_t n,
                  int64_t hid, int64_t height, int64_t width, bool reverse, int64_t gate_stride, int dtype,
                  int precision, std::uintptr_t stream) {
  lstm_tc::dispatch<Forward>("diagonal_lstm", dtype, precision, gates, a_pack, y, state, n,
                             make_geometry(hid, height, width, reverse, gate_stride), to_stream(stream));
}

void backward_cuda(std::uintptr_t dy, std::uintptr_t a_pack, std::uintptr_t state, std::uintptr_t dgates, int64_t n,
                   int64_t hid, int64_t height, int64_t width, bool reverse, int64_t gate_stride, int dtype,
                   int precision, std::uintptr_t stream) {
  lstm_tc::dispatch<Backward>("diagonal_lstm", dtype, precision, dy, a_pack, state, dgates, n,
                              make_geometry(hid, height, width, reverse, gate_stride), to_stream(stream));
}

void weight_grad_cuda(std::uintptr_t dgates, std::uintptr_t y, std::uintptr_t dw, int64_t n, int64_t hid,
                      int64_t height, int64_t width, bool reverse, int64_t gate_stride, int dtype, int precision,
                      bool deterministic, std::uintptr_t stream) {
  // gate_stride 0: dgates and y NCHW; else channels-last, dgates' pixels gate_stride apart and y's h.
  lstm_tc::dispatch<WeightGrad>("diagonal_lstm", dtype, precision, dgates, y, dw, n,
                                make_geometry(hid, height, width, reverse, gate_stride > 0 ? gate_stride : 4 * hid),
                                gate_stride > 0, deterministic, to_stream(stream));
}

}  // namespace diagonal_lstm
}  // namespace gm
