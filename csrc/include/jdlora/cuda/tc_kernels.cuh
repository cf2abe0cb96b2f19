// Tensor-core segmented GEMMs for fp16/bf16: shrink (jd_shrink, lora_shrink),
// expand (jd_expand, lora_expand) and the fused shrink -> core -> expand.
//
// Work decomposition. A block owns a window of M consecutive sorted positions
// (tokens grouped by cluster or adapter) and reads the segment table itself,
// so grids depend only on host-known sizes (graph safe) and no problem-size or
// pointer arrays are needed in device memory. The window's positions split
// into runs, one per segment it touches. Runs partition the window's rows, so
// one accumulator tile serves all of them: step (tile, run) multiplies the
// rows of that run (the others masked to zero in the A fragments) by the
// run's weights and adds the product to those rows only (mma_rows: a zero
// row times an inf weight is NaN, and a run's weights must never reach
// another run's rows). A window with 1 run (a
// prefill cluster) and one with 16 runs of one token (16 distinct adapters,
// the BGMV case) go through the same code, and in the latter the weight tiles
// of successive runs stream through the copy pipeline back to back.
//
// Shrink reduces over d_in; on sm_90 the blocks of a thread-block cluster
// split d_in (split-K) and sum their partial h tiles through distributed
// shared memory, which keeps the sum deterministic and needs no workspace and
// no zeroing pass. Fused uses the same cluster to split d_out afterwards.
//
// Tiles: DecodeTile (M = 16) for small batches, where the time goes into
// reading weights; PrefillTile (M = 64) for large ones, where each weight
// tile is reused by more tokens.
//
// Quantized weight stacks (the QUANT instances) are dequantised on the way
// into the weight tiles (store_dequant8): plain stores in place of the
// asynchronous copies, published by the same pipeline barriers, so the MMA
// loops are those of float stacks.
#pragma once

#include <climits>

#include "jdlora/cuda/common.cuh"
#include "jdlora/cuda/core.cuh"
#include "jdlora/cuda/tc_primitives.cuh"

