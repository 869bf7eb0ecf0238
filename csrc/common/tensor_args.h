// The extension never links libtorch: Python checks shapes, dtypes, devices and contiguity, then passes
// raw addresses (int) and the CUDA stream handle (int). These helpers turn those integers back into types.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace gm {

// Dtype codes shared with gm/_ext.py (DTYPE_CODES).
enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

template <typename T>
inline T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline DType to_dtype(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("gm._C: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

}  // namespace gm
