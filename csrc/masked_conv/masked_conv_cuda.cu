// masked_conv2d CUDA kernels: implicit GEMM on tensor cores over the kept taps (math in masked_conv.h).
//
// Block tile 128 x 128, 8 warps (2 along M x 4 along N, 64 x 32 each), mma.sync with fp32 accumulation:
//   bf16/fp16: m16n8k16; float32: m16n8k8 tf32 (kTf32, operands rounded to tf32) or three tf32 products with
//   hi/lo splits (kTf32x3: error at the level of fp32 rounding, used when torch disallows tf32).
// Each pipeline stage carries 64 bytes of the reduction dim per row (32 bf16 channels / 16 fp32 channels, or
// 32 / 16 pixels for the weight gradient), filled by 16-byte cp.async (zero-filled outside the image and past the
// channel tail), kStages deep. Forward and input gradient write NCHW or NHWC (channels-last) directly: the tile goes
// through shared memory, channel-major for NCHW (each warp stores 32 consecutive pixels of one channel) or pixel-major
// for NHWC (each warp stores 32 consecutive channels, of one pixel or of neighbouring ones).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "common/mma_sync.cuh"
#include "common/tensor_args.h"
#include "masked_conv/masked_conv.h"

namespace gm {
namespace masked_conv {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = 128;
constexpr int kBN = 128;
#ifndef GM_MASKED_CONV_STAGES  // tuning overrides for experiments; the defaults are the measured choice
#define GM_MASKED_CONV_STAGES 4
#endif
#ifndef GM_MASKED_CONV_MIN_BLOCKS
#define GM_MASKED_CONV_MIN_BLOCKS 2
#endif
constexpr int kStages = GM_MASKED_CONV_STAGES;
constexpr int kMinBlocks = GM_MASKED_CONV_MIN_BLOCKS;
constexpr int kKBytes = 64;  // reduction bytes per stage row

// Tensor-core building blocks (PTX wrappers, WarpAcc, mma_step, fragment loaders): common/mma_sync.cuh.
using namespace ::gm::mma;  // NOLINT(build/namespaces): this file's kernels are written in its terms

// The tap table goes to shared memory once per block: indexing a kernel parameter array with a run-time
// index could make the compiler copy it to local memory.
__device__ __forceinline__ void load_taps(const TapTable& taps, int2* s_taps) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < kMaxTaps; ++i) s_taps[i] = make_int2(taps.dy[i], taps.dx[i]);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------------------------
// Forward / input gradient: C[m, o] = sum_{t, c} A[pixel m + off_t, c] * B[t, o, c], written as out[n, o, h, w].
// Shared memory rows are K-contiguous (64 bytes + 16 pad: conflict-free ldmatrix over 8 rows).

struct ConvGemmArgs {
  const char* a;     // (N, H, W, Kp) NHWC
  const char* b;     // (T, n_out, Kp)
  const void* bias;  // (n_out,) or null
  void* out;         // (N, n_out, H, W), or (N, H, W, n_out) when out_nhwc
  int n, h, w;
  int k_bytes;  // Kp * sizeof(T), a multiple of 16
  int n_out;
  bool out_nhwc;
  TapTable taps;
  // The fused (ReLU, conv) layers' options (the kFused kernel variant; gm.nn.relu_conv): relu_a convolves relu(a);
  // gate (out's layout and dtype, or null) zeroes the output where gate <= 0 (ReLU's derivative in an input
  // gradient), then residual (the same, or null) is added.
  bool relu_a;
  const void* gate;
  const void* residual;
  // The centre tap's reduction-channel range per 128-channel tile of n_out ((lo, hi): channels lo..hi-1 hold every
  // pair the colour groups connect there), or null: the whole range. The centre is the last kept tap, so a block
  // runs its chunks lo/32..ceil(hi/32) (bf16) alone and the forbidden-pair zeros outside them are never multiplied.
  const int2* centre;
};

// The fused layers' epilogue on one output element at offset `at` of out (bias already added).
template <typename T, bool kFused>
__device__ __forceinline__ float fuse_epilogue(const ConvGemmArgs& args, float v, std::int64_t at) {
  if constexpr (kFused) {
    if (args.gate != nullptr && !(to_float(static_cast<const T*>(args.gate)[at]) > 0.f)) v = 0.f;
    if (args.residual != nullptr) v += to_float(static_cast<const T*>(args.residual)[at]);
  }
  return v;
}

// The centre tap's range (lo, hi) of reduction channels as the stage chunks that hold it, [kc_lo, kc_hi) with
// kc_hi >= kc_lo (an empty range: no chunk).
__device__ __forceinline__ void centre_chunks(int2 range, int elem, int& kc_lo, int& kc_hi) {
  kc_lo = range.x * elem / kKBytes;
  kc_hi = (range.y * elem + kKBytes - 1) / kKBytes;
  if (kc_hi < kc_lo) kc_hi = kc_lo;
}

constexpr int kGemmRow = kKBytes + 16;
constexpr int kGemmStage = (kBM + kBN) * kGemmRow;
constexpr int kGemmSmem = kStages * kGemmStage;
// Epilogue staging row lengths, floats. Channel-major (NCHW): the transposed fragment stores are conflict-free.
// Pixel-major (NHWC): kOutLdNhwc % 32 == 8 makes the float2 fragment stores conflict-free per half-warp.
constexpr int kOutLd = kBM + 4;
constexpr int kOutLdNhwc = kBN + 8;
static_assert(kBN * kOutLd * 4 <= kGemmSmem, "epilogue staging must fit in the pipeline's shared memory");
static_assert(kBM * kOutLdNhwc * 4 <= kGemmSmem, "epilogue staging must fit in the pipeline's shared memory");

// The block's fp32 tile in shared memory, channel-major (s_out[o * kOutLd + m]) or pixel-major
// (s_out[m * kOutLdNhwc + o]); a warp's accumulators are rows g and g + 8, columns 2tq and 2tq + 1 of each m16n8 tile.
template <bool kPixelMajor>
__device__ __forceinline__ void stage_tile(const WarpAcc& acc, float* s_out, int wm0, int wn0, int lane) {
  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = wm0 + 16 * i + g, o = wn0 + 8 * j + 2 * tq;
      if constexpr (kPixelMajor) {
        *reinterpret_cast<float2*>(s_out + m * kOutLdNhwc + o) = make_float2(acc.v[i][j][0], acc.v[i][j][1]);
        *reinterpret_cast<float2*>(s_out + (m + 8) * kOutLdNhwc + o) = make_float2(acc.v[i][j][2], acc.v[i][j][3]);
      } else {
        s_out[o * kOutLd + m] = acc.v[i][j][0];
        s_out[(o + 1) * kOutLd + m] = acc.v[i][j][1];
        s_out[o * kOutLd + m + 8] = acc.v[i][j][2];
        s_out[(o + 1) * kOutLd + m + 8] = acc.v[i][j][3];
      }
    }
  __syncthreads();
}

