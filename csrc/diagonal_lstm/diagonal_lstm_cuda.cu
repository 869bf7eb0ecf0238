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
// step over da of step t + 1 (shared memory, [image row][gate, unit], double-buffered); a warp owns 16 units x 32 rows
// and dc * sigmoid(f) passes to the left neighbour through a per-cell shared slot.
//
// Gates, y, dy, dgates are channels-last (N, H, W, C); the state is (N, H, W, 5h) float32. bfloat16/float16 run on
// m16n8k16 tensor cores with float32 accumulation (h and da rounded to the input dtype, the values y and dgates hold);
// float32 on tf32 m16n8k8 when torch allows tf32, else 3xTF32 (fp32-level error). The launcher pads h to hp, a
// multiple of 16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "common/mma_sync.cuh"
#include "common/precision.h"
#include "common/tensor_args.h"
#include "diagonal_lstm/diagonal_lstm.h"

namespace gm {
namespace diagonal_lstm {
namespace {

using mma::from_float;
using mma::kStepBytes;
using mma::mma_tiles;
using mma::row_fragments_b;
using mma::smem_addr;
using mma::to_float;

constexpr int kMaxWarps = 16;
constexpr int kItemRows = 32;  // image rows per warp item: four n8 tiles

struct Geometry {
  int hid, hp, height, width, chunks;  // chunks: 32-row groups of image rows
  bool reverse;
  __device__ int rows() const { return kItemRows * chunks; }
  __device__ bool inside(int i, int t) const { return i < height && t - i >= 0 && t - i < width; }
  __device__ int64_t pix(int i, int t) const { return pixel(i, t - i, width, reverse); }
};

template <typename T>
__device__ __forceinline__ T stored(float x) {
  return from_float<T>(x);
}

// A fragments of (m16 tile, k-step) for this lane: 16 bytes packed by the launcher in register order.
template <int kM>
__device__ __forceinline__ void load_a(std::uint32_t (&af)[kM][4], const uint4* __restrict__ a_pack, int mtile0,
                                       int ksteps, int ks, int lane) {
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const uint4 v = __ldg(a_pack + (int64_t(mtile0 + m) * ksteps + ks) * 32 + lane);
    af[m][0] = v.x;
    af[m][1] = v.y;
    af[m][2] = v.z;
    af[m][3] = v.w;
  }
}

// acc[kM][4][4] = A[mtile0 .. +kM) . B, with B's k-steps split in two taps of `tap_steps` each, tap q reading the
// 32-row tile that starts at buffer row wn0[q] of `buf` (row_bytes a row).
template <typename T, Precision P, int kM>
__device__ __forceinline__ void step_gemm(float (&acc)[kM][4][4], const uint4* __restrict__ a_pack, int mtile0,
                                          std::uint32_t buf, int row_bytes, int wn0_tap0, int wn0_tap1,
                                          int tap_steps, int lane) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;
  const int ksteps = 2 * tap_steps;
  for (int ks = 0; ks < ksteps; ++ks) {
    const int tap = ks >= tap_steps;
    std::uint32_t af[kM][4], bf[4][2];
    load_a<kM>(af, a_pack, mtile0, ksteps, ks, lane);
    row_fragments_b(bf, buf, row_bytes, tap ? wn0_tap1 : wn0_tap0, ks - tap * tap_steps, lane);
    mma_tiles<T, P, kM, 4>(acc, af, bf);
  }
}

template <typename T, Precision P>
__global__ void __launch_bounds__(kMaxWarps * 32)
    diagonal_lstm_fwd_tc(const T* __restrict__ gates, const uint4* __restrict__ a_pack, T* __restrict__ y,
                         float* __restrict__ state, Geometry g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = g.rows(), hp = g.hp, hid = g.hid;
  const int row_bytes = hp * int(sizeof(T)) + 16;  // 16-byte pad: 8 consecutive rows on distinct banks
  const int buf_bytes = (rows + 1) * row_bytes;
  float* c_buf = reinterpret_cast<float*>(smem_raw + 2 * buf_bytes);  // [image row][hp + 1]
  const int c_stride = hp + 1;
  for (int e = threadIdx.x; e < 2 * buf_bytes / 4; e += blockDim.x) reinterpret_cast<std::uint32_t*>(smem_raw)[e] = 0u;
  for (int e = threadIdx.x; e < rows * c_stride; e += blockDim.x) c_buf[e] = 0.f;
  __syncthreads();

  const int64_t n = blockIdx.x, hw = int64_t(g.height) * g.width;
  const T* gates_n = gates + n * hw * 4 * hid;
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
          const T* at = gates_n + (in ? g.pix(i, t) * 4 * hid + unit : 0);
#pragma unroll
          for (int q = 0; q < 4; ++q) gv[q][j][e] = in ? to_float(at[q * hid]) : 0.f;
        }
      float acc[2][4][4];
      // Up tap: image row i - 1 sits at buffer row i; left tap: image row i at buffer row i + 1.
      step_gemm<T, P, 2>(acc, a_pack, 2 * group, rd, row_bytes, row0, row0 + 1, tap_steps, lane);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = row0 + 8 * j + 2 * tq + e;
          float* c_at = c_buf + i * c_stride + unit;
          float c = 0.f, h = 0.f;
          if (real && g.inside(i, t)) {
            // m16 tile 0 holds gates i (rows 0-7) and f (rows 8-15) of the group's units, tile 1 gates o and g.
            const float s_i = sigmoid(acc[0][j][e] + gv[0][j][e]);
            const float s_f = sigmoid(acc[0][j][2 + e] + gv[1][j][e]);
            const float s_o = sigmoid(acc[1][j][e] + gv[2][j][e]);
            const float t_g = tanh_of(acc[1][j][2 + e] + gv[3][j][e]);
            c = s_f * *c_at + s_i * t_g;
            const T h_t = stored<T>(s_o * tanh_of(c));
            h = to_float(h_t);
            const int64_t p = g.pix(i, t);
            y_n[p * hid + unit] = h_t;
            float* st = st_n + p * 5 * hid + unit;
            st[0] = c;
            st[hid] = s_i;
            st[2 * hid] = s_f;
            st[3 * hid] = s_o;
            st[4 * hid] = t_g;
          }
          *c_at = c;
          wr[(i + 1) * (row_bytes / int(sizeof(T))) + unit] = stored<T>(h);
        }
    }
    __syncthreads();
  }
}

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
  for (int e = threadIdx.x; e < 2 * buf_bytes / 4; e += blockDim.x) reinterpret_cast<std::uint32_t*>(smem_raw)[e] = 0u;
  for (int e = threadIdx.x; e < rows * c_stride; e += blockDim.x) dc_buf[e] = 0.f;
  __syncthreads();

  const int64_t n = blockIdx.x, hw = int64_t(g.height) * g.width;
  const T* dy_n = dy + n * hw * hid;
  const float* st_n = state + n * hw * 5 * hid;
  T* dg_n = dgates + n * hw * 4 * hid;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int tiles = hp / 16, items = tiles * g.chunks;
  const int tap_steps = 4 * hp * int(sizeof(T)) / kStepBytes;
  const std::uint32_t s_base = smem_addr(smem_raw);

  for (int t = g.width + g.height - 2; t >= 0; --t) {
    const std::uint32_t rd = s_base + ((t + 1) & 1) * buf_bytes;  // da of step t + 1
    T* wr = reinterpret_cast<T*>(smem_raw + (t & 1) * buf_bytes);
    for (int item = warp; item < items; item += warps) {
      const int tile = item % tiles, row0 = (item / tiles) * kItemRows;
      float acc[1][4][4];
      // Tap 0 (w_up^T) reads da of the pixel below: buffer row i + 1; tap 1 (w_left^T) the pixel right: row i.
      step_gemm<T, P, 1>(acc, a_pack, tile, rd, row_bytes, row0 + 1, row0, tap_steps, lane);
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int unit = tile * 16 + gq + 8 * half, i = row0 + 8 * j + 2 * tq + e;
            float* dc_at = dc_buf + i * c_stride + unit;
            float da[4] = {0.f, 0.f, 0.f, 0.f}, dc_pass = 0.f;
            if (unit < hid && g.inside(i, t)) {
              const int64_t p = g.pix(i, t);
              const float* st = st_n + p * 5 * hid + unit;
              const float c = st[0], s_i = st[hid], s_f = st[2 * hid], s_o = st[3 * hid], t_g = st[4 * hid];
              const float c_left = t - i > 0 ? st_n[g.pix(i, t - 1) * 5 * hid + unit] : 0.f;
              const float dh = acc[0][j][2 * half + e] + to_float(dy_n[p * hid + unit]);
              const float t_c = tanh_of(c);
              const float dc = *dc_at + dh * s_o * (1.f - t_c * t_c);
              da[0] = dc * t_g * s_i * (1.f - s_i);
              da[1] = dc * c_left * s_f * (1.f - s_f);
              da[2] = dh * t_c * s_o * (1.f - s_o);
              da[3] = dc * s_i * (1.f - t_g * t_g);
              dc_pass = dc * s_f;
              T* dg = dg_n + p * 4 * hid + unit;
#pragma unroll
              for (int q = 0; q < 4; ++q) dg[q * hid] = stored<T>(da[q]);
            }
            *dc_at = dc_pass;
            T* row = wr + i * row_elems + unit;
#pragma unroll
            for (int q = 0; q < 4; ++q) row[q * hp] = stored<T>(da[q]);
          }
    }
    __syncthreads();  // da of step t complete for every warp; the buffer of step t + 1 is free
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch.

