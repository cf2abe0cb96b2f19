// Launchers of the tensor-core kernels: check that a call qualifies, pick the
// tile, the cluster size and the shrink step from host-known sizes, launch.
// See jdlora/cuda/tc_launchers.h for the dispatch rules.
#include <cstdint>
#include <type_traits>
#include <vector>

#include "jdlora/cuda/launch.h"
#include "jdlora/cuda/tc_kernels.cuh"
#include "jdlora/cuda/tc_launchers.h"
#include "jdlora/mode.h"

namespace jdlora::cuda {
namespace {

using tc::DecodeTile;
using tc::Kernel;
using tc::PrefillTile;
using tc::SmemLayout;
using tc::TcArgs;

// Bytes of one shrink stage (x tile + weight tile) to aim for: three stages
// then keep about 50-70 KB in flight per block, and two blocks fit on an SM.
constexpr int kShrinkStageBytes = 24 * 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int round_up(int v, int m) { return (v + m - 1) / m * m; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte accesses of 2-byte elements: 8 elements per vector.
bool rank_ok(int r) { return r >= 8 && r <= tc::kMaxRank && r % 8 == 0; }

bool activation_ok(const Activation& a) { return aligned16(a.data) && a.stride_t % 8 == 0 && a.cols % 8 == 0; }

bool stack_ok(const WeightStack& w) {
  return aligned16(w.data) && w.stride_n % 8 == 0 && w.stride_row % 8 == 0 && w.cols % 8 == 0;
}

// A quantized stack's tiles are dequantised into shared memory 8 values at a
// time (store_dequant8): their packed bytes (8 for int8, 4 for int4) must be
// aligned for one load and share one scale group. Like the other conditions
// it depends on the stacks alone, never on the batch.
bool quant_stack_ok(const WeightStack& w) {
  const int bytes = w.quant == Quant::kInt4 ? 4 : 8;
  return reinterpret_cast<uintptr_t>(w.data) % bytes == 0 && w.stride_n % bytes == 0 && w.stride_row % bytes == 0 &&
         w.cols % 8 == 0 && w.scales.group % 8 == 0;
}

bool stacks_ok(const StackList& l, bool rows_by_8) {
  for (int s = 0; s < l.num_slices; ++s) {
    const WeightStack& w = l.stack[s];
    if (!(w.quant == Quant::kNone ? stack_ok(w) : quant_stack_ok(w))) return false;
    if (rows_by_8 && w.rows % 8 != 0) return false;
  }
  return true;
}

bool any_quantized(const StackList& l) {
  for (int s = 0; s < l.num_slices; ++s)
    if (l.stack[s].quant != Quant::kNone) return true;
  return false;
}

// y columns written by 16-byte vectors: every slice starts on a vector.
bool y_ok(const Activation& y, const StackList& l) {
  if (!aligned16(y.data) || y.stride_t % 8 != 0) return false;
  for (int s = 0; s < l.num_slices; ++s)
    if (l.col_offset[s] % 8 != 0) return false;
  return true;
}

bool intermediate_ok(const Intermediate& g) {
  return aligned16(g.data) && g.stride_s % 4 == 0 && g.stride_t % 4 == 0;
}

bool full_cores_vectorizable(const StackList& l) {
  for (int s = 0; s < l.num_slices; ++s)
    if (!l.diagonal[s] && !stack_ok(l.stack[s])) return false;
  return true;
}

// fp16/bf16 and the tile by batch size; f(type tag, tile) returns whether it
// launched. A prefill tile that cannot launch (its shared memory) tries the
// decode tile before the simple kernels: the tiles round alike (see
// shrink_phase), so a batch's size never decides between the tensor-core
// and the simple kernels' rounding.
template <typename F>
bool dispatch(DType dtype, int num_tokens, F&& f) {
  auto by_tile = [&](auto tag) {
    if (num_tokens >= kPrefillMinTokens && f(tag, PrefillTile{})) return true;
    return f(tag, DecodeTile{});
  };
  switch (dtype) {
    case DType::kFloat16: return by_tile(std::type_identity<__half>{});
    case DType::kBFloat16: return by_tile(std::type_identity<__nv_bfloat16>{});
    default: return false;
  }
}

// Cluster size: the smallest power of two that puts about two blocks on every
// multiprocessor, at most 8 (the portable limit), at most one 64-wide step of
// d_in per block. 1 where the device or the kernel's image lacks clusters.
int pick_cluster(const DeviceInfo& dev, const KernelInfo& k, int64_t blocks, int d_in) {
  if (!clusters_available(dev, k)) return 1;
  const int max_split = static_cast<int>(ceil_div(d_in, 64));
  int cl = 1;
  while (cl < 8 && cl * 2 <= max_split && blocks * cl < 2 * static_cast<int64_t>(dev.sms)) cl *= 2;
  return cl;
}

// Batch-invariant mode's split of d_in: the largest pick_cluster can choose
// for this d_in (the one it picks for small batches), whatever the batch and
// the device. Where clusters run it is the cluster; elsewhere one block sums
// the shares in turn (shrink_shares), which rounds the same way. Tile,
// k_tile and expand's column span still follow the batch: they change which
// rows share a block, not the order of any row's sums.
int invariant_split(int d_in) {
  const int max_split = static_cast<int>(ceil_div(d_in, 64));
  int n = 1;
  while (n < 8 && n * 2 <= max_split) n *= 2;
  return n;
}

// d_in step of shrink: as wide as the stage budget allows (fewer, larger
// copies per block), no wider than twice the block's share of d_in.
template <typename Cfg>
int pick_k_tile(int r, int elem, int k_share) {
  int k = 256;
  while (k > 64 && ((Cfg::M + r) * (k + 8) * elem > kShrinkStageBytes || k / 2 >= k_share)) k /= 2;
  return k;
}

// Launches `kernel` (kind k, tile config Cfg) when its shared memory, static
// and dynamic, fits the device and the launch succeeds; false (nothing
// launched, no error pending) sends the op to the simple kernels.
template <typename T, typename Cfg, typename Params, typename Kern>
bool launch_if_fits(Kern kernel, const KernelInfo& info, Kernel k, dim3 grid, int r, cudaStream_t stream,
                    const Params& p, const TcArgs& a) {
  const SmemLayout L = tc::smem_layout(k, Cfg::M, Cfg::kStages, Cfg::kNTile, r, a.r_pad, a.k_tile, sizeof(T),
                                       sizeof(tc::WindowPlan<Cfg::M>));
  if (!info.ok || info.arch < 80 || L.total > max_dynamic_shared(device_info(), info)) return false;
  LaunchShape s;
  s.grid = grid;
  s.block = dim3(Cfg::kThreads);
  s.dynamic_smem = L.total;
  s.cluster = a.cl;
  return launch_kernel(kernel, info, s, stream, p, a) == cudaSuccess;
}

// Arguments of the kernels that split d_in over a cluster (shrink, fused).
template <typename T, typename Cfg>
TcArgs split_k_args(const DeviceInfo& dev, const KernelInfo& k, int64_t blocks, int r, int d_in) {
  TcArgs a{};
  int split = 1;
  if (batch_invariant()) {
    split = invariant_split(d_in);
    a.cl = clusters_available(dev, k) ? split : 1;
    a.k_split = a.cl > 1 ? 1 : split;
    // Share bounds in 64-element units, not k-tiles: k_tile follows the tile
    // (and so the batch size), the bounds must not.
    a.share = static_cast<int>(ceil_div(ceil_div(d_in, 64), split)) * 64;
  } else {
    split = a.cl = pick_cluster(dev, k, blocks, d_in);
    a.k_split = 1;
  }
  a.k_tile = pick_k_tile<Cfg>(r, sizeof(T), static_cast<int>(ceil_div(d_in, split)));
  a.r_pad = round_up(r, 16);
  return a;
}

}  // namespace

bool tc_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream) {
  const int r = p.h.r;
  if (!rank_ok(r) || !activation_ok(p.x) || !stacks_ok(p.weights, false)) return false;
  const DeviceInfo& dev = device_info();
  if (dev.major < 8) return false;
  const bool quant = any_quantized(p.weights);
  return dispatch(dtype, p.seg.num_tokens, [&](auto tag, auto cfg) {
    using T = typename decltype(tag)::type;
    using Cfg = decltype(cfg);
    const auto kernel = quant ? tc::tc_shrink_kernel<T, Cfg, true> : tc::tc_shrink_kernel<T, Cfg, false>;
    const KernelInfo info = kernel_info(reinterpret_cast<const void*>(kernel));
    const int64_t windows = ceil_div(p.seg.num_tokens, Cfg::M);
    const int S = p.weights.num_slices;
    const TcArgs a = split_k_args<T, Cfg>(dev, info, windows * S, r, p.x.cols);
    const dim3 grid(static_cast<unsigned>(windows * a.cl), static_cast<unsigned>(S));
    return launch_if_fits<T, Cfg>(kernel, info, Kernel::kShrink, grid, r, stream, p, a);
  });
}

bool tc_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream) {
  const int r = p.g.r;
  if (!rank_ok(r) || !intermediate_ok(p.g) || !stacks_ok(p.weights, true) || !y_ok(p.y, p.weights))
    return false;
  const DeviceInfo& dev = device_info();
  if (dev.major < 8) return false;
  const bool quant = any_quantized(p.weights);
  return dispatch(dtype, p.seg.num_tokens, [&](auto tag, auto cfg) {
    using T = typename decltype(tag)::type;
    using Cfg = decltype(cfg);
    const int64_t windows = ceil_div(p.seg.num_tokens, Cfg::M);
    int64_t col_tiles = 0;
    for (int s = 0; s < p.weights.num_slices; ++s) col_tiles += ceil_div(p.weights.stack[s].rows, Cfg::kNTile);
    if (col_tiles == 0) return true;  // nothing to add
    // Several column tiles per block once the grid has about four blocks per
    // SM: the window plan is then built once for all of them and their copies
    // pipeline; at most 8 so that small batches keep their parallelism.
    int64_t per_block = windows * col_tiles / (4 * static_cast<int64_t>(dev.sms > 0 ? dev.sms : 1));
    per_block = per_block < 1 ? 1 : (per_block > 8 ? 8 : per_block);
    TcArgs a{};
    a.cl = 1;
    a.k_tile = 64;
    a.r_pad = round_up(r, 16);
    a.span = Cfg::kNTile * static_cast<int>(per_block);
    int64_t spans = 0;
    for (int s = 0; s < p.weights.num_slices; ++s) spans += ceil_div(p.weights.stack[s].rows, a.span);
    const dim3 grid(static_cast<unsigned>(windows), static_cast<unsigned>(spans));
    const auto kernel = quant ? tc::tc_expand_kernel<T, Cfg, true> : tc::tc_expand_kernel<T, Cfg, false>;
    return launch_if_fits<T, Cfg>(kernel, kernel_info(reinterpret_cast<const void*>(kernel)), Kernel::kExpand, grid,
                                  r, stream, p, a);
  });
}