// NCHW: thread tid walks the channels of pixel m0 + tid % kBM, two channels a step over the block (a warp: 32
// consecutive pixels of one channel).
template <typename T, bool kFused>
__device__ __forceinline__ void store_nchw(const ConvGemmArgs& args, const float* s_out, std::int64_t m0, int n0,
                                           std::int64_t m_total, int hw_size) {
  const int tid = threadIdx.x;
  const int m_local = tid & (kBM - 1);
  const std::int64_t m = m0 + m_local;
  if (m >= m_total) return;
  const std::int64_t img = m / hw_size;
  const std::int64_t out_base = img * args.n_out * static_cast<std::int64_t>(hw_size) + (m - img * hw_size);
  T* out = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
#pragma unroll 4
  for (int i = 0; i < kBN / (kThreads / kBM); ++i) {
    const int o_local = i * (kThreads / kBM) + (tid / kBM);
    const int o = n0 + o_local;
    if (o >= args.n_out) break;
    float v = s_out[o_local * kOutLd + m_local];
    if (bias != nullptr) v += to_float(bias[o]);
    const std::int64_t at = out_base + static_cast<std::int64_t>(o) * hw_size;
    out[at] = from_float<T>(fuse_epilogue<T, kFused>(args, v, at));
  }
}

// NHWC: out[m, o], rows of n_out channels; consecutive threads write consecutive channels of a pixel. A full-width
// tile (128 channels) gives each thread one channel, two pixel rows a step (sm_90: 11 instructions an element, the
// NCHW store 14). A narrower one (the last channel tile, or n_out under 128) is walked as one flat row-major range
// of rows x cols, kThreads elements a step, so no thread idles past the last channel (26 instructions an element).
// The staging reads follow the stores (row m at bank 8m): conflict-free when cols is a multiple of 32 (a warp in one
// pixel row), at most 2-way for any cols >= 32 where a warp spans two rows, 3- to 8-way only for tiles under 24
// channels (8-way at cols = 1), whose epilogue is short anyway. The loops have fixed trip counts with an early
// exit: with a run-time bound instead (e < count) ptxas gave the main loop 10 more instructions a stage
// (tools/sass_loops.py).
template <typename T, bool kFused>
__device__ __forceinline__ void store_nhwc(const ConvGemmArgs& args, const float* s_out, std::int64_t m0, int n0,
                                           std::int64_t m_total) {
  const int tid = threadIdx.x;
  const int cols = args.n_out - n0 < kBN ? args.n_out - n0 : kBN;
  const int rows = m_total - m0 < kBM ? static_cast<int>(m_total - m0) : kBM;
  int m = tid / cols, o = tid - m * cols;  // this thread's first element of the tile
  T* dst = static_cast<T*>(args.out) + (m0 + m) * args.n_out + n0 + o;
  const bool has_bias = args.bias != nullptr;
  if (cols == kBN) {  // a full-width tile: each thread keeps one channel (its bias read once), two pixel rows a step
    constexpr int kRowsPerStep = kThreads / kBN;
    const float b = has_bias ? to_float(static_cast<const T*>(args.bias)[n0 + o]) : 0.f;
    const std::int64_t g_step = static_cast<std::int64_t>(kRowsPerStep) * args.n_out;
#pragma unroll 4
    for (int i = 0; i < kBM / kRowsPerStep; ++i) {
      if (m + i * kRowsPerStep >= rows) break;
      float v = s_out[(m + i * kRowsPerStep) * kOutLdNhwc + o];
      if (has_bias) v += b;  // not v + 0 without bias: the NCHW path keeps a -0 sum's sign
      if constexpr (kFused) v = fuse_epilogue<T, true>(args, v, dst - static_cast<T*>(args.out));
      *dst = from_float<T>(v);
      dst += g_step;
    }
    return;
  }
  // Element (m, o) sits at s_out[s_at] and dst: both advance by the flat step, plus a row's remainder on a wrap.
  const int count = rows * cols;
  const int step_m = kThreads / cols, step_o = kThreads - step_m * cols;
  int s_at = m * kOutLdNhwc + o;
  const int s_step = step_m * kOutLdNhwc + step_o, s_wrap = kOutLdNhwc - cols;
  const std::int64_t g_step = static_cast<std::int64_t>(step_m) * args.n_out + step_o;
  const int g_wrap = args.n_out - cols;
  const T* bias = static_cast<const T*>(args.bias);
#pragma unroll 4
  for (int i = 0; i < kBM * kBN / kThreads; ++i) {
    if (i * kThreads + tid >= count) break;
    float v = s_out[s_at];
    if (has_bias) v += to_float(bias[n0 + o]);
    if constexpr (kFused) v = fuse_epilogue<T, true>(args, v, dst - static_cast<T*>(args.out));
    *dst = from_float<T>(v);
    s_at += s_step;
    dst += g_step;
    o += step_o;
    if (o >= cols) {
      o -= cols;
      s_at += s_wrap;
      dst += g_wrap;
    }
  }
}

