// Tensor checks and the translation of op arguments into the plain parameter
// blocks of jdlora/params.h. Shared by the CPU and CUDA registrations so both
// keys accept exactly the same inputs and fail with the same messages.
//
// Every check runs before any output is written: a bad call changes nothing.
// Messages name the op, the argument, what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "jdlora/params.h"

namespace jdlora::torch_ext {

DType to_dtype(at::ScalarType t);

// The scales of quantized weight stacks, one per slice, or none for float
// stacks (the optional Tensor[]? arguments of the schemas).
using OptionalStacks = std::optional<at::TensorList>;

// Shape/dtype/device checks only (no reads of tensor values; safe for CUDA).
BatchMetaParams batch_meta_params(const at::Tensor& token_lora_mapping,
                                  const at::Tensor& adapter_cluster,
                                  const at::Tensor& token_indices_sorted,
                                  const at::Tensor& active_cluster_ids,
                                  const at::Tensor& num_tokens_per_cluster,
                                  const at::Tensor& cluster_token_start,
                                  const at::Tensor& active_lora_ids,
                                  const at::Tensor& num_tokens_per_lora,
                                  const at::Tensor& lora_token_start_loc,
                                  const at::Tensor& no_lora_flag);

ShrinkParams jd_shrink_params(const at::Tensor& x, at::TensorList V_stacks,
                              const at::Tensor& token_indices_sorted,
                              const at::Tensor& active_cluster_ids,
                              const at::Tensor& cluster_token_start, const at::Tensor& h,
                              const OptionalStacks& V_quant_scales);

CoreParams jd_core_params(const at::Tensor& h, at::TensorList S_stacks,
                          const at::Tensor& token_lora_mapping, const at::Tensor& g);

ExpandParams jd_expand_params(const at::Tensor& g, at::TensorList U_stacks,
                              at::IntArrayRef slice_offsets,
                              const at::Tensor& token_indices_sorted,
                              const at::Tensor& active_cluster_ids,
                              const at::Tensor& cluster_token_start, const at::Tensor& y,
                              const OptionalStacks& U_quant_scales);

FusedParams jd_fused_params(const at::Tensor& x, at::TensorList V_stacks,
                            at::TensorList S_stacks, at::TensorList U_stacks,
                            at::IntArrayRef slice_offsets, const at::Tensor& token_lora_mapping,
                            const at::Tensor& token_indices_sorted,
                            const at::Tensor& active_cluster_ids,
                            const at::Tensor& cluster_token_start, const at::Tensor& y,
                            const OptionalStacks& V_quant_scales, const OptionalStacks& U_quant_scales);

ShrinkParams lora_shrink_params(const at::Tensor& x, at::TensorList A_stacks,
                                const at::Tensor& scales,
                                const at::Tensor& token_indices_sorted,
                                const at::Tensor& active_lora_ids,
                                const at::Tensor& lora_token_start_loc, const at::Tensor& h,
                                const OptionalStacks& A_quant_scales);

ExpandParams lora_expand_params(const at::Tensor& h, at::TensorList B_stacks,
                                at::IntArrayRef slice_offsets,
                                const at::Tensor& token_indices_sorted,
                                const at::Tensor& active_lora_ids,
                                const at::Tensor& lora_token_start_loc, const at::Tensor& y,
                                const OptionalStacks& B_quant_scales);

// Value checks of host-resident metadata (CPU key only: on CUDA they would
// need a device-to-host copy; the CUDA kernels skip out-of-range entries).
void validate_segments(const char* op, const SegmentTable& seg, const char* ids_name,
                       const char* start_name, int64_t num_groups);
void validate_slots(const char* op, const int32_t* token_lora_mapping, int32_t num_tokens,
                    int64_t num_adapters, const char* capacity_source);

}  // namespace jdlora::torch_ext