bool tc_fused_cuda(const FusedParams& p, DType dtype, cudaStream_t stream) {
  const int r = p.r;
  if (!rank_ok(r) || !activation_ok(p.x) || !stacks_ok(p.shrink, false) || !stacks_ok(p.expand, true) ||
      !y_ok(p.y, p.expand))
    return false;
  const DeviceInfo& dev = device_info();
  if (dev.major < 8) return false;
  const bool quant = any_quantized(p.shrink) || any_quantized(p.expand);
  return dispatch(dtype, p.seg.num_tokens, [&](auto tag, auto cfg) {
    using T = typename decltype(tag)::type;
    using Cfg = decltype(cfg);
    const auto kernel = quant ? tc::tc_fused_kernel<T, Cfg, true> : tc::tc_fused_kernel<T, Cfg, false>;
    const KernelInfo info = kernel_info(reinterpret_cast<const void*>(kernel));
    const int64_t windows = ceil_div(p.seg.num_tokens, Cfg::M);
    const int S = p.shrink.num_slices;
    TcArgs a = split_k_args<T, Cfg>(dev, info, windows * S, r, p.x.cols);
    a.s_vec = full_cores_vectorizable(p.core) ? 1 : 0;
    const dim3 grid(static_cast<unsigned>(windows * a.cl), static_cast<unsigned>(S));
    return launch_if_fits<T, Cfg>(kernel, info, Kernel::kFused, grid, r, stream, p, a);
  });
}

}  // namespace jdlora::cuda
