// Launchers of the CUDA kernels: the tensor-core path where a call qualifies
// (tc_kernels.cu), else the simple kernels of this file, which pick the
// element type and the vector width, size the grid from host-known values and
// enqueue. See jdlora/cuda/launchers.h and jdlora/cuda/tc_launchers.h.
//
// JDLORA_CUDA_SIMPLE=1 in the environment when the library loads routes every
// call to the simple kernels: a second, independent implementation to compare
// against when a fast kernel is in doubt.
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "jdlora/cuda/batch_meta.cuh"
#include "jdlora/cuda/core.cuh"
#include "jdlora/cuda/expand.cuh"
#include "jdlora/cuda/fused.cuh"
#include "jdlora/cuda/launch.h"
#include "jdlora/cuda/launchers.h"
#include "jdlora/cuda/shrink.cuh"
#include "jdlora/cuda/tc_launchers.h"

namespace jdlora::cuda {
namespace {

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

// Read once, when the library is loaded.
const bool kSimpleOnly = env_flag("JDLORA_CUDA_SIMPLE");

// Enough blocks for about two per SM on the largest current GPUs; below that,
// token tiles shrink to add blocks.
constexpr int64_t kTargetBlocks = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(std::type_identity<float>{}); break;
    case DType::kFloat16: f(std::type_identity<__half>{}); break;
    case DType::kBFloat16: f(std::type_identity<__nv_bfloat16>{}); break;
  }
}

// 16-byte loads need 16-byte aligned rows: aligned base and every stride and
// width a multiple of the vector. Otherwise (e.g. d_in = 111) one element per
// load. A quantized stack reads a vector of values as its packed bytes (vec
// for int8, vec / 2 for int4) in one load of that size, with one scale: see
// rows_vectorizable.
template <typename T, typename F>
void with_vec(bool vectorize, F&& f) {
  if (vectorize) {
    f(std::integral_constant<int, kVec16<T>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool rows_vectorizable(const WeightStack& w, int vec) {
  if (w.quant == Quant::kNone)
    return aligned16(w.data) && w.stride_n % vec == 0 && w.stride_row % vec == 0 && w.cols % vec == 0;
  // Vectors start at multiples of vec values: their bytes are aligned when the
  // base and the strides (in bytes) are, and they never straddle a scale group
  // (nor pass the row's end) when vec divides the group.
  const int bytes = w.quant == Quant::kInt4 ? vec / 2 : vec;
  return bytes > 0 && reinterpret_cast<uintptr_t>(w.data) % bytes == 0 && w.stride_n % bytes == 0 &&
         w.stride_row % bytes == 0 && w.cols % vec == 0 && w.scales.group % vec == 0;
}

bool rows_vectorizable(const Activation& a, int vec) {
  return aligned16(a.data) && a.stride_t % vec == 0 && a.cols % vec == 0;
}

bool any_quantized(const StackList& l) {
  for (int s = 0; s < l.num_slices; ++s)
    if (l.stack[s].quant != Quant::kNone) return true;
  return false;
}

// f(QUANT): the kernels with the dequantising reader only where a stack needs it.
template <typename F>
void with_quant(bool quantized, F&& f) {
  if (quantized) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Full (r x r) stacks only when skip_diagonal: a sigma vector is read by element.
bool stacks_vectorizable(const StackList& l, int vec, bool skip_diagonal = false) {
  for (int s = 0; s < l.num_slices; ++s) {
    if (skip_diagonal && l.diagonal[s]) continue;
    if (!rows_vectorizable(l.stack[s], vec)) return false;
  }
  return true;
}

// Tokens per block: kMaxTileTokens reuses each weight element the most; small
// batches take smaller tiles so that the grid still fills the GPU.
int tile_tokens(int num_tokens, int64_t blocks_per_tile) {
  int tile = kMaxTileTokens;
  while (tile > 1 && ceil_div(num_tokens, tile) * blocks_per_tile < kTargetBlocks) tile /= 2;
  return tile;
}

LaunchShape shape(int64_t grid_x, int64_t grid_y, int threads, size_t smem = 0) {
  LaunchShape s;
  s.grid = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  s.block = dim3(static_cast<unsigned>(threads));
  s.dynamic_smem = smem;
  return s;
}

cudaError_t shrink(const ShrinkParams& p, DType dtype, cudaStream_t stream) {
  const int row_tiles = static_cast<int>(ceil_div(p.h.r, kShrinkRowsPerBlock));
  const int64_t slices_rows = static_cast<int64_t>(p.weights.num_slices) * row_tiles;
  if (slices_rows == 0) return cudaSuccess;
  const int tile = tile_tokens(p.seg.num_tokens, slices_rows);
  const LaunchShape s = shape(ceil_div(p.seg.num_tokens, tile), slices_rows, kShrinkThreads);
  cudaError_t err = cudaSuccess;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int vec = kVec16<T>;
    const bool v = rows_vectorizable(p.x, vec) && stacks_vectorizable(p.weights, vec);
    with_vec<T>(v, [&](auto V) {
      with_quant(any_quantized(p.weights), [&](auto Q) {
        err = launch_kernel(shrink_kernel<T, decltype(V)::value, decltype(Q)::value>, s, stream, p, tile,
                            row_tiles);
      });
    });
  });
  return err;
}

cudaError_t expand(const ExpandParams& p, DType dtype, cudaStream_t stream) {
  int64_t col_tiles = 0;
  for (int s = 0; s < p.weights.num_slices; ++s) col_tiles += ceil_div(p.weights.stack[s].rows, kExpandCols);
  if (col_tiles == 0) return cudaSuccess;
  const int tile = tile_tokens(p.seg.num_tokens, col_tiles);
  const LaunchShape s = shape(ceil_div(p.seg.num_tokens, tile), col_tiles, kExpandThreads,
                              simple_expand_shared_bytes(p.g.r));
  cudaError_t err = cudaSuccess;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int vec = kVec16<T>;
    with_vec<T>(stacks_vectorizable(p.weights, vec), [&](auto V) {
      with_quant(any_quantized(p.weights), [&](auto Q) {
        err = launch_kernel(expand_kernel<T, decltype(V)::value, decltype(Q)::value>, s, stream, p, tile);
      });
    });
  });
  return err;
}

}  // namespace