namespace jdlora::cuda::tc {

template <int M_>
struct Tile {
  static constexpr int M = M_;
  static constexpr int kThreads = 128;
  static constexpr int kWarpsM = M / 16;          // warps along the tokens
  static constexpr int kWarpsN = 4 / kWarpsM;     // warps along the output columns
  static constexpr int kStages = 3;
  static constexpr int kNTile = M == 16 ? 128 : 64;  // y columns per expand step
  static constexpr int kShrinkFrags = 16 / kWarpsN;  // 8-column tiles of h per warp at r = 128
  static constexpr int kExpandFrags = kNTile / 8 / kWarpsN;
};
using DecodeTile = Tile<16>;
using PrefillTile = Tile<64>;

inline constexpr int kMaxRank = 128;

// Per-call settings, all from host-known sizes.
struct TcArgs {
  int cl;      // blocks per cluster: split of d_in (shrink, fused) and of d_out (fused)
  int k_tile;  // d_in elements per shrink step: 64, 128 or 256
  int r_pad;   // r rounded up to 16, the MMA depth of expand
  int span;    // expand: y columns per block, a multiple of kNTile
  int s_vec;   // fused: full S rows allow 16-byte loads
  int k_split; // cl == 1: shares of d_in one block sums in turn as a cluster of k_split would (<= 1: one)
  int share;   // d_in elements per share, a multiple of 16 (<= 0: whole k-tiles, as even as they split)
};

// Dynamic shared memory of the kernels (byte offsets, each 16-byte aligned):
// the copy rings, the h and g tiles, the window plan last. Shrink and expand
// rings alias in the fused kernel: its phases are separated by barriers.
struct SmemLayout {
  size_t x_ring, w_ring, u_ring, y_ring, h_tile, g_tile, plan, total;
};

enum class Kernel : int { kShrink = 0, kExpand = 1, kFused = 2 };

__host__ __device__ inline size_t align16(size_t v) { return (v + 15) & ~static_cast<size_t>(15); }

// Row strides (elements) pad every row by 16 bytes (8 for fp32 tiles: 32
// bytes): fragment reads of 8 rows x 4 lanes then hit 32 distinct banks.
__host__ __device__ inline SmemLayout smem_layout(Kernel kind, int M, int stages, int n_tile, int r,
                                                  int r_pad, int k_tile, int elem, size_t plan_bytes) {
  const size_t xs = k_tile + 8, us = r_pad + 8, ys = n_tile + 8, hs = r_pad + 8;
  SmemLayout L{};
  L.x_ring = 0;
  L.w_ring = align16(stages * M * xs * elem);
  const size_t shrink_ring = L.w_ring + align16(stages * r * xs * elem);
  L.u_ring = 0;
  L.y_ring = align16(stages * n_tile * us * elem);
  const size_t expand_ring = L.y_ring + align16(stages * M * ys * elem);
  size_t ring = expand_ring;
  if (kind == Kernel::kShrink) ring = shrink_ring;
  if (kind == Kernel::kFused) ring = shrink_ring > expand_ring ? shrink_ring : expand_ring;
  const size_t tile = align16(M * hs * sizeof(float));
  L.h_tile = ring;
  L.g_tile = ring + (kind == Kernel::kExpand ? 0 : tile);
  L.plan = L.g_tile + (kind == Kernel::kShrink ? 0 : tile);
  L.total = L.plan + align16(plan_bytes);
  return L;
}

// ---------------------------------------------------------------------------
// The window plan: which token each row holds and which run it belongs to.

template <int M>
struct WindowPlan {
  int tok[M];        // token index of row i (position p0 + i); -1: past the batch or out of range
  int run_of[M];     // run of row i; -1: no adapter, a group id out of range, or no token
  int slot[M];       // adapter slot of row i's token (fused); -1 when out of range
  int run_group[M];  // group (cluster or adapter slot) of each run
  int seg[M];
  int starts[M + 1];
  unsigned run_flags[(M + 31) / 32];
  int num_runs;
};

// Fills `pl` for the window at sorted position p0. Three dependent rounds of
// loads (the tokens and the segment of p0; the next M segment starts and the
// tokens' adapter slots; the group ids) instead of one search per run, so a window of 16 one-token
// adapters costs about as much to plan as a window of one cluster. With a
// valid table active segments are non-empty, so the M starts after p0's
// segment cover the window; a corrupt table gives wrong runs but every index
// stays in range. Block-uniform.
template <int M>
__device__ __forceinline__ void build_plan(const SegmentTable& seg, int p0, WindowPlan<M>& pl,
                                           const int32_t* mapping = nullptr, int num_adapters = 0) {
  const int tid = threadIdx.x;
  const int T = seg.num_tokens;
  const int cap = seg.capacity;
  // The token load does not depend on the search: it is in flight during it.
  int tok = tid < M && p0 + tid < T ? seg.token_indices_sorted[p0 + tid] : -1;
  const int j0 = find_segment(seg, p0);
  if (tid <= M) pl.starts[tid] = j0 + tid <= cap ? seg.seg_start[j0 + tid] : INT_MAX;
  if (tid < M) {
    if (tok < 0 || tok >= T) tok = -1;
    pl.tok[tid] = tok;
    if (mapping != nullptr) {
      int a = tok >= 0 ? mapping[tok] : -1;
      if (a < 0 || a >= num_adapters) a = -1;
      pl.slot[tid] = a;
    }
  }
  __syncthreads();

  int j = -1;
  int group = -1;
  if (tid < M && p0 + tid < T) {
    const int p = p0 + tid;
    int c = 0;
    for (int k = 1; k <= M; ++k) c += pl.starts[k] <= p ? 1 : 0;
    j = j0 + c;
    if (j < cap) {
      group = seg.active_ids[j];
      if (group < 0 || group >= cap) group = -1;
    }
  }
  if (tid < M) pl.seg[tid] = j;
  __syncthreads();

  // A run starts where the segment changes; only runs with a valid group are
  // numbered (the others contribute nothing and are never loaded).
  const bool starts_run = tid < M && group >= 0 && (tid == 0 || pl.seg[tid - 1] != j);
  constexpr int kFlagWords = (M + 31) / 32;
  if (tid < 32 * kFlagWords) {
    const unsigned b = __ballot_sync(kFullMask, starts_run);
    if ((tid & 31) == 0) pl.run_flags[tid >> 5] = b;
  }
  __syncthreads();
  if (tid < M) {
    int upto = 0;  // run starts at rows <= tid
    for (int w = 0; w < (tid >> 5); ++w) upto += __popc(pl.run_flags[w]);
    // (2 << lane) - 1 wraps to all ones for lane 31 (unsigned arithmetic).
    upto += __popc(pl.run_flags[tid >> 5] & ((2u << (tid & 31)) - 1u));
    const int run = group >= 0 ? upto - 1 : -1;
    if (starts_run) pl.run_group[run] = group;
    pl.run_of[tid] = tok >= 0 ? run : -1;
  }
  if (tid == 0) {
    int n = 0;
    for (int w = 0; w < kFlagWords; ++w) n += __popc(pl.run_flags[w]);
    pl.num_runs = n;
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------
// This lane's place in the block tile's m16n8k16 fragments: the warp's column
// slot wn (its row slab is wm), the two tile rows whose A and C elements the
// lane holds (row_a = 16 wm + g, row_b = row_a + 8) with their runs in the plan
// (-1 for padding rows), and the lane's column pair q4.
template <typename Cfg>
struct MmaLane {
  int wn, g, q4, row_a, row_b, run_a, run_b;

  __device__ __forceinline__ explicit MmaLane(const WindowPlan<Cfg::M>& pl) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    wn = warp / Cfg::kWarpsM;
    g = lane >> 2;
    q4 = lane & 3;
    row_a = (warp % Cfg::kWarpsM) * 16 + g;
    row_b = row_a + 8;
    run_a = pl.run_of[row_a];
    run_b = pl.run_of[row_b];
  }
};

// ---------------------------------------------------------------------------
// Shrink phase: h_tile[row, :r] = sum over d_in of x[tok(row)] *
// W[group(run(row))] for every row of the window (0 for rows in no run),
// over shares [first, last) of d_in, each `share` elements wide (the last
// one short or empty). Each share's partial starts from 0 and joins h_tile in
// share order, as a cluster of one block per share sums them (reduce_rows),
// so both give the same bits. All shares go through one copy pipeline: a
// block that sums several shares in turn (batch-invariant mode without
// clusters) never drains it between them. Steps run k-tile major, run minor,
// so the x tile of a k-tile is loaded once and reused by all runs. A row's
// sum takes the same steps in the same order whatever the tile, k_tile or
// the other rows (mma_rows keeps other runs out of it), so only the split of
// d_in into shares changes its rounding.

struct Shares {
  int first, last;  // this block's shares
  int share;        // d_in elements per share
  int d_in;
  __device__ __forceinline__ int begin(int q) const { return min(d_in, q * share); }
  __device__ __forceinline__ int end(int q) const { return min(d_in, begin(q) + share); }
};

template <typename T, typename Cfg, bool QUANT>
__device__ __forceinline__ void shrink_phase(const WindowPlan<Cfg::M>& pl, const T* __restrict__ x,
                                             int64_t ldx, const WeightStack& W, int r, const Shares& sh,
                                             int k_tile, T* x_ring, T* w_ring, float* h_tile, int hs) {
  constexpr int M = Cfg::M;
  constexpr int S = Cfg::kStages;
  constexpr int NF = Cfg::kShrinkFrags;
  const int xs = k_tile + 8;
  const int chunks = k_tile / 8;
  const int nruns = pl.num_runs;
  // Every share but the last non-empty one is full, so k-tile kt of the
  // block is local k-tile kt % kt_share of share first + kt / kt_share.
  const int kt_share = (sh.share + k_tile - 1) / k_tile;
  int ktiles = 0;
  for (int q = sh.first; q < sh.last; ++q) ktiles += (sh.end(q) - sh.begin(q) + k_tile - 1) / k_tile;
  const int nsteps = ktiles * nruns;
  const int tid = threadIdx.x;
  const MmaLane<Cfg> ln(pl);
  const T* w_data = static_cast<const T*>(W.data);

  float acc[NF][4] = {};
  auto for_each_frag = [&](auto&& f) {
#pragma unroll
    for (int i = 0; i < NF; ++i) {
      const int n8 = ln.wn + i * Cfg::kWarpsN;
      if (n8 * 8 < r) f(i, n8 * 8 + 2 * ln.q4);
    }
  };
  // h_tile starts at 0 in this lane's fragment elements (a block whose shares
  // are all empty writes zeros); each lane only ever touches its own.
  for_each_frag([&](int, int col) {
    *reinterpret_cast<float2*>(h_tile + ln.row_a * hs + col) = make_float2(0.f, 0.f);
    *reinterpret_cast<float2*>(h_tile + ln.row_b * hs + col) = make_float2(0.f, 0.f);
  });

  // d_in range [k0, kend) of global k-tile kt.
  auto k_range = [&](int kt, int& k0, int& kend) {
    const int q = sh.first + kt / kt_share;
    k0 = sh.begin(q) + (kt % kt_share) * k_tile;
    kend = sh.end(q);
  };

  auto load = [&](int q) {
    const int kt = q / nruns;
    const int run = q - kt * nruns;
    int k0, kend;
    k_range(kt, k0, kend);
    if (run == 0) {
      T* dst = x_ring + (kt % S) * M * xs;
      for (int idx = tid; idx < M * chunks; idx += Cfg::kThreads) {
        const int row = idx / chunks;
        const int col = k0 + (idx - row * chunks) * 8;
        const bool ok = pl.run_of[row] >= 0 && col < kend;
        cp_async16(dst + row * xs + (col - k0), ok ? x + pl.tok[row] * ldx + col : x, ok);
      }
    }
    T* dst = w_ring + (q % S) * r * xs;
    if (QUANT && W.quant != Quant::kNone) {
      const QuantMatrix<T> wq = quant_matrix<T>(W, pl.run_group[run]);
      for (int idx = tid; idx < r * chunks; idx += Cfg::kThreads) {
        const int row = idx / chunks;
        const int col = k0 + (idx - row * chunks) * 8;
        store_dequant8<T>(dst + row * xs + (col - k0), wq, row, col, col < kend);
      }
      return;
    }
    const T* wg = w_data + pl.run_group[run] * W.stride_n;
    for (int idx = tid; idx < r * chunks; idx += Cfg::kThreads) {
      const int row = idx / chunks;
      const int col = k0 + (idx - row * chunks) * 8;
      const bool ok = col < kend;
      cp_async16(dst + row * xs + (col - k0), ok ? wg + row * W.stride_row + col : w_data, ok);
    }
  };

  auto compute = [&](int q) {
    const int kt = q / nruns;
    const int run = q - kt * nruns;
    const bool on_a = ln.run_a == run;
    const bool on_b = ln.run_b == run;
    if (__any_sync(kFullMask, on_a || on_b)) {
      const T* xb = x_ring + (kt % S) * M * xs;
      const T* wb = w_ring + (q % S) * r * xs;
      for (int kk = 0; kk < k_tile; kk += 16) {
        const int c = kk + 2 * ln.q4;
        uint32_t a[1][4];
        a[0][0] = on_a ? load_pair(xb + ln.row_a * xs + c) : 0u;
        a[0][1] = on_b ? load_pair(xb + ln.row_b * xs + c) : 0u;
        a[0][2] = on_a ? load_pair(xb + ln.row_a * xs + c + 8) : 0u;
        a[0][3] = on_b ? load_pair(xb + ln.row_b * xs + c + 8) : 0u;
        for_each_frag([&](int f, int) {
          const T* wr = wb + ((ln.wn + f * Cfg::kWarpsN) * 8 + ln.g) * xs + c;
          mma_rows<T>(acc[f], a, load_pair(wr), load_pair(wr + 8), on_a, on_b);
        });
      }
    }
    // The last step of a share: its partial joins h (0 + acc first, as the
    // cluster's sum starts in reduce_rows).
    if (run == nruns - 1 && ((kt + 1) % kt_share == 0 || kt + 1 == ktiles)) {
      for_each_frag([&](int f, int col) {
        float2* ha = reinterpret_cast<float2*>(h_tile + ln.row_a * hs + col);
        float2* hb = reinterpret_cast<float2*>(h_tile + ln.row_b * hs + col);
        const float2 pa = *ha, pb = *hb;
        *ha = make_float2(pa.x + acc[f][0], pa.y + acc[f][1]);
        *hb = make_float2(pb.x + acc[f][2], pb.y + acc[f][3]);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[f][e] = 0.f;
      });
    }
  };

  run_pipeline<S>(nsteps, load, compute);
}

// Partial h over this block's share of d_in: share `rank` of a cluster of
// a.cl blocks, or, without a cluster, all a.k_split shares in turn, added in
// share order, so that the sum is bitwise the one a cluster of k_split
// blocks forms in reduce_rows (batch-invariant mode on devices without
// clusters).
template <typename T, typename Cfg, bool QUANT>
__device__ __forceinline__ void shrink_shares(const WindowPlan<Cfg::M>& pl, const Activation& x,
                                              const WeightStack& W, int r, const TcArgs& a, int rank,
                                              T* x_ring, T* w_ring, float* h_tile, int hs) {
  const int d_in = x.cols;
  const int parts = a.cl > 1 ? a.cl : max(a.k_split, 1);
  const int ktiles = (d_in + a.k_tile - 1) / a.k_tile;
  Shares sh;
  sh.share = a.share > 0 ? a.share : (ktiles + parts - 1) / parts * a.k_tile;
  sh.first = a.cl > 1 ? rank : 0;
  sh.last = a.cl > 1 ? rank + 1 : parts;
  sh.d_in = d_in;
  shrink_phase<T, Cfg, QUANT>(pl, static_cast<const T*>(x.data), x.stride_t, W, r, sh, a.k_tile, x_ring, w_ring,
                              h_tile, hs);
}

// ---------------------------------------------------------------------------
// fp16 takes g into the MMA as hi + lo halves (split_pair). Unscaled, a row
// with |g| >= 65520 would give hi = inf and lo = -inf (NaN in y where the
// simple kernels are finite), and |g| below 2^-14 would lose its low bits to
// subnormals. So each row is multiplied by the power of two that brings its
// largest |g| into [2^12, 2^13) before the split, and the row's sums by the
// inverse afterwards; both are exact. bf16 has fp32's exponent range: no
// scaling. The shift comes from the finite values (rows that are all zero or
// all non-finite stay unscaled); infs and NaNs propagate as in the simple
// kernels (split_pair keeps inf - inf out of the low half).
template <typename T>
__device__ __forceinline__ int g_row_shift(const float* row, int r) {
  if constexpr (!std::is_same_v<T, __half>) {
    return 0;
  } else {
    // The largest finite |g|: an inf or NaN stays one after scaling.
    float m = 0.f;
    for (int k = 0; k < r; ++k) {
      const float v = fabsf(row[k]);
      if (v < INFINITY) m = fmaxf(m, v);
    }
    if (!(m > 0.f)) return 0;
    int e = 0;
    frexpf(m, &e);  // m = f * 2^e, f in [0.5, 1)
    return min(max(13 - e, -125), 125);
  }
}

// ---------------------------------------------------------------------------
// Expand phase: y[tok(row), y_col0 + c] += U[group(run(row))][c, :] . g_tile[row]
// for c in [c0, c1) and every row in a run. g_tile is fp32 [M][r_pad + 8]
// with columns r..r_pad zero; it enters the MMA as hi + lo halves. Steps run
// column-tile major, run minor; the y tile of a column tile is loaded with its
// first step, updated in shared memory with its last, and written back with
// 16-byte coalesced stores.

// The copies of the first steps depend only on the plan, not on g: `part`
// kPrologue issues them (the fused kernel does so before its core, so they
// overlap the cluster exchange), kBody runs the rest, kAll both.
enum class Part : int { kPrologue, kBody, kAll };

template <typename T, typename Cfg, bool QUANT>
__device__ __forceinline__ void expand_phase(Part part, const WindowPlan<Cfg::M>& pl, const float* g_tile,
                                             int gs, int r, int r_pad, const WeightStack& U, int c0, int c1,
                                             T* __restrict__ y, int64_t ldy, int64_t y_col0,
                                             T* u_ring, T* y_ring) {
  constexpr int M = Cfg::M;
  constexpr int S = Cfg::kStages;
  constexpr int N = Cfg::kNTile;
  constexpr int NF = Cfg::kExpandFrags;
  constexpr int kYChunks = N / 8;
  const int us = r_pad + 8;
  constexpr int ys = N + 8;
  const int uchunks = r_pad / 8;
  const int nruns = pl.num_runs;
  const int ntiles = c1 > c0 ? (c1 - c0 + N - 1) / N : 0;
  const int nsteps = ntiles * nruns;
  const int tid = threadIdx.x;
  const MmaLane<Cfg> ln(pl);
  const T* u_data = static_cast<const T*>(U.data);

  float acc[NF][4] = {};
  // Per-row scale of g and its inverse (g_row_shift), set at the first step,
  // when g is in shared memory.
  float scale_a = 1.f, scale_b = 1.f, unscale_a = 1.f, unscale_b = 1.f;

  auto load = [&](int q) {
    const int jt = q / nruns;
    const int run = q - jt * nruns;
    const int n0 = c0 + jt * N;
    T* dst = u_ring + (q % S) * N * us;
    if (QUANT && U.quant != Quant::kNone) {
      const QuantMatrix<T> uq = quant_matrix<T>(U, pl.run_group[run]);
      for (int idx = tid; idx < N * uchunks; idx += Cfg::kThreads) {
        const int row = idx / uchunks;
        const int k = (idx - row * uchunks) * 8;
        store_dequant8<T>(dst + row * us + k, uq, n0 + row, k, n0 + row < c1 && k < r);
      }
    } else {
      const T* ug = u_data + pl.run_group[run] * U.stride_n;
      for (int idx = tid; idx < N * uchunks; idx += Cfg::kThreads) {
        const int row = idx / uchunks;
        const int k = (idx - row * uchunks) * 8;
        const bool ok = n0 + row < c1 && k < r;
        cp_async16(dst + row * us + k, ok ? ug + (n0 + row) * U.stride_row + k : u_data, ok);
      }
    }
    if (run == 0) {
      T* ydst = y_ring + (jt % S) * M * ys;
      for (int idx = tid; idx < M * kYChunks; idx += Cfg::kThreads) {
        const int row = idx / kYChunks;
        const int col = (idx - row * kYChunks) * 8;
        const bool ok = pl.run_of[row] >= 0 && n0 + col < c1;
        cp_async16(ydst + row * ys + col, ok ? y + pl.tok[row] * ldy + y_col0 + n0 + col : y, ok);
      }
    }
  };

  auto compute = [&](int q) {
    const int jt = q / nruns;
    const int run = q - jt * nruns;
    const int n0 = c0 + jt * N;
    if (q == 0) {
      const int sa = ln.run_a >= 0 ? g_row_shift<T>(g_tile + ln.row_a * gs, r) : 0;
      const int sb = ln.run_b >= 0 ? g_row_shift<T>(g_tile + ln.row_b * gs, r) : 0;
      scale_a = ldexpf(1.f, sa);
      unscale_a = ldexpf(1.f, -sa);
      scale_b = ldexpf(1.f, sb);
      unscale_b = ldexpf(1.f, -sb);
    }
    if (run == 0) {
#pragma unroll
      for (int f = 0; f < NF; ++f)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[f][e] = 0.f;
    }
    const bool on_a = ln.run_a == run;
    const bool on_b = ln.run_b == run;
    if (__any_sync(kFullMask, on_a || on_b)) {
      const T* ub = u_ring + (q % S) * N * us;
      const float2 zero = make_float2(0.f, 0.f);
      auto scaled = [](float2 v, float s) { return make_float2(v.x * s, v.y * s); };
      for (int kk = 0; kk < r_pad; kk += 16) {
        const int c = kk + 2 * ln.q4;
        const float2 v0 = on_a ? scaled(*reinterpret_cast<const float2*>(g_tile + ln.row_a * gs + c), scale_a) : zero;
        const float2 v1 = on_b ? scaled(*reinterpret_cast<const float2*>(g_tile + ln.row_b * gs + c), scale_b) : zero;
        const float2 v2 =
            on_a ? scaled(*reinterpret_cast<const float2*>(g_tile + ln.row_a * gs + c + 8), scale_a) : zero;
        const float2 v3 =
            on_b ? scaled(*reinterpret_cast<const float2*>(g_tile + ln.row_b * gs + c + 8), scale_b) : zero;
        uint32_t hl[2][4];  // the hi and lo halves of g
        split_pair<T>(v0, hl[0][0], hl[1][0]);
        split_pair<T>(v1, hl[0][1], hl[1][1]);
        split_pair<T>(v2, hl[0][2], hl[1][2]);
        split_pair<T>(v3, hl[0][3], hl[1][3]);
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          const T* ur = ub + ((ln.wn + f * Cfg::kWarpsN) * 8 + ln.g) * us + c;
          mma_rows<T>(acc[f], hl, load_pair(ur), load_pair(ur + 8), on_a, on_b);
        }
      }
    }
    if (run != nruns - 1) return;

    // Last run of the column tile: y + acc, rounded once to T, in place in the
    // staged y tile, then written back coalesced. c1 - n0 is a multiple of 8
    // and col even, so a pair is either inside the slice or wholly past it.
    T* yb = y_ring + (jt % S) * M * ys;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int col = (ln.wn + f * Cfg::kWarpsN) * 8 + 2 * ln.q4;
      if (n0 + col < c1) {
        if (ln.run_a >= 0) {
          uint32_t* p = reinterpret_cast<uint32_t*>(yb + ln.row_a * ys + col);
          const float2 old = unpack_pair<T>(*p);
          *p = pack_pair<T>(old.x + acc[f][0] * unscale_a, old.y + acc[f][1] * unscale_a);
        }
        if (ln.run_b >= 0) {
          uint32_t* p = reinterpret_cast<uint32_t*>(yb + ln.row_b * ys + col);
          const float2 old = unpack_pair<T>(*p);
          *p = pack_pair<T>(old.x + acc[f][2] * unscale_b, old.y + acc[f][3] * unscale_b);
        }
      }
    }
    __syncthreads();
    for (int idx = tid; idx < M * kYChunks; idx += Cfg::kThreads) {
      const int row = idx / kYChunks;
      const int col = (idx - row * kYChunks) * 8;
      if (pl.run_of[row] >= 0 && n0 + col < c1)
        *reinterpret_cast<uint4*>(y + pl.tok[row] * ldy + y_col0 + n0 + col) =
            *reinterpret_cast<const uint4*>(yb + row * ys + col);
    }
  };

