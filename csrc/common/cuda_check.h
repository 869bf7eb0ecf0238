// Error checks for CUDA runtime calls and launches: a failure raises RuntimeError in Python with the call site.
#pragma once
#ifdef GM_WITH_CUDA
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#define GM_CUDA_CHECK(expr)                                                                            \
  do {                                                                                                 \
    cudaError_t gm_err_ = (expr);                                                                      \
    if (gm_err_ != cudaSuccess)                                                                        \
      throw std::runtime_error(std::string("gm CUDA error: ") + cudaGetErrorString(gm_err_) + " at " + \
                               __FILE__ + ":" + std::to_string(__LINE__) + " (" #expr ")");            \
  } while (0)

// After a <<<>>> launch: catches bad configurations at once (asynchronous faults surface at the next sync).
#define GM_CUDA_CHECK_LAUNCH() GM_CUDA_CHECK(cudaGetLastError())

namespace gm {
inline cudaStream_t to_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes) once per kernel and device, not on every launch: a
// runtime call of host time each, at sizes where host time sets the layer time. For kernels that always launch with
// the same `bytes`. The record is keyed by the kernel's address, not by a static of each caller's instantiation:
// those are one object per process (GNU unique symbols), shared by every copy of the extension loaded (the CUDA
// emulator's tests load several), whose kernels each need their own attribute.
template <typename K>
void set_max_dynamic_smem(K kernel, int bytes) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;  // (kernel, device)
  int device = 0;
  GM_CUDA_CHECK(cudaGetDevice(&device));
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key) != 0) return;
  GM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert(key);
}
}  // namespace gm
#endif
