// CPU registrations: check arguments (shapes and, since the metadata is on the
// host, its values too), then run the kernels of jdlora/cpu/kernels.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "jdlora/cpu/kernels.h"
#include "torch/op_params.h"

namespace jdlora::torch_ext {
namespace {

// One item is a block of up to 16 tokens against a whole weight matrix, so a
// grain of one item keeps both threads busy even at decode sizes.
void cpu_parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n > 0) at::parallel_for(0, n, 1, fn);
}

template <typename Fn>
void dispatch(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "jdlora_ops: unsupported dtype ", t);
  }
}

void build_batch_meta_cpu(const at::Tensor& token_lora_mapping, const at::Tensor& adapter_cluster,
                          const at::Tensor& token_indices_sorted,
                          const at::Tensor& active_cluster_ids,
                          const at::Tensor& num_tokens_per_cluster,
                          const at::Tensor& cluster_token_start, const at::Tensor& active_lora_ids,
                          const at::Tensor& num_tokens_per_lora,
                          const at::Tensor& lora_token_start_loc, const at::Tensor& no_lora_flag) {
  const BatchMetaParams p = batch_meta_params(
      token_lora_mapping, adapter_cluster, token_indices_sorted, active_cluster_ids,
      num_tokens_per_cluster, cluster_token_start, active_lora_ids, num_tokens_per_lora,
      lora_token_start_loc, no_lora_flag);
  validate_slots("build_batch_meta", p.token_lora_mapping, p.num_tokens, p.num_adapters,
                 "adapter_cluster");
  for (int32_t t = 0; t < p.num_tokens; ++t) {
    const int32_t a = p.token_lora_mapping[t];
    if (a < 0) continue;
    const int32_t c = p.adapter_cluster[a];
    TORCH_CHECK(c >= 0 && c < p.num_clusters, "build_batch_meta: adapter_cluster[", a, "] = ", c,
                " (adapter of token ", t, ") is out of range: expected a cluster id in [0, ",
                p.num_clusters, ") (the number of clusters, from active_cluster_ids)");
  }
  cpu::build_batch_meta(p);
}

void jd_shrink_cpu(const at::Tensor& x, at::TensorList V_stacks,
                   const at::Tensor& token_indices_sorted, const at::Tensor& active_cluster_ids,
                   const at::Tensor& cluster_token_start, const at::Tensor& h,
                   OptionalStacks V_quant_scales) {
  const ShrinkParams p = jd_shrink_params(x, V_stacks, token_indices_sorted, active_cluster_ids,
                                          cluster_token_start, h, V_quant_scales);
  validate_segments("jd_shrink", p.seg, "active_cluster_ids", "cluster_token_start", p.seg.capacity);
  dispatch(x.scalar_type(), [&](auto tag) { cpu::shrink<decltype(tag)>(p, cpu_parallel_for); });
}

void lora_shrink_cpu(const at::Tensor& x, at::TensorList A_stacks, const at::Tensor& scales,
                     const at::Tensor& token_indices_sorted, const at::Tensor& active_lora_ids,
                     const at::Tensor& lora_token_start_loc, const at::Tensor& h,
                     OptionalStacks A_quant_scales) {
  const ShrinkParams p = lora_shrink_params(x, A_stacks, scales, token_indices_sorted,
                                            active_lora_ids, lora_token_start_loc, h, A_quant_scales);
  validate_segments("lora_shrink", p.seg, "active_lora_ids", "lora_token_start_loc", p.seg.capacity);
  dispatch(x.scalar_type(), [&](auto tag) { cpu::shrink<decltype(tag)>(p, cpu_parallel_for); });
}

void jd_core_cpu(const at::Tensor& h, at::TensorList S_stacks, const at::Tensor& token_lora_mapping,
                 const at::Tensor& g) {
  const CoreParams p = jd_core_params(h, S_stacks, token_lora_mapping, g);
  validate_slots("jd_core", p.token_lora_mapping, p.num_tokens, S_stacks[0].size(0),
                 "S_stacks[0].shape[0]");
  dispatch(S_stacks[0].scalar_type(), [&](auto tag) { cpu::core<decltype(tag)>(p, cpu_parallel_for); });
}