  if (part != Part::kBody) pipeline_prologue<S>(nsteps, load);
  if (part != Part::kPrologue) pipeline_body<S>(nsteps, load, compute);
}

// Adds the partial h tiles of all cl blocks of the cluster for rows
// [row0, row0 + rows) and leaves the sums in this block's h tile (rows of a
// block's share are read only by that block, so writing in place is safe).
__device__ __forceinline__ void reduce_rows(float* h_tile, int hs, int r, int row0, int rows, int cl) {
  for (int idx = threadIdx.x; idx < rows * r; idx += blockDim.x) {
    const int off = (row0 + idx / r) * hs + idx % r;
    float sum = 0.f;
    for (int q = 0; q < cl; ++q) sum += cluster_peer(h_tile, q, cl)[off];
    h_tile[off] = sum;
  }
}

// Which slice and which block-column span blockIdx.y covers, spans numbered
// slice after slice (at most kMaxSlices steps).
__device__ __forceinline__ int slice_of_span(const StackList& l, int span, int& index) {
  int s = 0;
  index = static_cast<int>(blockIdx.y);
  while (s + 1 < l.num_slices) {
    const int n = (l.stack[s].rows + span - 1) / span;
    if (index < n) break;
    index -= n;
    ++s;
  }
  return s;
}

