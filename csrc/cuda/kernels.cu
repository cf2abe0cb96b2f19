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

// Dynamic shared memory a kernel gets without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

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
// load.
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
  return aligned16(w.data) && w.stride_n % vec == 0 && w.stride_row % vec == 0 && w.cols % vec == 0;
}

bool rows_vectorizable(const Activation& a, int vec) {
  return aligned16(a.data) && a.stride_t % vec == 0 && a.cols % vec == 0;
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

// Kernels needing more than the default dynamic shared memory must opt in
// (large r only). A failure shows up in the launch error.
template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSharedBytes)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

void shrink(const ShrinkParams& p, DType dtype, cudaStream_t stream) {
  const int row_tiles = static_cast<int>(ceil_div(p.h.r, kShrinkRowsPerBlock));
  const int64_t slices_rows = static_cast<int64_t>(p.weights.num_slices) * row_tiles;
  if (slices_rows == 0) return;
  const int tile = tile_tokens(p.seg.num_tokens, slices_rows);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seg.num_tokens, tile)), static_cast<unsigned>(slices_rows));
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int vec = kVec16<T>;
    const bool v = rows_vectorizable(p.x, vec) && stacks_vectorizable(p.weights, vec);
    with_vec<T>(v, [&](auto V) {
      shrink_kernel<T, decltype(V)::value><<<grid, kShrinkThreads, 0, stream>>>(p, tile, row_tiles);
    });
  });
}

void expand(const ExpandParams& p, DType dtype, cudaStream_t stream) {
  int64_t col_tiles = 0;
  for (int s = 0; s < p.weights.num_slices; ++s) col_tiles += ceil_div(p.weights.stack[s].rows, kExpandCols);
  if (col_tiles == 0) return;
  const int tile = tile_tokens(p.seg.num_tokens, col_tiles);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seg.num_tokens, tile)), static_cast<unsigned>(col_tiles));
  const size_t smem = sizeof(float) * kMaxTileTokens * static_cast<size_t>(p.g.r);
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int vec = kVec16<T>;
    with_vec<T>(stacks_vectorizable(p.weights, vec), [&](auto V) {
      auto kernel = expand_kernel<T, decltype(V)::value>;
      allow_shared_bytes(kernel, smem);
      kernel<<<grid, kExpandThreads, smem, stream>>>(p, tile);
    });
  });
}

}  // namespace

size_t build_batch_meta_shared_bytes(const BatchMetaParams& p) {
  return batch_meta_smem_bytes(p.num_adapters, p.num_clusters);
}

size_t build_batch_meta_shared_limit() {
  int device = 0;
  int optin = 0;
  cudaFuncAttributes attr{};
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaFuncGetAttributes(&attr, build_batch_meta_kernel) != cudaSuccess) {
    return 0;
  }
  return static_cast<size_t>(optin) > attr.sharedSizeBytes ? optin - attr.sharedSizeBytes : 0;
}

cudaError_t build_batch_meta_cuda(const BatchMetaParams& p, cudaStream_t stream) {
  const size_t smem = build_batch_meta_shared_bytes(p);
  if (smem > kDefaultSharedBytes) {
    if (smem > build_batch_meta_shared_limit()) return cudaErrorInvalidValue;
    const cudaError_t e = cudaFuncSetAttribute(
        build_batch_meta_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  build_batch_meta_kernel<<<1, kMetaThreads, smem, stream>>>(p);
  return cudaSuccess;
}

void jd_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream) {
  if (!kSimpleOnly && tc_shrink_cuda(p, dtype, stream)) return;
  shrink(p, dtype, stream);
}

void lora_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream) {
  if (!kSimpleOnly && tc_shrink_cuda(p, dtype, stream)) return;
  shrink(p, dtype, stream);
}

void jd_core_cuda(const CoreParams& p, DType dtype, cudaStream_t stream) {
  const int r = p.h.r;
  // Lanes per (slice, token): about r, so that small ranks do not idle most
  // of a warp.
  int lanes = 32;
  while (lanes > 1 && lanes / 2 >= r) lanes /= 2;
  const int items_per_block = kCoreThreads / lanes;
  const int64_t items = static_cast<int64_t>(p.weights.num_slices) * p.num_tokens;
  const dim3 grid(static_cast<unsigned>(ceil_div(items, items_per_block)));
  const size_t smem = sizeof(float) * items_per_block * (static_cast<size_t>(r) + 1);
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int vec = kVec16<T>;
    with_vec<T>(stacks_vectorizable(p.weights, vec, /*skip_diagonal=*/true), [&](auto V) {
      auto kernel = core_kernel<T, decltype(V)::value>;
      allow_shared_bytes(kernel, smem);
      kernel<<<grid, kCoreThreads, smem, stream>>>(p, lanes);
    });
  });
}

void jd_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream) {
  if (!kSimpleOnly && tc_expand_cuda(p, dtype, stream)) return;
  expand(p, dtype, stream);
}

void lora_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream) {
  if (!kSimpleOnly && tc_expand_cuda(p, dtype, stream)) return;
  expand(p, dtype, stream);
}

void jd_fused_cuda(const FusedParams& p, DType dtype, cudaStream_t stream) {
  if (!kSimpleOnly && tc_fused_cuda(p, dtype, stream)) return;
  const int S = p.shrink.num_slices;
  const int tile = tile_tokens(p.seg.num_tokens, S);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seg.num_tokens, tile)), static_cast<unsigned>(S));
  const size_t smem = sizeof(float) * 2 * kMaxTileTokens * static_cast<size_t>(p.r);
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int vec = kVec16<T>;
    const bool v = rows_vectorizable(p.x, vec) && stacks_vectorizable(p.shrink, vec) &&
                   stacks_vectorizable(p.core, vec, /*skip_diagonal=*/true) &&
                   stacks_vectorizable(p.expand, vec);
    with_vec<T>(v, [&](auto V) {
      auto kernel = fused_kernel<T, decltype(V)::value>;
      allow_shared_bytes(kernel, smem);
      kernel<<<grid, kFusedThreads, smem, stream>>>(p, tile);
    });
  });
}

}  // namespace jdlora::cuda