void jd_expand_cpu(const at::Tensor& g, at::TensorList U_stacks, at::IntArrayRef slice_offsets,
                   const at::Tensor& token_indices_sorted, const at::Tensor& active_cluster_ids,
                   const at::Tensor& cluster_token_start, const at::Tensor& y,
                   OptionalStacks U_quant_scales) {
  const ExpandParams p = jd_expand_params(g, U_stacks, slice_offsets, token_indices_sorted,
                                          active_cluster_ids, cluster_token_start, y, U_quant_scales);
  validate_segments("jd_expand", p.seg, "active_cluster_ids", "cluster_token_start", p.seg.capacity);
  dispatch(y.scalar_type(), [&](auto tag) { cpu::expand<decltype(tag)>(p, cpu_parallel_for); });
}

void lora_expand_cpu(const at::Tensor& h, at::TensorList B_stacks, at::IntArrayRef slice_offsets,
                     const at::Tensor& token_indices_sorted, const at::Tensor& active_lora_ids,
                     const at::Tensor& lora_token_start_loc, const at::Tensor& y,
                     OptionalStacks B_quant_scales) {
  const ExpandParams p = lora_expand_params(h, B_stacks, slice_offsets, token_indices_sorted,
                                            active_lora_ids, lora_token_start_loc, y, B_quant_scales);
  validate_segments("lora_expand", p.seg, "active_lora_ids", "lora_token_start_loc", p.seg.capacity);
  dispatch(y.scalar_type(), [&](auto tag) { cpu::expand<decltype(tag)>(p, cpu_parallel_for); });
}

void jd_fused_cpu(const at::Tensor& x, at::TensorList V_stacks, at::TensorList S_stacks,
                  at::TensorList U_stacks, at::IntArrayRef slice_offsets,
                  const at::Tensor& token_lora_mapping, const at::Tensor& token_indices_sorted,
                  const at::Tensor& active_cluster_ids, const at::Tensor& cluster_token_start,
                  const at::Tensor& y,
                  OptionalStacks V_quant_scales, OptionalStacks U_quant_scales) {
  const FusedParams p = jd_fused_params(x, V_stacks, S_stacks, U_stacks, slice_offsets,
                                        token_lora_mapping, token_indices_sorted,
                                        active_cluster_ids, cluster_token_start, y, V_quant_scales,
                                        U_quant_scales);
  validate_segments("jd_fused", p.seg, "active_cluster_ids", "cluster_token_start", p.seg.capacity);
  validate_slots("jd_fused", p.token_lora_mapping, p.seg.num_tokens, S_stacks[0].size(0),
                 "S_stacks[0].shape[0]");
  // A token in a cluster segment must have an adapter whose S we can gather.
  for (int32_t q = 0; q < p.seg.seg_start[p.seg.capacity]; ++q) {
    const int32_t t = p.seg.token_indices_sorted[q];
    TORCH_CHECK(p.token_lora_mapping[t] >= 0, "jd_fused: token ", t,
                " lies in a cluster segment but token_lora_mapping[", t,
                "] = -1; rebuild the batch metadata from this token_lora_mapping");
  }
  dispatch(x.scalar_type(), [&](auto tag) { cpu::fused<decltype(tag)>(p, cpu_parallel_for); });
}

}  // namespace
}  // namespace jdlora::torch_ext

TORCH_LIBRARY_IMPL(jdlora_ops, CPU, m) {
  using namespace jdlora::torch_ext;
  m.impl("build_batch_meta", &build_batch_meta_cpu);
  m.impl("jd_shrink", &jd_shrink_cpu);
  m.impl("jd_core", &jd_core_cpu);
  m.impl("jd_expand", &jd_expand_cpu);
  m.impl("jd_fused", &jd_fused_cpu);
  m.impl("lora_shrink", &lora_shrink_cpu);
  m.impl("lora_expand", &lora_expand_cpu);
}