// ---------------------------------------------------------------------------
// Kernels. Grid x: window * cl + rank (clusters along x); grid y: slice (or
// slice and column span for expand).

template <typename T, typename Cfg, bool QUANT>
__global__ void __launch_bounds__(Cfg::kThreads)
    tc_shrink_kernel(const __grid_constant__ ShrinkParams p, const TcArgs a) {
  constexpr int M = Cfg::M;
  unsigned char* smem = smem_base();

  const int cl = a.cl;
  const int rank = static_cast<int>(blockIdx.x) % cl;
  const int s = static_cast<int>(blockIdx.y);
  const int r = p.h.r;
  const int hs = a.r_pad + 8;
  const SmemLayout L =
      smem_layout(Kernel::kShrink, M, Cfg::kStages, Cfg::kNTile, r, a.r_pad, a.k_tile, sizeof(T),
                  sizeof(WindowPlan<M>));
  WindowPlan<M>& pl = *reinterpret_cast<WindowPlan<M>*>(smem + L.plan);
  float* h_tile = reinterpret_cast<float*>(smem + L.h_tile);

  build_plan<M>(p.seg, static_cast<int>(blockIdx.x) / cl * M, pl);

  shrink_shares<T, Cfg, QUANT>(pl, p.x, p.weights.stack[s], r, a, rank, reinterpret_cast<T*>(smem + L.x_ring),
                               reinterpret_cast<T*>(smem + L.w_ring), h_tile, hs);
  cluster_barrier(cl);

  // Each block sums and writes its share of the rows; rows without a run
  // (no adapter) are written as zeros.
  const int rows = M / cl;
  const int row0 = rank * rows;
  reduce_rows(h_tile, hs, r, row0, rows, cl);
  __syncthreads();
  float* h = p.h.data + s * p.h.stride_s;
  for (int idx = threadIdx.x; idx < rows * r; idx += blockDim.x) {
    const int row = row0 + idx / r;
    const int col = idx % r;
    const int tok = pl.tok[row];
    if (tok < 0) continue;
    const int run = pl.run_of[row];
    float scale = 1.f;
    if (p.scales.data != nullptr && run >= 0)
      scale = p.scales.data[s * p.scales.stride_s + pl.run_group[run] * p.scales.stride_a];
    h[tok * p.h.stride_t + col] = h_tile[row * hs + col] * scale;
  }
  // No block may leave while another still reads its h tile.
  cluster_barrier(cl);
}

