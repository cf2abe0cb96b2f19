// Plain parameter blocks shared by the CPU and CUDA kernels.
//
// Nothing here depends on PyTorch: the torch bindings check tensors and fill
// these structs, the kernels only read them. Every pointer is to device (or
// host, for CPU kernels) memory owned by the caller. Matrices have a unit
// stride in their last dimension; the other strides are in elements.
#pragma once

#include <cstdint>

namespace jdlora {

// Enough for fused q/k/v plus gate/up; kept small so a parameter block can be
// passed by value to a CUDA kernel without a device allocation.
inline constexpr int kMaxSlices = 8;

// Most tokens one call takes. Kernels step through tokens in int32 by up to
// 1024 (a block) or a tile at a time; this keeps every such step below
// INT32_MAX with room to spare.
inline constexpr int64_t kMaxTokens = (int64_t{1} << 31) - (int64_t{1} << 16);

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tokens grouped into contiguous segments of a sorted order: clusters for the
// shared-basis ops, adapters for the uncompressed baseline. Segment j covers
// sorted positions [seg_start[j], seg_start[j + 1]) and belongs to group
// active_ids[j]; unused segments have id -1 and zero length. Positions
// [seg_start[capacity], num_tokens) hold the tokens without an adapter.
struct SegmentTable {
  const int32_t* token_indices_sorted;  // [num_tokens]
  const int32_t* active_ids;            // [capacity]
  const int32_t* seg_start;             // [capacity + 1]
  int32_t capacity;
  int32_t num_tokens;
};

// How a weight stack holds its values (python/jdlora_ops/quant.py states the
// formats). The shrink and expand stacks may be quantized; cores stay float.
// kInt8: int8 values, one per element. kInt4: uint8 bytes, element c of a row
// in byte c / 2, the low nibble for even c, stored as q + 8. Either way the
// value is float(q) * float(scale of the element's group), in fp32.
enum class Quant : int32_t { kNone = 0, kInt8 = 1, kInt4 = 2 };

// The scales of a quantized stack: [N, rows, cols / group] in the model
// dtype, unit stride in the last dimension. A group never straddles a byte
// of a 4-bit row (group is even there).
struct QuantScales {
  const void* data = nullptr;
  int64_t stride_n = 0;
  int64_t stride_row = 0;
  int32_t group = 0;
};

// One [N, rows, cols] weight stack: V (rows = r, cols = d_in), U or B
// (rows = d_out, cols = r), A (rows = r, cols = d_in), S (rows = cols = r) or
// a diagonal S (rows = 1, cols = r, stride_row unused). Strides count stored
// elements: bytes for a quantized stack, so a 4-bit row of `cols` values is
// cols / 2 of them.
struct WeightStack {
  const void* data;
  int64_t stride_n;
  int64_t stride_row;
  int32_t rows;
  int32_t cols;
  // 1, except for a column-major U or B on the CPU (stride_row == 1): the
  // CPU expand reads its columns in place instead of reordering the rows.
  int64_t stride_col = 1;
  Quant quant = Quant::kNone;
  QuantScales scales{};
};

struct StackList {
  WeightStack stack[kMaxSlices];
  int64_t col_offset[kMaxSlices];  // expand: first column of the slice in y
  bool diagonal[kMaxSlices];       // core: sigma vector instead of r x r matrix
  int32_t num_slices;
};

// A row-major activation: x [T, cols] or y [T, cols], model dtype.
struct Activation {
  void* data;
  int64_t stride_t;
  int32_t cols;
};

// The fp32 intermediate h or g: [S, T, r].
struct Intermediate {
  float* data;
  int64_t stride_s;
  int64_t stride_t;
  int32_t r;
};

// Optional per-(slice, adapter) fp32 scale of the baseline shrink.
struct Scales {
  const float* data;  // nullptr: all ones
  int64_t stride_s;
  int64_t stride_a;
};

// x [T, d_in] -> h [S, T, r] with one stack per slice, grouped by seg.
struct ShrinkParams {
  Activation x;
  StackList weights;
  Intermediate h;
  Scales scales;
  SegmentTable seg;
};

// h [S, T, r] -> g [S, T, r], S_s gathered by token_lora_mapping.
struct CoreParams {
  Intermediate h;
  Intermediate g;
  StackList weights;
  const int32_t* token_lora_mapping;  // [num_tokens]
  int32_t num_tokens;
  int32_t num_adapters;  // first dimension of the S stacks
};

// y [T, :] += W_s[group] g[s] for each slice s, grouped by seg.
struct ExpandParams {
  Intermediate g;
  StackList weights;
  Activation y;
  SegmentTable seg;
};

// y += U_s[c] S_s[a] V_s[c] x for each slice, grouped by cluster.
struct FusedParams {
  Activation x;
  StackList shrink;  // V stacks
  StackList core;    // S stacks
  StackList expand;  // U stacks and column offsets
  Activation y;
  const int32_t* token_lora_mapping;
  SegmentTable seg;
  int32_t r;
  int32_t num_adapters;  // first dimension of the S stacks
};

// Counting sort of tokens by (cluster, adapter). Outputs follow
// reference.build_batch_meta.
struct BatchMetaParams {
  const int32_t* token_lora_mapping;  // [num_tokens]
  const int32_t* adapter_cluster;     // [num_adapters]
  int32_t num_tokens;
  int32_t num_adapters;
  int32_t num_clusters;
  int32_t* token_indices_sorted;      // [num_tokens]
  int32_t* active_cluster_ids;        // [num_clusters]
  int32_t* num_tokens_per_cluster;    // [num_clusters]
  int32_t* cluster_token_start;       // [num_clusters + 1]
  int32_t* active_lora_ids;           // [num_adapters]
  int32_t* num_tokens_per_lora;       // [num_adapters]
  int32_t* lora_token_start_loc;      // [num_adapters + 1]
  bool* no_lora_flag;                 // [1]
};

}  // namespace jdlora
