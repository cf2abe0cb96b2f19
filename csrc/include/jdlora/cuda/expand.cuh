// Segmented expand: y[t, off_s + j] += W_s[group(t)][j, :] . g[s, t]
// (jd_expand with the cluster bases U, lora_expand with the adapter factors B).
#pragma once

#include "jdlora/cuda/common.cuh"

namespace jdlora::cuda {

inline constexpr int kExpandThreads = 128;
inline constexpr int kExpandCols = kExpandThreads;  // one output column per thread

// acc[i] = wrow . g_i for the n tokens whose fp32 g rows lie in shared memory
// at s_g + i * r. One thread owns one output column: it reads its weight row
// (r contiguous values, a row reader of common.cuh) once and reuses it for
// every token of the tile, while all threads read the same g values
// (shared-memory broadcast).
template <int VEC, typename Row>
__device__ __forceinline__ void expand_column(const Row& wrow, int r, const float* s_g, int n,
                                              float (&acc)[kMaxTileTokens]) {
#pragma unroll
  for (int i = 0; i < kMaxTileTokens; ++i) acc[i] = 0.f;
  for (int k = 0; k < r; k += VEC) {
    float w[VEC];
    wrow.template load<VEC>(k, w);
#pragma unroll
    for (int i = 0; i < kMaxTileTokens; ++i) {
      if (i < n) {
        float gv[VEC];
        load_shared<VEC>(s_g + i * r + k, gv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[i] = fmaf(w[e], gv[e], acc[i]);
      }
    }
  }
}

// y[t_i, col] += acc[i] for the n tokens of s_tok, in the model dtype.
template <typename T>
__device__ __forceinline__ void add_to_y(const Activation& y, int64_t col, const int* s_tok, int n,
                                         const float (&acc)[kMaxTileTokens]) {
  T* base = static_cast<T*>(y.data) + col;
#pragma unroll
  for (int i = 0; i < kMaxTileTokens; ++i) {
    if (i < n) {
      T* out = base + s_tok[i] * y.stride_t;
      *out = from_float<T>(to_float(*out) + acc[i]);
    }
  }
}

// Grid: x = tiles of tile_tokens sorted positions, y = column tiles of
// kExpandCols over all slices, slice after slice. Slices must write disjoint
// columns of y (their blocks run concurrently).
template <typename T, int VEC, bool QUANT>
__global__ void __launch_bounds__(kExpandThreads)
    expand_kernel(const __grid_constant__ ExpandParams p, int tile_tokens) {
  float* s_g = dynamic_shared<float>();  // [kMaxTileTokens][r]
  __shared__ int s_tok[kMaxTileTokens];
  __shared__ int s_count;

  // Which slice and column tile this block covers (at most kMaxSlices steps).
  int s = 0;
  int tile = static_cast<int>(blockIdx.y);
  while (s + 1 < p.weights.num_slices) {
    const int tiles = (p.weights.stack[s].rows + kExpandCols - 1) / kExpandCols;
    if (tile < tiles) break;
    tile -= tiles;
    ++s;
  }
  const WeightStack& w = p.weights.stack[s];
  const int col = tile * kExpandCols + static_cast<int>(threadIdx.x);
  const int r = p.g.r;
  const float* g = p.g.data + s * p.g.stride_s;

  const int p0 = static_cast<int>(blockIdx.x) * tile_tokens;
  const int p1 = min(p0 + tile_tokens, p.seg.num_tokens);

  for_each_run(p.seg, p0, p1, [&](int group, int pos, int len) {
    if (group < 0) return;  // tokens without an adapter: nothing to add
    const int n = stage_tokens(p.seg, pos, len, s_tok, &s_count);
    for (int idx = threadIdx.x; idx < n * r; idx += blockDim.x)
      s_g[idx] = g[s_tok[idx / r] * p.g.stride_t + idx % r];
    __syncthreads();
    if (col >= w.rows) return;
    float acc[kMaxTileTokens];
    with_matrix<T, QUANT>(w, group, [&](const auto& W) { expand_column<VEC>(W.row(col), r, s_g, n, acc); });
    add_to_y<T>(p.y, p.weights.col_offset[s] + col, s_tok, n, acc);
  });
}

}  // namespace jdlora::cuda
