// Host entry points of the tensor-core kernels (csrc/cuda/tc_kernels.cu),
// called by the launchers of launchers.h before they fall back to the simple
// kernels. Plain C++.
//
// Dispatch, from host-known sizes only (never from metadata in device memory,
// so a captured graph stays valid for any batch of the same size):
//   * fp16/bf16, r a multiple of 8 in [8, 128], and rows that allow 16-byte
//     accesses (16-byte aligned bases; strides, d_in, each d_out and each
//     y column offset multiples of 8 elements; h/g strides multiples of 4);
//     a quantized stack instead needs its bytes of 8 values aligned for one
//     load (8-byte int8 rows, 4-byte int4 rows) and scale groups of a
//     multiple of 8 values; anything else, and fp32, takes the simple kernels;
//   * num_tokens < kPrefillMinTokens: decode tiles (16 sorted positions per
//     block); otherwise prefill tiles (64);
//   * an sm_90 device running an image compiled for sm_90: shrink and fused
//     split d_in over a thread-block cluster of up to 8 blocks, enough to put
//     about two blocks on every multiprocessor; otherwise (older device, or
//     an sm_80 image on a newer one) one block per window;
//   * the tiles' shared memory, with the kernel's static arrays, must fit the
//     device's opt-in limit and the launch must succeed; else the simple
//     kernels run.
#pragma once

#include <cuda_runtime_api.h>

#include "jdlora/params.h"

namespace jdlora::cuda {

inline constexpr int kPrefillMinTokens = 1024;

// Each returns false, launching nothing and leaving no error pending, when
// the call does not qualify for the tensor-core path (see above), its tiles
// do not fit in the shared memory of the current device, or the launch fails.
bool tc_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream);
bool tc_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream);
bool tc_fused_cuda(const FusedParams& p, DType dtype, cudaStream_t stream);

}  // namespace jdlora::cuda