Geometry make_geometry(int64_t hid, int64_t height, int64_t width, bool reverse) {
  const int hp = static_cast<int>((hid + 15) / 16 * 16);
  const int chunks = static_cast<int>((height + kItemRows - 1) / kItemRows);
  return Geometry{static_cast<int>(hid), hp, static_cast<int>(height), static_cast<int>(width), chunks, reverse};
}

size_t smem_bytes(const Geometry& g, int gates_per_row, size_t elem) {
  const size_t rows = size_t(kItemRows) * g.chunks;
  const size_t row_bytes = gates_per_row * size_t(g.hp) * elem + 16;
  return 2 * (rows + 1) * row_bytes + rows * (g.hp + 1) * sizeof(float);
}

template <typename K>
void set_smem(K kernel, size_t bytes, const char* pass) {
  int device = 0, limit = 0;
  GM_CUDA_CHECK(cudaGetDevice(&device));
  GM_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<size_t>(limit))
    throw std::invalid_argument(std::string("gm diagonal_lstm (cuda): the ") + pass + " scan needs " +
                                std::to_string(bytes) + " bytes of shared memory, more than this GPU's " +
                                std::to_string(limit) +
                                " per block: use the triton backend, or a smaller hidden size or height");
  GM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

int threads_for(int items) { return 32 * (items < kMaxWarps ? items : kMaxWarps); }

