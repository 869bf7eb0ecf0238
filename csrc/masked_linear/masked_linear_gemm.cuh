// Tensor-core GEMMs over the non-empty tiles of a 0/1 weight mask, shared by masked_linear (masked_linear_cuda.cu)
// and the fused MADE output layer (iaf/iaf_made_output_cuda.cu). Device code; include from .cu files only.
//
//   masked_gemm_kernel:  C[r, j] = sum_i A[r, i] Wm(i, j), then an epilogue on the fp32 tile (bias + activation,
//                        or the IAF step). Wm = (W ⊙ M)^T read as weight rows = output columns (BLayout::kRows:
//                        forward, fused output layer) or W ⊙ M read as weight rows = reduction (BLayout::kTrans:
//                        input gradient). Each block owns 128 rows x one column block and walks only the reduction
//                        tiles listed for that column block in a compressed tile map (gm.ops.masked_linear.TileMap:
//                        offsets, tile indices, mids; all-ones tiles first). A reduction tile is one pipeline
//                        stage: 64 bytes (32 bf16/fp16, 16 fp32). For the partly-zero tiles only, the mask bytes of
//                        the stage arrive by cp.async beside the weight, and each thread zeroes the masked elements
//                        of its own 16-byte weight chunks before the stage's barrier (no extra synchronisation).
//   masked_wgrad_kernel: partial[s, o, k] = M[o, k] sum_{r in split s} G[r, o] X[r, k], one block per 128 x 128
//                        (o, k) tile: empty tiles store zeros without a loop; the mask is read, in the epilogue,
//                        only by partly-zero tiles.
//
// 256 threads, 8 warps of 64 x 32 (common/mma_sync.cuh), 4-stage cp.async pipeline, fp32 accumulation; bf16/fp16
// on m16n8k16, fp32 on tf32 m16n8k8 (Precision::kTf32) or 3xTF32 (kTf32x3, fp32-level error).
// Python pads every row to a 16-byte multiple (cp.async), and the mask's rows to 16 bytes, before launching.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "common/mma_sync.cuh"
#include "common/tensor_args.h"

