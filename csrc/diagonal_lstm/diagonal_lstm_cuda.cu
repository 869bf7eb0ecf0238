// Diagonal LSTM on CUDA: one block per batch element runs the whole scan (the W+H-1 skewed columns) with the
// state in shared memory; see diagonal_lstm.h for the equations.
//
// Thread e owns the cells (k, i) = (e % h, e / h), (e + T) ... of the (h x H) diagonal state for the whole scan,
// so its cell state c never crosses threads. h of the previous step lives in shared memory (double-buffered by
// step parity: one barrier per forward step), stored rounded to the input dtype, which is the value y holds:
// the backward recomputes the gate pre-activations from y and gets the forward's operands exactly.
// The skew is addressing: at step t, row i handles pixel (i, t - i) (columns mirrored when reverse).
// Products run on the CUDA cores in the state type (float, double for double): a plain, portable baseline
// beside the Triton kernels, which use tensor cores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "common/tensor_args.h"
#include "diagonal_lstm/diagonal_lstm.h"

namespace gm {
namespace diagonal_lstm {
namespace {

constexpr int kMaxThreads = 512;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return x; }

// The value of h as the input dtype stores it (what y holds and what the products use).
template <typename T, typename A>
__device__ __forceinline__ A as_stored(A x) {
  return to_acc(from_acc<T>(x));
}

struct Geometry {
  int hid, height, width;
  bool reverse;
  __device__ int64_t hw() const { return int64_t(height) * width; }
  __device__ bool inside(int i, int t) const { return t - i >= 0 && t - i < width; }
  __device__ int64_t pix(int i, int t) const { return pixel(i, t - i, width, reverse); }
};

// Pre-activation of gate row o = gate * h + k at cell (row i, step t): gates + w_up . h_up + w_left . h_left,
// with h_up, h_left (h values each) in shared memory and w_t = (2, h, 4h) = [tap, in, out].
template <typename T, typename A>
__device__ __forceinline__ A preactivation(const T* gates_n, const T* __restrict__ w_t, const A* h_up,
                                           const A* h_left, int o, int64_t p, const Geometry& g) {
  const int g4 = 4 * g.hid;
  A acc = to_acc(gates_n[int64_t(o) * g.hw() + p]);
  for (int q = 0; q < g.hid; ++q) {
    if (h_up != nullptr) acc += to_acc(w_t[int64_t(q) * g4 + o]) * h_up[q];
    acc += to_acc(w_t[int64_t(g.hid + q) * g4 + o]) * h_left[q];
  }
  return acc;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kMaxThreads)
    diagonal_lstm_fwd_kernel(const T* __restrict__ gates, const T* __restrict__ w_t, T* __restrict__ y,
                             A* __restrict__ c_out, Geometry g) {
  extern __shared__ unsigned char smem_raw[];
  A* h_buf = reinterpret_cast<A*>(smem_raw);  // [2][H][h]
  A* c_buf = h_buf + 2 * g.height * g.hid;    // [H][h]
  const int cells = g.height * g.hid;
  const int64_t n = blockIdx.x, hw = g.hw();
  const T* gates_n = gates + n * 4 * g.hid * hw;
  T* y_n = y + n * g.hid * hw;
  A* c_n = c_out + n * g.hid * hw;
  for (int e = threadIdx.x; e < 3 * cells; e += blockDim.x) h_buf[e] = A(0);
  __syncthreads();
  for (int t = 0; t < g.width + g.height - 1; ++t) {
    const A* h_prev = h_buf + ((t + 1) & 1) * cells;
    A* h_next = h_buf + (t & 1) * cells;
    for (int e = threadIdx.x; e < cells; e += blockDim.x) {
      const int k = e % g.hid, i = e / g.hid;
      A c = A(0), h = A(0);
      if (g.inside(i, t)) {
        const int64_t p = g.pix(i, t);
        const A* h_up = i > 0 ? h_prev + (i - 1) * g.hid : nullptr;
        const A* h_left = h_prev + i * g.hid;
        A a[4];
        for (int gate = 0; gate < 4; ++gate)
          a[gate] = preactivation<T, A>(gates_n, w_t, h_up, h_left, gate * g.hid + k, p, g);
        cell_forward(a[0], a[1], a[2], a[3], c_buf[e], c, h);
        h = as_stored<T, A>(h);
        y_n[int64_t(k) * hw + p] = from_acc<T>(h);
        c_n[int64_t(k) * hw + p] = c;
      }
      c_buf[e] = c;
      h_next[e] = h;
    }
    __syncthreads();
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kMaxThreads)
    diagonal_lstm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ gates, const T* __restrict__ w_t,
                             const T* __restrict__ w_ss, const T* __restrict__ y, const A* __restrict__ c_saved,
                             T* __restrict__ dgates, Geometry g) {
  extern __shared__ unsigned char smem_raw[];
  const int hid = g.hid, cells = g.height * hid;
  A* x_buf = reinterpret_cast<A*>(smem_raw);  // [H][2][h]: y above, y left of each row's cell
  A* da_buf = x_buf + 2 * cells;               // [H][4h]
  A* dh_next = da_buf + 4 * cells;             // [H][h]: dL/dh(t) from step t+1 (owned per cell)
  A* dc_next = dh_next + cells;                // [H][h]: dL/dc(t) from step t+1 (owned per cell)
  const int64_t n = blockIdx.x, hw = g.hw();
  const T* gates_n = gates + n * 4 * hid * hw;
  T* dg_n = dgates + n * 4 * hid * hw;
  const T* y_n = y + n * hid * hw;
  const T* dy_n = dy + n * hid * hw;
  const A* c_n = c_saved + n * hid * hw;
  for (int e = threadIdx.x; e < cells; e += blockDim.x) dh_next[e] = dc_next[e] = A(0);
  for (int t = g.width + g.height - 2; t >= 0; --t) {
    for (int e = threadIdx.x; e < cells; e += blockDim.x) {
      const int k = e % hid, i = e / hid;
      A up = A(0), left = A(0);
      if (g.inside(i, t)) {
        const int64_t p = g.pix(i, t);
        if (i > 0) up = to_acc(y_n[int64_t(k) * hw + p - g.width]);
        if (t - i > 0) left = to_acc(y_n[int64_t(k) * hw + g.pix(i, t - 1)]);
      }
      x_buf[(2 * i) * hid + k] = up;
      x_buf[(2 * i + 1) * hid + k] = left;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < cells; e += blockDim.x) {
      const int k = e % hid, i = e / hid;
      A da[4] = {A(0), A(0), A(0), A(0)}, dc_left = A(0);
      if (g.inside(i, t)) {
        const int64_t p = g.pix(i, t);
        const A* h_up = i > 0 ? x_buf + (2 * i) * hid : nullptr;
        const A* h_left = x_buf + (2 * i + 1) * hid;
        A a[4];
        for (int gate = 0; gate < 4; ++gate)
          a[gate] = preactivation<T, A>(gates_n, w_t, h_up, h_left, gate * hid + k, p, g);
        const A c = c_n[int64_t(k) * hw + p];
        const A c_left = t - i > 0 ? c_n[int64_t(k) * hw + g.pix(i, t - 1)] : A(0);
        const A dh = to_acc(dy_n[int64_t(k) * hw + p]) + dh_next[e];
        cell_backward(a[0], a[1], a[2], a[3], c, c_left, dh, dc_next[e], da[0], da[1], da[2], da[3], dc_left);
        for (int gate = 0; gate < 4; ++gate) {
          dg_n[int64_t(gate * hid + k) * hw + p] = from_acc<T>(da[gate]);
          da[gate] = as_stored<T, A>(da[gate]);  // the products use da in the input dtype, like the Triton kernel
        }
      }
      for (int gate = 0; gate < 4; ++gate) da_buf[i * 4 * hid + gate * hid + k] = da[gate];
      dc_next[e] = dc_left;
    }
    __syncthreads();
    // dL/dh(t-1) at row r: w_left^T da(row r) + w_up^T da(row r + 1); w_ss is (4h, h, 2).
    for (int e = threadIdx.x; e < cells; e += blockDim.x) {
      const int k = e % hid, r = e / hid;
      A acc = A(0);
      const A* da_row = da_buf + r * 4 * hid;
      const A* da_below = r + 1 < g.height ? da_buf + (r + 1) * 4 * hid : nullptr;
      for (int o = 0; o < 4 * hid; ++o) {
        acc += to_acc(w_ss[(int64_t(o) * hid + k) * 2 + 1]) * da_row[o];
        if (da_below != nullptr) acc += to_acc(w_ss[(int64_t(o) * hid + k) * 2]) * da_below[o];
      }
      dh_next[e] = acc;
    }
    // The next step's first barrier orders these da_buf reads before its writes.
  }
}

size_t forward_smem(int hid, int height, size_t acc_size) { return 3 * size_t(hid) * height * acc_size; }
size_t backward_smem(int hid, int height, size_t acc_size) { return 8 * size_t(hid) * height * acc_size; }

int threads_for(int hid, int height) {
  const int cells = hid * height;
  return cells >= kMaxThreads ? kMaxThreads : ((cells + 31) / 32) * 32;
}

template <typename K>
void set_smem(K kernel, size_t bytes) {
  int device = 0, limit = 0;
  GM_CUDA_CHECK(cudaGetDevice(&device));
  GM_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<size_t>(limit))
    throw std::invalid_argument("gm diagonal_lstm (cuda): the state needs " + std::to_string(bytes) +
                                " bytes of shared memory, more than this GPU's " + std::to_string(limit) +
                                " per block: use the triton backend, or a smaller hidden size or height");
  GM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T, typename A>
void launch_forward(std::uintptr_t gates, std::uintptr_t w_t, std::uintptr_t y, std::uintptr_t c, int64_t n,
                    const Geometry& g, cudaStream_t stream) {
  auto kernel = diagonal_lstm_fwd_kernel<T, A>;
  const size_t smem = forward_smem(g.hid, g.height, sizeof(A));
  set_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(n), threads_for(g.hid, g.height), smem, stream>>>(
      ptr<const T>(gates), ptr<const T>(w_t), ptr<T>(y), ptr<A>(c), g);
  GM_CUDA_CHECK_LAUNCH();
}

template <typename T, typename A>
void launch_backward(std::uintptr_t dy, std::uintptr_t gates, std::uintptr_t w_t, std::uintptr_t w_ss,
                     std::uintptr_t y, std::uintptr_t c, std::uintptr_t dgates, int64_t n, const Geometry& g,
                     cudaStream_t stream) {
  auto kernel = diagonal_lstm_bwd_kernel<T, A>;
  const size_t smem = backward_smem(g.hid, g.height, sizeof(A));
  set_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(n), threads_for(g.hid, g.height), smem, stream>>>(
      ptr<const T>(dy), ptr<const T>(gates), ptr<const T>(w_t), ptr<const T>(w_ss), ptr<const T>(y), ptr<const A>(c),
      ptr<T>(dgates), g);
  GM_CUDA_CHECK_LAUNCH();
}

Geometry make_geometry(int64_t hid, int64_t height, int64_t width, bool reverse) {
  return Geometry{static_cast<int>(hid), static_cast<int>(height), static_cast<int>(width), reverse};
}

}  // namespace

void forward_cuda(std::uintptr_t gates, std::uintptr_t w_t, std::uintptr_t y, std::uintptr_t c, int64_t n, int64_t hid,
                  int64_t height, int64_t width, bool reverse, int dtype, std::uintptr_t stream) {
  const Geometry g = make_geometry(hid, height, width, reverse);
  const cudaStream_t s = to_stream(stream);
  switch (to_dtype(dtype)) {
    case DType::f32: return launch_forward<float, float>(gates, w_t, y, c, n, g, s);
    case DType::f64: return launch_forward<double, double>(gates, w_t, y, c, n, g, s);
    case DType::f16: return launch_forward<__half, float>(gates, w_t, y, c, n, g, s);
    case DType::bf16: return launch_forward<__nv_bfloat16, float>(gates, w_t, y, c, n, g, s);
  }
}

void backward_cuda(std::uintptr_t dy, std::uintptr_t gates, std::uintptr_t w_t, std::uintptr_t w_ss, std::uintptr_t y,
                   std::uintptr_t c, std::uintptr_t dgates, int64_t n, int64_t hid, int64_t height, int64_t width,
                   bool reverse, int dtype, std::uintptr_t stream) {
  const Geometry g = make_geometry(hid, height, width, reverse);
  const cudaStream_t s = to_stream(stream);
  switch (to_dtype(dtype)) {
    case DType::f32: return launch_backward<float, float>(dy, gates, w_t, w_ss, y, c, dgates, n, g, s);
    case DType::f64: return launch_backward<double, double>(dy, gates, w_t, w_ss, y, c, dgates, n, g, s);
    case DType::f16: return launch_backward<__half, float>(dy, gates, w_t, w_ss, y, c, dgates, n, g, s);
    case DType::bf16: return launch_backward<__nv_bfloat16, float>(dy, gates, w_t, w_ss, y, c, dgates, n, g, s);
  }
}

}  // namespace diagonal_lstm
}  // namespace gm
