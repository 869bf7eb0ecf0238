// Warp-level tensor-core building blocks shared by the CUDA GEMMs (masked_conv, masked_linear, iaf_made_output):
// cp.async / ldmatrix / mma.sync PTX wrappers, the 64 x 32 warp accumulator tile and its fragment loaders.
//
// One MMA k-step reads 32 bytes of the reduction dim: k16 of bf16/fp16 (m16n8k16) or k8 of tf32 (m16n8k8), so the
// same shared-memory addressing serves every dtype. Precision (common/precision.h) says how float32 reaches the
// tensor cores: kTf32 rounds operands to tf32; kTf32x3 adds the hi/lo cross products (error at fp32 rounding level).
// Device-only; include from .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/precision.h"

namespace gm {
namespace mma {

constexpr int kStepBytes = 32;  // one MMA k-step: k16 of a 16-bit type or k8 of tf32

// ---------------------------------------------------------------------------------------------------------------
// PTX wrappers.

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 writes zeros without reading src.
__device__ __forceinline__ void cp_async16(std::uint32_t dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
// 4- or 8-byte async copy through L1 (cp.async.cg takes 16 bytes only); zeros when !ok.
template <int kBytes>
__device__ __forceinline__ void cp_async_small(std::uint32_t dst, const void* src, bool ok) {
  static_assert(kBytes == 4 || kBytes == 8, "cp.async.ca copies 4, 8 or 16 bytes");
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(kBytes),
               "r"(ok ? kBytes : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t* r, std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t* r, std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ std::uint32_t to_tf32(std::uint32_t bits) {
  std::uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(bits)));
  return r;
}

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const std::uint32_t* a, const std::uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float* d, const std::uint32_t* a, const std::uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct MmaOp<float> {  // operands already tf32 bit patterns
  static __device__ __forceinline__ void run(float* d, const std::uint32_t* a, const std::uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The warp's 64 x 32 accumulator tile and one k-step of MMAs on fragments already in registers.
// Fragment e of v[i][j] holds row 16 i + lane / 4 + 8 (e / 2), column 8 j + 2 (lane % 4) + e % 2 of the warp tile.

struct WarpAcc {
  float v[4][4][4];  // [m16 tile][n8 tile][fragment]
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) v[i][j][e] = 0.f;
  }
};

// One k-step of MMAs over a kM x kN grid of m16 x n8 tiles, on fragments already in registers (they are rounded or
// split in place for tf32).
template <typename T, Precision P, int kM, int kN>
__device__ __forceinline__ void mma_tiles(float (&acc)[kM][kN][4], std::uint32_t (&af)[kM][4],
                                          std::uint32_t (&bf)[kN][2]) {
  if constexpr (P == Precision::kTf32x3) {
    // x = big + small with both tf32: big*big + big*small + small*big (small*small is below fp32 rounding).
    std::uint32_t a_small[kM][4], b_small[kN][2];
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = __uint_as_float(af[i][e]);
        af[i][e] = to_tf32(af[i][e]);
        a_small[i][e] = to_tf32(__float_as_uint(x - __uint_as_float(af[i][e])));
      }
#pragma unroll
    for (int j = 0; j < kN; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float x = __uint_as_float(bf[j][e]);
        bf[j][e] = to_tf32(bf[j][e]);
        b_small[j][e] = to_tf32(__float_as_uint(x - __uint_as_float(bf[j][e])));
      }
    // The tensor cores truncate while accumulating: sum this k-step from zero, then add it with a rounded FADD,
    // so the truncation error stays inside 8 products instead of growing with the whole reduction.
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        float step[4] = {0.f, 0.f, 0.f, 0.f};
        MmaOp<float>::run(step, a_small[i], bf[j]);
        MmaOp<float>::run(step, af[i], b_small[j]);
        MmaOp<float>::run(step, af[i], bf[j]);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] += step[e];
      }
  } else {
    if constexpr (P == Precision::kTf32) {
#pragma unroll
      for (int i = 0; i < kM; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) af[i][e] = to_tf32(af[i][e]);
#pragma unroll
      for (int j = 0; j < kN; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) bf[j][e] = to_tf32(bf[j][e]);
    }
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int j = 0; j < kN; ++j) MmaOp<T>::run(acc[i][j], af[i], bf[j]);
  }
}

template <typename T, Precision P>
__device__ __forceinline__ void mma_step(WarpAcc& acc, std::uint32_t (&af)[4][4], std::uint32_t (&bf)[4][2]) {
  mma_tiles<T, P, 4, 4>(acc.v, af, bf);
}

// ---------------------------------------------------------------------------------------------------------------
// The multi-stage cp.async main loop shared by gm's GEMMs. load(slot, iter) issues this thread's copies of k-iteration
// `iter` into stage buffer `slot` (one commit group per iteration, empty past the end); landed(slot, iter) runs on
// this thread's own landed copies before the barrier (e.g. zeroing masked weights); step(slot) consumes the stage once
// every thread's copies are in. kStages - 1 iterations are in flight; all copies have landed on return.

struct NoLanded {
  __device__ __forceinline__ void operator()(int, int) const {}
};

