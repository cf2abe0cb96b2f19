// A host emulation of the CUDA execution model, just large enough to run the
// tensor-core kernels of this library (tc_kernels.cuh) on a machine without a
// GPU: every thread of a block (or of a thread-block cluster) is a fiber on
// one OS thread, switched only at barriers, so a run is deterministic for a
// given schedule seed. Block, warp and cluster barriers, the warp votes the
// kernels use, and __syncthreads_count are exact; the hardware layer
// (cp.async, mma.sync, distributed shared memory) is emulated in tc_hw_emu.h.
//
// What it checks: index arithmetic, the window plan, the masking of runs,
// the copy pipeline (copies land only at cp.async.wait_group, so a read
// before its wait sees stale bytes), barrier placement (fibers are scheduled
// in a shuffled order each round, and shared memory starts as NaN bytes), the
// cluster split and its exchange, and deadlocks (reported, not hung).
// What it does not: timing, memory-model subtleties of real hardware, the
// MMA fragment layout itself (emulated from the PTX description, so it
// checks the kernels against that description, not against the silicon).
//
// Static __shared__ arrays become function-local statics: one copy shared
// by the fibers of the running block (blocks and clusters run one after
// another; the simple kernels, which have static arrays, never run as
// clusters). Unlike dynamic shared memory they are not reset to NaN bytes
// between blocks. Warp-collective steps and block barriers are counted per
// run (RunStats), for cost models of serial phases.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#ifndef JDLORA_EMULATION
#define JDLORA_EMULATION 1
#endif

namespace emu {

inline constexpr int kWarp = 32;

struct Barrier {
  int expected = 0;
  int arrived = 0;
  long generation = 0;
};

struct Fiber {
  ucontext_t ctx{};
  // The barrier this fiber waits at and the generation it waits to end: the
  // scheduler skips it until then.
  const Barrier* waiting = nullptr;
  long wait_gen = 0;
  std::unique_ptr<char[]> stack;
  uint3 tid{};
  uint3 bid{};
  int block = 0;  // index of its block within the running cluster
  bool done = false;
  // cp.async copies not yet landed: (dst, src, pred, group)
  struct Copy {
    void* dst;
    const void* src;
    bool pred;
    long group;
  };
  std::vector<Copy> copies;
  long committed = 0;
};

struct WarpExchange {
  uint32_t u[kWarp][6];
  int i[kWarp];
};

// Counts of the last run_cluster call (one block or one cluster).
struct RunStats {
  long block_barriers = 0;                   // of block 0
  std::vector<long> warp_collectives;        // per warp of block 0: votes, shuffles, matches, __syncwarp
  std::map<const void*, long> atomics;      // of block 0, per address
  long max_warp_collectives() const {
    long m = 0;
    for (long v : warp_collectives) m = v > m ? v : m;
    return m;
  }
  // Atomics on one address serialise: the busiest address bounds their cost.
  long max_atomics_one_address() const {
    long m = 0;
    for (const auto& [addr, n] : atomics) m = n > m ? n : m;
    return m;
  }
  long total_atomics() const {
    long t = 0;
    for (const auto& [addr, n] : atomics) t += n;
    return t;
  }
};

struct Machine {
  std::vector<Fiber> fibers;
  ucontext_t main_ctx{};
  int current = -1;
  uint3 block_dim{128, 1, 1};
  int threads_per_block = 128;
  std::vector<Barrier> block_bar, warp_bar;
  Barrier cluster_bar;
  std::vector<int> count_acc, count_result;
  std::vector<WarpExchange> warp_x;
  std::vector<std::vector<unsigned char>> smem;  // per block of the cluster
  size_t smem_bytes = 0;
  long progress = 0;
  std::mt19937 rng{12345};
  std::function<void()> body;
  RunStats stats;
  int image_arch = 90;  // __CUDA_ARCH__ / 10 of the emulated image (cluster support)
};

inline Machine& m() {
  static Machine machine;
  return machine;
}

inline Fiber& cur() { return m().fibers[m().current]; }

inline void yield() { swapcontext(&cur().ctx, &m().main_ctx); }

inline void wait_at(Barrier& b) {
  const long gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    ++m().progress;
    return;
  }
  cur().waiting = &b;
  cur().wait_gen = gen;
  while (b.generation == gen) yield();
  cur().waiting = nullptr;
}

inline void fiber_entry() {
  m().body();
  cur().done = true;
  ++m().progress;
  swapcontext(&cur().ctx, &m().main_ctx);
}

