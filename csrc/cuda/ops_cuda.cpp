// CUDA registrations: check arguments (shapes, dtypes, devices; metadata
// values stay on the device unread, the kernels skip out-of-range entries),
// then launch on the current stream of the tensors' device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "jdlora/cuda/launchers.h"
#include "torch/op_params.h"

namespace jdlora::torch_ext {
namespace {

// kErrorTooMuchSharedMemory from a launcher: the kernel's shared memory does
// not fit a block of this device (nothing was launched). Any other code is
// the runtime's and is reported as such.
void check_launch(const char* op, cudaError_t err, int64_t r) {
  TORCH_CHECK(err != cuda::kErrorTooMuchSharedMemory, op, ": rank ", r,
              " needs more shared memory per block than one block of this device can have;"
              " use a smaller rank");
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Every op but build_batch_meta has nothing to do for an empty batch; the
// launch goes on the current stream of the output's device.
template <typename Launch>
void launch_on(const char* op, const at::Device& device, int32_t num_tokens, int64_t r, Launch&& launch) {
  if (num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  check_launch(op, launch(c10::cuda::getCurrentCUDAStream().stream()), r);
}

void build_batch_meta_cuda_impl(const at::Tensor& token_lora_mapping,
                                const at::Tensor& adapter_cluster,
                                const at::Tensor& token_indices_sorted,
                                const at::Tensor& active_cluster_ids,
                                const at::Tensor& num_tokens_per_cluster,
                                const at::Tensor& cluster_token_start,
                                const at::Tensor& active_lora_ids,
                                const at::Tensor& num_tokens_per_lora,
                                const at::Tensor& lora_token_start_loc,
                                const at::Tensor& no_lora_flag) {
  const BatchMetaParams p = batch_meta_params(
      token_lora_mapping, adapter_cluster, token_indices_sorted, active_cluster_ids,
      num_tokens_per_cluster, cluster_token_start, active_lora_ids, num_tokens_per_lora,
      lora_token_start_loc, no_lora_flag);
  const c10::cuda::CUDAGuard guard(token_lora_mapping.device());
  // No early return for an empty batch: the tables and the flag must still be
  // written (all padding, flag true).
  const cudaError_t err = cuda::build_batch_meta_cuda(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err != cuda::kErrorTooMuchSharedMemory,
              "build_batch_meta: ", p.num_adapters, " adapter slots and ", p.num_clusters,
              " clusters need ", cuda::build_batch_meta_shared_bytes(p),
              " bytes of shared memory, more than the ", cuda::build_batch_meta_shared_limit(),
              " one block of this device can have besides the kernel's own");
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void jd_shrink_cuda_impl(const at::Tensor& x, at::TensorList V_stacks,
                         const at::Tensor& token_indices_sorted,
                         const at::Tensor& active_cluster_ids,
                         const at::Tensor& cluster_token_start, const at::Tensor& h,
                         OptionalStacks V_quant_scales) {
  const ShrinkParams p = jd_shrink_params(x, V_stacks, token_indices_sorted, active_cluster_ids,
                                          cluster_token_start, h, V_quant_scales);
  launch_on("jd_shrink", x.device(), p.seg.num_tokens, p.h.r,
            [&](cudaStream_t stream) { return cuda::jd_shrink_cuda(p, to_dtype(x.scalar_type()), stream); });
}

void lora_shrink_cuda_impl(const at::Tensor& x, at::TensorList A_stacks, const at::Tensor& scales,
                           const at::Tensor& token_indices_sorted,
                           const at::Tensor& active_lora_ids,
                           const at::Tensor& lora_token_start_loc, const at::Tensor& h,
                           OptionalStacks A_quant_scales) {
  const ShrinkParams p = lora_shrink_params(x, A_stacks, scales, token_indices_sorted,
                                            active_lora_ids, lora_token_start_loc, h, A_quant_scales);
  launch_on("lora_shrink", x.device(), p.seg.num_tokens, p.h.r,
            [&](cudaStream_t stream) { return cuda::lora_shrink_cuda(p, to_dtype(x.scalar_type()), stream); });
}

void jd_core_cuda_impl(const at::Tensor& h, at::TensorList S_stacks,
                       const at::Tensor& token_lora_mapping, const at::Tensor& g) {
  const CoreParams p = jd_core_params(h, S_stacks, token_lora_mapping, g);
  launch_on("jd_core", h.device(), p.num_tokens, p.h.r, [&](cudaStream_t stream) {
    return cuda::jd_core_cuda(p, to_dtype(S_stacks[0].scalar_type()), stream);
  });
}

void jd_expand_cuda_impl(const at::Tensor& g, at::TensorList U_stacks,
                         at::IntArrayRef slice_offsets, const at::Tensor& token_indices_sorted,
                         const at::Tensor& active_cluster_ids,
                         const at::Tensor& cluster_token_start, const at::Tensor& y,
                         OptionalStacks U_quant_scales) {
  const ExpandParams p = jd_expand_params(g, U_stacks, slice_offsets, token_indices_sorted,
                                          active_cluster_ids, cluster_token_start, y, U_quant_scales);
  launch_on("jd_expand", y.device(), p.seg.num_tokens, p.g.r,
            [&](cudaStream_t stream) { return cuda::jd_expand_cuda(p, to_dtype(y.scalar_type()), stream); });
}

void lora_expand_cuda_impl(const at::Tensor& h, at::TensorList B_stacks,
                           at::IntArrayRef slice_offsets, const at::Tensor& token_indices_sorted,
                           const at::Tensor& active_lora_ids,
                           const at::Tensor& lora_token_start_loc, const at::Tensor& y,
                           OptionalStacks B_quant_scales) {
  const ExpandParams p = lora_expand_params(h, B_stacks, slice_offsets, token_indices_sorted,
                                            active_lora_ids, lora_token_start_loc, y, B_quant_scales);
  launch_on("lora_expand", y.device(), p.seg.num_tokens, p.g.r,
            [&](cudaStream_t stream) { return cuda::lora_expand_cuda(p, to_dtype(y.scalar_type()), stream); });
}

void jd_fused_cuda_impl(const at::Tensor& x, at::TensorList V_stacks, at::TensorList S_stacks,
                        at::TensorList U_stacks, at::IntArrayRef slice_offsets,
                        const at::Tensor& token_lora_mapping,
                        const at::Tensor& token_indices_sorted,
                        const at::Tensor& active_cluster_ids,
                        const at::Tensor& cluster_token_start, const at::Tensor& y,
                        OptionalStacks V_quant_scales, OptionalStacks U_quant_scales) {
  const FusedParams p = jd_fused_params(x, V_stacks, S_stacks, U_stacks, slice_offsets,
                                        token_lora_mapping, token_indices_sorted,
                                        active_cluster_ids, cluster_token_start, y, V_quant_scales,
                                        U_quant_scales);
  launch_on("jd_fused", x.device(), p.seg.num_tokens, p.r,
            [&](cudaStream_t stream) { return cuda::jd_fused_cuda(p, to_dtype(x.scalar_type()), stream); });
}

}  // namespace
}  // namespace jdlora::torch_ext

TORCH_LIBRARY_IMPL(jdlora_ops, CUDA, m) {
  using namespace jdlora::torch_ext;
  m.impl("build_batch_meta", &build_batch_meta_cuda_impl);
  m.impl("jd_shrink", &jd_shrink_cuda_impl);
  m.impl("jd_core", &jd_core_cuda_impl);
  m.impl("jd_expand", &jd_expand_cuda_impl);
  m.impl("jd_fused", &jd_fused_cuda_impl);
  m.impl("lora_shrink", &lora_shrink_cuda_impl);
  m.impl("lora_expand", &lora_expand_cuda_impl);
}