namespace gm {
namespace masked_linear {
namespace gemm {

using namespace ::gm::mma;  // NOLINT(build/namespaces)

constexpr int kThreads = 256;
constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kStages = 4;
constexpr int kKBytes = 64;             // reduction bytes per stage
constexpr int kRowTile = kKBytes + 16;  // row tiles: 64 bytes + 16 pad, conflict-free ldmatrix over 8 rows
constexpr int kTileA = kBM * kRowTile;
constexpr int kTileB = kBN * kRowTile;
constexpr int kTileMask = kBN * kKBytes / 2;  // mask bytes of one weight stage (at most 32 bf16 x 128)
constexpr int kStage = kTileA + kTileB + kTileMask;
constexpr int kSmem = kStages * kStage;
constexpr int kOutLd = kBN + 8;  // floats: float2 fragment stores conflict-free per half-warp
static_assert(kBM * kOutLd * 4 <= kSmem, "the epilogue tile must fit in the pipeline's shared memory");
constexpr int kHeadCols = kBN / 2;  // fused output layer: 64 m columns beside their 64 s columns

// A stage tile whose rows are the reduction dim and whose 128 columns are contiguous (kBN of them).
template <typename T>
struct TransTile {
  static constexpr int kElem = static_cast<int>(sizeof(T));
  static constexpr int kRows = kKBytes / kElem;
  static constexpr int kRowBytes = kBN * kElem;
  static constexpr int kPad = kElem == 2 ? 16 : 32;  // ldmatrix.trans rows / scalar tf32 loads conflict-free
  static constexpr int kRow = kRowBytes + kPad;
  static constexpr int kTile = kRows * kRow;
  static constexpr int kChunksPerRow = kRowBytes / 16;
  static_assert(kRows * kChunksPerRow == 2 * kThreads, "two 16-byte chunks per thread per tile");
  static_assert(kTile <= kTileB, "a transposed tile must fit in the B slot of a stage");
};

enum class BLayout { kRows, kTrans };

struct TileList {  // CSR over the column blocks: tiles idx[off[j]..off[j+1]), all-ones ones before mid[j]
  const int* offsets;
  const int* idx;
  const int* mids;
};

struct GemmArgs {
  const char* a;              // (rows, reduction) row-major, a_bytes a row
  const char* w;              // weight (w_rows, w_cols) row-major, w_bytes a row
  const unsigned char* mask;  // (w_rows, mask_ld) uint8, rows zero-padded to a 16-byte multiple
  TileList tiles;
  int rows;
  int a_bytes;
  int w_rows;
  int w_bytes;
  int mask_ld;
  int col_blocks;  // column blocks per row block (the grid is row blocks x col_blocks)
  int head_rows;   // fused output layer: D (weight rows d and D + d in one block); 0 for a plain GEMM
};

// Zero the elements of one 16-byte weight chunk whose mask byte is 0 (16 / sizeof(T) mask bytes).
template <typename T>
__device__ __forceinline__ void mask_chunk(unsigned char* w, const unsigned char* m) {
  uint4 v = *reinterpret_cast<uint4*>(w);
  std::uint32_t* words = reinterpret_cast<std::uint32_t*>(&v);
  if constexpr (sizeof(T) == 2) {
    const uint2 mb = *reinterpret_cast<const uint2*>(m);
    const std::uint32_t bytes[2] = {mb.x, mb.y};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const std::uint32_t b = bytes[q >> 1] >> ((q & 1) * 16);
      words[q] &= ((b & 0xffu) ? 0x0000ffffu : 0u) | ((b & 0xff00u) ? 0xffff0000u : 0u);
    }
  } else {
    const std::uint32_t mb = *reinterpret_cast<const std::uint32_t*>(m);
#pragma unroll
    for (int q = 0; q < 4; ++q) words[q] &= ((mb >> (8 * q)) & 0xffu) ? 0xffffffffu : 0u;
  }
  *reinterpret_cast<uint4*>(w) = v;
}

// The main loop: the warp tiles of acc for output rows m0.., column block jb.
template <typename T, Precision P, BLayout L>
__device__ __forceinline__ void gemm_mainloop(const GemmArgs& args, unsigned char* smem, WarpAcc& acc,
                                              std::int64_t m0, int jb) {
  constexpr int kElem = static_cast<int>(sizeof(T));
  constexpr int kMaskChunk = 16 / kElem;  // mask bytes per 16-byte weight chunk
  constexpr int kRedElems = kKBytes / kElem;
  using TT = TransTile<T>;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp & 1) * 64, wn0 = (warp >> 1) * 32;
  const int start = args.tiles.offsets[jb], mid = args.tiles.mids[jb];
  const int k_iters = args.tiles.offsets[jb + 1] - start;

  // Producer roles. Row tiles: chunk (tid & 3) of rows row0 and row0 + 64. Transposed tile: chunks tid, tid + 256.
  const int chunk = tid & 3, row0 = tid >> 2;
  const char* a_src[2];
  bool a_ok[2];
  const char* w_src[2];
  const unsigned char* m_src[2];
  bool w_ok[2];
  int b_dst[2], m_dst[2];  // byte offsets of this thread's weight / mask chunks inside a stage's B / mask slot
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t m = m0 + row0 + 64 * r;
    a_ok[r] = m < args.rows;
    a_src[r] = args.a + (a_ok[r] ? m : 0) * args.a_bytes + chunk * 16;
    if constexpr (L == BLayout::kRows) {
      const int n = row0 + 64 * r;
      int w_row;
      if (args.head_rows > 0) {  // rows 0..63: m of d0 + n; rows 64..127: s of the same d
        const int d = jb * kHeadCols + (n & (kHeadCols - 1));
        w_ok[r] = d < args.head_rows;
        w_row = d + (n >= kHeadCols ? args.head_rows : 0);
      } else {
        w_row = jb * kBN + n;
        w_ok[r] = w_row < args.w_rows;
      }
      w_row = w_ok[r] ? w_row : 0;
      w_src[r] = args.w + static_cast<std::int64_t>(w_row) * args.w_bytes + chunk * 16;
      m_src[r] = args.mask + static_cast<std::int64_t>(w_row) * args.mask_ld + chunk * kMaskChunk;
      b_dst[r] = n * kRowTile + chunk * 16;
      m_dst[r] = (n * 4 + chunk) * kMaskChunk;
    } else {
      const int id = tid + r * kThreads;
      const int row = id / TT::kChunksPerRow, col_byte = (id % TT::kChunksPerRow) * 16;
      const int col_byte_global = jb * TT::kRowBytes + col_byte;
      w_ok[r] = col_byte_global < args.w_bytes;
      w_src[r] = args.w + static_cast<std::int64_t>(row) * args.w_bytes + col_byte_global;  // + tile rows later
      m_src[r] = args.mask + static_cast<std::int64_t>(row) * args.mask_ld + col_byte_global / kElem;
      b_dst[r] = row * TT::kRow + col_byte;
      m_dst[r] = id * kMaskChunk;
    }
  }
  const std::uint32_t smem_base = smem_addr(smem);

