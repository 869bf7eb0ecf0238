// The CPU engine shared by the Row LSTM and Diagonal LSTM scans (csrc/row_lstm, csrc/diagonal_lstm).
//
// Both scans are, in the right coordinates, the same recurrence over "rows" r of a batch of images, each row a
// vector of `lanes` positions (row_lstm: image rows, lanes = W; diagonal_lstm: skewed columns t = i + j,
// lanes = H, where the pixel above (i-1, j) and the pixel to the left (i, j-1) are lanes i-1 and i of column t-1):
//   z[o, x] = gates_r[o, x] + sum_{j, t} w[o, j, t] h_{r-1}[j, x + d_t]        (h zero outside [0, lanes))
//   c_r = sig(z_f) c_{r-1} + sig(z_i) tanh(z_g);  h_r = sig(z_o) tanh(c_r)
// with per-tap lane offsets d_t (row_lstm: t - k/2; diagonal_lstm: -1 (above), 0 (left)) and, per row, a range of
// valid lanes [lo, hi) outside which h, c and every gradient are zero (the skew; the vector tail).
//
// Each op supplies a Layout that moves its tensors to and from per-row lane buffers (the skew is done there, by
// addressing). The engine keeps the state lane-major, (channel, lane), so that a row's state-to-state product is
// a GEMM whose columns are lane vectors: Z (4h x lanes) = W (4h x h*taps) @ Hshift (h*taps x lanes), batched over
// the images of a thread (the columns of one micro-kernel call may come from different images). The micro-kernel
// keeps a (rows x vectors) block of Z in registers, broadcasts packed weights against lane vectors loaded at the
// tap offsets of a zero-padded h buffer, and runs the LSTM cell on the registers (the cell is fused into the GEMM
// epilogue: the block holds gates i, f, o, g of the same channels). The backward recomputes Z the same way (or
// loads the forward's, where the layout keeps them: the channels-last diagonal scan), runs
// the cell backward in the epilogue, then dh_{r-1} = W^T dZ (a second GEMM over shifted dZ rows), and after the
// scan dw = sum over rows of dZ (x) Hshift, tiled over w and parallel over the tiles (no reduction across
// threads, so dw does not depend on the thread count). OpenMP splits the batch for the scan.
//
// Vector code uses GCC vector extensions, compiled three times: x86-64-v4 (AVX-512, 64-byte vectors),
// x86-64-v3 (AVX2+FMA, 32 bytes) and baseline x86-64 (16 bytes), chosen at run time by ISA level (never by CPU
// name). exp is a Cody-Waite reduction and a Taylor polynomial (relative error < 1e-8 in float, < 1e-16 in
// double); sigmoid and tanh are 1/(1+exp(-x)) and 2/(1+exp(-2x))-1 as in the ops' scalar headers.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// The vector helpers take and return 32/64-byte vectors without carrying a target attribute themselves; they are
// always inlined into the AVX2/AVX-512 functions, so the ABI GCC warns about is never used. GCC reports it where
// the templates are instantiated, at the end of the including file, hence no push/pop around this header.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace gm {
namespace lstm_scan {

#define GM_SCAN_INLINE inline __attribute__((always_inline))

// ----------------------------------------------------------------------------------------------------------------
// What the engine needs to know about a scan, and how the ops' layouts look.

struct Dims {
  int64_t n = 0;          // images
  int64_t hid = 0;        // h
  int64_t rows = 0;       // scan steps
  int64_t lanes = 0;      // positions per step
  std::vector<int> taps;  // lane offset d_t of each tap; w is (4h, h, taps) like the ops' w_ss
};

// A Layout provides (T = float or double; every buffer is (channels, ld); loads write the lanes [0, lv) of every
// channel, zero outside the valid range):
//   lane_lo(r), lane_hi(r)                        valid lanes of row r
//   load_gates(n, r, T* dst, ld, lv)              4h channels
//   load_h(n, r, T* dst, ld, lv), load_c(...)     h channels of row r's saved state; r = -1: the initial state
//   load_dy(n, r, T* dst, ld, lv)
//   store_state(n, r, const T* h, ldh, const T* c, ldc)   forward outputs of row r (valid lanes)
//   store_dgates(n, r, const T* dz, ld)
//   store_initial_grads(n, const T* dh, const T* dc, ld)  gradients of the initial state (may do nothing)
// and may provide (SavesPreact below) saves_preact(), store_preact(n, r, const T* z, ld) and load_preact(n, r, T* dst,
// ld, lv): where saves_preact() is true, the forward stores each row's pre-activations z (4h channels, valid lanes)
// and the backward loads them instead of reloading the gates and recomputing W h_{r-1} (one GEMM of its three). The
// values are the same either way: the backward's recomputation is the forward's arithmetic on the same operands.

template <class L, class = void>
struct SavesPreact : std::false_type {};
template <class L>
struct SavesPreact<L, std::void_t<decltype(std::declval<const L&>().saves_preact())>> : std::true_type {};

// Whether this scan's forward stores (and its backward loads) the pre-activations.
template <class L>
bool saves_preact(const L& lay) {
  if constexpr (SavesPreact<L>::value)
    return lay.saves_preact();
  else
    return false;
}

// ----------------------------------------------------------------------------------------------------------------
// Vector math.

template <typename T, int VB>
struct Simd;
template <int VB>
struct Simd<float, VB> {
  typedef float V __attribute__((vector_size(VB)));
  typedef uint32_t U __attribute__((vector_size(VB)));
};
template <int VB>
struct Simd<double, VB> {
  typedef double V __attribute__((vector_size(VB)));
  typedef uint64_t U __attribute__((vector_size(VB)));
};

template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
  static constexpr float lo = -87.0f, hi = 88.0f;  // 2^k stays a normal number: k in [-126, 127]
  static constexpr float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23: y + magic rounds y to an integer in the low bits
  static constexpr uint32_t bias = 127;
  static constexpr int shift = 23, degree = 7;
};
template <>
struct ExpConst<double> {
  static constexpr double lo = -708.0, hi = 709.0;
  static constexpr double log2e = 1.4426950408889634, ln2_hi = 6.93147180369123816490e-01,
                          ln2_lo = 1.90821492927058770002e-10;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr uint64_t bias = 1023;
  static constexpr int shift = 52, degree = 13;
};

