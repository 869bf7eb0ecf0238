// Stand-in for cuda_bf16.h under the gm CUDA emulator: bfloat16 storage with round-to-nearest-even conversions.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  std::uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {  // NOLINT: implicit like CUDA's
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) {
      bits = static_cast<std::uint16_t>((u >> 16) | 0x40);  // quiet NaN, sign kept
      return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = static_cast<std::uint16_t>(u >> 16);
  }
  __nv_bfloat16(double d) : __nv_bfloat16(static_cast<float>(d)) {}
  operator float() const {  // NOLINT
    const std::uint32_t u = std::uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
using nv_bfloat16 = __nv_bfloat16;
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(static_cast<float>(d)); }