  auto load_stage = [&](int stage, int t) {
    const int kt = args.tiles.idx[t];
    const bool partial = t >= mid;
    const std::uint32_t a_dst = smem_base + stage * kStage;
    const std::uint32_t w_dst = a_dst + kTileA;
    const std::uint32_t mk_dst = w_dst + kTileB;
    const int red_byte = kt * kKBytes;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = a_ok[r] && red_byte + chunk * 16 < args.a_bytes;
      cp_async16(a_dst + (row0 + 64 * r) * kRowTile + chunk * 16, ok ? a_src[r] + red_byte : args.a, ok);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      bool ok;
      std::int64_t w_off, m_off;
      if constexpr (L == BLayout::kRows) {
        ok = w_ok[r] && red_byte + chunk * 16 < args.w_bytes;
        w_off = red_byte;
        m_off = kt * kRedElems;
      } else {
        const int o = kt * TT::kRows + (tid + r * kThreads) / TT::kChunksPerRow;
        ok = w_ok[r] && o < args.w_rows;
        w_off = static_cast<std::int64_t>(kt) * TT::kRows * args.w_bytes;
        m_off = static_cast<std::int64_t>(kt) * TT::kRows * args.mask_ld;
      }
      cp_async16(w_dst + b_dst[r], ok ? w_src[r] + w_off : args.w, ok);
      if (partial) cp_async_small<kMaskChunk>(mk_dst + m_dst[r], ok ? m_src[r] + m_off : args.mask, ok);
    }
  };

  acc.zero();
  cp_async_mainloop<kStages>(
      k_iters, [&](int slot, int it) { load_stage(slot, start + it); },
      [&](int slot) {
        const std::uint32_t a_base = smem_base + slot * kStage;
        const std::uint32_t b_base = a_base + kTileA;
#pragma unroll
        for (int ks = 0; ks < kKBytes / kStepBytes; ++ks) {
          std::uint32_t af[4][4], bf[4][2];
          row_fragments_a(af, a_base, kRowTile, wm0, ks, lane);
          if constexpr (L == BLayout::kRows)
            row_fragments_b(bf, b_base, kRowTile, wn0, ks, lane);
          else
            trans_fragments_b<T, TT::kRow>(bf, b_base, smem, ks, lane, wn0);
          mma_step<T, P>(acc, af, bf);
        }
      },
      [&](int slot, int it) {
        if (start + it >= mid) {  // partly-zero tile: zero the masked elements of this thread's own weight chunks
          unsigned char* w_tile = smem + slot * kStage + kTileA;
#pragma unroll
          for (int r = 0; r < 2; ++r) mask_chunk<T>(w_tile + b_dst[r], w_tile + kTileB + m_dst[r]);
        }
      });
  __syncthreads();
}

