// gm CUDA emulator runtime: the fiber scheduler behind launches, barriers, warp collectives, shared memory and
// cp.async (the model is described in include/gm_emu/runtime.h).
#include "gm_emu/runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

#include "gm_emu/stats.h"

namespace gm_emu {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr int kOptinLimit = 227 * 1024;  // H100/H200 per-block opt-in
constexpr std::size_t kDefaultDynamicLimit = 48 * 1024;

enum class State { ready, block_barrier, warp_barrier, done };

struct Copy {
  std::uint32_t dst;
  const void* src;
  int cp_size, src_size;
};

struct Fiber {
  ucontext_t ctx;
  unsigned char* stack = nullptr;
  unsigned tid = 0;
  State state = State::ready;
  unsigned collectives = 0;  // warp collectives taken part in (double-buffers the exchange slots)
  std::vector<Copy> copies;  // issued cp.async, oldest first
  std::vector<std::size_t> group_ends;  // committed groups: end index into copies
};

struct Warp {
  unsigned live = 0, arrived = 0, arrived_mask = 0;
  unsigned need = 0;  // union of the masks the arrived lanes named
  const char* what = nullptr;
  unsigned present[2] = {0, 0};
};

struct Scheduler {
  std::vector<Fiber> fibers;
  Warp warps[kMaxThreads / 32];
  alignas(16) unsigned char slots[2][kMaxThreads][kSlotBytes];
  std::deque<unsigned> runq;
  unsigned nthreads = 0, live = 0, at_block = 0, current = 0;
  ucontext_t main_ctx;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  std::mt19937_64 rng;
  std::vector<unsigned char> dyn;  // dynamic shared memory (+ alignment slack)
  unsigned char* dyn_base = nullptr;
  std::size_t dyn_bytes = 0;
  std::vector<std::pair<void*, std::size_t>> statics;
  std::map<const void*, int> max_dynamic;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
  int pending_error = 0;
  std::string error_text;
  std::string pending_text;
  bool launch_unchecked = false;
  std::string order = "random";
  std::uint64_t seed = 0;
  Stats stats;
};

Scheduler& S() {
  static Scheduler* s = [] {
    auto* p = new Scheduler();
    if (const char* o = std::getenv("GM_EMU_ORDER")) p->order = o;
    if (const char* sd = std::getenv("GM_EMU_SEED")) p->seed = std::strtoull(sd, nullptr, 10);
    return p;
  }();
  return *s;
}

unsigned char* new_stack() {
  const long page = sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting a neighbour
  return static_cast<unsigned char*>(p) + page;
}

Fiber& me() { return S().fibers[S().current]; }

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

// Queue the threads a barrier releases. "forward"/"reverse": in thread order, behind everything already runnable, so
// warps advance in near lock-step. "random": shuffled, and half of the time (by coin) ahead of everything already
// runnable, so a warp can run many warp-collective steps ahead of the others, as it may on a GPU; races between
// warps that lock-step would hide then read stale or poisoned data.
void release(std::vector<unsigned>& tids) {
  Scheduler& s = S();
  for (unsigned t : tids) s.fibers[t].state = State::ready;
  if (s.order == "reverse") std::reverse(tids.begin(), tids.end());
  if (s.order == "forward" || s.order == "reverse") {
    s.runq.insert(s.runq.end(), tids.begin(), tids.end());
    return;
  }
  std::shuffle(tids.begin(), tids.end(), s.rng);
  if (s.rng() & 1)
    s.runq.insert(s.runq.begin(), tids.begin(), tids.end());
  else
    s.runq.insert(s.runq.end(), tids.begin(), tids.end());
}

void maybe_release_block() {
  Scheduler& s = S();
  if (s.at_block == 0 || s.at_block != s.live) return;
  std::vector<unsigned> tids;
  for (unsigned t = 0; t < s.nthreads; ++t)
    if (s.fibers[t].state == State::block_barrier) tids.push_back(t);
  s.at_block = 0;
  ++s.stats.barriers;
  release(tids);
}

void maybe_release_warp(unsigned w) {
  Scheduler& s = S();
  Warp& wp = s.warps[w];
  if (wp.arrived == 0 || wp.arrived != wp.live) return;
  const unsigned present = wp.arrived_mask;
  if ((wp.need & present) != wp.need) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s: the lanes' masks name lanes 0x%08x of warp %u, but only 0x%08x took part",
                  wp.what, wp.need, w, present);
    fail(buf);
  }
  // Which slot buffer this round wrote: every lane of the round used the same parity (checked on arrival).
  const unsigned parity = (s.fibers[w * 32 + static_cast<unsigned>(__builtin_ctz(present))].collectives - 1) & 1u;
  wp.present[parity] = present;
  std::vector<unsigned> tids;
  for (unsigned l = 0; l < 32; ++l)
    if ((present >> l) & 1u) tids.push_back(w * 32 + l);
  wp.arrived = 0;
  wp.arrived_mask = 0;
  wp.need = 0;
  wp.what = nullptr;
  ++s.stats.warp_collectives;
  release(tids);
}

