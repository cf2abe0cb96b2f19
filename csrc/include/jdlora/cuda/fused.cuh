// Fused JD: y[t, off_s + :] += U_s[c] S_s[a(t)] V_s[c] x[t] in one launch;
// h and g stay in shared memory.
#pragma once

#include "jdlora/cuda/common.cuh"
#include "jdlora/cuda/core.cuh"
#include "jdlora/cuda/expand.cuh"
#include "jdlora/cuda/shrink.cuh"

namespace jdlora::cuda {

inline constexpr int kFusedWarps = 8;
inline constexpr int kFusedThreads = 32 * kFusedWarps;

// Grid: x = tiles of tile_tokens sorted positions, y = slice. A block takes
// the tokens of one cluster segment within its tile and, for its slice, runs
// h = V x, g = S_a h and y += U g back to back. Slices are independent (own
// V, S, U and columns of y), so spreading them over blocks adds parallelism
// without repeating any work.
template <typename T, int VEC, bool QUANT>
__global__ void __launch_bounds__(kFusedThreads)
    fused_kernel(const __grid_constant__ FusedParams p, int tile_tokens) {
  float* s_hg = dynamic_shared<float>();  // h then g: [kMaxTileTokens][r] each
  __shared__ int s_tok[kMaxTileTokens];
  __shared__ int s_slot[kMaxTileTokens];
  __shared__ int s_count;

  const int s = static_cast<int>(blockIdx.y);
  const int r = p.r;
  float* s_h = s_hg;
  float* s_g = s_hg + kMaxTileTokens * r;
  const WeightStack& V = p.shrink.stack[s];
  const WeightStack& S = p.core.stack[s];
  const WeightStack& U = p.expand.stack[s];
  const bool diagonal = p.core.diagonal[s];
  const T* x = static_cast<const T*>(p.x.data);

  const int p0 = static_cast<int>(blockIdx.x) * tile_tokens;
  const int p1 = min(p0 + tile_tokens, p.seg.num_tokens);

  for_each_run(p.seg, p0, p1, [&](int group, int pos, int len) {
    if (group < 0) return;  // tokens without an adapter: nothing to add
    const int n = stage_tokens(p.seg, pos, len, s_tok, &s_count, p.token_lora_mapping, p.num_adapters,
                               s_slot);

    with_matrix<T, QUANT>(V, group, [&](const auto& Vc) {
      for (int row0 = 0; row0 < r; row0 += kFusedWarps * kShrinkRowsPerWarp)
        shrink_rows<T, VEC>(Vc, r, row0, x, p.x.stride_t, p.x.cols, s_tok, n,
                            [&](int i, int row, float v) { s_h[i * r + row] = v; });
    });
    __syncthreads();

    // A token of the segment whose slot is invalid gets g = 0: it adds nothing.
    for (int idx = threadIdx.x; idx < n * r; idx += blockDim.x) {
      const int i = idx / r;
      const int row = idx % r;
      const int slot = s_slot[i];
      float v = 0.f;
      if (slot >= 0) {
        const T* Sa = static_cast<const T*>(S.data) + slot * S.stride_n;
        v = diagonal ? to_float(Sa[row]) * s_h[idx]
                     : core_row<T, VEC>(Sa + row * S.stride_row, s_h + i * r, r);
      }
      s_g[idx] = v;
    }
    __syncthreads();

    with_matrix<T, QUANT>(U, group, [&](const auto& Uc) {
      for (int col = threadIdx.x; col < U.rows; col += blockDim.x) {
        float acc[kMaxTileTokens];
        expand_column<VEC>(Uc.row(col), r, s_g, n, acc);
        add_to_y<T>(p.y, p.expand.col_offset[s] + col, s_tok, n, acc);
      }
    });
  });
}

}  // namespace jdlora::cuda