template <typename T, Precision P>
void launch_forward(std::uintptr_t gates, std::uintptr_t a_pack, std::uintptr_t y, std::uintptr_t state, int64_t n,
                    const Geometry& g, cudaStream_t stream) {
  auto kernel = diagonal_lstm_fwd_tc<T, P>;
  const size_t smem = smem_bytes(g, 1, sizeof(T));
  set_smem(kernel, smem, "forward");
  kernel<<<static_cast<unsigned>(n), threads_for(g.hp / 8 * g.chunks), smem, stream>>>(
      ptr<const T>(gates), ptr<const uint4>(a_pack), ptr<T>(y), ptr<float>(state), g);
  GM_CUDA_CHECK_LAUNCH();
}

template <typename T, Precision P>
void launch_backward(std::uintptr_t dy, std::uintptr_t a_pack, std::uintptr_t state, std::uintptr_t dgates, int64_t n,
                     const Geometry& g, cudaStream_t stream) {
  auto kernel = diagonal_lstm_bwd_tc<T, P>;
  const size_t smem = smem_bytes(g, 4, sizeof(T));
  set_smem(kernel, smem, "backward");
  kernel<<<static_cast<unsigned>(n), threads_for(g.hp / 16 * g.chunks), smem, stream>>>(
      ptr<const T>(dy), ptr<const uint4>(a_pack), ptr<const float>(state), ptr<T>(dgates), g);
  GM_CUDA_CHECK_LAUNCH();
}

// dtype x precision dispatch: float16/bfloat16 run natively, float32 as tf32 or 3xTF32.
template <template <typename, Precision> class Launch, typename... Args>
void dispatch(int dtype, int precision, Args... args) {
  switch (to_dtype(dtype)) {
    case DType::f16: return Launch<__half, Precision::kNative>::run(args...);
    case DType::bf16: return Launch<__nv_bfloat16, Precision::kNative>::run(args...);
    case DType::f32:
      if (static_cast<Precision>(precision) == Precision::kTf32) return Launch<float, Precision::kTf32>::run(args...);
      return Launch<float, Precision::kTf32x3>::run(args...);
    default: throw std::invalid_argument("gm diagonal_lstm (cuda) takes float16, bfloat16 or float32");
  }
}

template <typename T, Precision P>
struct Forward {
  template <typename... Args>
  static void run(Args... args) {
    launch_forward<T, P>(args...);
  }
};
template <typename T, Precision P>
struct Backward {
  template <typename... Args>
  static void run(Args... args) {
    launch_backward<T, P>(args...);
  }
};

}  // namespace

void forward_cuda(std::uintptr_t gates, std::uintptr_t a_pack, std::uintptr_t y, std::uintptr_t state, int64_t n,
                  int64_t hid, int64_t height, int64_t width, bool reverse, int dtype, int precision,
                  std::uintptr_t stream) {
  dispatch<Forward>(dtype, precision, gates, a_pack, y, state, n, make_geometry(hid, height, width, reverse),
                    to_stream(stream));
}

void backward_cuda(std::uintptr_t dy, std::uintptr_t a_pack, std::uintptr_t state, std::uintptr_t dgates, int64_t n,
                   int64_t hid, int64_t height, int64_t width, bool reverse, int dtype, int precision,
                   std::uintptr_t stream) {
  dispatch<Backward>(dtype, precision, dy, a_pack, state, dgates, n, make_geometry(hid, height, width, reverse),
                     to_stream(stream));
}

}  // namespace diagonal_lstm
}  // namespace gm
