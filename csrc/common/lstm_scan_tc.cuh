// Building blocks of the tensor-core LSTM scans (csrc/row_lstm, csrc/diagonal_lstm): one block per image runs every
// step of a scan; each step is one small GEMM, A (weights, packed by gm/ops/_lstm_cuda.py in mma.sync fragment order
// and read from global memory: one 16-byte load per lane, m16 tile and k-step) times B (the previous step's state or
// gate gradients, in a shared [position][channel] array read with ldmatrix), over 32-position warp items. The taps
// of the state-to-state convolution are the same B tile at shifted start rows. Device-only; include from .cu files.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/cuda_check.h"
#include "common/mma_sync.cuh"
#include "common/precision.h"
#include "common/tensor_args.h"

namespace gm {
namespace lstm_tc {

constexpr int kMaxWarps = 16;
constexpr int kItemRows = 32;  // positions (image rows or columns) per warp item: four n8 tiles

// Gate activations. For 16-bit inputs, whose h is rounded to 8 (bf16) or 11 (fp16) bits anyway, tanh is one
// tanh.approx.f32 (MUFU, max relative error ~2^-11) and sigmoid(x) = (1 + tanh(x / 2)) / 2: one special-function
// op each instead of an exp and a reciprocal, which bound a step's cell math (5 activations per cell, ~2k cells per
// step at h = 64 and 32 rows, all on one SM's 16 MUFU lanes). float32 keeps exp-based forms (fp32-level error).
__device__ __forceinline__ float tanh_approx(float x) {
  float r;
  asm("tanh.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

template <typename T>
__device__ __forceinline__ float act_tanh(float x) {
  if constexpr (sizeof(T) == 2) {
    return tanh_approx(x);
  } else {
    return 2.f / (1.f + __expf(-2.f * x)) - 1.f;  // saturates to +-1 without NaN for large |x|
  }
}

template <typename T>
__device__ __forceinline__ float act_sigmoid(float x) {
  if constexpr (sizeof(T) == 2) {
    return 0.5f * tanh_approx(0.5f * x) + 0.5f;
  } else {
    return 1.f / (1.f + __expf(-x));
  }
}

// A fragments of (m16 tile, k-step) for this lane.
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

// acc[kM][4][4] = A[m16 tiles mtile0 .. +kM) . B over k-steps lo .. hi of each of `taps` taps of `tap_steps` k-steps;
// tap q reads the 32 positions from buffer row first_row + dir * q of `buf` (row_bytes a row). Fragment e of
// acc[m][j] holds A row 16 m + lane / 4 + 8 (e / 2) and position 8 j + 2 (lane % 4) + e % 2. The loops are nested
// per tap (not ks / tap_steps: no integer division per k-step).
template <typename T, Precision P, int kM>
__device__ __forceinline__ void k_range_gemm(float (&acc)[kM][4][4], const uint4* __restrict__ a_pack, int mtile0,
                                             std::uint32_t buf, int row_bytes, int first_row, int dir, int taps,
                                             int tap_steps, int lo, int hi, int lane) {
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;
  const int ksteps = taps * tap_steps;
  for (int tap = 0; tap < taps; ++tap) {
    const std::uint32_t tap_buf = buf + (first_row + dir * tap) * row_bytes;
    for (int s = lo; s < hi; ++s) {
      std::uint32_t af[kM][4], bf[4][2];
      load_a<kM>(af, a_pack, mtile0, ksteps, tap * tap_steps + s, lane);
      mma::row_fragments_b(bf, tap_buf, row_bytes, 0, s, lane);
      mma::mma_tiles<T, P, kM, 4>(acc, af, bf);
    }
  }
}

// A scan step's whole GEMM.
template <typename T, Precision P, int kM>
__device__ __forceinline__ void step_gemm(float (&acc)[kM][4][4], const uint4* __restrict__ a_pack, int mtile0,
                                          std::uint32_t buf, int row_bytes, int first_row, int dir, int taps,
                                          int tap_steps, int lane) {
  k_range_gemm<T, P, kM>(acc, a_pack, mtile0, buf, row_bytes, first_row, dir, taps, tap_steps, 0, tap_steps, lane);
}

// Half of it (part 0: the first half of each tap's k-steps, part 1 the second): the K split of a warp pair, whatever
// the tap count (tap_steps is even: hp is a multiple of 16).
template <typename T, Precision P, int kM>
__device__ __forceinline__ void half_k_gemm(float (&acc)[kM][4][4], const uint4* __restrict__ a_pack, int mtile0,
                                            std::uint32_t buf, int row_bytes, int first_row, int dir, int taps,
                                            int tap_steps, int part, int lane) {
  const int per = tap_steps / 2;
  k_range_gemm<T, P, kM>(acc, a_pack, mtile0, buf, row_bytes, first_row, dir, taps, tap_steps, part * per,
                         (part + 1) * per, lane);
}

// Warp pairs of a K-split backward: at most kMaxWarps / 2 (one per 16-unit x 32-position item), and the floats of
// their exchange slots (per warp: 2 row tiles x 4 accumulator registers x 32 lanes).
__host__ __device__ inline int bwd_pairs(int items) { return items < kMaxWarps / 2 ? items : kMaxWarps / 2; }
constexpr int kXchgFloats = 8 * 32;

// The pair exchange of a K-split backward item: warp kh finishes positions j = 2 kh, 2 kh + 1 of its 32 (two n8
// tiles), so it hands its partial sums of the other two to its partner (pair_put, before a barrier) and adds the
// partner's to its own (pair_sum, after it). Selects, not acc[0][2 * kh + jj]: a run-time index would put the
// accumulators in local memory. x_mine / x_other: this lane's slot of the warp's / the partner's kXchgFloats.
__device__ __forceinline__ void pair_put(const float (&acc)[1][4][4], int kh, float* x_mine) {
#pragma unroll
  for (int jj = 0; jj < 2; ++jj)
#pragma unroll
    for (int q = 0; q < 4; ++q) x_mine[(jj * 4 + q) * 32] = kh ? acc[0][jj][q] : acc[0][2 + jj][q];
}

__device__ __forceinline__ void pair_sum(const float (&acc)[1][4][4], int kh, const float* x_other,
                                         float (&dh)[2][4]) {
#pragma unroll
  for (int jj = 0; jj < 2; ++jj)
#pragma unroll
    for (int q = 0; q < 4; ++q) dh[jj][q] = (kh ? acc[0][2 + jj][q] : acc[0][jj][q]) + x_other[(jj * 4 + q) * 32];
}

// An LSTM cell's backward from what the forward saved, v = [c, sigmoid(a_i), sigmoid(a_f), sigmoid(a_o),
// tanh(a_g), c of the cell it took its state from, dy], the state term of dh, and dc carried from the next cell:
// the four gate gradients (order i, f, o, g) into da; returns dc * sigmoid(a_f), the dc carried on.
template <typename T>
__device__ __forceinline__ float cell_backward(const float (&v)[7], float dh_state, float dc_carry, float (&da)[4]) {
  const float c = v[0], s_i = v[1], s_f = v[2], s_o = v[3], t_g = v[4], c_prev = v[5];
  const float dh = dh_state + v[6];
  const float t_c = act_tanh<T>(c);
  const float dc = dc_carry + dh * s_o * (1.f - t_c * t_c);
  da[0] = dc * t_g * s_i * (1.f - s_i);
  da[1] = dc * c_prev * s_f * (1.f - s_f);
  da[2] = dh * t_c * s_o * (1.f - s_o);
  da[3] = dc * s_i * (1.f - t_g * t_g);
  return dc * s_f;
}

// Zero `bytes` (a multiple of 4) of shared memory with the whole block.
__device__ __forceinline__ void zero_shared(unsigned char* p, int bytes) {
  for (int e = threadIdx.x; e < bytes / 4; e += blockDim.x) reinterpret_cast<std::uint32_t*>(p)[e] = 0u;
}

// Row bytes of a [position][channels] state array: 16 bytes of padding put 8 consecutive rows on distinct banks.
__host__ __device__ __forceinline__ int row_bytes(int channels, size_t elem) {
  return static_cast<int>(channels * elem + 16);
}

inline int threads_for(int items) { return 32 * (items < kMaxWarps ? items : kMaxWarps); }

// What set_smem has asked of the runtime so far: each device's opt-in shared memory per block, and each kernel's
// dynamic shared memory maximum per device, keyed by address (the instantiations of a kernel template share a type,
// and this record is one object per process, shared by every copy of the extension loaded: the CUDA emulator's tests
// load several).
struct SmemAttributes {
  std::mutex mutex;
  std::map<int, int> limit;                          // device -> cudaDevAttrMaxSharedMemoryPerBlockOptin
  std::map<std::pair<const void*, int>, int> raised;  // (kernel, device) -> maximum set by cudaFuncSetAttribute
};

inline SmemAttributes& smem_attributes() {
  static SmemAttributes attributes;
  return attributes;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device, or throws naming `what` where the
// GPU has less per block. The device query and cudaFuncSetAttribute ran on every launch (host time, which sets the
// eager layer time at small sizes); now a kernel's maximum is raised only when a launch needs more than any launch of
// it before on that device (a larger maximum admits every smaller launch), and the limit is queried once per device.
template <typename K>
void set_smem(K kernel, size_t bytes, const char* what) {
  int device = 0;
  GM_CUDA_CHECK(cudaGetDevice(&device));
  SmemAttributes& cache = smem_attributes();
  std::lock_guard<std::mutex> lock(cache.mutex);
  auto limit = cache.limit.find(device);
  if (limit == cache.limit.end()) {
    int value = 0;
    GM_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    limit = cache.limit.emplace(device, value).first;
  }
  if (bytes > static_cast<size_t>(limit->second))
    throw std::invalid_argument(std::string("gm ") + what + " needs " + std::to_string(bytes) +
                                " bytes of shared memory, more than this GPU's " + std::to_string(limit->second) +
                                " per block: use the triton backend, or a smaller hidden size or image");
  int& raised = cache.raised[{reinterpret_cast<const void*>(kernel), device}];  // 0 when new
  if (bytes <= static_cast<size_t>(raised)) return;
  GM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  raised = static_cast<int>(bytes);
}

// dtype x precision dispatch: float16/bfloat16 run natively, float32 as tf32 or 3xTF32.
// Launch<T, P>::run(args...) is called.
template <template <typename, Precision> class Launch, typename... Args>
void dispatch(const char* op, int dtype, int precision, Args... args) {
  switch (to_dtype(dtype)) {
    case DType::f16: return Launch<__half, Precision::kNative>::run(args...);
    case DType::bf16: return Launch<__nv_bfloat16, Precision::kNative>::run(args...);
    case DType::f32:
      if (static_cast<Precision>(precision) == Precision::kTf32) return Launch<float, Precision::kTf32>::run(args...);
      return Launch<float, Precision::kTf32x3>::run(args...);
    default: throw std::invalid_argument(std::string("gm ") + op + " (cuda) takes float16, bfloat16 or float32");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradient of a scan's state-to-state convolution on tensor cores:
//   dw[o, i, t] = sum over pixels p = (n, r, w) of dz[n, o, r, w] * src[n, i, r + dr(t), w + dc(t)]
// with src zero outside the image, except that row -1 reads init[n, i, w + dc(t)] when init is given (row_lstm's h0).
// Taps: row_lstm (kind 0): dr = -1, dc = t - k/2 for t < k; diagonal_lstm (kind 1): t = 0 the pixel above (-1, 0),
// t = 1 the left one in scan order (0, -1), or (0, +1) when reversed. dz, src NCHW (or channels-last: kNhwc below),
// init (N, h, W) in either; dw (4h, h, taps) float32,
// zeroed here and accumulated with atomics over pixel splits (blockIdx.z). A block computes a 64 (o) x 64 (i) tile of
// ONE tap t over chunks of 32 pixels, gathered (with the tap's shift and the conversion to T) into shared memory by
// plain loads; 4 warps of 32 x 32. One tap per block makes the shift, the bounds and the source offset a per-pixel
// value, so a gathered element costs an address add and a load (the (i, t)-mixed tile took ~100 instructions an
// element: sm_90 SASS, 3100 instructions a chunk for 16 MMAs).

struct WgradArgs {
  int64_t n;
  int hid, height, width, taps, kind, dir;  // dir: k/2 for kind 0; +1 / -1 (reverse / not) for kind 1
  int64_t per_split;
  // Channels-last operands (launch_wgrad's nhwc): elements from one pixel's dz (resp. src) to the next's.
  int dz_stride, src_stride;
};

__device__ __forceinline__ void wgrad_tap(const WgradArgs& a, int t, int& dr, int& dc) {
  if (a.kind == 0) {
    dr = -1;
    dc = t - a.dir;
  } else {
    dr = t == 0 ? -1 : 0;
    dc = t == 0 ? 0 : a.dir;
  }
}

template <typename T>
constexpr size_t wgrad_smem_bytes() {
  return 2 * 64 * (32 * sizeof(T) + 16);
}

// kNhwc: dz and src channels-last, (N, H, W, *) with pixel strides a.dz_stride and a.src_stride (the PixelRNN layers'
// channels-last paths: dz the Row LSTM's (N, H, W, 4h) gate gradients and src its float32 hs, or dz a direction's
// half of the Diagonal BiLSTM's (N, H, W, 8h) ones and src its y); else NCHW. Each thread then gathers 16
// consecutive channels of its pixel (rows 16 rg .. 16 rg + 15 of the tiles) instead of every fourth: the same tiles
// in shared memory, so the MMAs and the sums are the NCHW variant's. The row -1 of kInit (the Row LSTM's h0) reads
// init (N, h, W) as the NCHW variant does, each thread its 16 channels (init is not in the hot path: one row of H).
template <typename T, typename S, Precision P, bool kInit, bool kNhwc = false>
__global__ void __launch_bounds__(128, 3)
    lstm_wgrad_tc(const T* __restrict__ dz, const S* __restrict__ src, const T* __restrict__ init,
                  float* __restrict__ dw, WgradArgs a) {
  constexpr int kBM = 64, kBQ = 64, kBP = 32, kRowsPerThread = kBM / 4;  // 128 threads: 4 row groups
  constexpr int kRow = kBP * int(sizeof(T)) + 16;  // bytes per shared row (pixels contiguous)
  extern __shared__ __align__(16) unsigned char wgrad_smem[];  // wgrad_smem_bytes<T>(): the dz and src tiles
  unsigned char* a_s = wgrad_smem;
  unsigned char* b_s = wgrad_smem + kBM * kRow;
  const int64_t hw = int64_t(a.height) * a.width, total = a.n * hw;
  const int m_rows = 4 * a.hid, q_cols = a.hid * a.taps;
  const int i_tiles = (a.hid + kBQ - 1) / kBQ;
  const int tap = blockIdx.x / i_tiles, i0 = (blockIdx.x - tap * i_tiles) * kBQ, o0 = blockIdx.y * kBM;
  int dr, dc;
  wgrad_tap(a, tap, dr, dc);
  const int64_t start = int64_t(blockIdx.z) * a.per_split;
  const int64_t end = start + a.per_split < total ? start + a.per_split : total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp & 1, wq = warp >> 1;
  const std::uint32_t a_addr = mma::smem_addr(a_s), b_addr = mma::smem_addr(b_s);
  float acc[2][4][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;
  // Thread (pixel column c, row group rg) gathers rows rg, rg + 4, ..., rg + 60 of both tiles for pixel p0 + c:
  // one pixel decomposition and one tap shift per chunk, 32 independent loads in flight, coalesced along pixels.
  const int c = lane, rg = warp;
  float va[kRowsPerThread], vb[kRowsPerThread];
  // kInit: row -1 reads the initial state (row_lstm's h0, (N, h, W) in both variants), one image row in H: a rare
  // branch. The k-th value of this thread is tile row row0 + step * k (rg + 4 k NCHW, 16 rg + k channels-last).
  auto from_init = [&](int64_t n, int ww, int row0, int step) {
    const T* init_n = init + n * a.hid * a.width + ww;
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int i = i0 + row0 + step * k;
      vb[k] = i < a.hid ? mma::to_float(init_n[int64_t(i) * a.width]) : 0.f;
    }
  };
  // Loads are unconditional from a valid address (the image's first element where the value is a zero) and
  // selected after, so the gather compiles to straight-line code: no branch per element.
  auto gather = [&](int64_t p0) {
    const int64_t p = p0 + c;
    const bool ok = p < end;
    const int64_t n = ok ? p / hw : 0;
    const int pix = ok ? int(p - n * hw) : 0;
    const int r = pix / a.width, w = pix - r * a.width;
    const int rr = r + dr, ww = w + dc;
    const bool in = ok && ww >= 0 && ww < a.width && rr < a.height;
    const bool from_src = in && rr >= 0;
    if constexpr (kNhwc) {
      const T* dz_p = dz + (n * hw + pix) * a.dz_stride;
      const S* src_p = src + (n * hw + (from_src ? int64_t(rr) * a.width + ww : 0)) * a.src_stride;
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int o = o0 + kRowsPerThread * rg + k, i = i0 + kRowsPerThread * rg + k;
        const bool take_a = ok && o < m_rows, take_b = from_src && i < a.hid;
        const float x = mma::to_float(dz_p[take_a ? o : 0]);
        const float y = float(src_p[take_b ? i : 0]);
        va[k] = take_a ? x : 0.f;
        vb[k] = take_b ? y : 0.f;
      }
      if constexpr (kInit) {
        if (in && rr < 0) from_init(n, ww, kRowsPerThread * rg, 1);
      }
      return;
    }
    const T* dz_n = dz + n * m_rows * hw + pix;
    const S* src_n = src + n * a.hid * hw + (from_src ? int64_t(rr) * a.width + ww : 0);
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int o = o0 + rg + 4 * k, i = i0 + rg + 4 * k;
      const bool take_a = ok && o < m_rows, take_b = from_src && i < a.hid;
      const float x = mma::to_float(dz_n[take_a ? int64_t(o) * hw : 0]);
      const float y = float(src_n[take_b ? int64_t(i) * hw : 0]);
      va[k] = take_a ? x : 0.f;
      vb[k] = take_b ? y : 0.f;
    }
    if constexpr (kInit) {
      if (in && rr < 0) from_init(n, ww, rg, 4);
    }
  };
  if (start < end) gather(start);
  for (int64_t p0 = start; p0 < end; p0 += kBP) {
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int row = kNhwc ? kRowsPerThread * rg + k : rg + 4 * k;
      *reinterpret_cast<T*>(a_s + row * kRow + c * int(sizeof(T))) = mma::from_float<T>(va[k]);
      *reinterpret_cast<T*>(b_s + row * kRow + c * int(sizeof(T))) = mma::from_float<T>(vb[k]);
    }
    __syncthreads();
    if (p0 + kBP < end) gather(p0 + kBP);  // the next chunk's loads fly while this one's MMAs run
#pragma unroll
    for (int ks = 0; ks < kBP * int(sizeof(T)) / mma::kStepBytes; ++ks) {
      std::uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int m = 0; m < 2; ++m)
        mma::ldmatrix_x4(af[m], a_addr + (wm * 32 + 16 * m + (lane & 15)) * kRow + ks * mma::kStepBytes +
                                    (lane >> 4) * 16);
      mma::row_fragments_b(bf, b_addr, kRow, wq * 32, ks, lane);
      mma::mma_tiles<T, P, 2, 4>(acc, af, bf);
    }
    __syncthreads();  // the tiles are consumed before the next chunk overwrites them
  }
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int o = o0 + wm * 32 + 16 * m + gq + 8 * (e / 2), i = i0 + wq * 32 + 8 * j + 2 * tq + (e % 2);
        if (o < m_rows && i < a.hid) atomicAdd(dw + int64_t(o) * q_cols + i * a.taps + tap, acc[m][j][e]);
      }
}

// Launch: dw zeroed, pixel splits sized to fill 3 blocks per SM (132 SMs assumed for the split count only; the
// kernel is bounded to 168 registers a thread for 3 resident blocks), at least 256 pixels each. nhwc: the kNhwc
// variant (a.dz_stride and a.src_stride set), with or without init as the NCHW one. The splits meet in dw through
// atomic adds, whose order varies; `deterministic` (torch.use_deterministic_algorithms) takes one split, so each
// element of dw gets a single add onto zero: the same bits every run, at the cost of fewer blocks.
template <typename T, typename S, Precision P>
void launch_wgrad(const T* dz, const S* src, const T* init, float* dw, WgradArgs a, cudaStream_t stream,
                  bool nhwc = false, bool deterministic = false) {
  const int m_rows = 4 * a.hid, q_cols = a.hid * a.taps;
  GM_CUDA_CHECK(cudaMemsetAsync(dw, 0, sizeof(float) * m_rows * q_cols, stream));
  const int64_t pixels = a.n * a.height * a.width;
  if (pixels == 0) return;
  const int x_tiles = (a.hid + 63) / 64 * a.taps;
  const int64_t tiles = int64_t(x_tiles) * ((m_rows + 63) / 64);
  int64_t splits = (396 + tiles - 1) / tiles;
  if (splits > pixels / 256) splits = pixels / 256 > 0 ? pixels / 256 : 1;
  if (deterministic) splits = 1;
  a.per_split = ((pixels + splits - 1) / splits + 31) / 32 * 32;
  const dim3 grid(static_cast<unsigned>(x_tiles), static_cast<unsigned>((m_rows + 63) / 64),
                  static_cast<unsigned>((pixels + a.per_split - 1) / a.per_split));
  if (nhwc && init != nullptr)
    lstm_wgrad_tc<T, S, P, true, true><<<grid, 128, wgrad_smem_bytes<T>(), stream>>>(dz, src, init, dw, a);
  else if (nhwc)
    lstm_wgrad_tc<T, S, P, false, true><<<grid, 128, wgrad_smem_bytes<T>(), stream>>>(dz, src, init, dw, a);
  else if (init != nullptr)
    lstm_wgrad_tc<T, S, P, true><<<grid, 128, wgrad_smem_bytes<T>(), stream>>>(dz, src, init, dw, a);
  else
    lstm_wgrad_tc<T, S, P, false><<<grid, 128, wgrad_smem_bytes<T>(), stream>>>(dz, src, init, dw, a);
  GM_CUDA_CHECK_LAUNCH();
}

}  // namespace lstm_tc
}  // namespace gm