// kCentre: args.centre is set (its variant: the centre's chunk offset costs the bf16 main loop 12 instructions a stage,
// 147 -> 159 in sm_90 SASS, which layers without colour groups need not pay; Python takes it only where the ranges
// skip more than a tenth of the products: gm.ops._masked_conv_cuda.centre_table).
template <typename T, Precision P, bool kFused, bool kCentre>
__global__ void __launch_bounds__(kThreads, P == Precision::kTf32x3 ? 1 : kMinBlocks)
    masked_conv_gemm_kernel(const ConvGemmArgs args) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int2 s_taps[kMaxTaps];
  load_taps(args.taps, s_taps);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp & 1) * 64, wn0 = (warp >> 1) * 32;
  const int num_n = (args.n_out + kBN - 1) / kBN;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x / num_n) * kBM;  // neighbours share the A tile
  const int n0 = (blockIdx.x % num_n) * kBN;
  const int hw_size = args.h * args.w;
  const std::int64_t m_total = static_cast<std::int64_t>(args.n) * hw_size;

  // Producer: each thread copies 16-byte chunk `chunk` of rows row0 and row0 + 64 of both tiles. Per row, the pixel's
  // own address is computed once; a stage adds its tap's offset (32-bit) and channel chunk, and finds (tap, chunk)
  // from kiter by a multiply-high instead of a division (sm_90 SASS: the producer was ~120 of the main loop's 198
  // instructions per 32 MMAs).
  const int chunk = tid & 3, row0 = tid >> 2;
  const char* a_px[2];
  const char* b_row[2];
  int ph[2], pw[2];
  bool m_ok[2], o_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t m = m0 + row0 + 64 * r;
    m_ok[r] = m < m_total;
    const std::int64_t img = m_ok[r] ? m / hw_size : 0;
    const int hw = m_ok[r] ? static_cast<int>(m - img * hw_size) : 0;
    // A row past the last pixel gets a row index no tap brings into the image: the stage's bounds test covers it
    // (one predicate fewer live through the main loop; sm_90: 145 instructions a bf16 stage, was 159 and a spill).
    ph[r] = m_ok[r] ? hw / args.w : -(1 << 30);
    pw[r] = hw - (hw / args.w) * args.w;
    a_px[r] = args.a + (img * hw_size + hw) * args.k_bytes + chunk * 16;
    o_ok[r] = n0 + row0 + 64 * r < args.n_out;
    b_row[r] = args.b + static_cast<std::int64_t>(o_ok[r] ? n0 + row0 + 64 * r : 0) * args.k_bytes + chunk * 16;
  }
  const int n_kc = (args.k_bytes + kKBytes - 1) / kKBytes;
  // The centre tap's chunks kc_lo..kc_hi-1 (all of them without a range table) follow the other taps' n_kc each.
  const int k_centre = (args.taps.count - 1) * n_kc;
  int kc_lo = 0, kc_hi = n_kc;
  if constexpr (kCentre) centre_chunks(args.centre[n0 / kBN], static_cast<int>(sizeof(T)), kc_lo, kc_hi);
  const int k_iters = k_centre + kc_hi - kc_lo;
  const int centre_skip = kc_lo * kKBytes;  // bytes
  // kiter / n_kc = (kiter * magic) >> 32, exact while kiter * n_kc < 2^32: kiter < 49 taps x n_kc and n_kc < 8192
  // (the launcher's limit).
  const std::uint64_t magic = 0xffffffffull / static_cast<std::uint64_t>(n_kc) + 1;  // 2^32 for n_kc = 1
  const std::int64_t b_tap_bytes = static_cast<std::int64_t>(args.n_out) * args.k_bytes;
  const std::uint32_t smem_base = smem_addr(smem);

  auto load_stage = [&](int stage, int kiter) {
    const int t = static_cast<int>((static_cast<std::uint64_t>(kiter) * magic) >> 32);
    const int c_byte = (kiter - t * n_kc) * kKBytes + (kCentre && kiter >= k_centre ? centre_skip : 0);
    const bool c_ok = c_byte + chunk * 16 < args.k_bytes;
    const int2 off = s_taps[t];
    const std::int64_t a_off = static_cast<std::int64_t>(off.x * args.w + off.y) * args.k_bytes + c_byte;
    const std::uint32_t a_dst = smem_base + stage * kGemmStage;
    const std::uint32_t b_dst = a_dst + kBM * kGemmRow;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 64 * r;
      const int ih = ph[r] + off.x, iw = pw[r] + off.y;
      const bool ok = c_ok && ih >= 0 && ih < args.h && iw >= 0 && iw < args.w;
      cp_async16(a_dst + row * kGemmRow + chunk * 16, ok ? a_px[r] + a_off : args.a, ok);
      const bool bok = c_ok && o_ok[r];
      cp_async16(b_dst + row * kGemmRow + chunk * 16, bok ? b_row[r] + t * b_tap_bytes + c_byte : args.b, bok);
    }
  };

  // A warp whose 32 output channels (or 64 pixels) lie wholly past the tile's edge (the last channel tile of an
  // n_out that 128 does not divide: PixelCNN's 129- and 258-channel colour layers) skips its fragment loads and MMAs;
  // its share of the copies and barriers is block-wide and stays. Its accumulators stay zero, never stored.
  const bool warp_on = n0 + wn0 < args.n_out && m0 + wm0 < m_total;
  WarpAcc acc;
  acc.zero();
  cp_async_mainloop<kStages>(k_iters, load_stage, [&](int slot) {
    if (!warp_on) return;
    const std::uint32_t a_base = smem_base + slot * kGemmStage;
    const std::uint32_t b_base = a_base + kBM * kGemmRow;
#pragma unroll
    for (int ks = 0; ks < kKBytes / kStepBytes; ++ks) {
      std::uint32_t af[4][4], bf[4][2];
      row_fragments_a(af, a_base, kGemmRow, wm0, ks, lane);
      if constexpr (kFused) {
        if (args.relu_a) relu_fragments<T>(af);
      }
      row_fragments_b(bf, b_base, kGemmRow, wn0, ks, lane);
      mma_step<T, P>(acc, af, bf);
    }
  });
  __syncthreads();

  // Epilogue: the tile through shared memory, laid out for the output's memory format (a block-uniform branch).
  float* s_out = reinterpret_cast<float*>(smem);
  if (args.out_nhwc) {
    stage_tile<true>(acc, s_out, wm0, wn0, lane);
    store_nhwc<T, kFused>(args, s_out, m0, n0, m_total);
  } else {
    stage_tile<false>(acc, s_out, wm0, wn0, lane);
    store_nchw<T, kFused>(args, s_out, m0, n0, m_total, hw_size);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradient: C[c, o] = sum_{p in split} X[p + off_t, c] * G[p, o], one tap per block. Shared memory rows
// are pixels (the reduction dim), channel-contiguous: ldmatrix.trans for 16-bit types, scalar loads for tf32.

struct WgradArgs {
  const char* x;   // (N, H, W, Cin_p)
  const char* g;   // (N, H, W, Cout_p)
  float* partial;  // (splits, T, c_in, c_out)
  int n, h, w;
  int x_bytes, g_bytes;  // row bytes of x and grad (padded channels)
  int c_in, c_out;
  std::int64_t pixels_per_split;
  TapTable taps;
  // The kFused variant's options (gm.nn.relu_conv): relu_x, the weight gradient of conv(relu(x)); db_partial
  // ((splits, c_out) float32, or null): the block of the first tap and channel tile also sums the grad tiles it loads
  // over its split's pixels (the bias gradient's partial sums; cuda_wgrad_unpack adds the splits).
  bool relu_x;
  float* db_partial;
  // The forward's centre table (ConvGemmArgs::centre: per 128-channel tile of c_out, the c_in range the centre
  // connects), or null: a centre-tap block whose c_in tile lies outside its range computes nothing (writes zeros).
  const int2* centre;
};

template <typename T>
struct WgradShape {
  static constexpr int kElem = static_cast<int>(sizeof(T));
  static constexpr int kRows = kKBytes / kElem;     // pixels per stage
  static constexpr int kRowBytes = kBM * kElem;     // 128 channels
  static constexpr int kPad = kElem == 2 ? 16 : 32;  // ldmatrix.trans rows / scalar tf32 loads conflict-free
  static constexpr int kRow = kRowBytes + kPad;
  static constexpr int kTile = kRows * kRow;
  static constexpr int kStage = 2 * kTile;
  static constexpr int kSmem = kStages * kStage;
  static constexpr int kChunksPerRow = kRowBytes / 16;
  static_assert(kRows * kChunksPerRow == 2 * kThreads, "two 16-byte chunks per thread per tile");
};

template <typename T>
__device__ __forceinline__ void wgrad_fragments(std::uint32_t a_base, std::uint32_t b_base, const unsigned char* smem,
                                                int ks, int lane, int wm0, int wn0, std::uint32_t (&af)[4][4],
                                                std::uint32_t (&bf)[4][2]) {
  // WgradShape<float>::kRow / 4 % 32 == 8: the scalar tf32 loads hit 32 distinct banks.
  trans_fragments_a<T, WgradShape<T>::kRow>(af, a_base, smem, ks, lane, wm0);
  trans_fragments_b<T, WgradShape<T>::kRow>(bf, b_base, smem, ks, lane, wn0);
}

// kFused: the options of WgradArgs (relu_x: ReLU applied to x's fragments; db_partial), off in the default variant.
template <typename T, Precision P, bool kFused>
__global__ void __launch_bounds__(kThreads, P == Precision::kTf32x3 ? 1 : kMinBlocks)
    masked_conv_wgrad_kernel(const WgradArgs args) {
  using S = WgradShape<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int2 s_taps[kMaxTaps];
  load_taps(args.taps, s_taps);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp & 1) * 64, wn0 = (warp >> 1) * 32;
  const int num_c = (args.c_in + kBM - 1) / kBM;
  const int t = blockIdx.x / num_c;
  const int c0 = (blockIdx.x % num_c) * kBM;
  const int o0 = blockIdx.y * kBN;
  const int hw_size = args.h * args.w;
  const std::int64_t p_total = static_cast<std::int64_t>(args.n) * hw_size;
  const std::int64_t p_begin = blockIdx.z * args.pixels_per_split;
  const std::int64_t p_end = p_begin + args.pixels_per_split < p_total ? p_begin + args.pixels_per_split : p_total;
  const int2 off = s_taps[t];
  bool tile_on = p_begin < p_end;
  if (args.centre != nullptr && t == args.taps.count - 1 && !(kFused && args.db_partial != nullptr && blockIdx.x == 0)) {
    const int2 r = args.centre[blockIdx.y];  // (not the bias gradient's block: its sums need every pixel)
    tile_on = tile_on && c0 < r.y && r.x < c0 + kBM;
  }
  const int k_iters = tile_on ? static_cast<int>((p_end - p_begin + S::kRows - 1) / S::kRows) : 0;

  int row[2], col_byte[2];
  bool cx_ok[2], cg_ok[2];
  // Pixel of each of this thread's two rows, kept incrementally: load_stage is called with kiter = 0, 1, 2, ... in
  // order (cp_async_mainloop), so each call advances the pixel by kRows with a few compares instead of the int64
  // division and two int32 divisions per row and stage that made the index math outweigh the MMAs.
  std::int64_t p_cur[2], img[2];
  int ph[2], pw[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int id = tid + r * kThreads;
    row[r] = id / S::kChunksPerRow;
    col_byte[r] = (id % S::kChunksPerRow) * 16;
    cx_ok[r] = c0 * S::kElem + col_byte[r] < args.x_bytes;
    cg_ok[r] = o0 * S::kElem + col_byte[r] < args.g_bytes;
    p_cur[r] = p_begin + row[r];
    img[r] = p_cur[r] / hw_size;
    const int hw = static_cast<int>(p_cur[r] - img[r] * hw_size);
    ph[r] = hw / args.w;
    pw[r] = hw - ph[r] * args.w;
  }
  int k_cur = 0;
  const std::uint32_t smem_base = smem_addr(smem);

  auto load_stage = [&](int stage, int kiter) {
    const std::uint32_t a_dst = smem_base + stage * S::kStage;
    const std::uint32_t b_dst = a_dst + S::kTile;
    const int step = (kiter - k_cur) * S::kRows;  // kRows in order; any forward distance stays exact
    k_cur = kiter;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      p_cur[r] += step;
      pw[r] += step;
      while (pw[r] >= args.w) {
        pw[r] -= args.w;
        ++ph[r];
      }
      while (ph[r] >= args.h) {
        ph[r] -= args.h;
        ++img[r];
      }
      const std::int64_t p = p_cur[r];
      const bool p_ok = p < p_end;
      const int ih = ph[r] + off.x, iw = pw[r] + off.y;
      const bool ok = p_ok && cx_ok[r] && ih >= 0 && ih < args.h && iw >= 0 && iw < args.w;
      const char* src =
          ok ? args.x + (img[r] * hw_size + ih * args.w + iw) * args.x_bytes + c0 * S::kElem + col_byte[r] : args.x;
      cp_async16(a_dst + row[r] * S::kRow + col_byte[r], src, ok);
      const bool gok = p_ok && cg_ok[r];
      const char* gsrc = gok ? args.g + p * args.g_bytes + o0 * S::kElem + col_byte[r] : args.g;
      cp_async16(b_dst + row[r] * S::kRow + col_byte[r], gsrc, gok);
    }
  };

  // The bias gradient's partial sum (db_partial set, first tap and channel tile only): thread tid sums column
  // tid % kBN of the grad tile over half its pixel rows, each stage.
  const bool sum_db = kFused && args.db_partial != nullptr && blockIdx.x == 0;
  // As in the GEMM: a warp whose 64 input channels or 32 output channels lie past the tile's edge skips its MMAs.
  const bool warp_on = c0 + wm0 < args.c_in && o0 + wn0 < args.c_out;
  const int db_col = tid & (kBN - 1), db_half = tid / kBN;
  float db = 0.f;

  WarpAcc acc;
  acc.zero();
  cp_async_mainloop<kStages>(k_iters, load_stage, [&](int slot) {
    const std::uint32_t a_base = smem_base + slot * S::kStage;
    const std::uint32_t b_base = a_base + S::kTile;
    if (kFused && sum_db) {
      const unsigned char* g_tile = smem + slot * S::kStage + S::kTile + db_col * S::kElem;
#pragma unroll 4
      for (int r = db_half * (S::kRows / 2); r < (db_half + 1) * (S::kRows / 2); ++r)
        db += to_float(*reinterpret_cast<const T*>(g_tile + r * S::kRow));
    }
    if (!warp_on) return;
#pragma unroll
    for (int ks = 0; ks < kKBytes / kStepBytes; ++ks) {
      std::uint32_t af[4][4], bf[4][2];
      wgrad_fragments<T>(a_base, b_base, smem, ks, lane, wm0, wn0, af, bf);
      if constexpr (kFused) {
        if (args.relu_x) relu_fragments<T>(af);
      }
      mma_step<T, P>(acc, af, bf);
    }
  });

  if (kFused && sum_db) {  // the two halves of each column through shared memory (the pipeline's stages are drained)
    __syncthreads();
    float* s_db = reinterpret_cast<float*>(smem);
    if (db_half == 1) s_db[db_col] = db;
    __syncthreads();
    if (db_half == 0 && o0 + db_col < args.c_out)
      args.db_partial[static_cast<std::int64_t>(blockIdx.z) * args.c_out + o0 + db_col] = db + s_db[db_col];
  }
  const int g = lane >> 2, tq = lane & 3;
  float* out = args.partial + (static_cast<std::int64_t>(blockIdx.z) * args.taps.count + t) * args.c_in *
                                  static_cast<std::int64_t>(args.c_out);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = c0 + wm0 + 16 * i + g + (e >> 1) * 8;
        const int o = o0 + wn0 + 8 * j + 2 * tq + (e & 1);
        if (c < args.c_in && o < args.c_out) out[static_cast<std::int64_t>(c) * args.c_out + o] = acc.v[i][j][e];
      }
}