// The block's fp32 tile, row-major (kBM x kOutLd) in shared memory, for the epilogues.
__device__ __forceinline__ float* stage_tile(const WarpAcc& acc, unsigned char* smem) {
  float* s_out = reinterpret_cast<float*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm0 = (warp & 1) * 64, wn0 = (warp >> 1) * 32, g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = wm0 + 16 * i + g, n = wn0 + 8 * j + 2 * tq;
      *reinterpret_cast<float2*>(s_out + m * kOutLd + n) = make_float2(acc.v[i][j][0], acc.v[i][j][1]);
      *reinterpret_cast<float2*>(s_out + (m + 8) * kOutLd + n) = make_float2(acc.v[i][j][2], acc.v[i][j][3]);
    }
  __syncthreads();
  return s_out;
}

// Epilogue interface: Epi::run(epi_args, gemm_args, s_out, m0, jb); each warp owns 16 rows of the tile, its lanes
// walk the columns (coalesced global stores).
template <typename T, Precision P, BLayout L, class Epi>
__global__ void __launch_bounds__(kThreads, P == Precision::kTf32x3 ? 1 : 2)
    masked_gemm_kernel(const GemmArgs args, const typename Epi::Args epi) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int jb = static_cast<int>(blockIdx.x % args.col_blocks);
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x / args.col_blocks) * kBM;  // neighbours share A
  WarpAcc acc;
  gemm_mainloop<T, P, L>(args, smem, acc, m0, jb);
  Epi::run(epi, args, stage_tile(acc, smem), m0, jb);
}

template <typename T, Precision P, BLayout L, class Epi>
void launch_gemm(const GemmArgs& args, const typename Epi::Args& epi, cudaStream_t stream) {
  const std::int64_t blocks = static_cast<std::int64_t>((args.rows + kBM - 1) / kBM) * args.col_blocks;
  if (blocks == 0) return;
  if (blocks > 0x7fffffff) throw std::invalid_argument("masked GEMM (cuda): problem too large for one launch");
  auto kernel = masked_gemm_kernel<T, P, L, Epi>;
  set_max_dynamic_smem(kernel, kSmem);
  kernel<<<static_cast<unsigned>(blocks), kThreads, kSmem, stream>>>(args, epi);
  GM_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradient.

struct WgradArgs {
  const char* g;              // (rows, O_p) row-major: dL/d(pre-activation), g_bytes a row
  const char* x;              // (rows, K_p) row-major, x_bytes a row
  const unsigned char* mask;  // (o, k) uint8 contiguous (unpadded): read only by partly-zero tiles
  const int* flags;           // (ceil(o / 128), ceil(k / 128)): 0 empty, 1 partly zero, 2 all ones
  float* partial;             // (splits, o, k)
  int rows, o, k;
  int g_bytes, x_bytes;
  std::int64_t rows_per_split;
};

template <typename T, Precision P>
__global__ void __launch_bounds__(kThreads, P == Precision::kTf32x3 ? 1 : 2)
    masked_wgrad_kernel(const WgradArgs args) {
  using TT = TransTile<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp & 1) * 64, wn0 = (warp >> 1) * 32;
  const int num_k = (args.k + kBN - 1) / kBN;
  const int o0 = (blockIdx.x / num_k) * kBM, k0 = (blockIdx.x % num_k) * kBN;
  const int flag = args.flags[blockIdx.x];
  float* out = args.partial + static_cast<std::int64_t>(blockIdx.y) * args.o * args.k;
  if (flag == 0) {  // empty tile: the gradient is exactly zero
    for (int e = tid; e < kBM * kBN; e += kThreads) {
      const int o = o0 + e / kBN, k = k0 + e % kBN;
      if (o < args.o && k < args.k) out[static_cast<std::int64_t>(o) * args.k + k] = 0.f;
    }
    return;
  }
  const std::int64_t p_begin = blockIdx.y * args.rows_per_split;
  const std::int64_t p_end =
      p_begin + args.rows_per_split < args.rows ? p_begin + args.rows_per_split : static_cast<std::int64_t>(args.rows);
  const int k_iters = p_begin < p_end ? static_cast<int>((p_end - p_begin + TT::kRows - 1) / TT::kRows) : 0;

  int row[2], col_byte[2];
  bool g_ok[2], x_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int id = tid + r * kThreads;
    row[r] = id / TT::kChunksPerRow;
    col_byte[r] = (id % TT::kChunksPerRow) * 16;
    g_ok[r] = o0 * TT::kElem + col_byte[r] < args.g_bytes;
    x_ok[r] = k0 * TT::kElem + col_byte[r] < args.x_bytes;
  }
  const std::uint32_t smem_base = smem_addr(smem);
  constexpr int kWStage = 2 * TT::kTile;

  auto load_stage = [&](int stage, int kiter) {
    const std::uint32_t a_dst = smem_base + stage * kWStage;
    const std::uint32_t b_dst = a_dst + TT::kTile;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const std::int64_t p = p_begin + static_cast<std::int64_t>(kiter) * TT::kRows + row[r];
      const bool p_ok = p < p_end;
      const bool gok = p_ok && g_ok[r], xok = p_ok && x_ok[r];
      const char* gsrc = gok ? args.g + p * args.g_bytes + o0 * TT::kElem + col_byte[r] : args.g;
      const char* xsrc = xok ? args.x + p * args.x_bytes + k0 * TT::kElem + col_byte[r] : args.x;
      cp_async16(a_dst + row[r] * TT::kRow + col_byte[r], gsrc, gok);
      cp_async16(b_dst + row[r] * TT::kRow + col_byte[r], xsrc, xok);
    }
  };

  WarpAcc acc;
  acc.zero();
  cp_async_mainloop<kStages>(k_iters, load_stage, [&](int slot) {
    const std::uint32_t a_base = smem_base + slot * kWStage;
    const std::uint32_t b_base = a_base + TT::kTile;
#pragma unroll
    for (int ks = 0; ks < kKBytes / kStepBytes; ++ks) {
      std::uint32_t af[4][4], bf[4][2];
      trans_fragments_a<T, TT::kRow>(af, a_base, smem, ks, lane, wm0);
      trans_fragments_b<T, TT::kRow>(bf, b_base, smem, ks, lane, wn0);
      mma_step<T, P>(acc, af, bf);
    }
  });

  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int o = o0 + wm0 + 16 * i + g + (e >> 1) * 8;
        const int k = k0 + wn0 + 8 * j + 2 * tq + (e & 1);
        if (o >= args.o || k >= args.k) continue;
        const std::int64_t at = static_cast<std::int64_t>(o) * args.k + k;
        out[at] = (flag == 1 && args.mask[at] == 0) ? 0.f : acc.v[i][j][e];
      }
}