constexpr double inverse_factorial(int n) { return n <= 1 ? 1.0 : inverse_factorial(n - 1) / n; }

template <typename T, int VB>
struct Vec {
  using V = typename Simd<T, VB>::V;
  using U = typename Simd<T, VB>::U;
  static constexpr int L = VB / static_cast<int>(sizeof(T));

  static GM_SCAN_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static GM_SCAN_INLINE void store(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
  static GM_SCAN_INLINE V splat(T x) { return V{} + x; }

  // exp(x) = 2^k e^r, k = round(x log2 e), r = x - k ln 2 in [-ln2/2, ln2/2]; NaN stays NaN.
  static GM_SCAN_INLINE V exp(const V& arg) {
    using K = ExpConst<T>;
    V x = arg < splat(K::lo) ? splat(K::lo) : arg;
    x = x > splat(K::hi) ? splat(K::hi) : x;
    const V y = x * K::log2e + K::magic;
    const V k = y - K::magic;
    V r = x - k * K::ln2_hi;
    r = r - k * K::ln2_lo;
    V p = splat(T(inverse_factorial(K::degree)));
#pragma GCC unroll 16
    for (int i = K::degree - 1; i >= 0; --i) p = p * r + T(inverse_factorial(i));
    const U scale = ((U)y + K::bias) << K::shift;  // low bits of y hold k
    return p * (V)scale;
  }
  using M = decltype(V{} < V{});  // lane mask (all bits set where true)

  // The mask of lanes first, first + 1, ... that lie in [lo, hi).
  static GM_SCAN_INLINE M lanes_in(int64_t first, int64_t lo, int64_t hi) {
    static constexpr T iota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const V idx = load(iota) + T(first);
    return (idx >= splat(T(lo))) & (idx < splat(T(hi)));
  }
  static GM_SCAN_INLINE V sigmoid(const V& x) { return T(1) / (T(1) + exp(-x)); }
  static GM_SCAN_INLINE V tanh(const V& x) { return T(2) / (T(1) + exp(T(-2) * x)) - T(1); }
};

// ----------------------------------------------------------------------------------------------------------------
// Scratch memory from a per-thread cache. The pages of a fresh allocation fault in on first touch, which on a
// small VM costs as much as the arithmetic at the benchmark's size (measured: the backward of row_lstm, N=8, h=32,
// 16x16, took 2.0 ms with its two large buffers allocated per call, 1.1 ms with them cached). Each thread keeps
// its buffers, up to kKeepBytes in all; a buffer that would exceed that is allocated for the call and freed.
// Slots: the calling thread's pass-level buffers use slots 0-1, the per-thread buffers of the passes 2 and up.
class ScratchCache {
 public:
  static constexpr int kSlots = 10;
  static constexpr size_t kKeepBytes = size_t(64) << 20;
  static constexpr size_t kAlign = 64;

  // count elements of T, 64-byte aligned, uninitialised; valid until the next take() of the same slot.
  template <typename T>
  static T* take(int slot, int64_t count, std::unique_ptr<unsigned char[]>& owned) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + kAlign;
    State& st = state();
    if (bytes > st.size[slot]) {
      if (st.total - st.size[slot] + bytes <= kKeepBytes) {
        st.total -= st.size[slot];
        st.mem[slot].reset(new unsigned char[bytes]);
        st.size[slot] = bytes;
        st.total += bytes;
      } else {
        owned.reset(new unsigned char[bytes]);
        return aligned<T>(owned.get());
      }
    }
    return aligned<T>(st.mem[slot].get());
  }

 private:
  struct State {
    std::unique_ptr<unsigned char[]> mem[kSlots];
    size_t size[kSlots] = {};
    size_t total = 0;
  };
  static State& state() {
    static thread_local State st;
    return st;
  }
  template <typename T>
  static T* aligned(unsigned char* p) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    return reinterpret_cast<T*>((a + kAlign - 1) / kAlign * kAlign);
  }
};