// ---------------------------------------------------------------------------------------------------------------
// Layout conversion NCHW -> NHWC with the channels zero-padded to cp: a 32 x 32 tile transposed through shared memory,
// reads coalesced along pixels, writes along channels (torch's permute-copy ran at ~0.6 TB/s for this on an H200).

template <typename E>
__global__ void __launch_bounds__(256) nchw_to_nhwc_kernel(const E* in, E* out, int c, int cp, int hw) {
  __shared__ E tile[32][33];
  const std::int64_t n = blockIdx.z;
  const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
  const E* src = in + n * c * hw;
  E* dst = out + n * cp * hw;
#pragma unroll
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int ch = c0 + i, p = p0 + threadIdx.x;
    tile[i][threadIdx.x] = (ch < c && p < hw) ? src[static_cast<std::int64_t>(ch) * hw + p] : E(0);
  }
  __syncthreads();
#pragma unroll
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int p = p0 + i, ch = c0 + threadIdx.x;
    if (p < hw && ch < cp) dst[static_cast<std::int64_t>(p) * cp + ch] = tile[threadIdx.x][i];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight-gradient epilogue: dw[o, c, pos] (C_out, C_in, kh*kw) in the weight's dtype = sum over the splits of
// partial[s, t, c, o] at the kept tap t = tap_at[pos] (times keep[t, c, o] where given), exactly zero where
// tap_at[pos] = -1. One pass for what was a split sum, a select, a zero fill, a scatter and a cast. One thread per
// output element in partial's order (o fastest), so the split reads, the bulk of the traffic (up to 64 splits of the
// whole weight), are coalesced; the writes to dw are strided but touch the weight once.

