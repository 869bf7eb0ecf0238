// gm CUDA emulator: the execution model behind the stand-in CUDA headers.
//
// A launch runs its blocks one after another on the calling host thread. Inside a block every CUDA thread is a
// fiber (ucontext) with its own stack; a fiber runs until it reaches a barrier (__syncthreads, or a warp-collective
// operation such as a shuffle, ldmatrix or mma), then the next runnable fiber runs. When every live thread of the
// block (or of the warp) has arrived, the waiters are released in a seeded pseudo-random order, so code whose result
// depends on which thread of a barrier interval runs first (a missing __syncthreads) gives wrong answers instead of
// lucky ones. Threads that return leave every barrier, as exited threads do on sm_70+. A barrier no thread can leave
// is reported as a deadlock (with where each thread waits) instead of hanging.
//
// Shared memory: the dynamic allocation and every static __shared__ array are filled with 0xFF bytes (NaN for
// floating point) before each block. cp.async copies are queued per thread and land at the cp.async.wait_group that
// covers them (the latest moment the PTX memory model allows), so a read before the wait sees stale data.
//
// Faults (out-of-bounds shared access, misaligned cp.async/ldmatrix, warp-collective misuse, bad launch
// configuration) raise gm_emu::Fault, which reaches Python as RuntimeError through the op's binding.
#pragma once
#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
using uint3 = dim3;

// The current thread's coordinates: set by the scheduler before it resumes a fiber.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

typedef struct CUstream_st* cudaStream_t;

namespace gm_emu {

struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Raise a fault from kernel code (the scheduler adds the kernel, block and thread to the message).
[[noreturn]] void fail(const std::string& what);

// ---- block and warp synchronisation
void sync_block();
void sync_warp(unsigned mask);
// Publish n (<= kSlotBytes) bytes of this lane's data and wait for every live lane of the warp. Returns the warp's 32
// slots (kSlotBytes apart, lane order) and, in *present, the lanes that took part. Slots stay valid until this lane's
// next warp collective.
constexpr std::size_t kSlotBytes = 64;
const unsigned char* warp_exchange(const void* data, std::size_t n, const char* what, unsigned mask,
                                   unsigned* present);
unsigned lane_id();
unsigned thread_rank();  // linear thread index in the block

// ---- shared memory
unsigned char* dynamic_smem();
std::size_t dynamic_smem_bytes();
bool register_static_smem(void* p, std::size_t bytes);  // poisons now and before every block
// Shared-window addresses (what cvta.to.shared gives): offsets into the dynamic allocation.
std::uint32_t shared_address(const void* p);
unsigned char* shared_pointer(std::uint32_t addr, std::size_t bytes, const char* what);

// ---- cp.async (queued per thread; lands at the covering wait_group)
void cp_async(std::uint32_t dst, const void* src, int cp_size, int src_size, const char* what);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// ---- launches
struct LaunchSite {
  const char* kernel;
  const char* where;
};
void set_max_dynamic_smem(const void* kernel, int bytes);
int max_dynamic_smem_optin();
// Validates the configuration (a bad one becomes the error cudaGetLastError returns) and runs every block.
void run_grid(const LaunchSite& site, const void* kernel, dim3 grid, dim3 block, std::size_t smem,
              const std::function<void()>& body);

template <class K>
struct Launch {
  K kernel;
  LaunchSite site;
  dim3 grid, block;
  std::size_t smem;
  template <class... Args>
  void operator()(Args... args) const {
    const K k = kernel;
    run_grid(site, reinterpret_cast<const void*>(k), grid, block, smem, [&] { k(args...); });
  }
};

template <class K>
Launch<K> launch(K kernel, const char* name, const char* where, dim3 grid, dim3 block, std::size_t smem = 0,
                 cudaStream_t = nullptr) {
  return Launch<K>{kernel, LaunchSite{name, where}, grid, block, smem};
}

// ---- runtime error state (cudaGetLastError)
int take_launch_error(std::string* message);
const char* error_string(int code);  // the detail of the last launch error for its code, else the code's name

}  // namespace gm_emu

// ---- device-side primitives used by kernels
inline void __syncthreads() { gm_emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { gm_emu::sync_warp(mask); }

namespace gm_emu {
template <class T>
T shuffle(unsigned mask, T v, int delta, int width, int kind, const char* what) {
  static_assert(sizeof(T) <= kSlotBytes && std::is_trivially_copyable<T>::value, "shuffle of a large type");
  unsigned present = 0;
  const unsigned char* slots = warp_exchange(&v, sizeof(T), what, mask, &present);
  const int lane = static_cast<int>(lane_id());
  const int base = lane - lane % width;
  int src = lane;
  switch (kind) {
    case 0: src = lane % width + delta < width ? lane + delta : lane; break;         // down
    case 1: src = lane % width - delta >= 0 ? lane - delta : lane; break;            // up
    case 2: src = (lane ^ delta) < base + width ? (lane ^ delta) : lane; break;      // xor
    default: src = base + ((delta % width) + width) % width; break;                  // indexed
  }
  if (!((present >> src) & 1u)) fail(std::string(what) + ": source lane " + std::to_string(src) + " did not take part");
  T out;
  std::memcpy(&out, slots + kSlotBytes * src, sizeof(T));
  return out;
}
}  // namespace gm_emu

template <class T> T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return gm_emu::shuffle(m, v, int(d), w, 0, "__shfl_down_sync"); }
template <class T> T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return gm_emu::shuffle(m, v, int(d), w, 1, "__shfl_up_sync"); }
template <class T> T __shfl_xor_sync(unsigned m, T v, int d, int w = 32) { return gm_emu::shuffle(m, v, d, w, 2, "__shfl_xor_sync"); }
template <class T> T __shfl_sync(unsigned m, T v, int src, int w = 32) { return gm_emu::shuffle(m, v, src, w, 3, "__shfl_sync"); }

inline unsigned __ballot_sync(unsigned mask, int pred) {
  const int p = pred != 0;
  unsigned present = 0;
  const unsigned char* slots = gm_emu::warp_exchange(&p, sizeof p, "__ballot_sync", mask, &present);
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l) {
    int v = 0;
    if ((present >> l) & (mask >> l) & 1u) std::memcpy(&v, slots + gm_emu::kSlotBytes * l, sizeof v);
    out |= unsigned(v != 0) << l;
  }
  return out;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == (__ballot_sync(mask, 1)); }

// Fibers share one host thread, so read-modify-write is atomic by construction.
template <class T> T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <class T> T atomicSub(T* p, T v) { const T old = *p; *p = old - v; return old; }
template <class T> T atomicMax(T* p, T v) { const T old = *p; *p = old < v ? v : old; return old; }
template <class T> T atomicMin(T* p, T v) { const T old = *p; *p = v < old ? v : old; return old; }
template <class T> T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
template <class T> T atomicCAS(T* p, T cmp, T v) { const T old = *p; if (old == cmp) *p = v; return old; }

inline std::size_t __cvta_generic_to_shared(const void* p) { return gm_emu::shared_address(p); }
template <class T> T __ldg(const T* p) { return *p; }
template <class T> T __ldcs(const T* p) { return *p; }  // cache-streaming load: a plain load here

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline double __longlong_as_double(long long u) { double f; std::memcpy(&f, &u, 8); return f; }
inline long long __double_as_longlong(double f) { long long u; std::memcpy(&u, &f, 8); return u; }

// Fast-math intrinsics: precise host math (the GPU's approximations differ in the last bits).
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