template <typename T>
class Scratch {
 public:
  Scratch(int slot, int64_t count) : data_(ScratchCache::take<T>(slot, count, owned_)) {}
  Scratch(int slot, int64_t count, T fill) : Scratch(slot, count) { std::fill(data_, data_ + count, fill); }
  T* data() const { return data_; }

 private:
  std::unique_ptr<unsigned char[]> owned_;
  T* data_;
};

// ----------------------------------------------------------------------------------------------------------------
// Blocking per instruction set: JB channels (x 4 gates) per forward block, JD channels per dh block, NV lane
// vectors per micro-kernel call at most, and the dw tile of WQ (j, t) rows x WV vectors of outputs o. Sized so
// that the accumulators plus the operands of one step fit the register file (32 zmm; 16 ymm/xmm).
struct BlockingWide {
  static constexpr int JB = 2, NV = 3, JD = 8, NVD = 3, WQ = 6, WV = 4;
};
struct BlockingNarrow {
  static constexpr int JB = 1, NV = 3, JD = 4, NVD = 3, WQ = 6, WV = 2;
};
// The chunk loops handle chunks of 1, 2 and NV columns.
static_assert(BlockingWide::NV == 3 && BlockingWide::NVD == 3 && BlockingNarrow::NV == 3 && BlockingNarrow::NVD == 3,
              "chunk sizes");

// Buffer geometry for lane vectors of L elements: nvec vectors per row (lv = nvec L lanes), h rows padded with
// pl zeros on the left and pr on the right (stride s), so that every tap reads a whole vector without tests.
struct Geometry {
  int64_t nvec, lv, pl, pr, s, g4, kf, kd;
  Geometry(const Dims& d, int lanes_per_vec) {
    nvec = (d.lanes + lanes_per_vec - 1) / lanes_per_vec;
    lv = nvec * lanes_per_vec;
    int mn = 0, mx = 0;
    for (int t : d.taps) mn = std::min(mn, t), mx = std::max(mx, t);
    pl = -mn;
    pr = mx;
    s = lv + pl + pr;
    g4 = 4 * d.hid;
    kf = d.hid * static_cast<int64_t>(d.taps.size());
    kd = g4 * static_cast<int64_t>(d.taps.size());
  }
};

// The weights packed per channel block, in the order the micro-kernels read them, and the lane offsets of the
// B operand of each reduction index.
template <typename T>
struct Packed {
  std::vector<T> wf;         // forward: block b, q = j*taps + t, row jj*4 + gate  (zero for channels >= h)
  std::vector<T> wd;         // dh: block b, q = o*taps + t, row jj                (zero for channels >= h)
  std::vector<int64_t> bf;   // forward: q -> j*s + pl + d_t (in an h buffer)
  std::vector<int64_t> bd;   // dh: q -> o*s + pr - d_t (in a dz buffer)
  int64_t nbf, nbd;
  Packed(const T* w, const Dims& d, const Geometry& g, int jb, int jd) {
    const int64_t h = d.hid, nt = static_cast<int64_t>(d.taps.size());
    nbf = (h + jb - 1) / jb;
    nbd = (h + jd - 1) / jd;
    wf.assign(nbf * g.kf * 4 * jb, T(0));
    wd.assign(nbd * g.kd * jd, T(0));
    for (int64_t o = 0; o < g.g4; ++o)
      for (int64_t j = 0; j < h; ++j)
        for (int64_t t = 0; t < nt; ++t) {
          const T v = w[(o * h + j) * nt + t];
          const int64_t gate = o / h, c = o % h;  // forward: output channel c of gate `gate`, input j
          wf[((c / jb) * g.kf + j * nt + t) * 4 * jb + (c % jb) * 4 + gate] = v;
          wd[((j / jd) * g.kd + o * nt + t) * jd + j % jd] = v;  // dh: output j, input o
        }
    bf.resize(g.kf);
    bd.resize(g.kd);
    for (int64_t j = 0; j < h; ++j)
      for (int64_t t = 0; t < nt; ++t) bf[j * nt + t] = j * g.s + g.pl + d.taps[t];
    for (int64_t o = 0; o < g.g4; ++o)
      for (int64_t t = 0; t < nt; ++t) bd[o * nt + t] = o * g.s + g.pr - d.taps[t];
  }
};

// acc[r][c] += sum_q a[q*R + r] * B_c[off[q] : off[q] + L]: R broadcast weights against NC lane vectors.
template <typename T, int VB, int R, int NC>
GM_SCAN_INLINE void gemm_block(typename Vec<T, VB>::V (&acc)[R][NC], const T* __restrict a, const T* const (&bcol)[NC],
                               const int64_t* __restrict off, int64_t kdim) {
  using X = Vec<T, VB>;
  using V = typename X::V;
  for (int64_t q = 0; q < kdim; ++q) {
    V b[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) b[c] = X::load(bcol[c] + off[q]);
    const T* aq = a + q * R;
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const T ar = aq[r];
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] += ar * b[c];
    }
  }
}