template <typename E>
__global__ void __launch_bounds__(256)
    wgrad_unpack_kernel(const float* partial, const int* tap_at, const std::uint8_t* keep, E* dw, int splits,
                        int taps, int c_in, int c_out, int kk, const float* db_partial, E* db) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t total = static_cast<std::int64_t>(c_out) * c_in * kk;
  if (i >= total) return;
  const int o = static_cast<int>(i % c_out);
  const std::int64_t pc = i / c_out;
  const int c = static_cast<int>(pc % c_in), pos = static_cast<int>(pc / c_in);
  const int t = tap_at[pos];
  float acc = 0.f;
  if (t >= 0) {
    const std::int64_t off = (static_cast<std::int64_t>(t) * c_in + c) * c_out + o;
    const std::int64_t split_stride = static_cast<std::int64_t>(taps) * c_in * c_out;
    for (int s = 0; s < splits; ++s) acc += partial[s * split_stride + off];
    if (keep != nullptr && keep[off] == 0) acc = 0.f;
  }
  dw[(static_cast<std::int64_t>(o) * c_in + c) * kk + pos] = from_float<E>(acc);
  if (db_partial != nullptr && c == 0 && pos == 0) {  // the bias gradient: its splits' partial sums, in order
    float b = 0.f;
    for (int s = 0; s < splits; ++s) b += db_partial[static_cast<std::int64_t>(s) * c_out + o];
    db[o] = from_float<E>(b);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: dtype/precision dispatch and launch.

template <typename T, Precision P, bool kFused, bool kCentre>
void launch_gemm(const ConvGemmArgs& args, cudaStream_t stream) {
  const std::int64_t m_tiles = (static_cast<std::int64_t>(args.n) * args.h * args.w + kBM - 1) / kBM;
  const std::int64_t blocks = m_tiles * ((args.n_out + kBN - 1) / kBN);
  if (blocks > 0x7fffffff) throw std::invalid_argument("masked_conv2d (cuda): problem too large for one launch");
  auto kernel = masked_conv_gemm_kernel<T, P, kFused, kCentre>;
  set_max_dynamic_smem(kernel, kGemmSmem);
  kernel<<<static_cast<unsigned>(blocks), kThreads, kGemmSmem, stream>>>(args);
  GM_CUDA_CHECK_LAUNCH();
}

template <typename T, Precision P, bool kFused>
void launch_wgrad(const WgradArgs& args, int splits, cudaStream_t stream) {
  const dim3 grid(args.taps.count * ((args.c_in + kBM - 1) / kBM), (args.c_out + kBN - 1) / kBN, splits);
  auto kernel = masked_conv_wgrad_kernel<T, P, kFused>;
  set_max_dynamic_smem(kernel, WgradShape<T>::kSmem);
  kernel<<<grid, kThreads, WgradShape<T>::kSmem, stream>>>(args);
  GM_CUDA_CHECK_LAUNCH();
}

template <template <typename, Precision> class Launcher, typename... Args>
void dispatch(int dtype, int precision, Args&&... args) {
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
      throw std::invalid_argument("masked_conv2d (cuda): takes float16, bfloat16 or float32");
  }
}