template <typename T, typename Cfg, bool QUANT>
__global__ void __launch_bounds__(Cfg::kThreads)
    tc_expand_kernel(const __grid_constant__ ExpandParams p, const TcArgs a) {
  constexpr int M = Cfg::M;
  unsigned char* smem = smem_base();

  int span_index = 0;
  const int s = slice_of_span(p.weights, a.span, span_index);
  const WeightStack& U = p.weights.stack[s];
  const int c0 = span_index * a.span;
  const int c1 = min(U.rows, c0 + a.span);
  const int r = p.g.r;
  const int gs = a.r_pad + 8;
  const SmemLayout L =
      smem_layout(Kernel::kExpand, M, Cfg::kStages, Cfg::kNTile, r, a.r_pad, a.k_tile, sizeof(T),
                  sizeof(WindowPlan<M>));
  WindowPlan<M>& pl = *reinterpret_cast<WindowPlan<M>*>(smem + L.plan);
  float* g_tile = reinterpret_cast<float*>(smem + L.g_tile);

  build_plan<M>(p.seg, static_cast<int>(blockIdx.x) * M, pl);
  if (pl.num_runs == 0 || c0 >= c1) return;

  // g rows of the window's tokens, fp32, columns past r zero-filled; they
  // join the pipeline's first commit group.
  const float* gsrc = p.g.data + s * p.g.stride_s;
  const int gchunks = a.r_pad / 4;
  for (int idx = threadIdx.x; idx < M * gchunks; idx += blockDim.x) {
    const int row = idx / gchunks;
    const int k = (idx - row * gchunks) * 4;
    const bool ok = pl.run_of[row] >= 0 && k < r;
    cp_async16(g_tile + row * gs + k, ok ? gsrc + pl.tok[row] * p.g.stride_t + k : gsrc, ok);
  }
  expand_phase<T, Cfg, QUANT>(Part::kAll, pl, g_tile, gs, r, a.r_pad, U, c0, c1, static_cast<T*>(p.y.data),
                              p.y.stride_t, p.weights.col_offset[s], reinterpret_cast<T*>(smem + L.u_ring),
                              reinterpret_cast<T*>(smem + L.y_ring));
}