void yield() {
  Scheduler& s = S();
  ++s.stats.switches;
  swapcontext(&me().ctx, &s.main_ctx);
}

void fiber_main() {
  Scheduler& s = S();
  try {
    (*s.body)();
  } catch (...) {
    if (!s.error) s.error = std::current_exception();
  }
  Fiber& f = me();
  f.state = State::done;
  --s.live;
  --s.warps[f.tid / 32].live;
  // Leaving may complete a barrier the others wait at (exited threads do not count on sm_70+).
  if (!s.error) {
    try {
      maybe_release_block();
      maybe_release_warp(f.tid / 32);
    } catch (...) {
      s.error = std::current_exception();
    }
  }
  setcontext(&s.main_ctx);
}

std::string describe_waits() {
  Scheduler& s = S();
  std::string out;
  auto name = [](const Fiber& f, const Warp& w) -> std::string {
    switch (f.state) {
      case State::block_barrier: return "__syncthreads";
      case State::warp_barrier: return std::string("warp collective ") + (w.what ? w.what : "?");
      case State::done: return "exited";
      default: return "runnable";
    }
  };
  unsigned start = 0;
  for (unsigned t = 1; t <= s.nthreads; ++t) {
    const Fiber& a = s.fibers[start];
    if (t < s.nthreads && name(s.fibers[t], s.warps[t / 32]) == name(a, s.warps[start / 32]) &&
        (a.state != State::warp_barrier || t / 32 == start / 32))
      continue;
    out += "\n  threads " + std::to_string(start) + "-" + std::to_string(t - 1) + ": " +
           name(a, s.warps[start / 32]);
    start = t;
  }
  return out;
}

void run_block(const LaunchSite& site, dim3 grid, dim3 block, dim3 bidx) {
  Scheduler& s = S();
  blockIdx = bidx;
  std::memset(s.dyn_base, 0xFF, s.dyn_bytes);
  for (auto& [p, n] : s.statics) std::memset(p, 0xFF, n);
  s.live = s.nthreads;
  s.at_block = 0;
  for (unsigned w = 0; w < (s.nthreads + 31) / 32; ++w) {
    s.warps[w] = Warp{};
    s.warps[w].live = std::min(32u, s.nthreads - 32 * w);
  }
  std::vector<unsigned> all(s.nthreads);
  for (unsigned t = 0; t < s.nthreads; ++t) {
    Fiber& f = s.fibers[t];
    f.tid = t;
    f.collectives = 0;
    f.copies.clear();
    f.group_ends.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
    all[t] = t;
  }
  s.runq.clear();
  release(all);
  while (!s.runq.empty() && !s.error) {
    const unsigned t = s.runq.front();
    s.runq.pop_front();
    s.current = t;
    threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    ++s.stats.switches;
    swapcontext(&s.main_ctx, &s.fibers[t].ctx);
  }
  ++s.stats.blocks;
  auto where = [&] {
    return std::string("gm_emu: kernel ") + site.kernel + " launched at " + site.where + ", grid " + dims(grid) +
           " block " + dims(block) + ", in block " + dims(bidx);
  };
  if (s.error) {
    const unsigned t = s.current;
    const std::string thread = ", thread " + dims(dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y)));
    std::exception_ptr e = s.error;
    s.error = nullptr;
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      throw Fault(where() + thread + ": " + ex.what());
    }
  }
  if (s.live != 0) throw Fault(where() + ": deadlock, no thread can proceed:" + describe_waits());
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------------