template <typename T, Precision P>
struct GemmLauncher {
  static void run(const ConvGemmArgs& args, cudaStream_t stream) {
    const bool fused = args.relu_a || args.gate != nullptr || args.residual != nullptr;
    if (args.centre != nullptr)
      fused ? launch_gemm<T, P, true, true>(args, stream) : launch_gemm<T, P, false, true>(args, stream);
    else
      fused ? launch_gemm<T, P, true, false>(args, stream) : launch_gemm<T, P, false, false>(args, stream);
  }
};
template <typename T, Precision P>
struct WgradLauncher {
  static void run(const WgradArgs& args, int splits, cudaStream_t stream) {
    if (args.relu_x || args.db_partial != nullptr)
      launch_wgrad<T, P, true>(args, splits, stream);
    else
      launch_wgrad<T, P, false>(args, splits, stream);
  }
};

void check_taps(const TapTable& taps) {
  if (taps.count < 1 || taps.count > kMaxTaps)
    throw std::invalid_argument("masked_conv2d (cuda): tap count must be in [1, " + std::to_string(kMaxTaps) +
                                "], got " + std::to_string(taps.count));
}

}  // namespace

void cuda_to_nhwc(std::uintptr_t in, std::uintptr_t out, int n, int c, int c_padded, int hw, int elem_bytes,
                  std::uintptr_t stream) {
  if (n > 65535) throw std::invalid_argument("masked_conv2d (cuda): layout conversion takes N <= 65535");
  const dim3 grid((hw + 31) / 32, (c_padded + 31) / 32, n), block(32, 8);
  if (elem_bytes == 2)
    nchw_to_nhwc_kernel<std::uint16_t><<<grid, block, 0, to_stream(stream)>>>(ptr<const std::uint16_t>(in),
                                                                              ptr<std::uint16_t>(out), c, c_padded, hw);
  else if (elem_bytes == 4)
    nchw_to_nhwc_kernel<std::uint32_t><<<grid, block, 0, to_stream(stream)>>>(ptr<const std::uint32_t>(in),
                                                                              ptr<std::uint32_t>(out), c, c_padded, hw);
  else
    throw std::invalid_argument("masked_conv2d (cuda): layout conversion takes 2- or 4-byte elements");
  GM_CUDA_CHECK_LAUNCH();
}