// Columns of a thread's micro-kernel calls: (local image, lane vector), split into nearly equal chunks of at
// most NV so that no call runs with a lone leftover column.
struct Chunks {
  int64_t ncols, nchunks;
  Chunks(int64_t cols, int nv) : ncols(cols), nchunks((cols + nv - 1) / nv) {}
  int64_t begin(int64_t i) const { return ncols * i / nchunks; }
  int64_t end(int64_t i) const { return ncols * (i + 1) / nchunks; }
};

// ----------------------------------------------------------------------------------------------------------------
// Forward.

// acc <- the staged values of channel block b (zero for channels >= h) from gb (image, 4h, lv).
template <typename T, int VB, int JB, int NC>
GM_SCAN_INLINE void load_block(typename Vec<T, VB>::V (&acc)[4 * JB][NC], const Geometry& g, int64_t hid, const T* gb,
                               const int64_t (&img)[NC], const int64_t (&at)[NC], int64_t b) {
  using X = Vec<T, VB>;
#pragma GCC unroll 8
  for (int jj = 0; jj < JB; ++jj) {
    const int64_t j = b * JB + jj;
#pragma GCC unroll 4
    for (int gate = 0; gate < 4; ++gate)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c)
        acc[jj * 4 + gate][c] = j < hid ? X::load(gb + (img[c] * g.g4 + gate * hid + j) * g.lv + at[c])
                                        : typename X::V{};
  }
}

// gb[...] <- acc for the channels < h of block b (load_block's places).
template <typename T, int VB, int JB, int NC>
GM_SCAN_INLINE void store_block(const typename Vec<T, VB>::V (&acc)[4 * JB][NC], const Geometry& g, int64_t hid, T* gb,
                                const int64_t (&img)[NC], const int64_t (&at)[NC], int64_t b) {
  using X = Vec<T, VB>;
#pragma GCC unroll 8
  for (int jj = 0; jj < JB; ++jj) {
    const int64_t j = b * JB + jj;
    if (j >= hid) break;
#pragma GCC unroll 4
    for (int gate = 0; gate < 4; ++gate)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) X::store(gb + (img[c] * g.g4 + gate * hid + j) * g.lv + at[c], acc[jj * 4 + gate][c]);
  }
}

// acc <- the pre-activations of channel block b (JB channels x gates i, f, o, g) for NC lane vectors: the staged
// gates gb (image, 4h, lv) plus W h_{r-1}, h read from the padded rows hrows[c] (image img[c], lanes at[c]...).
template <typename T, int VB, int JB, int NC>
GM_SCAN_INLINE void preactivations(typename Vec<T, VB>::V (&acc)[4 * JB][NC], const Geometry& g, const Packed<T>& w,
                                   int64_t hid, const T* gb, const T* const (&hrows)[NC], const int64_t (&img)[NC],
                                   const int64_t (&at)[NC], int64_t b) {
  load_block<T, VB, JB, NC>(acc, g, hid, gb, img, at, b);
  gemm_block<T, VB, 4 * JB, NC>(acc, w.wf.data() + b * g.kf * 4 * JB, hrows, w.bf.data(), g.kf);
}

// Whether every lane of the NC vectors is valid (then the cell needs no masks).
template <int L, int NC>
GM_SCAN_INLINE bool all_lanes_valid(const int64_t (&at)[NC], int64_t lo, int64_t hi) {
  bool full = true;
  for (int c = 0; c < NC; ++c) full = full && at[c] >= lo && at[c] + L <= hi;
  return full;
}


template <typename T, int VB, class B, class Layout>
struct Forward {
  using X = Vec<T, VB>;
  using V = typename X::V;
  static constexpr int L = X::L, JB = B::JB;

  const Layout& lay;
  const Dims& d;
  const Geometry& g;
  const Packed<T>& w;
  int64_t n0, nl;
  Scratch<T> hp, cst, gb;  // h of rows r-1 and r: (2, nl, h, s); c (nl, h, lv); gates, then z (nl, 4h, lv)
  const bool save_z;

  Forward(const Layout& l, const Dims& dd, const Geometry& gg, const Packed<T>& ww, int64_t first, int64_t count)
      : lay(l), d(dd), g(gg), w(ww), n0(first), nl(count), hp(2, 2 * count * dd.hid * gg.s, T(0)),
        cst(3, count * dd.hid * gg.lv), gb(4, count * gg.g4 * gg.lv), save_z(saves_preact(l)) {}

  T* hbuf(int64_t parity, int64_t i) { return hp.data() + (parity * nl + i) * d.hid * g.s; }

  template <int NC>
  GM_SCAN_INLINE void block(int64_t b, int64_t c0, int64_t prv, int64_t cur, int64_t r) {
    V acc[4 * JB][NC];
    const T* hrows[NC];
    int64_t img[NC], at[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      img[c] = (c0 + c) / g.nvec;
      at[c] = ((c0 + c) % g.nvec) * L;
      hrows[c] = hbuf(prv, img[c]) + at[c];
    }
    preactivations<T, VB, JB, NC>(acc, g, w, d.hid, gb.data(), hrows, img, at, b);
    if (save_z) store_block<T, VB, JB, NC>(acc, g, d.hid, gb.data(), img, at, b);  // the row's z, for store_preact
    if (all_lanes_valid<L>(at, lay.lane_lo(r), lay.lane_hi(r)))
      cells<NC, false>(acc, b, img, at, cur, r);
    else
      cells<NC, true>(acc, b, img, at, cur, r);
  }