// Runs `kernel` for every thread of `cl` blocks (one cluster) whose indices
// are blockIdx.x = bx0 .. bx0 + cl - 1, blockIdx.y = by. Aborts on deadlock.
inline void run_cluster(const std::function<void()>& kernel, uint3 grid, unsigned bx0, unsigned by, int cl,
                        int threads, size_t smem_bytes) {
  Machine& M = m();
  (void)grid;
  M.body = kernel;
  M.threads_per_block = threads;
  M.block_dim = uint3{static_cast<unsigned>(threads), 1, 1};
  const int n = threads * cl;
  const int warps = threads / kWarp;
  M.fibers.clear();
  M.fibers.resize(n);
  M.block_bar.assign(cl, Barrier{threads, 0, 0});
  M.warp_bar.assign(cl * warps, Barrier{kWarp, 0, 0});
  M.cluster_bar = Barrier{n, 0, 0};
  M.count_acc.assign(cl, 0);
  M.count_result.assign(cl, 0);
  M.warp_x.assign(cl * warps, WarpExchange{});
  // Shared memory starts as 0xff bytes: NaN for every float, so reading
  // anything before it is written shows up in the results.
  M.smem.assign(cl, std::vector<unsigned char>(smem_bytes + 16, 0xff));
  M.smem_bytes = smem_bytes;
  M.stats = RunStats{};
  M.stats.warp_collectives.assign(warps, 0);
  constexpr size_t kStack = 256 * 1024;
  for (int f = 0; f < n; ++f) {
    Fiber& fb = M.fibers[f];
    fb.stack.reset(new char[kStack]);
    fb.block = f / threads;
    fb.tid = uint3{static_cast<unsigned>(f % threads), 0, 0};
    fb.bid = uint3{bx0 + static_cast<unsigned>(fb.block), by, 0};
    getcontext(&fb.ctx);
    fb.ctx.uc_stack.ss_sp = fb.stack.get();
    fb.ctx.uc_stack.ss_size = kStack;
    fb.ctx.uc_link = nullptr;
    makecontext(&fb.ctx, fiber_entry, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  int idle_rounds = 0;
  while (true) {
    bool all_done = true;
    const long before = M.progress;
    std::shuffle(order.begin(), order.end(), M.rng);
    for (int f : order) {
      const Fiber& fb = M.fibers[f];
      if (fb.done) continue;
      all_done = false;
      if (fb.waiting != nullptr && fb.waiting->generation == fb.wait_gen) continue;
      M.current = f;
      swapcontext(&M.main_ctx, &M.fibers[f].ctx);
    }
    if (all_done) break;
    idle_rounds = M.progress == before ? idle_rounds + 1 : 0;
    if (idle_rounds > 3) {
      std::fprintf(stderr, "emulation: deadlock in cluster at block (%u, %u)\n", bx0, by);
      std::abort();
    }
  }
  M.current = -1;
  M.fibers.clear();
}

inline int lane() { return static_cast<int>(cur().tid.x) % kWarp; }
inline int warp_index() { return cur().block * (m().threads_per_block / kWarp) + static_cast<int>(cur().tid.x) / kWarp; }
inline void warp_sync() { wait_at(m().warp_bar[warp_index()]); }
// One warp-collective step, counted once per warp of block 0.
inline void count_collective() {
  if (cur().block == 0 && lane() == 0) ++m().stats.warp_collectives[cur().tid.x / kWarp];
}
inline WarpExchange& warp_x() { return m().warp_x[warp_index()]; }

}  // namespace emu

// --- the CUDA names the kernels use -------------------------------------------------

#define threadIdx (::emu::cur().tid)
#define blockIdx (::emu::cur().bid)
// blockDim is also a field of cudaLaunchConfig_t (launch.h), so it is an
// object rather than a macro: blockDim.x converts to the running block's size.
namespace emu {
struct BlockDimX {
  operator unsigned() const { return m().block_dim.x; }
};
struct BlockDim {
  BlockDimX x;
};
}  // namespace emu
inline const emu::BlockDim blockDim{};

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

inline void __syncthreads() {
  if (emu::cur().block == 0 && emu::cur().tid.x == 0) ++emu::m().stats.block_barriers;
  emu::wait_at(emu::m().block_bar[emu::cur().block]);
}

inline int __syncthreads_count(int pred) {
  emu::Machine& M = emu::m();
  const int b = emu::cur().block;
  M.count_acc[b] += pred ? 1 : 0;
  emu::Barrier& bar = M.block_bar[b];
  if (b == 0 && emu::cur().tid.x == 0) ++M.stats.block_barriers;
  const long gen = bar.generation;
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    M.count_result[b] = M.count_acc[b];
    M.count_acc[b] = 0;
    ++bar.generation;
    ++M.progress;
  } else {
    emu::cur().waiting = &bar;
    emu::cur().wait_gen = gen;
    while (bar.generation == gen) emu::yield();
    emu::cur().waiting = nullptr;
  }
  return M.count_result[b];
}

