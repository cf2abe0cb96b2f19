// Core: g[s, t] = S_s[a(t)] h[s, t] (full r x r) or sigma_s[a(t)] * h[s, t]
// (diagonal), gathered per token by adapter slot.
#pragma once

#include "jdlora/cuda/common.cuh"

namespace jdlora::cuda {

inline constexpr int kCoreThreads = 128;

// One output of a full core: row `srow` (r elements) dotted with h (fp32,
// shared memory). Each thread reads a whole contiguous row, so consecutive
// threads on consecutive rows cover the matrix without wasted sectors.
template <typename T, int VEC>
__device__ __forceinline__ float core_row(const T* __restrict__ srow, const float* h, int r) {
  float acc = 0.f;
  for (int k = 0; k < r; k += VEC) {
    float w[VEC];
    load_f32<T, VEC>(srow + k, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc = fmaf(w[e], h[k + e], acc);
  }
  return acc;
}

// A group of `group_lanes` lanes (a power of two <= 32, about r) handles one
// (slice, token) item: it stages the h row in shared memory, then each lane
// computes rows lane, lane + group_lanes, ... of g. Staging first also makes
// g == h (in place) safe. Grid: x = ceil(S * T / items per block).
template <typename T, int VEC>
__global__ void __launch_bounds__(kCoreThreads)
    core_kernel(const __grid_constant__ CoreParams p, int group_lanes) {
  float* s_h = dynamic_shared<float>();  // [items per block][r + 1]

  const int r = p.h.r;
  // The +1 keeps the groups of a warp on different banks.
  const int ldh = r + 1;
  const int L = group_lanes;
  const int gi = static_cast<int>(threadIdx.x) / L;
  const int li = static_cast<int>(threadIdx.x) % L;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / L) + gi;
  const int num_tokens = p.num_tokens;
  const bool active = item < static_cast<int64_t>(p.weights.num_slices) * num_tokens;
  const int s = active ? static_cast<int>(item / num_tokens) : 0;
  const int t = active ? static_cast<int>(item % num_tokens) : 0;
  int slot = active ? p.token_lora_mapping[t] : -1;
  if (slot >= p.num_adapters) slot = -1;

  float* hrow = s_h + gi * ldh;
  if (slot >= 0) {
    const float* src = p.h.data + s * p.h.stride_s + t * p.h.stride_t;
    for (int k = li; k < r; k += L) hrow[k] = src[k];
  }
  __syncwarp();
  if (!active) return;

  float* g = p.g.data + s * p.g.stride_s + t * p.g.stride_t;
  if (slot < 0) {
    for (int k = li; k < r; k += L) g[k] = 0.f;
    return;
  }
  const WeightStack& w = p.weights.stack[s];
  const T* base = static_cast<const T*>(w.data) + slot * w.stride_n;
  if (p.weights.diagonal[s]) {
    for (int k = li; k < r; k += L) g[k] = to_float(base[k]) * hrow[k];
    return;
  }
  for (int i = li; i < r; i += L) g[i] = core_row<T, VEC>(base + i * w.stride_row, hrow, r);
}

}  // namespace jdlora::cuda