  // The cell on the registers: c and h of channel block b, lanes outside the row's valid range set to zero.
  template <int NC, bool kMasked>
  GM_SCAN_INLINE void cells(const V (&acc)[4 * JB][NC], int64_t b, const int64_t (&img)[NC], const int64_t (&at)[NC],
                            int64_t cur, int64_t r) {
    typename X::M valid[NC];
    if constexpr (kMasked)
      for (int c = 0; c < NC; ++c) valid[c] = X::lanes_in(at[c], lay.lane_lo(r), lay.lane_hi(r));
#pragma GCC unroll 8
    for (int jj = 0; jj < JB; ++jj) {
      const int64_t j = b * JB + jj;
      if (j >= d.hid) break;
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        T* cp = cst.data() + (img[c] * d.hid + j) * g.lv + at[c];
        V cn = X::sigmoid(acc[jj * 4 + 1][c]) * X::load(cp) + X::sigmoid(acc[jj * 4][c]) * X::tanh(acc[jj * 4 + 3][c]);
        if constexpr (kMasked) cn = valid[c] ? cn : V{};
        V hn = X::sigmoid(acc[jj * 4 + 2][c]) * X::tanh(cn);
        if constexpr (kMasked) hn = valid[c] ? hn : V{};
        X::store(cp, cn);
        X::store(hbuf(cur, img[c]) + j * g.s + g.pl + at[c], hn);
      }
    }
  }

  GM_SCAN_INLINE void run() {
    if (nl <= 0) return;
    for (int64_t i = 0; i < nl; ++i) {
      lay.load_h(n0 + i, -1, hbuf(0, i) + g.pl, g.s, g.lv);
      lay.load_c(n0 + i, -1, cst.data() + i * d.hid * g.lv, g.lv, g.lv);
    }
    const Chunks ch(nl * g.nvec, B::NV);
    for (int64_t r = 0; r < d.rows; ++r) {
      const int64_t prv = r & 1, cur = prv ^ 1;
      for (int64_t i = 0; i < nl; ++i) lay.load_gates(n0 + i, r, gb.data() + i * g.g4 * g.lv, g.lv, g.lv);
      for (int64_t b = 0; b < w.nbf; ++b)
        for (int64_t k = 0; k < ch.nchunks; ++k) {
          const int64_t c0 = ch.begin(k);
          switch (ch.end(k) - c0) {
            case 1: block<1>(b, c0, prv, cur, r); break;
            case 2: block<2>(b, c0, prv, cur, r); break;
            default: block<B::NV>(b, c0, prv, cur, r); break;
          }
        }
      for (int64_t i = 0; i < nl; ++i) {
        lay.store_state(n0 + i, r, hbuf(cur, i) + g.pl, g.s, cst.data() + i * d.hid * g.lv, g.lv);
        if constexpr (SavesPreact<Layout>::value)
          if (save_z) lay.store_preact(n0 + i, r, gb.data() + i * g.g4 * g.lv, g.lv);
      }
    }
  }
};

// ----------------------------------------------------------------------------------------------------------------
// Backward: the scan (per thread, its images), then dw (all threads, tiles of dw).

template <typename T, int VB, class B, class Layout>
struct Backward {
  using X = Vec<T, VB>;
  using V = typename X::V;
  static constexpr int L = X::L, JB = B::JB, JD = B::JD;

  const Layout& lay;
  const Dims& d;
  const Geometry& g;
  const Packed<T>& w;
  T* hall;  // (N, rows, h, s): h_{r-1} of every row, zero-padded (shared by the threads)
  T* dzt;   // (N, rows, lv, 4h): dz of every row, transposed for the dw GEMM (shared by the threads)
  int64_t n0, nl;
  Scratch<T> dzb;  // (nl, 4h, s): dz of the current row, zero-padded (pr zeros on the left)
  Scratch<T> gb, cur_buf, prev_buf, dh, dc, dyb;  // gates (nl, 4h, lv); the rest (nl, h, lv)
  T* c_cur;  // c_r and c_{r-1}: cur_buf and prev_buf, swapped every row
  T* c_prev;
  const bool saved_z;  // gb holds the forward's z (load_preact), not the gates

  Backward(const Layout& l, const Dims& dd, const Geometry& gg, const Packed<T>& ww, T* hall_, T* dzt_,
           int64_t first, int64_t count)
      : lay(l), d(dd), g(gg), w(ww), hall(hall_), dzt(dzt_), n0(first), nl(count), dzb(2, count * gg.g4 * gg.s, T(0)),
        gb(3, count * gg.g4 * gg.lv), cur_buf(4, count * dd.hid * gg.lv), prev_buf(5, count * dd.hid * gg.lv),
        dh(6, count * dd.hid * gg.lv, T(0)), dc(7, count * dd.hid * gg.lv, T(0)), dyb(8, count * dd.hid * gg.lv),
        c_cur(cur_buf.data()), c_prev(prev_buf.data()), saved_z(saves_preact(l)) {}

