// Error checks for CUDA runtime calls and launches: a failure raises RuntimeError in Python with the call site.
#pragma once
#ifdef GM_WITH_CUDA
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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
}  // namespace gm
#endif