void cuda_conv_gemm(std::uintptr_t a, std::uintptr_t b, std::uintptr_t bias, std::uintptr_t out, int n, int h, int w,
                    int k_channels, int n_out, bool out_nhwc, const TapTable& taps, int dtype, int precision,
                    std::uintptr_t stream, bool relu_a, std::uintptr_t gate, std::uintptr_t residual,
                    std::uintptr_t centre) {
  check_taps(taps);
  const int elem = to_dtype(dtype) == DType::f32 ? 4 : 2;
  if ((k_channels * elem) % 16 != 0)
    throw std::invalid_argument("masked_conv2d (cuda): padded channel count must fill 16-byte chunks");
  if (static_cast<std::int64_t>(k_channels) * elem >= 8192 * kKBytes)
    throw std::invalid_argument("masked_conv2d (cuda): " + std::to_string(k_channels) +
                                " input channels exceed the kernels' limit (512 KB a pixel): use the triton backend");
  ConvGemmArgs args{ptr<const char>(a), ptr<const char>(b), ptr<const void>(bias), ptr<void>(out), n, h, w,
                    k_channels * elem, n_out, out_nhwc, taps, relu_a, ptr<const void>(gate),
                    ptr<const void>(residual), ptr<const int2>(centre)};
  dispatch<GemmLauncher>(dtype, precision, args, to_stream(stream));
}

