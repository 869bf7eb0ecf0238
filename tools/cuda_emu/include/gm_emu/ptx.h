// PTX instructions gm's inline asm uses, emulated from the PTX ISA.
//
// tools/cuda_emu/translate.py turns `asm("a.b.c %0, [%1], {%2, %3};" : "=r"(x) : "l"(p), "r"(u), "r"(v))` into
// `gm_emu::ptx::a_b_c(x, p, u, v)`: one function per instruction spelling, operands in template order (a {vector}
// is expanded, [address] passes the address), outputs as references. An instruction without a function here fails
// the translation with its name; add it below.
//
// Warp-collective instructions (ldmatrix, mma) exchange their operands through gm_emu::warp_exchange and need all
// 32 lanes (.sync.aligned). The MMA multiplies exactly and accumulates in double, then rounds once to float: the
// tensor cores' truncating accumulation is not reproduced (results can differ in the last bits).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "gm_emu/runtime.h"

namespace gm_emu {
namespace ptx {

// ---- cp.async: dst is a shared-window address, src a global pointer, src_size < cp_size zero-fills the rest.
inline void cp_async_cg_shared_global(std::uint32_t dst, const void* src, int cp_size, int src_size) {
  if (cp_size != 16) fail("cp.async.cg copies 16 bytes, got " + std::to_string(cp_size));
  cp_async(dst, src, cp_size, src_size, "cp.async.cg");
}
inline void cp_async_ca_shared_global(std::uint32_t dst, const void* src, int cp_size, int src_size) {
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) fail("cp.async.ca copies 4, 8 or 16 bytes");
  cp_async(dst, src, cp_size, src_size, "cp.async.ca");
}
inline void cp_async_cg_shared_global(std::uint32_t dst, const void* src, int cp_size) {
  cp_async_cg_shared_global(dst, src, cp_size, cp_size);
}
inline void cp_async_ca_shared_global(std::uint32_t dst, const void* src, int cp_size) {
  cp_async_ca_shared_global(dst, src, cp_size, cp_size);
}
inline void cp_async_commit_group() { cp_async_commit(); }
inline void cp_async_wait_group(int n) { cp_async_wait(n); }
inline void cp_async_wait_all() { cp_async_commit(); cp_async_wait(0); }

// ---- ldmatrix.m8n8.b16: lanes 8j..8j+7 give the row addresses of matrix j; each lane gets 32 bits of every matrix.
inline void ldmatrix_rows(std::uint32_t* r, int count, std::uint32_t addr, bool trans, const char* what) {
  unsigned present = 0;
  const unsigned char* slots = warp_exchange(&addr, sizeof addr, what, 0xffffffffu, &present);
  if (present != 0xffffffffu) fail(std::string(what) + " needs all 32 lanes of the warp");
  const unsigned lane = lane_id();
  auto row = [&](unsigned l) {
    std::uint32_t a;
    std::memcpy(&a, slots + kSlotBytes * l, sizeof a);
    if (a % 16 != 0) fail(std::string(what) + ": row address " + std::to_string(a) + " is not 16-byte aligned");
    return a;
  };
  for (int j = 0; j < count; ++j) {
    if (!trans) {  // row lane / 4, columns 2 (lane % 4), +1
      std::memcpy(&r[j], shared_pointer(row(8 * j + lane / 4) + 4 * (lane % 4), 4, what), 4);
    } else {  // transposed: rows 2 (lane % 4) and +1, column lane / 4
      std::uint16_t lo, hi;
      std::memcpy(&lo, shared_pointer(row(8 * j + 2 * (lane % 4)) + 2 * (lane / 4), 2, what), 2);
      std::memcpy(&hi, shared_pointer(row(8 * j + 2 * (lane % 4) + 1) + 2 * (lane / 4), 2, what), 2);
      r[j] = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
    }
  }
}
inline void ldmatrix_sync_aligned_m8n8_x1_shared_b16(std::uint32_t& r0, std::uint32_t a) {
  ldmatrix_rows(&r0, 1, a, false, "ldmatrix.x1");
}
inline void ldmatrix_sync_aligned_m8n8_x2_shared_b16(std::uint32_t& r0, std::uint32_t& r1, std::uint32_t a) {
  std::uint32_t r[2];
  ldmatrix_rows(r, 2, a, false, "ldmatrix.x2");
  r0 = r[0], r1 = r[1];
}
inline void ldmatrix_sync_aligned_m8n8_x4_shared_b16(std::uint32_t& r0, std::uint32_t& r1, std::uint32_t& r2,
                                                     std::uint32_t& r3, std::uint32_t a) {
  std::uint32_t r[4];
  ldmatrix_rows(r, 4, a, false, "ldmatrix.x4");
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
inline void ldmatrix_sync_aligned_m8n8_x4_trans_shared_b16(std::uint32_t& r0, std::uint32_t& r1, std::uint32_t& r2,
                                                           std::uint32_t& r3, std::uint32_t a) {
  std::uint32_t r[4];
  ldmatrix_rows(r, 4, a, true, "ldmatrix.x4.trans");
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

// ---- cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (result in a .b32).
inline void cvt_rna_tf32_f32(std::uint32_t& d, float a) {
  std::uint32_t u;
  std::memcpy(&u, &a, 4);
  if (((u >> 23) & 0xffu) != 0xffu) u = (u + 0x1000u) & 0xffffe000u;  // inf/nan unchanged
  d = u;
}

// ---- max.NaN.{bf16x2,f16x2,f32}: the larger operand, NaN if either is NaN (the canonical NaN; +0 over -0).
inline float max_nan_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  if (a == b) return std::signbit(a) ? b : a;
  return a > b ? a : b;
}
inline std::uint16_t max_nan_bf16(std::uint16_t a, std::uint16_t b) {
  auto f = [](std::uint16_t h) {
    std::uint32_t u = std::uint32_t(h) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
  };
  const float r = max_nan_float(f(a), f(b));
  if (std::isnan(r)) return 0x7fffu;  // the canonical bf16 NaN
  std::uint32_t u;
  std::memcpy(&u, &r, 4);
  return static_cast<std::uint16_t>(u >> 16);  // exact: r is one of the operands
}
inline std::uint16_t max_nan_f16(std::uint16_t a, std::uint16_t b) {
  _Float16 x, y;
  std::memcpy(&x, &a, 2);
  std::memcpy(&y, &b, 2);
  const float r = max_nan_float(static_cast<float>(x), static_cast<float>(y));
  if (std::isnan(r)) return 0x7fffu;  // the canonical f16 NaN
  const _Float16 h = static_cast<_Float16>(r);
  std::uint16_t out;
  std::memcpy(&out, &h, 2);
  return out;
}
inline void max_NaN_bf16x2(std::uint32_t& d, std::uint32_t a, std::uint32_t b) {
  d = std::uint32_t(max_nan_bf16(a & 0xffffu, b & 0xffffu)) | (std::uint32_t(max_nan_bf16(a >> 16, b >> 16)) << 16);
}
inline void max_NaN_f16x2(std::uint32_t& d, std::uint32_t a, std::uint32_t b) {
  d = std::uint32_t(max_nan_f16(a & 0xffffu, b & 0xffffu)) | (std::uint32_t(max_nan_f16(a >> 16, b >> 16)) << 16);
}
inline void max_NaN_f32(float& d, float a, float b) { d = max_nan_float(a, b); }

// ---- ex2.approx.ftz.f32: 2^a, subnormal inputs and results flushed to zero (the GPU's is within 2 ulp).
inline void ex2_approx_ftz_f32(float& d, float a) {
  if (std::fpclassify(a) == FP_SUBNORMAL) a = 0.f;
  d = std::exp2(a);
  if (std::fpclassify(d) == FP_SUBNORMAL) d = 0.f;
}

// ---- tanh.approx.f32 (sm_75+): the GPU's has a maximum relative error of about 2^-11; here tanh rounded to 11
// mantissa bits (truncation: an error of the same size), so tests see an approximate result, not an exact one.
inline void neg_f32(float& d, float a) { d = -a; }

inline void tanh_approx_f32(float& d, float a) {
  float t = std::tanh(a);
  std::uint32_t u;
  std::memcpy(&u, &t, 4);
  if (((u >> 23) & 0xffu) != 0xffu) u &= 0xfffff000u;
  std::memcpy(&d, &u, 4);
}

// ---- mma.sync.aligned.{m16n8k16 (16-bit), m16n8k8 (tf32)}.row.col.f32: fragment layouts from the PTX ISA.
enum class Elem { bf16, f16, tf32 };

inline float element(std::uint32_t reg, int half, Elem e) {
  switch (e) {
    case Elem::bf16: {
      const std::uint32_t u = ((reg >> (16 * half)) & 0xffffu) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    case Elem::f16: {
      const std::uint16_t u = static_cast<std::uint16_t>((reg >> (16 * half)) & 0xffffu);
      _Float16 h;
      std::memcpy(&h, &u, 2);
      return static_cast<float>(h);
    }
    case Elem::tf32:
    default: {
      const std::uint32_t u = reg & 0xffffe000u;  // the low 13 bits are ignored
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
  }
}

struct MmaOperands {
  std::uint32_t a[4], b[2];
};

inline void mma_m16n8(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2], const float (&c)[4],
                      Elem e, const char* what) {
  const MmaOperands mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  unsigned present = 0;
  const unsigned char* slots = warp_exchange(&mine, sizeof mine, what, 0xffffffffu, &present);
  if (present != 0xffffffffu) fail(std::string(what) + " needs all 32 lanes of the warp");
  auto ops = [&](unsigned lane) {
    MmaOperands o;
    std::memcpy(&o, slots + kSlotBytes * lane, sizeof o);
    return o;
  };
  const bool k16 = e != Elem::tf32;
  const int K = k16 ? 16 : 8;
  auto A = [&](int r, int k) {
    if (k16) return element(ops((r % 8) * 4 + (k % 8) / 2).a[(r >= 8) + 2 * (k >= 8)], k % 2, e);
    return element(ops((r % 8) * 4 + k % 4).a[(r >= 8) + 2 * (k >= 4)], 0, e);
  };
  auto B = [&](int k, int n) {
    if (k16) return element(ops(n * 4 + (k % 8) / 2).b[k >= 8], k % 2, e);
    return element(ops(n * 4 + k % 4).b[k >= 4], 0, e);
  };
  const unsigned lane = lane_id(), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {  // d_i: row g + 8 (i / 2), column 2 t + i % 2
    const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
    double acc = 0;
    for (int k = 0; k < K; ++k) acc += double(A(r, k)) * double(B(k, n));
    d[i] = static_cast<float>(double(c[i]) + acc);
  }
}

#define GM_EMU_MMA(NAME, ELEM, TEXT)                                                                             \
  inline void NAME(float& d0, float& d1, float& d2, float& d3, std::uint32_t a0, std::uint32_t a1,              \
                   std::uint32_t a2, std::uint32_t a3, std::uint32_t b0, std::uint32_t b1, float c0, float c1,  \
                   float c2, float c3) {                                                                         \
    float d[4];                                                                                                  \
    mma_m16n8(d, {a0, a1, a2, a3}, {b0, b1}, {c0, c1, c2, c3}, ELEM, TEXT);                                     \
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];                                                                  \
  }
GM_EMU_MMA(mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32, Elem::bf16, "mma.m16n8k16.bf16")
GM_EMU_MMA(mma_sync_aligned_m16n8k16_row_col_f32_f16_f16_f32, Elem::f16, "mma.m16n8k16.f16")
GM_EMU_MMA(mma_sync_aligned_m16n8k8_row_col_f32_tf32_tf32_f32, Elem::tf32, "mma.m16n8k8.tf32")
#undef GM_EMU_MMA

}  // namespace ptx
}  // namespace gm_emu
