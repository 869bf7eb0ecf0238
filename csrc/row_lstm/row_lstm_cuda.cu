// CUDA backend of row_lstm: one launch per pass of the scan, plus a tiled GEMM for dw_ss.
//
// Scan kernels: one thread block per batch element loops over the rows (state on chip). The state-to-state conv
// couples neighbouring columns and every output channel reads every input channel of the previous row, so a
// row is finished by one block before the next starts (__syncthreads only; no grid-wide sync). Threads own
// (channel j, column w) pairs with w fastest, so a warp reads one weight (broadcast) and consecutive shared-memory
// words of the previous row. h_{r-1} lives in shared memory, padded with k/2 zero columns each side, in the
// state type (float; double for double inputs).
// Forward:  z_q[j, w] = gates[n, q*h + j, r, w] + sum_{i,t} w_ss[q*h + j, i, t] h_{r-1}[i, w + t - k/2]; cell.
// Backward: rows bottom to top; recompute z from the saved h_{r-1}, cell backward (row_lstm.h) into dz (shared,
// padded, and dgates), then dh_{r-1}[i, w] = sum_{o,t} w_ss[o, i, t] dz[o, w - t + k/2].
// dw_ss[o, i, t] = sum over pixels of dz[o, p] h_{r-1}[i, w + t - k/2]: a (4h x P) @ (P x h*k) GEMM, tiled in shared
// memory, pixels split over gridDim.z with atomicAdd into a zeroed state-type buffer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "common/tensor_args.h"
#include "row_lstm/row_lstm.h"