// Starts moving the S rows that fused_core reads for rows [row0, row0 + rows)
// towards L1, one request per 128-byte line; nothing waits for them.
template <typename T, int M>
__device__ __forceinline__ void prefetch_core_rows(const WindowPlan<M>& pl, const WeightStack& S, bool diagonal,
                                                   int r, int row0, int rows) {
  const int s_rows = diagonal ? 1 : r;  // rows of S per adapter
  const int per_line = static_cast<int>(128 / sizeof(T));
  const int lines = (r + per_line - 1) / per_line;  // lines per S row
  const int per_token = s_rows * lines;
  for (int idx = threadIdx.x; idx < rows * per_token; idx += blockDim.x) {
    const int row = row0 + idx / per_token;
    const int rest = idx % per_token;
    const int slot = pl.slot[row];
    if (slot < 0 || pl.run_of[row] < 0) continue;
    const T* line = static_cast<const T*>(S.data) + slot * S.stride_n + (rest / lines) * S.stride_row +
                    (rest % lines) * per_line;
    prefetch_l1(line);
  }
}

// Core of the fused kernel for rows [row0, row0 + rows): g = S_a h (full) or
// sigma_a * h (diagonal) in fp32, from the reduced h rows; columns r..r_pad
// and rows without a run or a valid slot become 0 (they add nothing).
template <typename T, typename Cfg>
__device__ __forceinline__ void fused_core(const WindowPlan<Cfg::M>& pl, const WeightStack& S, bool diagonal,
                                           bool s_vec, const float* h_tile, float* g_tile, int hs, int r,
                                           int r_pad, int row0, int rows) {
  for (int idx = threadIdx.x; idx < rows * r_pad; idx += blockDim.x) {
    const int row = row0 + idx / r_pad;
    const int col = idx % r_pad;
    const int slot = pl.slot[row];
    float v = 0.f;
    if (col < r && pl.run_of[row] >= 0 && slot >= 0) {
      const T* sa = static_cast<const T*>(S.data) + slot * S.stride_n;
      const float* hrow = h_tile + row * hs;
      if (diagonal) {
        v = to_float(sa[col]) * hrow[col];
      } else if (s_vec) {
        v = core_row<T, kVec16<T>>(sa + col * S.stride_row, hrow, r);
      } else {
        const T* srow = sa + col * S.stride_row;
        for (int k = 0; k < r; ++k) v = fmaf(to_float(srow[k]), hrow[k], v);
      }
    }
    g_tile[row * hs + col] = v;
  }
}