  T* hrow(int64_t n, int64_t r) const { return hall + (n * d.rows + r) * d.hid * g.s; }
  T* dzrow(int64_t i) const { return dzb.data() + i * g.g4 * g.s; }  // local image i
  int64_t st(int64_t i, int64_t j) const { return (i * d.hid + j) * g.lv; }  // (image, channel) of a state buffer

  template <int NC>
  GM_SCAN_INLINE void cell_block(int64_t b, int64_t c0, int64_t r) {
    V acc[4 * JB][NC];
    const T* hrows[NC];
    int64_t img[NC], at[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      img[c] = (c0 + c) / g.nvec;
      at[c] = ((c0 + c) % g.nvec) * L;
      hrows[c] = hrow(n0 + img[c], r) + at[c];
    }
    if (saved_z)
      load_block<T, VB, JB, NC>(acc, g, d.hid, gb.data(), img, at, b);
    else
      preactivations<T, VB, JB, NC>(acc, g, w, d.hid, gb.data(), hrows, img, at, b);
    if (all_lanes_valid<L>(at, lay.lane_lo(r), lay.lane_hi(r)))
      cells<NC, false>(acc, b, img, at, r);
    else
      cells<NC, true>(acc, b, img, at, r);
  }

  // The cell backward on the registers: dz of channel block b (zero outside the row's valid lanes) into the dz
  // row, and the carried dc.
  template <int NC, bool kMasked>
  GM_SCAN_INLINE void cells(const V (&acc)[4 * JB][NC], int64_t b, const int64_t (&img)[NC], const int64_t (&at)[NC],
                            int64_t r) {
    typename X::M valid[NC];
    if constexpr (kMasked)
      for (int c = 0; c < NC; ++c) valid[c] = X::lanes_in(at[c], lay.lane_lo(r), lay.lane_hi(r));
#pragma GCC unroll 8
    for (int jj = 0; jj < JB; ++jj) {
      const int64_t j = b * JB + jj;
      if (j >= d.hid) break;
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        const int64_t s = st(img[c], j) + at[c];
        const V si = X::sigmoid(acc[jj * 4][c]), sf = X::sigmoid(acc[jj * 4 + 1][c]);
        const V so = X::sigmoid(acc[jj * 4 + 2][c]), tg = X::tanh(acc[jj * 4 + 3][c]);
        const V tc = X::tanh(X::load(c_cur + s));
        const V dhv = X::load(dh.data() + s);
        const V dct = X::load(dc.data() + s) + dhv * so * (T(1) - tc * tc);
        V dz[4] = {dct * tg * si * (T(1) - si), dct * X::load(c_prev + s) * sf * (T(1) - sf),
                   dhv * tc * so * (T(1) - so), dct * si * (T(1) - tg * tg)};
        V dcn = dct * sf;
        if constexpr (kMasked) {
          for (int gate = 0; gate < 4; ++gate) dz[gate] = valid[c] ? dz[gate] : V{};
          dcn = valid[c] ? dcn : V{};
        }
        T* dzr = dzrow(img[c]) + g.pr + at[c];
#pragma GCC unroll 4
        for (int gate = 0; gate < 4; ++gate) X::store(dzr + (gate * d.hid + j) * g.s, dz[gate]);
        X::store(dc.data() + s, dcn);
      }
    }
  }

  template <int NC>
  GM_SCAN_INLINE void dh_block(int64_t b, int64_t c0, int64_t r) {
    V acc[JD][NC] = {};
    const T* bcol[NC];
    int64_t img[NC], at[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      img[c] = (c0 + c) / g.nvec;
      at[c] = ((c0 + c) % g.nvec) * L;
      bcol[c] = dzrow(img[c]) + at[c];
    }
    gemm_block<T, VB, JD, NC>(acc, w.wd.data() + b * g.kd * JD, bcol, w.bd.data(), g.kd);
#pragma GCC unroll 16
    for (int jj = 0; jj < JD; ++jj) {
      const int64_t j = b * JD + jj;
      if (j >= d.hid) break;
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) X::store(dh.data() + st(img[c], j) + at[c], acc[jj][c]);
    }
  }

  // dzt[n, r, x, o] <- dz[o, x] for the valid lanes x of row r.
  GM_SCAN_INLINE void transpose_dz(int64_t i, int64_t r) {
    const T* src = dzrow(i) + g.pr;
    T* dst = dzt + ((n0 + i) * d.rows + r) * g.lv * g.g4;
    for (int64_t x = lay.lane_lo(r); x < lay.lane_hi(r); ++x)
      for (int64_t o = 0; o < g.g4; ++o) dst[x * g.g4 + o] = src[o * g.s + x];
  }

  GM_SCAN_INLINE void scan() {
    if (nl <= 0) return;
    for (int64_t i = 0; i < nl; ++i) {
      std::fill(hrow(n0 + i, 0), hrow(n0 + i, 0) + d.rows * d.hid * g.s, T(0));
      for (int64_t r = 0; r < d.rows; ++r) lay.load_h(n0 + i, r - 1, hrow(n0 + i, r) + g.pl, g.s, g.lv);
      if (d.rows > 0) lay.load_c(n0 + i, d.rows - 1, c_prev + st(i, 0), g.lv, g.lv);
    }
    const Chunks ch(nl * g.nvec, B::NV), chd(nl * g.nvec, B::NVD);
    const int64_t sz = d.hid * g.lv;
    for (int64_t r = d.rows - 1; r >= 0; --r) {
      std::swap(c_cur, c_prev);  // c_r was loaded as the previous row's c_{r-1}
      for (int64_t i = 0; i < nl; ++i) {
        T* gbi = gb.data() + i * g.g4 * g.lv;
        if constexpr (SavesPreact<Layout>::value)
          if (saved_z) lay.load_preact(n0 + i, r, gbi, g.lv, g.lv);
        if (!saved_z) lay.load_gates(n0 + i, r, gbi, g.lv, g.lv);
        lay.load_c(n0 + i, r - 1, c_prev + st(i, 0), g.lv, g.lv);
        lay.load_dy(n0 + i, r, dyb.data() + st(i, 0), g.lv, g.lv);
      }
      T* __restrict dhp = dh.data();
      const T* __restrict dyp = dyb.data();
      for (int64_t e = 0; e < nl * sz; ++e) dhp[e] += dyp[e];
      for (int64_t b = 0; b < w.nbf; ++b)  // (no lambdas here: they would not inherit the target attribute)
        for (int64_t k = 0; k < ch.nchunks; ++k) {
          const int64_t c0 = ch.begin(k);
          switch (ch.end(k) - c0) {
            case 1: cell_block<1>(b, c0, r); break;
            case 2: cell_block<2>(b, c0, r); break;
            default: cell_block<B::NV>(b, c0, r); break;
          }
        }
      for (int64_t i = 0; i < nl; ++i) {
        lay.store_dgates(n0 + i, r, dzrow(i) + g.pr, g.s);
        if (dzt != nullptr) transpose_dz(i, r);
      }
      for (int64_t b = 0; b < w.nbd; ++b)
        for (int64_t k = 0; k < chd.nchunks; ++k) {
          const int64_t c0 = chd.begin(k);
          switch (chd.end(k) - c0) {
            case 1: dh_block<1>(b, c0, r); break;
            case 2: dh_block<2>(b, c0, r); break;
            default: dh_block<B::NVD>(b, c0, r); break;
          }
        }
    }
    for (int64_t i = 0; i < nl; ++i) lay.store_initial_grads(n0 + i, dh.data() + st(i, 0), dc.data() + st(i, 0), g.lv);
  }
};

