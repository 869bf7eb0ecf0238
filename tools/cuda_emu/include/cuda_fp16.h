// Stand-in for cuda_fp16.h under the gm CUDA emulator: IEEE half storage (the compiler's _Float16, round to nearest
// even).
#pragma once
#include <cstdint>

struct __half {
  _Float16 v;
  __half() = default;
  __half(float f) : v(static_cast<_Float16>(f)) {}  // NOLINT: implicit like CUDA's
  __half(double d) : v(static_cast<_Float16>(static_cast<float>(d))) {}
  operator float() const { return static_cast<float>(v); }  // NOLINT
};
using half = __half;
inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