void fail(const std::string& what) { throw Fault(what); }

unsigned thread_rank() { return S().current; }
unsigned lane_id() { return S().current % 32; }

void sync_block() {
  Scheduler& s = S();
  Fiber& f = me();
  f.state = State::block_barrier;
  ++s.at_block;
  maybe_release_block();
  yield();
}

const unsigned char* warp_exchange(const void* data, std::size_t n, const char* what, unsigned mask,
                                   unsigned* present) {
  Scheduler& s = S();
  Fiber& f = me();
  const unsigned w = f.tid / 32, lane = f.tid % 32;
  Warp& wp = s.warps[w];
  if (n > kSlotBytes) fail(std::string(what) + ": operand too large for the emulator's exchange slot");
  if (!((mask >> lane) & 1u)) fail(std::string(what) + ": the calling lane is not in its own mask");
  const unsigned parity = f.collectives & 1u;
  if (wp.arrived == 0) {
    wp.what = what;
  } else {
    if (std::strcmp(wp.what, what) != 0)
      fail(std::string("warp divergence: lane ") + std::to_string(lane) + " reached " + what +
           " while other lanes of warp " + std::to_string(w) + " wait in " + wp.what);
    const unsigned first = w * 32 + static_cast<unsigned>(__builtin_ctz(wp.arrived_mask));
    if (s.fibers[first].collectives != f.collectives + 1)
      fail(std::string(what) + ": lanes of warp " + std::to_string(w) +
           " reached it after different numbers of warp collectives (divergent control flow)");
  }
  std::memcpy(s.slots[parity][f.tid], data, n);
  ++f.collectives;
  ++wp.arrived;
  wp.arrived_mask |= 1u << lane;
  wp.need |= mask;
  f.state = State::warp_barrier;
  maybe_release_warp(w);
  yield();
  *present = wp.present[parity];
  return s.slots[parity][w * 32];
}

void sync_warp(unsigned mask) {
  unsigned present = 0;
  const char none = 0;
  warp_exchange(&none, 0, "__syncwarp", mask, &present);
}

unsigned char* dynamic_smem() { return S().dyn_base; }
std::size_t dynamic_smem_bytes() { return S().dyn_bytes; }

bool register_static_smem(void* p, std::size_t bytes) {
  std::memset(p, 0xFF, bytes);
  S().statics.emplace_back(p, bytes);
  return true;
}

std::uint32_t shared_address(const void* p) {
  Scheduler& s = S();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < s.dyn_base || c > s.dyn_base + s.dyn_bytes)
    fail("__cvta_generic_to_shared: pointer is not in the dynamic shared allocation (static __shared__ arrays have "
         "no shared-window address in the emulator)");
  return static_cast<std::uint32_t>(c - s.dyn_base);
}

unsigned char* shared_pointer(std::uint32_t addr, std::size_t bytes, const char* what) {
  Scheduler& s = S();
  if (std::size_t(addr) + bytes > s.dyn_bytes)
    fail(std::string(what) + ": shared access [" + std::to_string(addr) + ", " + std::to_string(addr + bytes) +
         ") outside the " + std::to_string(s.dyn_bytes) + "-byte dynamic allocation");
  return s.dyn_base + addr;
}

void cp_async(std::uint32_t dst, const void* src, int cp_size, int src_size, const char* what) {
  if (dst % cp_size != 0 || reinterpret_cast<std::uintptr_t>(src) % cp_size != 0)
    fail(std::string(what) + ": " + std::to_string(cp_size) + "-byte copy with misaligned address (shared " +
         std::to_string(dst) + ")");
  if (src_size < 0 || src_size > cp_size) fail(std::string(what) + ": src-size outside [0, cp-size]");
  shared_pointer(dst, cp_size, what);  // bounds check now, copy at the wait
  me().copies.push_back(Copy{dst, src, cp_size, src_size});
  ++S().stats.async_copies;
}

