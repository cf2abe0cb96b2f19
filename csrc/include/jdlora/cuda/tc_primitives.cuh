// Building blocks of the tensor-core kernels: 16-byte asynchronous copies
// into shared memory, the m16n8k16 warp MMA (fp16/bf16 in, fp32 out; sm_80
// and newer, so one source serves the A100 and the H100/H200), fp32 -> two
// half-precision terms for operands that are fp32 in the op contract, a
// multi-stage copy/compute pipeline, and thread-block-cluster helpers that
// degrade to a single block where clusters do not exist.
#pragma once

#include <cooperative_groups.h>

#include <cstring>
#include <type_traits>

#include "jdlora/cuda/common.cuh"

namespace jdlora::cuda::tc {

// Copies 16 bytes global -> shared without staging through registers, so a
// thread can have many in flight. With pred false nothing is read and the 16
// bytes are zero-filled: tile padding (rows past a run, columns past the
// matrix) is then finite zeros, never stale data.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two consecutive 16-bit elements as one 32-bit register (the lower index in
// the lower half, as the MMA fragments expect).
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

template <typename T>
__device__ __forceinline__ float2 unpack_pair(uint32_t u) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v;
    memcpy(&v, &u, sizeof(u));
    return __bfloat1622float2(v);
  } else {
    __half2 v;
    memcpy(&v, &u, sizeof(u));
    return __half22float2(v);
  }
}

// fp32 pair -> hi + lo in T: hi carries the leading 8 (bf16) or 11 (fp16)
// bits and lo the next ones, so two MMAs with hi and lo keep about 16 bits of
// an fp32 operand (h, g) instead of rounding it to the model dtype.
template <typename T>
__device__ __forceinline__ void split_pair(float2 v, uint32_t& hi, uint32_t& lo) {
  hi = pack_pair<T>(v.x, v.y);
  const float2 h = unpack_pair<T>(hi);
  lo = pack_pair<T>(v.x - h.x, v.y - h.y);
}

// d += a * b for one 16x8x16 tile. Fragments (g = lane / 4, q = lane % 4):
// a[0] = A[g][2q, 2q+1], a[1] = A[g+8][2q, 2q+1], a[2] = A[g][2q+8, 2q+9],
// a[3] = A[g+8][2q+8, 2q+9]; b0 = B[k = 2q, 2q+1][n = g], b1 = B[k = 2q+8,
// 2q+9][n = g]; d[0..1] = D[g][2q, 2q+1], d[2..3] = D[g+8][2q, 2q+1].
// B is stored n-major with k contiguous, which is how every weight stack of
// this library is laid out along the reduced dimension.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Multi-stage pipeline over nsteps steps: load(q) issues the asynchronous
// copies of step q, compute(q) consumes them. Loads run STAGES - 1 steps
// ahead; one commit group per step (empty ones too) keeps the wait count
// exact. The barrier at the top of each step both publishes step q's data and
// ends every thread's use of the buffers that step q + STAGES - 1 refills.
// Block-uniform: every thread of the block must call it with the same nsteps.
template <int STAGES, typename Load, typename Compute>
__device__ __forceinline__ void run_pipeline(int nsteps, Load&& load, Compute&& compute) {
#pragma unroll
  for (int q = 0; q < STAGES - 1; ++q) {
    if (q < nsteps) load(q);
    cp_async_commit();
  }
  for (int q = 0; q < nsteps; ++q) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (q + STAGES - 1 < nsteps) load(q + STAGES - 1);
    cp_async_commit();
    compute(q);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// Thread-block clusters (sm_90): the blocks of one cluster split a reduction
// and exchange partial tiles through distributed shared memory. `cl` is the
// cluster size the host launched with; 1 means a plain launch (always the
// case below sm_90), where these reduce to the block itself.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define JDLORA_CLUSTERS 1
#else
#define JDLORA_CLUSTERS 0
#endif

__device__ __forceinline__ void cluster_barrier(int cl) {
#if JDLORA_CLUSTERS
  if (cl > 1) {
    cooperative_groups::this_cluster().sync();
    return;
  }
#endif
  __syncthreads();
}

// The same shared-memory object in block `rank` of this block's cluster.
template <typename P>
__device__ __forceinline__ P* cluster_peer(P* p, int rank, int cl) {
#if JDLORA_CLUSTERS
  if (cl > 1) return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#endif
  return p;
}

}  // namespace jdlora::cuda::tc