void cuda_weight_grad(std::uintptr_t x, std::uintptr_t grad, std::uintptr_t partial, int n, int h, int w,
                      int c_in_padded, int c_out_padded, int c_in, int c_out, const TapTable& taps,
                      std::int64_t pixels_per_split, int splits, int dtype, int precision, std::uintptr_t stream,
                      bool relu_x, std::uintptr_t db_partial, std::uintptr_t centre) {
  check_taps(taps);
  const int elem = to_dtype(dtype) == DType::f32 ? 4 : 2;
  if ((c_in_padded * elem) % 16 != 0 || (c_out_padded * elem) % 16 != 0)
    throw std::invalid_argument("masked_conv2d (cuda): padded channel counts must fill 16-byte chunks");
  WgradArgs args{ptr<const char>(x), ptr<const char>(grad), ptr<float>(partial), n, h, w, c_in_padded * elem,
                 c_out_padded * elem, c_in, c_out, pixels_per_split, taps, relu_x, ptr<float>(db_partial),
                 ptr<const int2>(centre)};
  dispatch<WgradLauncher>(dtype, precision, args, splits, to_stream(stream));
}

void cuda_wgrad_unpack(std::uintptr_t partial, std::uintptr_t tap_at, std::uintptr_t keep, std::uintptr_t dw,
                       int splits, int taps, int c_in, int c_out, int kk, int dtype, std::uintptr_t stream,
                       std::uintptr_t db_partial, std::uintptr_t db) {
  const std::int64_t total = static_cast<std::int64_t>(c_out) * c_in * kk;
  if (total == 0) return;
  const std::int64_t blocks = (total + 255) / 256;
  if (blocks > 0x7fffffff) throw std::invalid_argument("masked_conv2d (cuda): weight too large for one launch");
  const auto* p = ptr<const float>(partial);
  const auto* t = ptr<const int>(tap_at);
  const auto* k = ptr<const std::uint8_t>(keep);
  const auto* dbp = ptr<const float>(db_partial);
  const auto g = static_cast<unsigned>(blocks);
  switch (to_dtype(dtype)) {
    case DType::bf16:
      wgrad_unpack_kernel<__nv_bfloat16><<<g, 256, 0, to_stream(stream)>>>(
          p, t, k, ptr<__nv_bfloat16>(dw), splits, taps, c_in, c_out, kk, dbp, ptr<__nv_bfloat16>(db));
      break;
    case DType::f16:
      wgrad_unpack_kernel<__half><<<g, 256, 0, to_stream(stream)>>>(p, t, k, ptr<__half>(dw), splits, taps, c_in,
                                                                   c_out, kk, dbp, ptr<__half>(db));
      break;
    case DType::f32:
      wgrad_unpack_kernel<float><<<g, 256, 0, to_stream(stream)>>>(p, t, k, ptr<float>(dw), splits, taps, c_in, c_out,
                                                                  kk, dbp, ptr<float>(db));
      break;
    default:
      throw std::invalid_argument("masked_conv2d (cuda): takes float16, bfloat16 or float32");
  }
  GM_CUDA_CHECK_LAUNCH();
}

}  // namespace masked_conv
}  // namespace gm
