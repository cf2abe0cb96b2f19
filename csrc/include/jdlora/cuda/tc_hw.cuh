// The hardware layer of the tensor-core kernels: 16-byte asynchronous copies
// into shared memory, the m16n8k16 warp MMA (fp16/bf16 in, fp32 out; sm_80
// and newer, so one source serves the A100 and the H100/H200), the block's
// dynamic shared memory, L1 prefetch, and thread-block-cluster helpers that
// degrade to a single block where clusters do not exist. Everything here has
// a host emulation with the same signatures (csrc/cuda/emulation).
#pragma once

#include <cooperative_groups.h>

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

// The block's dynamic shared memory (every shared object of the tensor-core
// kernels lives in it, laid out by smem_layout).
__device__ __forceinline__ unsigned char* smem_base() {
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  return dynamic_smem;
}

// Starts moving the line holding p towards L1; nothing waits for it.
__device__ __forceinline__ void prefetch_l1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(__cvta_generic_to_global(p)));
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

// Thread-block clusters (sm_90): the blocks of one cluster split a reduction
// and exchange partial tiles through distributed shared memory. `cl` is the
// cluster size the host launched with; 1 means a plain launch (always the
// case below sm_90), where these reduce to the block itself.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define JDLORA_CLUSTERS 1
#else
#define JDLORA_CLUSTERS 0
#endif

// The host launches clusters only for images compiled with them
// (launch.h: clusters_available); an image without them that is nonetheless
// given cl > 1 stops the kernel rather than sum its own partials cl times.
__device__ __forceinline__ void cluster_barrier(int cl) {
#if JDLORA_CLUSTERS
  if (cl > 1) {
    cooperative_groups::this_cluster().sync();
    return;
  }
#else
  if (cl > 1) __trap();
#endif
  __syncthreads();
}

// The same shared-memory object in block `rank` of this block's cluster.
template <typename P>
__device__ __forceinline__ P* cluster_peer(P* p, int rank, int cl) {
#if JDLORA_CLUSTERS
  if (cl > 1) return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  if (cl > 1) __trap();
#endif
  return p;
}

}  // namespace jdlora::cuda::tc