template <int kStages, typename Load, typename Step, typename Landed = NoLanded>
__device__ __forceinline__ void cp_async_mainloop(int k_iters, Load&& load, Step&& step, Landed&& landed = {}) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_iters) load(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < k_iters; ++it) {
    cp_async_wait<kStages - 2>();  // this thread's copies of iteration `it` have landed
    const int slot = it % kStages;
    landed(slot, it);
    __syncthreads();  // iteration `it` complete for all threads; the slot of it - 1 is free to refill
    const int next = it + kStages - 1;
    if (next < k_iters) load(next % kStages, next);
    cp_async_commit();
    step(slot);
  }
  cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------------------------
// Fragment loaders for one k-step `ks` of a stage.
//
// Row tiles: rows are M (or N), the reduction is contiguous (kRow bytes a row; kRow % 128 == 80 or 16-byte padded
// so 8 consecutive rows hit distinct banks). ldmatrix (no transpose) serves 16-bit and tf32 data alike.

__device__ __forceinline__ void row_fragments_a(std::uint32_t (&af)[4][4], std::uint32_t base, int row_bytes, int wm0,
                                                int ks, int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
    ldmatrix_x4(af[i], base + (wm0 + 16 * i + (lane & 15)) * row_bytes + ks * kStepBytes + (lane >> 4) * 16);
}

__device__ __forceinline__ void row_fragments_b(std::uint32_t (&bf)[4][2], std::uint32_t base, int row_bytes, int wn0,
                                                int ks, int lane) {
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) {
    std::uint32_t r[4];
    ldmatrix_x4(r, base + (wn0 + 16 * jj + (lane & 7) + ((lane >> 4) << 3)) * row_bytes + ks * kStepBytes +
                       ((lane >> 3) & 1) * 16);
    bf[2 * jj][0] = r[0];
    bf[2 * jj][1] = r[1];
    bf[2 * jj + 1][0] = r[2];
    bf[2 * jj + 1][1] = r[3];
  }
}

// Transposed tiles: rows are the reduction dim, M (or N) is contiguous, kRow bytes a row. ldmatrix.trans for
// 16-bit types; scalar 32-bit loads for tf32 (kRow / 4 % 32 == 8 keeps them conflict-free).
template <typename T, int kRow>
__device__ __forceinline__ void trans_fragments_a(std::uint32_t (&af)[4][4], std::uint32_t base,
                                                  const unsigned char* smem, int ks, int lane, int wm0) {
  if constexpr (sizeof(T) == 2) {
    const int k0 = ks * 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      ldmatrix_x4_trans(af[i], base + (k0 + (lane & 7) + ((lane >> 4) << 3)) * kRow +
                                   (wm0 + 16 * i + ((lane >> 3) & 1) * 8) * 2);
  } else {
    constexpr int ld = kRow / 4;
    const int g = lane >> 2, tq = lane & 3, k0 = ks * 8;
    const std::uint32_t* a = reinterpret_cast<const std::uint32_t*>(smem + (base - smem_addr(smem)));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int mb = wm0 + 16 * i + g;
      af[i][0] = a[(k0 + tq) * ld + mb];
      af[i][1] = a[(k0 + tq) * ld + mb + 8];
      af[i][2] = a[(k0 + tq + 4) * ld + mb];
      af[i][3] = a[(k0 + tq + 4) * ld + mb + 8];
    }
  }
}

template <typename T, int kRow>
__device__ __forceinline__ void trans_fragments_b(std::uint32_t (&bf)[4][2], std::uint32_t base,
                                                  const unsigned char* smem, int ks, int lane, int wn0) {
  if constexpr (sizeof(T) == 2) {
    const int k0 = ks * 16;
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      std::uint32_t r[4];
      ldmatrix_x4_trans(r, base + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kRow +
                               (wn0 + 16 * jj + ((lane >> 4) << 3)) * 2);
      bf[2 * jj][0] = r[0];
      bf[2 * jj][1] = r[1];
      bf[2 * jj + 1][0] = r[2];
      bf[2 * jj + 1][1] = r[3];
    }
  } else {
    constexpr int ld = kRow / 4;
    const int g = lane >> 2, tq = lane & 3, k0 = ks * 8;
    const std::uint32_t* b = reinterpret_cast<const std::uint32_t*>(smem + (base - smem_addr(smem)));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nb = wn0 + 8 * j + g;
      bf[j][0] = b[(k0 + tq) * ld + nb];
      bf[j][1] = b[(k0 + tq + 4) * ld + nb];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Storage <-> float.

// ReLU of a fragment register as the layer's input is read (the residual blocks' fused (ReLU, conv) layers,
// gm.nn.relu_conv): two 16-bit values or one float32 (the tf32 paths' raw bits), NaN kept as torch's relu keeps it.
template <typename T>
__device__ __forceinline__ std::uint32_t relu_bits(std::uint32_t r) {
  std::uint32_t d;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("max.NaN.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(r), "r"(0u));
  } else if constexpr (std::is_same_v<T, __half>) {
    asm("max.NaN.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(r), "r"(0u));
  } else {
    float f;
    asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(f) : "f"(__uint_as_float(r)), "f"(0.f));
    d = __float_as_uint(f);
  }
  return d;
}

template <typename T>
__device__ __forceinline__ void relu_fragments(std::uint32_t (&af)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) af[i][j] = relu_bits<T>(af[i][j]);
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

}  // namespace mma
}  // namespace gm