inline void __syncwarp(unsigned = 0xffffffffu) {
  emu::count_collective();
  emu::warp_sync();
}

inline unsigned __ballot_sync(unsigned, int pred) {
  emu::count_collective();
  auto& x = emu::warp_x();
  x.i[emu::lane()] = pred ? 1 : 0;
  emu::warp_sync();
  unsigned b = 0;
  for (int l = 0; l < emu::kWarp; ++l) b |= x.i[l] ? (1u << l) : 0u;
  emu::warp_sync();
  return b;
}

inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

template <typename V>
inline V shfl_from(V v, int src) {
  emu::count_collective();
  auto& x = emu::warp_x();
  static_assert(sizeof(V) <= 4);
  uint32_t u = 0;
  std::memcpy(&u, &v, sizeof(V));
  x.u[emu::lane()][0] = u;
  emu::warp_sync();
  const uint32_t got = x.u[src & 31][0];
  emu::warp_sync();
  V out;
  std::memcpy(&out, &got, sizeof(V));
  return out;
}

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int m) { return shfl_from(v, emu::lane() ^ m); }

template <typename V>
inline V __shfl_up_sync(unsigned, V v, unsigned d) {
  const int src = emu::lane() - static_cast<int>(d);
  return shfl_from(v, src < 0 ? emu::lane() : src);
}

inline unsigned __match_any_sync(unsigned, int v) {
  emu::count_collective();
  auto& x = emu::warp_x();
  x.i[emu::lane()] = v;
  emu::warp_sync();
  unsigned b = 0;
  for (int l = 0; l < emu::kWarp; ++l) b |= x.i[l] == v ? (1u << l) : 0u;
  emu::warp_sync();
  return b;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(unsigned v) { return v == 0 ? 32 : __builtin_clz(v); }

namespace emu {

struct GlobalBuffer {
  const unsigned char* begin;
  size_t bytes;
};

// Global buffers the kernels may read (emu_harness.h's Buf registers each);
// an asynchronous copy or an __ldg from anywhere else is an out-of-bounds
// read and aborts the run.
inline std::vector<GlobalBuffer>& buffers() {
  static std::vector<GlobalBuffer> b;
  return b;
}

inline void check_global(const void* p, size_t n, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (const GlobalBuffer& b : buffers())
    if (c >= b.begin && c + n <= b.begin + b.bytes) return;
  std::fprintf(stderr, "emulation: %s of %zu bytes at %p is outside every global buffer\n", what, n, p);
  std::abort();
}

}  // namespace emu

// A read-only global load: inside a registered buffer, and aligned to its
// size (up to 16 bytes) as the device requires of a vector load; a
// misaligned one would fault on a GPU and aborts here.
template <typename V>
inline V __ldg(const V* p) {
  constexpr size_t align = sizeof(V) < 16 ? sizeof(V) : 16;
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    std::fprintf(stderr, "emulation: __ldg of %zu bytes at %p is not %zu-byte aligned\n", sizeof(V),
                 static_cast<const void*>(p), align);
    std::abort();
  }
  emu::check_global(p, sizeof(V), "__ldg");
  return *p;
}

namespace emu {
inline void count_atomic(const void* p) {
  if (cur().block == 0) ++m().stats.atomics[p];
}
}  // namespace emu

// Fibers switch only at barriers, so a read-modify-write is atomic.
inline int atomicAdd(int* p, int v) {
  emu::count_atomic(p);
  const int old = *p;
  *p = old + v;
  return old;
}

inline unsigned atomicMax(unsigned* p, unsigned v) {
  emu::count_atomic(p);
  const unsigned old = *p;
  *p = old > v ? old : v;
  return old;
}

[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "emulation: __trap() in block (%u, %u) thread %u\n", emu::cur().bid.x, emu::cur().bid.y,
               emu::cur().tid.x);
  std::abort();
}

namespace jdlora::cuda {
// The running block's dynamic shared memory (16-byte aligned, NaN bytes at
// the start of each block).
template <typename T>
inline T* dynamic_shared() {
  auto& v = ::emu::m().smem[::emu::cur().block];
  const auto addr = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<T*>(v.data() + ((16 - addr % 16) % 16));
}
}  // namespace jdlora::cuda
