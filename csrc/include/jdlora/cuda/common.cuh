// Device helpers shared by the CUDA kernels: element conversions, vector
// loads, readers of float and quantized weight stacks, warp and block
// reductions, and the walk over the segments that a block's tile of sorted
// positions touches.
//
// Grids are sized from host-known values only (num_tokens, slices, widths),
// never from metadata in device memory, so every launch can be captured in a
// CUDA graph; blocks discover their work from the segment table and exit or
// skip when there is none.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "jdlora/params.h"

namespace jdlora::cuda {

inline constexpr unsigned kFullMask = 0xffffffffu;

// Most sorted positions one block handles per tile. Accumulators are held per
// token in registers, so this bounds register use; 16 tokens already reuse
// each weight element 16 times.
inline constexpr int kMaxTileTokens = 16;

// The block's dynamic shared memory, 16-byte aligned. (The host emulation,
// which defines JDLORA_EMULATION, supplies its own.)
#ifndef JDLORA_EMULATION
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
  return reinterpret_cast<T*>(dynamic_shared_bytes);
}
#endif

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte access.
template <typename T>
inline constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

// VEC consecutive elements as fp32. With VEC * sizeof(T) == 16 the caller
// guarantees 16-byte alignment and this is one 128-bit read-only load.
template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(p[i]);
  }
}

// VEC consecutive fp32 values from shared memory, as float4 reads when the
// caller guarantees 16-byte alignment (VEC a multiple of 4).
template <int VEC>
__device__ __forceinline__ void load_shared(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + i);
      out[i] = v.x;
      out[i + 1] = v.y;
      out[i + 2] = v.z;
      out[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = p[i];
  }
}

// ---------------------------------------------------------------------------
// Weight stacks in any format (params.h: Quant). Kernels take a matrix of a
// stack through with_matrix, which picks the reader once per matrix: a float
// stack keeps the plain loads above, and only a quantized one pays for
// unpacking. Readers hand out rows; row(i).load<VEC>(k, out) gives values
// [k, k + VEC) of row i as fp32. Kernels are compiled twice, with and without
// the quantized reader (QUANT), so that the float instances keep their
// registers and occupancy; the launchers pick QUANT from the stacks.

template <typename T>
struct FloatRow {
  const T* p;
  template <int VEC>
  __device__ __forceinline__ void load(int k, float (&out)[VEC]) const {
    load_f32<T, VEC>(p + k, out);
  }
};

template <typename T>
struct FloatMatrix {
  const T* data;
  int64_t ld;
  __device__ __forceinline__ FloatRow<T> row(int i) const { return {data + i * ld}; }
};

// N bytes (1, 2, 4, 8 or 16; the caller guarantees N-byte alignment) in one
// read-only load, as little-endian 32-bit words.
template <int N>
__device__ __forceinline__ void load_words(const unsigned char* p, uint32_t (&w)[(N + 3) / 4]) {
  if constexpr (N == 16) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  } else if constexpr (N == 8) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x;
    w[1] = v.y;
  } else if constexpr (N == 4) {
    w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  } else if constexpr (N == 2) {
    w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
  } else {
    static_assert(N == 1, "1, 2, 4, 8 or 16 bytes");
    w[0] = __ldg(p);
  }
}

// A row of an int8 or int4 matrix and the scales of its groups. Value c is
// float(q) * float(scale[c / group]), one fp32 rounding, as the format
// defines it.
template <typename T>
struct QuantRow {
  const unsigned char* p;
  const T* scales;
  int group;
  bool int4;

  // With VEC > 1 the launcher guarantees that the values share one group and
  // that their VEC (int8) or VEC / 2 (int4) bytes are aligned to that size.
  template <int VEC>
  __device__ __forceinline__ void load(int k, float (&out)[VEC]) const {
    const float s = to_float(__ldg(scales + k / group));
    if (int4) {
      constexpr int kBytes = VEC > 1 ? VEC / 2 : 1;
      uint32_t w[(kBytes + 3) / 4];
      load_words<kBytes>(p + k / 2, w);
      const int first = VEC > 1 ? 0 : (k & 1);  // nibble of value k: k is even when VEC > 1
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int nib = first + e;
        const int q = static_cast<int>((w[nib / 8] >> (4 * (nib % 8))) & 15u) - 8;
        out[e] = static_cast<float>(q) * s;
      }
    } else {
      uint32_t w[(VEC + 3) / 4];
      load_words<VEC>(p + k, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int q = static_cast<int8_t>(w[e / 4] >> (8 * (e % 4)));
        out[e] = static_cast<float>(q) * s;
      }
    }
  }
};

template <typename T>
struct QuantMatrix {
  const unsigned char* data;
  int64_t ld;  // bytes per row
  const T* scales;
  int64_t scales_ld;
  int group;
  bool int4;
  __device__ __forceinline__ QuantRow<T> row(int i) const {
    return {data + i * ld, scales + i * scales_ld, group, int4};
  }
};