constexpr int kWgradSmem = kStages * 2 * 8704;  // both TransTile sizes are 8704 bytes
static_assert(kWgradSmem == kStages * 2 * TransTile<float>::kTile, "wgrad stage size");
static_assert(kWgradSmem == kStages * 2 * TransTile<__nv_bfloat16>::kTile, "wgrad stage size");

template <typename T, Precision P>
void launch_wgrad(const WgradArgs& args, int splits, cudaStream_t stream) {
  const int tiles = ((args.o + kBM - 1) / kBM) * ((args.k + kBN - 1) / kBN);
  if (tiles == 0 || splits == 0) return;
  auto kernel = masked_wgrad_kernel<T, P>;
  set_max_dynamic_smem(kernel, kWgradSmem);
  kernel<<<dim3(tiles, splits), kThreads, kWgradSmem, stream>>>(args);
  GM_CUDA_CHECK_LAUNCH();
}

// Float32 precision / 16-bit dtype dispatch: Launcher<T, P>::run(args...).
template <template <typename, Precision> class Launcher, typename... Args>
void dispatch(int dtype, int precision, const char* what, Args&&... args) {
  switch (to_dtype(dtype)) {
    case DType::bf16:
      Launcher<__nv_bfloat16, Precision::kNative>::run(args...);
      return;
    case DType::f16:
      Launcher<__half, Precision::kNative>::run(args...);
      return;
    case DType::f32:
      if (precision == static_cast<int>(Precision::kTf32))
        Launcher<float, Precision::kTf32>::run(args...);
      else
        Launcher<float, Precision::kTf32x3>::run(args...);
      return;
    default:
      throw std::invalid_argument(std::string(what) + " (cuda): takes float16, bfloat16 or float32");
  }
}

}  // namespace gemm
}  // namespace masked_linear
}  // namespace gm
