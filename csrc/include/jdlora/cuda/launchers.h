// Host entry points of the CUDA kernels (defined in csrc/cuda/kernels.cu).
// Shrink, expand and fused calls that qualify run the tensor-core kernels
// (tc_launchers.h: fp16/bf16, aligned rows, r a multiple of 8 up to 128);
// the others, fp32, jd_core and build_batch_meta run the simple kernels.
//
// Plain C++: callable from code compiled without nvcc. Each launcher enqueues
// its kernels on `stream` and returns: it allocates nothing and never waits
// for the device, and its grid depends only on host-known sizes in the
// parameters, so every call can be captured in a CUDA graph. Arguments must
// already be checked (jdlora::torch_ext::*_params); metadata values are not:
// the kernels skip out-of-range ids, slots and token indices. Launch errors
// are left for the caller to read with cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "jdlora/params.h"

namespace jdlora::cuda {

// Returns cudaErrorInvalidValue, launching nothing, when the per-adapter and
// per-cluster counters (8 bytes per adapter slot and per cluster) do not fit
// in the shared memory of one block of the current device.
cudaError_t build_batch_meta_cuda(const BatchMetaParams& p, cudaStream_t stream);

// Dynamic shared memory build_batch_meta needs for p, and the most its kernel
// can get on the current device (for error messages).
size_t build_batch_meta_shared_bytes(const BatchMetaParams& p);
size_t build_batch_meta_shared_limit();

// jd_shrink (p.scales.data == nullptr) and lora_shrink (scales applied).
void jd_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream);
void lora_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream);

// Slots at or above p.num_adapters are treated as "no adapter".
void jd_core_cuda(const CoreParams& p, DType dtype, cudaStream_t stream);

// Slices must write disjoint column ranges of y.
void jd_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream);
void lora_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream);

void jd_fused_cuda(const FusedParams& p, DType dtype, cudaStream_t stream);

}  // namespace jdlora::cuda