size_t simple_expand_shared_bytes(int r) { return sizeof(float) * kMaxTileTokens * static_cast<size_t>(r); }

size_t simple_fused_shared_bytes(int r) { return sizeof(float) * 2 * kMaxTileTokens * static_cast<size_t>(r); }

namespace {
KernelInfo batch_meta_kernel_info() { return kernel_info(reinterpret_cast<const void*>(build_batch_meta_kernel)); }

// The block-wide placement where its table fits the device, else the
// one-warp walk: decided by A, C and the device, never by the batch.
bool batch_meta_parallel(const BatchMetaParams& p, const KernelInfo& k) {
  return batch_meta_smem_bytes(p.num_adapters, p.num_clusters, true) <= max_dynamic_shared(device_info(), k);
}
}  // namespace

size_t build_batch_meta_shared_limit() { return max_dynamic_shared(device_info(), batch_meta_kernel_info()); }

size_t build_batch_meta_shared_bytes(const BatchMetaParams& p) {
  return batch_meta_smem_bytes(p.num_adapters, p.num_clusters, batch_meta_parallel(p, batch_meta_kernel_info()));
}

cudaError_t build_batch_meta_cuda(const BatchMetaParams& p, cudaStream_t stream) {
  const KernelInfo k = batch_meta_kernel_info();
  const bool parallel = batch_meta_parallel(p, k);
  const size_t smem = batch_meta_smem_bytes(p.num_adapters, p.num_clusters, parallel);
  return launch_kernel(build_batch_meta_kernel, k, shape(1, 1, kMetaThreads, smem), stream, p, parallel);
}

cudaError_t jd_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream) {
  if (!kSimpleOnly && tc_shrink_cuda(p, dtype, stream)) return cudaSuccess;
  return shrink(p, dtype, stream);
}

// lora_shrink_params differs from jd_shrink_params only in what indexes the
// stacks (adapter slots, not clusters) and in the per-slot scales, both
// carried by ShrinkParams: the same kernels serve both.
cudaError_t lora_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream) {
  return jd_shrink_cuda(p, dtype, stream);
}

cudaError_t jd_core_cuda(const CoreParams& p, DType dtype, cudaStream_t stream) {
  const int r = p.h.r;
  // Lanes per (slice, token): about r, so that small ranks do not idle most
  // of a warp.
  int lanes = 32;
  while (lanes > 1 && lanes / 2 >= r) lanes /= 2;
  const int items_per_block = kCoreThreads / lanes;
  const int64_t items = static_cast<int64_t>(p.weights.num_slices) * p.num_tokens;
  const LaunchShape s = shape(ceil_div(items, items_per_block), 1, kCoreThreads,
                              sizeof(float) * items_per_block * (static_cast<size_t>(r) + 1));
  cudaError_t err = cudaSuccess;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int vec = kVec16<T>;
    with_vec<T>(stacks_vectorizable(p.weights, vec, /*skip_diagonal=*/true), [&](auto V) {
      err = launch_kernel(core_kernel<T, decltype(V)::value>, s, stream, p, lanes);
    });
  });
  return err;
}

cudaError_t jd_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream) {
  if (!kSimpleOnly && tc_expand_cuda(p, dtype, stream)) return cudaSuccess;
  return expand(p, dtype, stream);
}

// As for shrink: ExpandParams carries what tells lora_expand from jd_expand.
cudaError_t lora_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream) {
  return jd_expand_cuda(p, dtype, stream);
}

cudaError_t jd_fused_cuda(const FusedParams& p, DType dtype, cudaStream_t stream) {
  if (!kSimpleOnly && tc_fused_cuda(p, dtype, stream)) return cudaSuccess;
  const int S = p.shrink.num_slices;
  const int tile = tile_tokens(p.seg.num_tokens, S);
  const LaunchShape s = shape(ceil_div(p.seg.num_tokens, tile), S, kFusedThreads, simple_fused_shared_bytes(p.r));
  cudaError_t err = cudaSuccess;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int vec = kVec16<T>;
    const bool v = rows_vectorizable(p.x, vec) && stacks_vectorizable(p.shrink, vec) &&
                   stacks_vectorizable(p.core, vec, /*skip_diagonal=*/true) &&
                   stacks_vectorizable(p.expand, vec);
    with_vec<T>(v, [&](auto V) {
      with_quant(any_quantized(p.shrink) || any_quantized(p.expand), [&](auto Q) {
        err = launch_kernel(fused_kernel<T, decltype(V)::value, decltype(Q)::value>, s, stream, p, tile);
      });
    });
  });
  return err;
}

}  // namespace jdlora::cuda