void cp_async_commit() {
  Fiber& f = me();
  f.group_ends.push_back(f.copies.size());
}

void cp_async_wait(int pending_groups) {
  Fiber& f = me();
  const std::size_t groups = f.group_ends.size();
  if (groups <= static_cast<std::size_t>(pending_groups)) return;
  const std::size_t land = groups - pending_groups;  // the oldest groups complete
  const std::size_t upto = f.group_ends[land - 1];
  for (std::size_t i = 0; i < upto; ++i) {
    const Copy& c = f.copies[i];
    unsigned char* d = shared_pointer(c.dst, c.cp_size, "cp.async");
    if (c.src_size > 0) std::memcpy(d, c.src, c.src_size);
    std::memset(d + c.src_size, 0, c.cp_size - c.src_size);
  }
  f.copies.erase(f.copies.begin(), f.copies.begin() + upto);
  f.group_ends.erase(f.group_ends.begin(), f.group_ends.begin() + land);
  for (auto& e : f.group_ends) e -= upto;
}

void set_max_dynamic_smem(const void* kernel, int bytes) { S().max_dynamic[kernel] = bytes; }
int max_dynamic_smem_optin() { return kOptinLimit; }

int take_launch_error(std::string* message) {
  Scheduler& s = S();
  s.launch_unchecked = false;
  const int e = s.pending_error;
  if (message) *message = s.pending_text;
  if (e) s.error_text = s.pending_text;
  s.pending_error = 0;
  s.pending_text.clear();
  return e;
}

const char* error_string(int code) {
  Scheduler& s = S();
  if (code == 0) return "no error";
  if (!s.error_text.empty()) return s.error_text.c_str();
  switch (code) {
    case 1: return "invalid argument";
    case 9: return "invalid configuration argument";
    default: return "emulated CUDA error";
  }
}

void run_grid(const LaunchSite& site, const void* kernel, dim3 grid, dim3 block, std::size_t smem,
              const std::function<void()>& body) {
  static std::mutex one_launch_at_a_time;
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  Scheduler& s = S();
  if (s.launch_unchecked) ++s.stats.unchecked_launches;  // the previous launch was never followed by cudaGetLastError
  s.launch_unchecked = true;
  ++s.stats.launches;
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  std::string bad;
  if (threads == 0 || threads > kMaxThreads || block.z > 64)
    bad = "block " + dims(block) + " (at most 1024 threads, z <= 64)";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu)
    bad = "grid " + dims(grid);
  else {
    auto it = s.max_dynamic.find(kernel);
    const std::size_t limit = it == s.max_dynamic.end() ? kDefaultDynamicLimit : std::size_t(it->second);
    if (smem > limit)
      bad = std::to_string(smem) + " bytes of dynamic shared memory, above the kernel's limit of " +
            std::to_string(limit) + " (cudaFuncAttributeMaxDynamicSharedMemorySize)";
  }
  if (!bad.empty()) {
    s.pending_error = 9;
    s.pending_text = std::string("invalid configuration argument (gm_emu: ") + site.kernel + " at " + site.where +
                     ": " + bad + ")";
    return;
  }
  s.nthreads = static_cast<unsigned>(threads);
  while (s.fibers.size() < s.nthreads) {
    s.fibers.emplace_back();
    s.fibers.back().stack = new_stack();
  }
  s.dyn.assign(smem + 256, 0xFF);
  s.dyn_base = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(s.dyn.data()) + 127) & ~std::uintptr_t(127));
  s.dyn_bytes = smem;
  s.body = &body;
  s.rng.seed(s.seed);
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(site, grid, block, dim3(x, y, z));
}

// ------------------------------------------------------------------------------------------------------------------

Stats& stats() { return S().stats; }
void set_order(const std::string& order, std::uint64_t seed) {
  if (order != "random" && order != "forward" && order != "reverse")
    throw std::invalid_argument("order must be random, forward or reverse, got " + order);
  S().order = order;
  S().seed = seed;
}
std::string order() { return S().order; }

}  // namespace gm_emu