// dw[o, j, t] = sum_{n, r, x} h_{r-1}[j, x + d_t] dz_r[o, x] over the valid lanes x: a GEMM with the reduction
// over every (image, row, lane), one tile of WQ reduction-free rows q = (j, t) x WV vectors of outputs o held in
// registers: h broadcast from the padded h rows, dz vectors from the transposed dz. Rows and outputs past the
// end are clamped or padded (computed, not stored).
template <typename T, int VB, class B, class Layout>
GM_SCAN_INLINE void weight_grad_tile(const Layout& lay, const Dims& d, const Geometry& g, const T* hall,
                                     const T* dzt, int64_t tile, T* dw) {
  using X = Vec<T, VB>;
  using V = typename X::V;
  constexpr int WQ = B::WQ, WV = B::WV, L = X::L;
  const int64_t nt = static_cast<int64_t>(d.taps.size());
  const int64_t nq = (g.kf + WQ - 1) / WQ;
  const int64_t o0 = (tile / nq) * WV * L, q0 = (tile % nq) * WQ;
  int64_t qoff[WQ];
#pragma GCC unroll 8
  for (int b = 0; b < WQ; ++b) {
    const int64_t q = std::min(q0 + b, g.kf - 1);
    qoff[b] = (q / nt) * g.s + g.pl + d.taps[q % nt];
  }
  V acc[WQ][WV] = {};
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t r = 0; r < d.rows; ++r) {
      const T* hp = hall + (n * d.rows + r) * d.hid * g.s;
      const T* dz = dzt + (n * d.rows + r) * g.lv * g.g4 + o0;
      for (int64_t x = lay.lane_lo(r); x < lay.lane_hi(r); ++x) {
        V dv[WV];
#pragma GCC unroll 8
        for (int v = 0; v < WV; ++v) dv[v] = X::load(dz + x * g.g4 + v * L);
#pragma GCC unroll 8
        for (int b = 0; b < WQ; ++b) {
          const T hv = hp[qoff[b] + x];
#pragma GCC unroll 8
          for (int v = 0; v < WV; ++v) acc[b][v] += hv * dv[v];
        }
      }
    }
  for (int b = 0; b < WQ; ++b) {
    const int64_t q = q0 + b;
    if (q >= g.kf) break;
    for (int v = 0; v < WV; ++v)
      for (int l = 0; l < L; ++l) {
        const int64_t o = o0 + v * L + l;
        if (o < g.g4) dw[o * g.kf + q] = acc[b][v][l];  // w layout (4h, h, taps): o * (h taps) + j taps + t
      }
  }
}