namespace gm {
namespace row_lstm {
namespace {

constexpr int kScanThreads = 512;

template <typename TA, typename TI>
__device__ __forceinline__ TA to_acc(TI x) {
  return static_cast<TA>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) {
  return x;
}
template <typename TI, typename TA>
__device__ __forceinline__ TI from_acc(TA x) {
  return static_cast<TI>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double from_acc<double, double>(double x) {
  return x;
}

// hp (h, W + 2p) in shared memory <- h_{r-1} of batch element n (row r-1 of hs, h0 or zero); pads are zero.
template <typename TA, typename TI>
__device__ void load_prev_h(TA* hp, const TA* hs, const TI* h0, int64_t n, int64_t r, const Shape& s) {
  const int64_t p = s.k / 2, wp = s.width + 2 * p;
  for (int64_t idx = threadIdx.x; idx < s.hidden * wp; idx += blockDim.x) {
    const int64_t i = idx / wp, w = idx % wp - p;
    TA v = TA(0);
    if (w >= 0 && w < s.width) {
      if (r > 0)
        v = hs[((n * s.hidden + i) * s.height + r - 1) * s.width + w];
      else if (h0 != nullptr)
        v = to_acc<TA>(h0[(n * s.hidden + i) * s.width + w]);
    }
    hp[idx] = v;
  }
}

// The four gate pre-activations of pair (j, w) at row r.
template <typename TA, typename TI>
__device__ __forceinline__ void preacts(const TI* gates, const TI* w_ss, const TA* hp, int64_t n, int64_t r,
                                        int64_t j, int64_t w, const Shape& s, TA z[4]) {
  const int64_t h = s.hidden, wp = s.width + 2 * (s.k / 2);
#pragma unroll
  for (int q = 0; q < 4; ++q) z[q] = to_acc<TA>(gates[((n * 4 * h + q * h + j) * s.height + r) * s.width + w]);
  for (int64_t i = 0; i < h; ++i) {
    const TA* hrow = hp + i * wp + w;  // hrow[t] = h_{r-1}[i, w + t - p]
    for (int64_t t = 0; t < s.k; ++t) {
      const TA a = hrow[t];
#pragma unroll
      for (int q = 0; q < 4; ++q) z[q] += to_acc<TA>(w_ss[((q * h + j) * h + i) * s.k + t]) * a;
    }
  }
}

template <typename TA, typename TI>
__global__ void row_lstm_fwd_kernel(const TI* __restrict__ gates, const TI* __restrict__ w_ss,
                                    const TI* __restrict__ h0, const TI* __restrict__ c0, TI* __restrict__ y,
                                    TA* __restrict__ hs, TA* __restrict__ cs, Shape s) {
  extern __shared__ unsigned char smem_raw[];
  TA* hp = reinterpret_cast<TA*>(smem_raw);  // (h, W + 2p)
  const int64_t n = blockIdx.x, h = s.hidden, pairs = h * s.width;
  for (int64_t r = 0; r < s.height; ++r) {
    load_prev_h(hp, hs, h0, n, r, s);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
      const int64_t j = idx / s.width, w = idx % s.width;
      TA z[4];
      preacts(gates, w_ss, hp, n, r, j, w, s, z);
      const int64_t at = ((n * h + j) * s.height + r) * s.width + w;
      TA c_prev = TA(0);
      if (r > 0)
        c_prev = cs[at - s.width];  // written by this thread at row r-1
      else if (c0 != nullptr)
        c_prev = to_acc<TA>(c0[(n * h + j) * s.width + w]);
      TA c, hn;
      cell_forward(z[0], z[1], z[2], z[3], c_prev, c, hn);
      cs[at] = c;
      hs[at] = hn;
      if (y != nullptr) y[at] = from_acc<TI>(hn);
    }
    __syncthreads();  // hs row r complete (and hp free) before the next row loads it
  }
}

template <typename TA, typename TI>
__global__ void row_lstm_bwd_kernel(const TI* __restrict__ dy, const TI* __restrict__ gates,
                                    const TI* __restrict__ w_ss, const TI* __restrict__ h0,
                                    const TI* __restrict__ c0, const TA* __restrict__ hs, const TA* __restrict__ cs,
                                    TI* __restrict__ dgates, TA* __restrict__ dh0, TA* __restrict__ dc0, Shape s) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t h = s.hidden, p = s.k / 2, wp = s.width + 2 * p, pairs = h * s.width;
  TA* hp = reinterpret_cast<TA*>(smem_raw);  // (h, W + 2p): h_{r-1}
  TA* dz = hp + h * wp;                      // (4h, W + 2p): dz of row r, zero pads
  TA* dh = dz + 4 * h * wp;                  // (h, W): dL/dh_r carried from row r+1
  TA* dc = dh + pairs;                       // (h, W): dL/dc_r carried from row r+1
  const int64_t n = blockIdx.x;
  for (int64_t idx = threadIdx.x; idx < 4 * h * wp; idx += blockDim.x) dz[idx] = TA(0);
  for (int64_t idx = threadIdx.x; idx < pairs; idx += blockDim.x) dh[idx] = dc[idx] = TA(0);
  for (int64_t r = s.height - 1; r >= 0; --r) {
    load_prev_h(hp, hs, h0, n, r, s);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
      const int64_t j = idx / s.width, w = idx % s.width;
      TA z[4];
      preacts(gates, w_ss, hp, n, r, j, w, s, z);
      const int64_t at = ((n * h + j) * s.height + r) * s.width + w;
      TA c_prev = TA(0);
      if (r > 0)
        c_prev = cs[at - s.width];
      else if (c0 != nullptr)
        c_prev = to_acc<TA>(c0[(n * h + j) * s.width + w]);
      TA g[4];
      TA dct = dc[idx];
      cell_backward(z[0], z[1], z[2], z[3], c_prev, cs[at], dh[idx] + to_acc<TA>(dy[at]), dct, g);
      dc[idx] = dct;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const TI gq = from_acc<TI>(g[q]);
        dgates[((n * 4 * h + q * h + j) * s.height + r) * s.width + w] = gq;
        dz[(q * h + j) * wp + p + w] = g[q];
      }
    }
    __syncthreads();  // dz complete; dh, dc consumed
    for (int64_t idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
      const int64_t i = idx / s.width, w = idx % s.width;
      TA acc = TA(0);
      for (int64_t o = 0; o < 4 * h; ++o) {
        const TA* zrow = dz + o * wp + p + w;  // zrow[-(t - p)] = dz[o, w - t + p]
        for (int64_t t = 0; t < s.k; ++t) acc += to_acc<TA>(w_ss[(o * h + i) * s.k + t]) * zrow[p - t];
      }
      dh[idx] = acc;
    }
    __syncthreads();  // dh ready for row r-1; dz and hp free
  }
  for (int64_t idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
    const int64_t j = idx / s.width, w = idx % s.width;
    if (dh0 != nullptr) dh0[(n * h + j) * s.width + w] = dh[idx];
    if (dc0 != nullptr) dc0[(n * h + j) * s.width + w] = dc[idx];
  }
}

constexpr int kTile = 32;  // dw GEMM: 32 x 32 outputs per block, 256 threads x 4 outputs, 32 pixels per step

