// Segmented shrink: h[s, t] = scale * W_s[group(t)] x[t] (jd_shrink with the
// cluster bases V, lora_shrink with the adapter factors A and their scales).
#pragma once

#include "jdlora/cuda/common.cuh"

namespace jdlora::cuda {

// Rows of W per warp: each loaded x vector is reused for RW rows, each loaded
// weight vector for every token of the tile.
inline constexpr int kShrinkRowsPerWarp = 4;
inline constexpr int kShrinkWarps = 4;
inline constexpr int kShrinkThreads = 32 * kShrinkWarps;
inline constexpr int kShrinkRowsPerBlock = kShrinkWarps * kShrinkRowsPerWarp;

// Rows [row0 + warp * RW, + RW) of W (rows x d, a matrix reader of
// common.cuh) times the x rows of the n tokens in s_tok; the lanes split d,
// then reduce. Calls store(i, row, value) once per (token i, row), from one
// lane. Warp-level only: no block barrier, so warps without rows simply
// return.
template <typename T, int VEC, typename Matrix, typename Store>
__device__ __forceinline__ void shrink_rows(const Matrix& W, int rows, int row0, const T* __restrict__ x,
                                            int64_t ldx, int d, const int* s_tok, int n, Store&& store) {
  constexpr int RW = kShrinkRowsPerWarp;
  const int lane = threadIdx.x & 31;
  const int rbase = row0 + static_cast<int>(threadIdx.x >> 5) * RW;
  if (rbase >= rows) return;

  float acc[RW][kMaxTileTokens];
#pragma unroll
  for (int q = 0; q < RW; ++q)
#pragma unroll
    for (int i = 0; i < kMaxTileTokens; ++i) acc[q][i] = 0.f;

  for (int k = lane * VEC; k < d; k += 32 * VEC) {
    float w[RW][VEC];
#pragma unroll
    for (int q = 0; q < RW; ++q) {
      if (rbase + q < rows) {
        W.row(rbase + q).template load<VEC>(k, w[q]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) w[q][e] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < kMaxTileTokens; ++i) {
      if (i < n) {
        float xv[VEC];
        load_f32<T, VEC>(x + s_tok[i] * ldx + k, xv);
#pragma unroll
        for (int q = 0; q < RW; ++q)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[q][i] = fmaf(w[q][e], xv[e], acc[q][i]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kMaxTileTokens; ++i) {
    if (i < n) {
#pragma unroll
      for (int q = 0; q < RW; ++q) {
        const float v = warp_sum(acc[q][i]);
        // Spread the stores over the lanes.
        if (lane == ((i * RW + q) & 31) && rbase + q < rows) store(i, rbase + q, v);
      }
    }
  }
}

// Grid: x = tiles of tile_tokens sorted positions, y = slice * row_tiles +
// tile of kShrinkRowsPerBlock rows of h.
template <typename T, int VEC, bool QUANT>
__global__ void __launch_bounds__(kShrinkThreads)
    shrink_kernel(const __grid_constant__ ShrinkParams p, int tile_tokens, int row_tiles) {
  __shared__ int s_tok[kMaxTileTokens];
  __shared__ int s_count;

  const int num_tokens = p.seg.num_tokens;
  const int p0 = static_cast<int>(blockIdx.x) * tile_tokens;
  const int p1 = min(p0 + tile_tokens, num_tokens);
  const int s = static_cast<int>(blockIdx.y) / row_tiles;
  const int row0 = (static_cast<int>(blockIdx.y) % row_tiles) * kShrinkRowsPerBlock;
  const int r = p.h.r;
  float* h = p.h.data + s * p.h.stride_s;
  const WeightStack& w = p.weights.stack[s];
  const T* x = static_cast<const T*>(p.x.data);

  for_each_run(p.seg, p0, p1, [&](int group, int pos, int len) {
    const int n = stage_tokens(p.seg, pos, len, s_tok, &s_count);
    if (group < 0) {
      // No adapter: the reference's zero rows.
      for (int idx = threadIdx.x; idx < n * kShrinkRowsPerBlock; idx += blockDim.x) {
        const int row = row0 + idx % kShrinkRowsPerBlock;
        if (row < r) h[s_tok[idx / kShrinkRowsPerBlock] * p.h.stride_t + row] = 0.f;
      }
      return;
    }
    const float scale =
        p.scales.data != nullptr ? p.scales.data[s * p.scales.stride_s + group * p.scales.stride_a] : 1.f;
    with_matrix<T, QUANT>(w, group, [&](const auto& W) {
      shrink_rows<T, VEC>(W, r, row0, x, p.x.stride_t, p.x.cols, s_tok, n,
                          [&](int i, int row, float v) { h[s_tok[i] * p.h.stride_t + row] = v * scale; });
    });
  });
}

}  // namespace jdlora::cuda
