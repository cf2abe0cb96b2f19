// Building blocks of the tensor-core kernels above the hardware layer
// (tc_hw.cuh): MMA operand packing, fp32 -> two half-precision terms for
// operands that are fp32 in the op contract, dequantised weight tiles, and
// the multi-stage copy/compute pipeline.
//
// JDLORA_TC_HW_HEADER, when defined, names a replacement of tc_hw.cuh: a host
// emulation of the same functions runs these kernels without a GPU
// (csrc/cuda/emulation).
#pragma once

#include <cstring>
#include <type_traits>

#include "jdlora/cuda/common.cuh"

#ifdef JDLORA_TC_HW_HEADER
#include JDLORA_TC_HW_HEADER
#else
#include "jdlora/cuda/tc_hw.cuh"
#endif

namespace jdlora::cuda::tc {

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
// an fp32 operand (h, g) instead of rounding it to the model dtype. For fp16
// the caller first scales v into fp16's range (tc_kernels.cuh: g_row_shift).
// A non-finite hi (an inf or NaN in v, or a value that rounds past T's range)
// carries the whole value and lo is 0: v - hi would be inf - inf = NaN, and
// a row of y would turn NaN where the simple kernels give +-inf.
__device__ __forceinline__ float residual_or_zero(float v, float hi) { return fabsf(hi) < INFINITY ? v - hi : 0.f; }

template <typename T>
__device__ __forceinline__ void split_pair(float2 v, uint32_t& hi, uint32_t& lo) {
  hi = pack_pair<T>(v.x, v.y);
  const float2 h = unpack_pair<T>(hi);
  lo = pack_pair<T>(residual_or_zero(v.x, h.x), residual_or_zero(v.y, h.y));
}

// Values [k, k + 8) of row `row` of a quantized matrix into 16 bytes of
// shared memory (zeros where !ok, as a predicated-off copy leaves them):
// float(q) * float(scale) in fp32, then rounded to T, the MMA operand type,
// as a table of T holding those values would have them. The launcher
// guarantees that the 8 values share a scale group and that their bytes
// are aligned for one load. A plain store: the pipeline's barrier that
// publishes a step's copies publishes it too.
template <typename T>
__device__ __forceinline__ void store_dequant8(T* dst, const QuantMatrix<T>& m, int row, int k, bool ok) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (ok) {
    float f[8];
    m.row(row).template load<8>(k, f);
    v = make_uint4(pack_pair<T>(f[0], f[1]), pack_pair<T>(f[2], f[3]), pack_pair<T>(f[4], f[5]),
                   pack_pair<T>(f[6], f[7]));
  }
  *reinterpret_cast<uint4*>(dst) = v;
}

// D += A B for one m16n8k16 tile, but only in the rows a lane owns for the
// current run (on_a: its rows g, on_b: g + 8). The product goes through a
// zeroed tile first: the other rows' A fragments are zero, and zero times an
// inf or NaN weight of this run is NaN, which must not reach a row of
// another run, i.e. another tenant's adapter or cluster. Every row takes the
// same steps whatever the other rows hold, so rounding stays batch-invariant.
template <typename T, int N>
__device__ __forceinline__ void mma_rows(float (&d)[4], const uint32_t (&a)[N][4], uint32_t b0, uint32_t b1,
                                         bool on_a, bool on_b) {
  float p[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < N; ++i) mma_16816<T>(p, a[i], b0, b1);
  if (on_a) {
    d[0] += p[0];
    d[1] += p[1];
  }
  if (on_b) {
    d[2] += p[2];
    d[3] += p[3];
  }
}

// Multi-stage pipeline over nsteps steps: load(q) issues the asynchronous
// copies of step q, compute(q) consumes them. Loads run STAGES - 1 steps
// ahead; one commit group per step (empty ones too) keeps the wait count
// exact. The barrier at the top of each step both publishes step q's data and
// ends every thread's use of the buffers that step q + STAGES - 1 refills.
// Block-uniform: every thread of the block must call it with the same nsteps.
// The prologue can be issued early and the body called later, with no other
// commit or wait in between.
template <int STAGES, typename Load>
__device__ __forceinline__ void pipeline_prologue(int nsteps, Load&& load) {
#pragma unroll
  for (int q = 0; q < STAGES - 1; ++q) {
    if (q < nsteps) load(q);
    cp_async_commit();
  }
}

template <int STAGES, typename Load, typename Compute>
__device__ __forceinline__ void pipeline_body(int nsteps, Load&& load, Compute&& compute) {
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

template <int STAGES, typename Load, typename Compute>
__device__ __forceinline__ void run_pipeline(int nsteps, Load&& load, Compute&& compute) {
  pipeline_prologue<STAGES>(nsteps, load);
  pipeline_body<STAGES>(nsteps, load, compute);
}

}  // namespace jdlora::cuda::tc