template <typename TA, typename TI>
__global__ void row_lstm_wgrad_kernel(const TI* __restrict__ dgates, const TA* __restrict__ hs,
                                      const TI* __restrict__ h0, TA* __restrict__ dw, Shape s,
                                      int64_t pixels_per_split) {
  __shared__ TA a_tile[kTile][kTile + 1];  // [o][pixel]
  __shared__ TA b_tile[kTile][kTile + 1];  // [q = i*k + t][pixel]
  const int64_t h = s.hidden, hw = s.height * s.width, total = s.n * hw, nq = h * s.k, p = s.k / 2;
  const int64_t o0 = int64_t(blockIdx.y) * kTile, q0 = int64_t(blockIdx.x) * kTile;
  const int64_t start = int64_t(blockIdx.z) * pixels_per_split;
  const int64_t end = min(total, start + pixels_per_split);
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;  // ty in [0, 8): rows ty, ty+8, ty+16, ty+24
  TA acc[4] = {TA(0), TA(0), TA(0), TA(0)};
  for (int64_t p0 = start; p0 < end; p0 += kTile) {
    for (int rr = ty; rr < kTile; rr += 8) {
      const int64_t px = p0 + tx;
      const bool ok = px < end;
      const int64_t n = ok ? px / hw : 0, r = ok ? (px / s.width) % s.height : 0, w = ok ? px % s.width : 0;
      const int64_t o = o0 + rr;
      a_tile[rr][tx] = (ok && o < 4 * h) ? to_acc<TA>(dgates[(n * 4 * h + o) * hw + r * s.width + w]) : TA(0);
      const int64_t q = q0 + rr, i = q / s.k, src = w + q % s.k - p;
      TA v = TA(0);
      if (ok && q < nq && src >= 0 && src < s.width) {
        if (r > 0)
          v = hs[((n * h + i) * s.height + r - 1) * s.width + src];
        else if (h0 != nullptr)
          v = to_acc<TA>(h0[(n * h + i) * s.width + src]);
      }
      b_tile[rr][tx] = v;
    }
    __syncthreads();
    for (int kk = 0; kk < kTile; ++kk) {
      const TA b = b_tile[tx][kk];
#pragma unroll
      for (int m = 0; m < 4; ++m) acc[m] += a_tile[ty + 8 * m][kk] * b;
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int64_t o = o0 + ty + 8 * m, q = q0 + tx;
    if (o < 4 * h && q < nq) atomicAdd(dw + o * nq + q, acc[m]);  // dw[o, i, t] at o*h*k + i*k + t = o*nq + q
  }
}

template <typename TA>
size_t fwd_smem(const Shape& s) {
  return sizeof(TA) * s.hidden * (s.width + 2 * (s.k / 2));
}
template <typename TA>
size_t bwd_smem(const Shape& s) {
  const int64_t wp = s.width + 2 * (s.k / 2);
  return sizeof(TA) * (5 * s.hidden * wp + 2 * s.hidden * s.width);
}

// Opt in to more than 48 KB of dynamic shared memory; a clear error past the device's per-block limit (227 KB on
// H100/H200: e.g. the float64 backward at h = 128, W = 32 needs 240 KB).
template <typename K>
void set_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int device = 0, limit = 0;
  GM_CUDA_CHECK(cudaGetDevice(&device));
  GM_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<size_t>(limit))
    throw std::invalid_argument("gm row_lstm (cuda): the scan needs " + std::to_string(bytes) +
                                " bytes of shared memory, more than this GPU's " + std::to_string(limit) +
                                " per block: use the triton backend, or a smaller hidden size or width");
  GM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename TA, typename TI>
void forward_typed(std::uintptr_t g, std::uintptr_t w, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t y,
                   std::uintptr_t hs, std::uintptr_t cs, Shape s, cudaStream_t stream) {
  if (s.n == 0 || s.height == 0 || s.width == 0) return;
  const size_t smem = fwd_smem<TA>(s);
  auto kernel = row_lstm_fwd_kernel<TA, TI>;
  set_smem(kernel, smem);
  TI* yp = (y == hs) ? nullptr : ptr<TI>(y);
  kernel<<<static_cast<unsigned>(s.n), kScanThreads, smem, stream>>>(
      ptr<const TI>(g), ptr<const TI>(w), ptr<const TI>(h0), ptr<const TI>(c0), yp, ptr<TA>(hs), ptr<TA>(cs), s);
  GM_CUDA_CHECK_LAUNCH();
}

