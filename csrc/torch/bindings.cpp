// Every op schema of jdlora_ops, and the pybind11 module that reports how the
// extension was built. Kernels register per dispatch key in ops_cpu.cpp and
// ops_cuda.cpp; shape-only (fake) kernels are registered from Python.
//
// Batch metadata names follow vLLM's LoRAKernelMeta so integrators recognise
// them. Integer metadata is int32; h and g are fp32; x, y and the weight stacks
// share one dtype (fp32, fp16 or bf16). The shrink and expand stacks may
// instead be quantized (int8, or uint8 holding two 4-bit values per byte),
// each with its scales in the optional *_quant_scales list (quant.py states
// the formats); cores are always float.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

// CUTLASS is present in every CUDA build; a CPU-only build may lack it.
#if __has_include(<cutlass/version.h>)
#include <cutlass/version.h>
#define JDLORA_HAVE_CUTLASS 1
#else
#define JDLORA_HAVE_CUTLASS 0
#endif

#include <string>

#include "build_info.h"
#include "jdlora/mode.h"

TORCH_LIBRARY(jdlora_ops, m) {
  // Stable sort of tokens by (cluster, adapter) and the per-cluster and
  // per-adapter segment tables, written into preallocated buffers.
  m.def(
      "build_batch_meta(Tensor token_lora_mapping, Tensor adapter_cluster, "
      "Tensor(a!) token_indices_sorted, Tensor(b!) active_cluster_ids, "
      "Tensor(c!) num_tokens_per_cluster, Tensor(d!) cluster_token_start, "
      "Tensor(e!) active_lora_ids, Tensor(f!) num_tokens_per_lora, "
      "Tensor(g!) lora_token_start_loc, Tensor(h!) no_lora_flag) -> ()");

  // h[s, t] = V_stacks[s][c(t)] x[t], segmented by cluster.
  m.def(
      "jd_shrink(Tensor x, Tensor[] V_stacks, Tensor token_indices_sorted, "
      "Tensor active_cluster_ids, Tensor cluster_token_start, Tensor(a!) h, "
      "Tensor[]? V_quant_scales=None) -> ()");

  // g[s, t] = S_stacks[s][a(t)] h[s, t] (full r x r, or diagonal r).
  m.def(
      "jd_core(Tensor h, Tensor[] S_stacks, Tensor token_lora_mapping, "
      "Tensor(a!) g) -> ()");

  // y[t, slice s] += U_stacks[s][c(t)] g[s, t], segmented by cluster.
  m.def(
      "jd_expand(Tensor g, Tensor[] U_stacks, int[] slice_offsets, "
      "Tensor token_indices_sorted, Tensor active_cluster_ids, "
      "Tensor cluster_token_start, Tensor(a!) y, Tensor[]? U_quant_scales=None) -> ()");

  // shrink, core and expand in one call; h and g never leave the kernel.
  m.def(
      "jd_fused(Tensor x, Tensor[] V_stacks, Tensor[] S_stacks, Tensor[] U_stacks, "
      "int[] slice_offsets, Tensor token_lora_mapping, Tensor token_indices_sorted, "
      "Tensor active_cluster_ids, Tensor cluster_token_start, Tensor(a!) y, "
      "Tensor[]? V_quant_scales=None, Tensor[]? U_quant_scales=None) -> ()");

  // Baseline: h[s, t] = scales[s, a(t)] A_stacks[s][a(t)] x[t], segmented by adapter.
  m.def(
      "lora_shrink(Tensor x, Tensor[] A_stacks, Tensor scales, "
      "Tensor token_indices_sorted, Tensor active_lora_ids, "
      "Tensor lora_token_start_loc, Tensor(a!) h, Tensor[]? A_quant_scales=None) -> ()");

  // Baseline: y[t, slice s] += B_stacks[s][a(t)] h[s, t], segmented by adapter.
  m.def(
      "lora_expand(Tensor h, Tensor[] B_stacks, int[] slice_offsets, "
      "Tensor token_indices_sorted, Tensor active_lora_ids, "
      "Tensor lora_token_start_loc, Tensor(a!) y, Tensor[]? B_quant_scales=None) -> ()");
}

namespace {

std::string cutlass_version() {
#if JDLORA_HAVE_CUTLASS
  return std::to_string(CUTLASS_MAJOR) + "." + std::to_string(CUTLASS_MINOR) + "." +
         std::to_string(CUTLASS_PATCH);
#else
  return "none";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "jdlora_ops native extension: op registrations and build information";
  m.def("build_info", [] {
    pybind11::dict info;
    info["version"] = JDLORA_VERSION;
    info["torch_version"] = TORCH_VERSION;
    info["cuda_enabled"] = JDLORA_WITH_CUDA != 0;
    info["cuda_version"] = JDLORA_CUDA_VERSION;
    info["cuda_archs"] = JDLORA_CUDA_ARCHS;
    info["cutlass_version"] = cutlass_version();
    info["cxx_compiler"] = JDLORA_CXX_COMPILER;
    info["build_type"] = JDLORA_BUILD_TYPE;
    return info;
  });
  m.def("set_batch_invariant", &jdlora::set_batch_invariant, pybind11::arg("on"),
        "Switch batch-invariant mode on or off for the whole process (see jdlora_ops.set_batch_invariant).");
  m.def("batch_invariant", &jdlora::batch_invariant, "Whether batch-invariant mode is on.");
}
