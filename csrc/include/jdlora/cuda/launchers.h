// Host entry points of the CUDA kernels (defined in csrc/cuda/kernels.cu).
// Shrink, expand and fused calls that qualify run the tensor-core kernels
// (tc_launchers.h: fp16/bf16, aligned rows, r a multiple of 8 up to 128);
// the others, fp32, jd_core and build_batch_meta run the simple kernels.
// Both dequantise int8 and int4 weight stacks (params.h: Quant).
//
// Plain C++: callable from code compiled without nvcc. Each launcher enqueues
// its kernels on `stream` and returns: it allocates nothing and never waits
// for the device, and its grid depends only on host-known sizes in the
// parameters, so every call can be captured in a CUDA graph. Arguments must
// already be checked (jdlora::torch_ext::*_params); metadata values are not:
// the kernels skip out-of-range ids, slots and token indices.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "jdlora/params.h"

namespace jdlora::cuda {

// Returned when static + dynamic shared memory exceed what one block of the
// device (or its driver) allows; nothing was launched. Not a runtime code
// (those end at 999 and start again at 10000), so that callers tell it from
// an invalid value the runtime reports for another reason.
inline constexpr cudaError_t kErrorTooMuchSharedMemory = static_cast<cudaError_t>(1000);

// Each returns cudaSuccess once its kernels are enqueued.
// kErrorTooMuchSharedMemory (launch.h) means the kernel's shared memory (its
// static arrays plus the dynamic bytes below) does not fit one block of the
// current device, and nothing was launched; other codes come from the runtime. A tensor-core launch that
// cannot run falls back to the simple kernels before anything is reported.

// The per-adapter and per-cluster counters: 8 bytes per adapter slot and per
// cluster of dynamic shared memory, plus the 32 KiB placement table where it
// fits the device, else 4 KiB for a one-warp placement.
cudaError_t build_batch_meta_cuda(const BatchMetaParams& p, cudaStream_t stream);

// Dynamic shared memory build_batch_meta needs for p, and the most its kernel
// can get on the current device (for error messages).
size_t build_batch_meta_shared_bytes(const BatchMetaParams& p);
size_t build_batch_meta_shared_limit();

// Dynamic shared memory of the simple expand and fused kernels at rank r
// (they hold the g, or h and g, rows of a token tile).
size_t simple_expand_shared_bytes(int r);
size_t simple_fused_shared_bytes(int r);

// jd_shrink (p.scales.data == nullptr) and lora_shrink (scales applied).
cudaError_t jd_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream);
cudaError_t lora_shrink_cuda(const ShrinkParams& p, DType dtype, cudaStream_t stream);

// Slots at or above p.num_adapters are treated as "no adapter".
cudaError_t jd_core_cuda(const CoreParams& p, DType dtype, cudaStream_t stream);

// Slices must write disjoint column ranges of y.
cudaError_t jd_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream);
cudaError_t lora_expand_cuda(const ExpandParams& p, DType dtype, cudaStream_t stream);

cudaError_t jd_fused_cuda(const FusedParams& p, DType dtype, cudaStream_t stream);

}  // namespace jdlora::cuda