template <typename TA, typename TI>
void backward_typed(std::uintptr_t dy, std::uintptr_t g, std::uintptr_t w, std::uintptr_t h0, std::uintptr_t c0,
                    std::uintptr_t hs, std::uintptr_t cs, std::uintptr_t dg, std::uintptr_t dw, std::uintptr_t dh0,
                    std::uintptr_t dc0, Shape s, cudaStream_t stream) {
  const int64_t nq = s.hidden * s.k;
  if (dw != 0) GM_CUDA_CHECK(cudaMemsetAsync(ptr<TA>(dw), 0, sizeof(TA) * 4 * s.hidden * nq, stream));
  if (s.n == 0 || s.height == 0 || s.width == 0) {
    if (dh0 != 0) GM_CUDA_CHECK(cudaMemsetAsync(ptr<TA>(dh0), 0, sizeof(TA) * s.n * s.hidden * s.width, stream));
    if (dc0 != 0) GM_CUDA_CHECK(cudaMemsetAsync(ptr<TA>(dc0), 0, sizeof(TA) * s.n * s.hidden * s.width, stream));
    return;
  }
  const size_t smem = bwd_smem<TA>(s);
  auto kernel = row_lstm_bwd_kernel<TA, TI>;
  set_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(s.n), kScanThreads, smem, stream>>>(
      ptr<const TI>(dy), ptr<const TI>(g), ptr<const TI>(w), ptr<const TI>(h0), ptr<const TI>(c0), ptr<const TA>(hs),
      ptr<const TA>(cs), ptr<TI>(dg), ptr<TA>(dh0), ptr<TA>(dc0), s);
  GM_CUDA_CHECK_LAUNCH();
  if (dw == 0) return;
  const int64_t pixels = s.n * s.height * s.width;
  const int64_t tiles = ((nq + kTile - 1) / kTile) * ((4 * s.hidden + kTile - 1) / kTile);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((264 + tiles - 1) / tiles, pixels / 256));
  const int64_t per_split = ((pixels + splits - 1) / splits + kTile - 1) / kTile * kTile;
  const dim3 grid(static_cast<unsigned>((nq + kTile - 1) / kTile), static_cast<unsigned>((4 * s.hidden + kTile - 1) / kTile),
                  static_cast<unsigned>((pixels + per_split - 1) / per_split));
  row_lstm_wgrad_kernel<TA, TI><<<grid, 256, 0, stream>>>(ptr<const TI>(dg), ptr<const TA>(hs), ptr<const TI>(h0),
                                                          ptr<TA>(dw), s, per_split);
  GM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void forward_cuda(std::uintptr_t gates, std::uintptr_t w_ss, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t y,
                  std::uintptr_t hs, std::uintptr_t cs, Shape s, int dtype, std::uintptr_t stream) {
  const cudaStream_t st = to_stream(stream);
  switch (to_dtype(dtype)) {
    case DType::f32: return forward_typed<float, float>(gates, w_ss, h0, c0, y, hs, cs, s, st);
    case DType::f64: return forward_typed<double, double>(gates, w_ss, h0, c0, y, hs, cs, s, st);
    case DType::f16: return forward_typed<float, __half>(gates, w_ss, h0, c0, y, hs, cs, s, st);
    case DType::bf16: return forward_typed<float, __nv_bfloat16>(gates, w_ss, h0, c0, y, hs, cs, s, st);
  }
  throw std::invalid_argument("row_lstm_forward_cuda: unknown dtype");
}

void backward_cuda(std::uintptr_t dy, std::uintptr_t gates, std::uintptr_t w_ss, std::uintptr_t h0, std::uintptr_t c0,
                   std::uintptr_t hs, std::uintptr_t cs, std::uintptr_t dgates, std::uintptr_t dw, std::uintptr_t dh0,
                   std::uintptr_t dc0, Shape s, int dtype, std::uintptr_t stream) {
  const cudaStream_t st = to_stream(stream);
  switch (to_dtype(dtype)) {
    case DType::f32:
      return backward_typed<float, float>(dy, gates, w_ss, h0, c0, hs, cs, dgates, dw, dh0, dc0, s, st);
    case DType::f64:
      return backward_typed<double, double>(dy, gates, w_ss, h0, c0, hs, cs, dgates, dw, dh0, dc0, s, st);
    case DType::f16:
      return backward_typed<float, __half>(dy, gates, w_ss, h0, c0, hs, cs, dgates, dw, dh0, dc0, s, st);
    case DType::bf16:
      return backward_typed<float, __nv_bfloat16>(dy, gates, w_ss, h0, c0, hs, cs, dgates, dw, dh0, dc0, s, st);
  }
  throw std::invalid_argument("row_lstm_backward_cuda: unknown dtype");
}

}  // namespace row_lstm
}  // namespace gm