template <typename T, typename Cfg, bool QUANT>
__global__ void __launch_bounds__(Cfg::kThreads)
    tc_fused_kernel(const __grid_constant__ FusedParams p, const TcArgs a) {
  constexpr int M = Cfg::M;
  unsigned char* smem = smem_base();

  const int cl = a.cl;
  const int rank = static_cast<int>(blockIdx.x) % cl;
  const int s = static_cast<int>(blockIdx.y);
  const int r = p.r;
  const int hs = a.r_pad + 8;
  const SmemLayout L =
      smem_layout(Kernel::kFused, M, Cfg::kStages, Cfg::kNTile, r, a.r_pad, a.k_tile, sizeof(T),
                  sizeof(WindowPlan<M>));
  WindowPlan<M>& pl = *reinterpret_cast<WindowPlan<M>*>(smem + L.plan);
  float* h_tile = reinterpret_cast<float*>(smem + L.h_tile);
  float* g_tile = reinterpret_cast<float*>(smem + L.g_tile);

  build_plan<M>(p.seg, static_cast<int>(blockIdx.x) / cl * M, pl, p.token_lora_mapping, p.num_adapters);

  // 1. Partial h over this block's share of d_in.
  shrink_shares<T, Cfg, QUANT>(pl, p.x, p.shrink.stack[s], r, a, rank, reinterpret_cast<T*>(smem + L.x_ring),
                               reinterpret_cast<T*>(smem + L.w_ring), h_tile, hs);

  // This block's share of the slice's columns. Its first weight and y tiles
  // and the core's S rows do not depend on h: start fetching them now, so
  // they arrive while the cluster exchanges partial sums.
  const WeightStack& U = p.expand.stack[s];
  const int cshare = ((U.rows + cl - 1) / cl + Cfg::kNTile - 1) / Cfg::kNTile * Cfg::kNTile;
  const int c0 = min(U.rows, rank * cshare);
  const int c1 = min(U.rows, c0 + cshare);
  T* y = static_cast<T*>(p.y.data);
  T* u_ring = reinterpret_cast<T*>(smem + L.u_ring);
  T* y_ring = reinterpret_cast<T*>(smem + L.y_ring);
  expand_phase<T, Cfg, QUANT>(Part::kPrologue, pl, g_tile, hs, r, a.r_pad, U, c0, c1, y, p.y.stride_t,
                              p.expand.col_offset[s], u_ring, y_ring);
  const int rows = M / cl;
  const int row0 = rank * rows;
  prefetch_core_rows<T>(pl, p.core.stack[s], p.core.diagonal[s], r, row0, rows);
  cluster_barrier(cl);

  // 2. Sum the partials of this block's rows, apply the core to them.
  reduce_rows(h_tile, hs, r, row0, rows, cl);
  __syncthreads();
  fused_core<T, Cfg>(pl, p.core.stack[s], p.core.diagonal[s], a.s_vec != 0, h_tile, g_tile, hs, r,
                     a.r_pad, row0, rows);
  cluster_barrier(cl);

  // 3. Every block needs all of g: copy the other blocks' rows.
  if (cl > 1) {
    const int vecs = a.r_pad / 4;
    for (int idx = threadIdx.x; idx < M * vecs; idx += blockDim.x) {
      const int row = idx / vecs;
      const int owner = row / rows;
      if (owner == rank) continue;
      const int off = row * hs + (idx - row * vecs) * 4;
      *reinterpret_cast<float4*>(g_tile + off) =
          *reinterpret_cast<const float4*>(cluster_peer(g_tile, owner, cl) + off);
    }
    __syncthreads();
  }

  // 4. y += U g over this block's columns.
  expand_phase<T, Cfg, QUANT>(Part::kBody, pl, g_tile, hs, r, a.r_pad, U, c0, c1, y, p.y.stride_t,
                              p.expand.col_offset[s], u_ring, y_ring);
  // No block may leave while another still reads its h or g tile.
  cluster_barrier(cl);
}

}  // namespace jdlora::cuda::tc