// Matrix n of a quantized stack w.
template <typename T>
__device__ __forceinline__ QuantMatrix<T> quant_matrix(const WeightStack& w, int n) {
  return {static_cast<const unsigned char*>(w.data) + n * w.stride_n, w.stride_row,
          static_cast<const T*>(w.scales.data) + n * w.scales.stride_n, w.scales.stride_row, w.scales.group,
          w.quant == Quant::kInt4};
}

// Calls f(matrix) with the reader of matrix n of w; without QUANT, w must be
// a float stack. Block-uniform (the format is a launch parameter), so f may
// synchronise.
template <typename T, bool QUANT, typename F>
__device__ __forceinline__ void with_matrix(const WeightStack& w, int n, F&& f) {
  if constexpr (QUANT) {
    if (w.quant != Quant::kNone) {
      f(quant_matrix<T>(w, n));
      return;
    }
  }
  f(FloatMatrix<T>{static_cast<const T*>(w.data) + n * w.stride_n, w.stride_row});
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ unsigned lanemask_lt() {
  return (1u << (threadIdx.x & 31)) - 1u;
}

// Exclusive prefix sum of v over the block (blockDim.x a multiple of 32);
// `total` receives the block sum. Every thread of the block must call it.
// s_warp: 32 ints of shared scratch, free again on return.
__device__ __forceinline__ int block_exclusive_sum(int v, int* s_warp, int& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) s_warp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? s_warp[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += y;
    }
    s_warp[lane] = w;
  }
  __syncthreads();
  const int before = warp > 0 ? s_warp[warp - 1] : 0;
  total = s_warp[nwarps - 1];
  __syncthreads();
  return before + x - v;
}

// Largest j in [0, capacity] with seg_start[j] <= p, or 0 if there is none
// (only possible with corrupt metadata). seg_start is non-decreasing, so the
// samples that satisfy the test form a prefix; each round narrows the range
// by a factor blockDim.x with one load per thread, instead of a dependent
// chain of log2(capacity) loads. Every thread of the block must call it.
__device__ __forceinline__ int find_segment(const SegmentTable& seg, int p) {
  int lo = 0;
  int len = seg.capacity + 1;
  const int nt = static_cast<int>(blockDim.x);
  while (true) {
    const int step = (len + nt - 1) / nt;
    const int i = static_cast<int>(threadIdx.x) * step;
    const int hits = __syncthreads_count(i < len && seg.seg_start[lo + i] <= p);
    if (hits == 0) return lo;
    lo += (hits - 1) * step;
    if (step == 1) return lo;
    len = min(step, len - (hits - 1) * step);
  }
}

// Calls f(group, pos, n) for each run of sorted positions [pos, pos + n) of
// the tile [p0, p1) that lies in one segment; group is the segment's id, or
// -1 for tokens without an adapter and for ids outside [0, capacity).
// Block-uniform: every thread makes the same calls, so f may synchronise.
template <typename F>
__device__ __forceinline__ void for_each_run(const SegmentTable& seg, int p0, int p1, F&& f) {
  int p = p0;
  while (p < p1) {
    // A fresh search per run skips the empty padding segments in one step.
    const int j = find_segment(seg, p);
    int end = p1;
    int group = -1;
    if (j < seg.capacity) {
      end = min(p1, seg.seg_start[j + 1]);
      if (end > p) {
        group = seg.active_ids[j];
        if (group < 0 || group >= seg.capacity) group = -1;
      } else {
        end = p + 1;  // corrupt table: step over the position
      }
    }
    f(group, p, end - p);
    p = end;
  }
}

// Loads the token indices of sorted positions [pos, pos + n) (n <= 32) into
// s_tok, dropping indices outside [0, num_tokens); returns how many remain.
// With a mapping, s_slot receives each token's adapter slot, -1 when outside
// [0, num_adapters). Every thread of the block must call it; it begins with a
// barrier so the previous run's readers of s_tok are done.
__device__ __forceinline__ int stage_tokens(const SegmentTable& seg, int pos, int n, int* s_tok,
                                            int* s_count, const int32_t* mapping = nullptr,
                                            int num_adapters = 0, int* s_slot = nullptr) {
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int t = lane < n ? seg.token_indices_sorted[pos + lane] : -1;
    const bool ok = t >= 0 && t < seg.num_tokens;
    const unsigned valid = __ballot_sync(kFullMask, ok);
    if (ok) {
      const int k = __popc(valid & lanemask_lt());
      s_tok[k] = t;
      if (mapping != nullptr) {
        const int a = mapping[t];
        s_slot[k] = a >= 0 && a < num_adapters ? a : -1;
      }
    }
    if (lane == 0) *s_count = __popc(valid);
  }
  __syncthreads();
  return *s_count;
}

}  // namespace jdlora::cuda