inline int thread_num() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int thread_total() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// The work of one thread in each pass. The OpenMP parallel regions must be lexically inside the functions that
// carry the target attribute (an outlined region inherits its function's target, not that of what is inlined into
// it), so the entry points below open them and call these, always inlined.
template <typename T, int VB, class B, class Layout>
GM_SCAN_INLINE void forward_thread(const Layout& lay, const Dims& d, const Geometry& g, const Packed<T>& pw) {
  const int64_t nth = thread_total(), id = thread_num();
  const int64_t first = d.n * id / nth, last = d.n * (id + 1) / nth;
  Forward<T, VB, B, Layout> f(lay, d, g, pw, first, last - first);
  f.run();
}

template <typename T, int VB, class B, class Layout>
GM_SCAN_INLINE void backward_thread(const Layout& lay, const Dims& d, const Geometry& g, const Packed<T>& pw,
                                    T* hall, T* dzt, T* dw) {
  const int64_t nth = thread_total(), id = thread_num();
  const int64_t first = d.n * id / nth, last = d.n * (id + 1) / nth;
  {
    Backward<T, VB, B, Layout> bw(lay, d, g, pw, hall, dw != nullptr ? dzt : nullptr, first, last - first);
    bw.scan();
  }
  if (dw != nullptr) {
    constexpr int64_t ow = B::WV * Vec<T, VB>::L;
    const int64_t tiles = ((g.g4 + ow - 1) / ow) * ((g.kf + B::WQ - 1) / B::WQ);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) weight_grad_tile<T, VB, B>(lay, d, g, hall, dzt, t, dw);
  }
}

// Entry points for one instruction set level.
#define GM_SCAN_DEFINE_LEVEL(SUFFIX, TARGET, VB, BLOCKING)                                                    \
  template <typename T, class Layout>                                                                         \
  TARGET void forward_##SUFFIX(const Layout& lay, const Dims& d, const T* w) {                                 \
    const Geometry g(d, Vec<T, VB>::L);                                                                       \
    const Packed<T> pw(w, d, g, BLOCKING::JB, BLOCKING::JD);                                                  \
    _Pragma("omp parallel") forward_thread<T, VB, BLOCKING>(lay, d, g, pw);                                   \
  }                                                                                                           \
  template <typename T, class Layout>                                                                         \
  TARGET void backward_##SUFFIX(const Layout& lay, const Dims& d, const T* w, T* dw) {                        \
    const Geometry g(d, Vec<T, VB>::L);                                                                       \
    const Packed<T> pw(w, d, g, BLOCKING::JB, BLOCKING::JD);                                                  \
    const Scratch<T> hall(0, d.n * d.rows * d.hid * g.s);                                                     \
    const int64_t dzt_size = dw != nullptr ? d.n * d.rows * g.lv * g.g4 : 0;                                   \
    const Scratch<T> dzt(1, dzt_size + Vec<T, VB>::L); /* + one vector, read (unused) past the last output */  \
    std::fill(dzt.data() + dzt_size, dzt.data() + dzt_size + Vec<T, VB>::L, T(0));                             \
    _Pragma("omp parallel") backward_thread<T, VB, BLOCKING>(lay, d, g, pw, hall.data(), dzt.data(), dw);      \
  }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define GM_SCAN_LEVELS 1
GM_SCAN_DEFINE_LEVEL(v4, __attribute__((target("arch=x86-64-v4"))), 64, BlockingWide)
GM_SCAN_DEFINE_LEVEL(v3, __attribute__((target("arch=x86-64-v3"))), 32, BlockingNarrow)
#endif
GM_SCAN_DEFINE_LEVEL(base, , 16, BlockingNarrow)

inline int isa_level() {
#ifdef GM_SCAN_FORCE_LEVEL  // testing the narrower paths on a wider machine: -DGM_SCAN_FORCE_LEVEL=3 or 1
  return GM_SCAN_FORCE_LEVEL;
#endif
#ifdef GM_SCAN_LEVELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return 4;
  if (__builtin_cpu_supports("x86-64-v3")) return 3;
#endif
  return 1;
}

template <typename T, class Layout>
void scan_forward(const Layout& lay, const Dims& d, const T* w) {
  switch (isa_level()) {
#ifdef GM_SCAN_LEVELS
    case 4: return forward_v4<T>(lay, d, w);
    case 3: return forward_v3<T>(lay, d, w);
#endif
    default: return forward_base<T>(lay, d, w);
  }
}

// dw may be null (no weight gradient wanted).
template <typename T, class Layout>
void scan_backward(const Layout& lay, const Dims& d, const T* w, T* dw) {
  switch (isa_level()) {
#ifdef GM_SCAN_LEVELS
    case 4: return backward_v4<T>(lay, d, w, dw);
    case 3: return backward_v3<T>(lay, d, w, dw);
#endif
    default: return backward_base<T>(lay, d, w, dw);
  }
}

}  // namespace lstm_scan
}  // namespace gm
