#include "torch/op_params.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <sstream>
#include <utility>
#include <string>
#include <vector>

namespace jdlora::torch_ext {
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

// Checks of one argument; `op` and `name` prefix every message.
struct Arg {
  const char* op;
  std::string name;
  const at::Tensor& t;

  void defined() const { TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None"); }

  void dtype(at::ScalarType expected, const char* why = nullptr) const {
    TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must have dtype ", expected,
                why ? " (" : "", why ? why : "", why ? ")" : "", ", got ", t.scalar_type());
  }

  void floating() const {
    auto s = t.scalar_type();
    TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                " must have dtype float32, float16 or bfloat16, got ", s);
  }

  void device(const at::Device& expected, const char* ref) const {
    TORCH_CHECK(t.device() == expected, op, ": ", name, " must be on device ", expected,
                " (the device of ", ref, "), got ", t.device());
  }

  // expected[i] < 0 means "any size"; meaning says where the sizes come from.
  void shape(std::initializer_list<int64_t> expected, const char* meaning) const {
    bool ok = t.dim() == static_cast<int64_t>(expected.size());
    int64_t i = 0;
    for (int64_t e : expected) {
      if (ok && e >= 0 && t.size(i) != e) ok = false;
      ++i;
    }
    if (!ok) {
      std::ostringstream want;
      want << "[";
      i = 0;
      for (int64_t e : expected) {
        want << (i++ ? ", " : "");
        if (e >= 0) want << e; else want << "*";
      }
      want << "]";
      TORCH_CHECK(false, op, ": ", name, " must have shape ", want.str(), " ", meaning, ", got ",
                  shape_str(t.sizes()));
    }
  }

  void unit_last_stride() const {
    TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                " must have stride 1 in its last dimension, got strides ",
                shape_str(t.strides()));
  }

  void contiguous() const {
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
                shape_str(t.strides()), " for shape ", shape_str(t.sizes()));
  }

  void index_vector(int64_t length, const char* meaning, const at::Device& dev, const char* ref) const {
    defined();
    dtype(at::kInt);
    device(dev, ref);
    shape({length}, meaning);
    contiguous();
  }
};

void check_num_slices(const char* op, const char* name, size_t n) {
  TORCH_CHECK(n >= 1 && n <= static_cast<size_t>(kMaxSlices), op, ": ", name,
              " must hold between 1 and ", kMaxSlices, " tensors (one per slice), got ", n);
}

const int32_t* i32(const at::Tensor& t) { return t.data_ptr<int32_t>(); }

// Checked as soon as T is known, before anything else is read or sized by it.
void check_num_tokens(const char* op, int64_t T, const char* source) {
  TORCH_CHECK(T <= kMaxTokens, op, ": num_tokens = ", T, " (", source, ") exceeds the most one call takes, ",
              kMaxTokens, " (2^31 - 2^16, so that int32 token loops cannot overflow); split the batch");
}

// An output written in place must not have two indices on one element: the
// kernels' read-modify-writes of the two would race (an expanded or
// otherwise self-overlapping view). Dimensions sorted by stride, each
// stride must step past everything the smaller ones span.
void check_no_self_overlap(const char* op, const char* name, const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of dimensions with size > 1
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.size(i) > 1) dims.emplace_back(t.stride(i), t.size(i));
  std::sort(dims.begin(), dims.end());
  int64_t span = 1;  // elements covered by the dimensions so far
  for (const auto& [stride, size] : dims) {
    TORCH_CHECK(stride >= span, op, ": ", name, " is written in place, so no two of its elements may share memory;"
                " its strides ", shape_str(t.strides()), " for shape ", shape_str(t.sizes()),
                " make some overlap (a stride of ", stride, " where at least ", span, " is needed)");
    span = stride * (size - 1) + span;
  }
}

int32_t to_i32(const char* op, const char* what, int64_t v) {
  TORCH_CHECK(v <= INT32_MAX, op, ": ", what, " = ", v, " exceeds the int32 range of the metadata");
  return static_cast<int32_t>(v);
}

// A [N, rows, cols] stack whose rows are the unit-stride dimension instead of
// the columns: a transposed view of a contiguous [N, cols, rows] tensor.
bool column_major(const at::Tensor& w) {
  return w.dim() == 3 && w.size(1) > 1 && w.size(2) > 1 && w.stride(1) == 1 && w.stride(2) != 1;
}

Quant quant_of(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kChar: return Quant::kInt8;
    case at::kByte: return Quant::kInt4;
    default: return Quant::kNone;
  }
}

// Values per row of a stack: a 4-bit row holds two per byte.
int64_t logical_cols(const at::Tensor& w) {
  return quant_of(w) == Quant::kInt4 ? 2 * w.size(-1) : w.size(-1);
}

WeightStack weight_stack(const at::Tensor& w, const at::Tensor* scales) {
  const bool cm = column_major(w);
  WeightStack ws{w.data_ptr(), w.stride(0), w.dim() == 3 ? w.stride(1) : 0,
                 static_cast<int32_t>(w.dim() == 3 ? w.size(1) : 1),
                 static_cast<int32_t>(logical_cols(w)), cm ? w.stride(2) : 1};
  if (scales != nullptr) {
    ws.quant = quant_of(w);
    ws.scales = QuantScales{scales->data_ptr(), scales->stride(0), scales->stride(1),
                            static_cast<int32_t>(ws.cols / scales->size(2))};
  }
  return ws;
}

Activation activation(const at::Tensor& t) {
  return Activation{t.data_ptr(), t.stride(0), static_cast<int32_t>(t.size(1))};
}

Intermediate intermediate(const at::Tensor& t) {
  return Intermediate{t.data_ptr<float>(), t.stride(0), t.stride(1), static_cast<int32_t>(t.size(2))};
}

// x [T, d_in] or y [T, d_out]: model dtype, unit last stride.
void check_activation(const char* op, const char* name, const at::Tensor& t, int64_t T,
                      const char* meaning) {
  Arg a{op, name, t};
  a.defined();
  a.floating();
  a.shape({T, -1}, meaning);
  a.unit_last_stride();
}

// h or g [S, T, r]: fp32, unit last stride.
void check_intermediate(const char* op, const char* name, const at::Tensor& t, int64_t S, int64_t T,
                        int64_t r, const at::Device& dev, const char* ref) {
  Arg a{op, name, t};
  a.defined();
  a.dtype(at::kFloat, "intermediates are float32");
  a.device(dev, ref);
  a.shape({S, T, r}, "[num_slices, num_tokens, rank]");
  a.unit_last_stride();
}

// Segments by cluster (JD) or by adapter (baseline): the three metadata
// vectors, checked against the number of tokens and the group capacity.
SegmentTable segments(const char* op, const at::Tensor& sorted, const at::Tensor& ids,
                      const at::Tensor& start, const char* ids_name, const char* start_name,
                      int64_t T, const at::Device& dev, const char* ref) {
  Arg{op, "token_indices_sorted", sorted}.index_vector(T, "[num_tokens]", dev, ref);
  Arg{op, ids_name, ids}.defined();
  TORCH_CHECK(ids.dim() == 1, op, ": ", ids_name, " must be 1-D [capacity], got shape ",
              shape_str(ids.sizes()));
  const int64_t capacity = ids.size(0);
  Arg{op, ids_name, ids}.index_vector(capacity, "[capacity]", dev, ref);
  Arg{op, start_name, start}.index_vector(capacity + 1, "[capacity + 1] (capacity from the ids)",
                                          dev, ref);
  return SegmentTable{i32(sorted), i32(ids), i32(start), to_i32(op, "capacity", capacity),
                      to_i32(op, "num_tokens", T)};
}

// The scales of quantized stack `w` (see quant.py): [n, rows, cols / group]
// in like's dtype, the group dividing the row (and even for 4-bit rows, so
// that no byte straddles two groups).
void check_quant_scales(const char* op, const std::string& w_name, const at::Tensor& w, const std::string& name,
                        const at::Tensor& sc, const at::Tensor& like, const char* like_name) {
  Arg a{op, name, sc};
  a.defined();
  a.device(like.device(), like_name);
  TORCH_CHECK(sc.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name, " (",
              like.scalar_type(), "; scales are in the tables' float dtype), got ", sc.scalar_type());
  const int64_t cols = logical_cols(w);
  a.shape({w.size(0), w.size(1), -1}, ("[n, rows, cols / group] (n and rows from " + w_name + ")").c_str());
  const int64_t groups = sc.size(2);
  TORCH_CHECK(groups >= 1 && cols % groups == 0, op, ": ", name, " has ", groups,
              " scales per row, which must divide the row length ", cols, " of ", w_name,
              " (one scale per group of cols / groups values)");
  TORCH_CHECK(quant_of(w) != Quant::kInt4 || (cols / groups) % 2 == 0, op, ": ", name, " gives groups of ",
              cols / groups, " values, which must be even for the 4-bit ", w_name,
              " (two values per byte, one group per whole byte)");
  a.unit_last_stride();
}

// One weight stack per slice, all with the same first dimension `n` and
// dtype of `like`; rows/cols < 0 mean "any" (checked by the caller). With
// `column_major_on_cpu` (the expand stacks U and B), a CPU stack may also be
// column-major (see column_major). With `qscales` every stack is quantized:
// int8 values, or uint8 bytes of two 4-bit values (cols / 2 per row).
void check_stacks(const char* op, const char* name, at::TensorList stacks, int64_t n, int64_t rows,
                  int64_t cols, const at::Tensor& like, const char* like_name, const char* meaning,
                  bool column_major_on_cpu = false, const OptionalStacks& qscales = std::nullopt,
                  const char* qname = nullptr) {
  check_num_slices(op, name, stacks.size());
  if (qscales.has_value())
    TORCH_CHECK(qscales->size() == stacks.size(), op, ": ", qname, " must hold one tensor per slice of ", name,
                " (", stacks.size(), "), got ", qscales->size());
  for (size_t s = 0; s < stacks.size(); ++s) {
    Arg a{op, std::string(name) + "[" + std::to_string(s) + "]", stacks[s]};
    a.defined();
    a.device(like.device(), like_name);
    if (qscales.has_value()) {
      const auto st = stacks[s].scalar_type();
      TORCH_CHECK(st == at::kChar || st == at::kByte, op, ": ", a.name, " must have dtype int8 (int8 values) or "
                  "uint8 (4-bit values, two per byte) since ", qname, " is given, got ", st);
      if (st == at::kByte) {
        TORCH_CHECK(cols % 2 == 0, op, ": ", a.name, " holds 4-bit values two per byte, so its row length ", cols,
                    " must be even");
        a.shape({n, rows, cols / 2}, (std::string(meaning) + " with the last dimension halved (4-bit, two values "
                                      "per byte)").c_str());
      } else {
        a.shape({n, rows, cols}, meaning);
      }
      if (!(column_major_on_cpu && column_major(stacks[s]) && stacks[s].device().is_cpu())) a.unit_last_stride();
      check_quant_scales(op, a.name, stacks[s], std::string(qname) + "[" + std::to_string(s) + "]",
                         (*qscales)[s], like, like_name);
      continue;
    }
    TORCH_CHECK(stacks[s].scalar_type() == like.scalar_type(), op, ": ", a.name,
                " must have the dtype of ", like_name, " (", like.scalar_type(), "), got ",
                stacks[s].scalar_type(),
                quant_of(stacks[s]) != Quant::kNone ? " (a quantized stack needs its scales argument)" : "");
    a.shape({n, rows, cols}, meaning);
    if (column_major_on_cpu && column_major(stacks[s])) {
      TORCH_CHECK(stacks[s].device().is_cpu(), op, ": ", a.name,
                  " must have stride 1 in its last dimension on ", stacks[s].device(),
                  " (a column-major stack, strides ", shape_str(stacks[s].strides()),
                  ", is taken on the CPU only)");
      continue;
    }
    a.unit_last_stride();
  }
}

StackList stack_list(at::TensorList stacks, const OptionalStacks& qscales = std::nullopt) {
  StackList l{};
  l.num_slices = static_cast<int32_t>(stacks.size());
  for (size_t s = 0; s < stacks.size(); ++s) {
    l.stack[s] = weight_stack(stacks[s], qscales.has_value() ? &(*qscales)[s] : nullptr);
    l.diagonal[s] = stacks[s].dim() == 2;
  }
  return l;
}

void set_offsets(const char* op, StackList& l, at::IntArrayRef offsets, at::TensorList stacks,
                 const at::Tensor& y) {
  TORCH_CHECK(offsets.size() == stacks.size(), op, ": slice_offsets must have one entry per slice (",
              stacks.size(), "), got ", offsets.size());
  for (size_t s = 0; s < stacks.size(); ++s) {
    const int64_t d_out = stacks[s].size(1);
    TORCH_CHECK(offsets[s] >= 0 && offsets[s] + d_out <= y.size(1), op, ": slice ", s,
                " writes columns [", offsets[s], ", ", offsets[s] + d_out,
                ") (slice_offsets[", s, "] + d_out), which must lie within y's ", y.size(1),
                " columns");
    l.col_offset[s] = offsets[s];
  }
  // Slices are written concurrently on the GPU, so overlapping ranges would race.
  for (size_t a = 0; a < stacks.size(); ++a)
    for (size_t b = a + 1; b < stacks.size(); ++b) {
      const int64_t a0 = offsets[a], a1 = a0 + stacks[a].size(1);
      const int64_t b0 = offsets[b], b1 = b0 + stacks[b].size(1);
      TORCH_CHECK(a1 <= b0 || b1 <= a0, op, ": slices ", a, " and ", b, " write overlapping columns [",
                  a0, ", ", a1, ") and [", b0, ", ", b1, ") of y; slice ranges must be disjoint");
    }
}

// S stacks: each [A, r, r] (full) or [A, r] (diagonal).
void check_core_stacks(const char* op, at::TensorList S_stacks, int64_t r, const at::Tensor& like,
                       const char* like_name) {
  check_num_slices(op, "S_stacks", S_stacks.size());
  const int64_t A = S_stacks[0].defined() && S_stacks[0].dim() >= 1 ? S_stacks[0].size(0) : -1;
  for (size_t s = 0; s < S_stacks.size(); ++s) {
    const auto& S = S_stacks[s];
    Arg a{op, "S_stacks[" + std::to_string(s) + "]", S};
    a.defined();
    a.device(like.device(), like_name);
    TORCH_CHECK(S.scalar_type() == like.scalar_type(), op, ": ", a.name,
                " must have the dtype of ", like_name, " (", like.scalar_type(), "), got ",
                S.scalar_type());
    if (S.dim() == 2) {
      a.shape({A, r}, "[num_adapters, r] (diagonal; num_adapters from S_stacks[0], r from h)");
    } else {
      a.shape({A, r, r}, "[num_adapters, r, r] (full) or [num_adapters, r] (diagonal)");
    }
    a.unit_last_stride();
  }
}

}  // namespace

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "jdlora_ops: unsupported dtype ", t);
  }
}

BatchMetaParams batch_meta_params(const at::Tensor& token_lora_mapping,
                                  const at::Tensor& adapter_cluster,
                                  const at::Tensor& token_indices_sorted,
                                  const at::Tensor& active_cluster_ids,
                                  const at::Tensor& num_tokens_per_cluster,
                                  const at::Tensor& cluster_token_start,
                                  const at::Tensor& active_lora_ids,
                                  const at::Tensor& num_tokens_per_lora,
                                  const at::Tensor& lora_token_start_loc,
                                  const at::Tensor& no_lora_flag) {
  constexpr const char* op = "build_batch_meta";
  Arg m{op, "token_lora_mapping", token_lora_mapping};
  m.defined();
  TORCH_CHECK(token_lora_mapping.dim() == 1, op, ": token_lora_mapping must be 1-D [num_tokens], got shape ",
              shape_str(token_lora_mapping.sizes()));
  const auto dev = token_lora_mapping.device();
  const char* ref = "token_lora_mapping";
  const int64_t T = token_lora_mapping.size(0);
  check_num_tokens(op, T, "length of token_lora_mapping");
  m.index_vector(T, "[num_tokens]", dev, ref);
  Arg ac{op, "adapter_cluster", adapter_cluster};
  ac.defined();
  TORCH_CHECK(adapter_cluster.dim() == 1, op, ": adapter_cluster must be 1-D [num_adapters], got shape ",
              shape_str(adapter_cluster.sizes()));
  const int64_t A = adapter_cluster.size(0);
  ac.index_vector(A, "[num_adapters]", dev, ref);
  Arg{op, "active_cluster_ids", active_cluster_ids}.defined();
  TORCH_CHECK(active_cluster_ids.dim() == 1, op,
              ": active_cluster_ids must be 1-D [num_clusters], got shape ",
              shape_str(active_cluster_ids.sizes()));
  const int64_t C = active_cluster_ids.size(0);
  Arg{op, "token_indices_sorted", token_indices_sorted}.index_vector(T, "[num_tokens] (from token_lora_mapping)", dev, ref);
  Arg{op, "active_cluster_ids", active_cluster_ids}.index_vector(C, "[num_clusters]", dev, ref);
  Arg{op, "num_tokens_per_cluster", num_tokens_per_cluster}.index_vector(C, "[num_clusters] (from active_cluster_ids)", dev, ref);
  Arg{op, "cluster_token_start", cluster_token_start}.index_vector(C + 1, "[num_clusters + 1] (from active_cluster_ids)", dev, ref);
  Arg{op, "active_lora_ids", active_lora_ids}.index_vector(A, "[num_adapters] (from adapter_cluster)", dev, ref);
  Arg{op, "num_tokens_per_lora", num_tokens_per_lora}.index_vector(A, "[num_adapters] (from adapter_cluster)", dev, ref);
  Arg{op, "lora_token_start_loc", lora_token_start_loc}.index_vector(A + 1, "[num_adapters + 1] (from adapter_cluster)", dev, ref);
  Arg f{op, "no_lora_flag", no_lora_flag};
  f.defined();
  f.dtype(at::kBool);
  f.device(dev, ref);
  f.shape({1}, "[1]");
  BatchMetaParams p{};
  p.token_lora_mapping = i32(token_lora_mapping);
  p.adapter_cluster = i32(adapter_cluster);
  p.num_tokens = to_i32(op, "num_tokens", T);
  p.num_adapters = to_i32(op, "num_adapters", A);
  p.num_clusters = to_i32(op, "num_clusters", C);
  p.token_indices_sorted = token_indices_sorted.data_ptr<int32_t>();
  p.active_cluster_ids = active_cluster_ids.data_ptr<int32_t>();
  p.num_tokens_per_cluster = num_tokens_per_cluster.data_ptr<int32_t>();
  p.cluster_token_start = cluster_token_start.data_ptr<int32_t>();
  p.active_lora_ids = active_lora_ids.data_ptr<int32_t>();
  p.num_tokens_per_lora = num_tokens_per_lora.data_ptr<int32_t>();
  p.lora_token_start_loc = lora_token_start_loc.data_ptr<int32_t>();
  p.no_lora_flag = no_lora_flag.data_ptr<bool>();
  return p;
}

namespace {

// Shared by jd_shrink and lora_shrink: x [T, d_in] -> h [S, T, r], weight
// stacks [N, r, d_in] with N the capacity of the segment table.
ShrinkParams shrink_params(const char* op, const at::Tensor& x, at::TensorList W, const char* w_name,
                           const at::Tensor& sorted, const at::Tensor& ids, const at::Tensor& start,
                           const char* ids_name, const char* start_name, const at::Tensor& h,
                           const OptionalStacks& qscales, const char* qname) {
  check_activation(op, "x", x, -1, "[num_tokens, d_in]");
  const int64_t T = x.size(0);
  check_num_tokens(op, T, "rows of x");
  const int64_t d_in = x.size(1);
  ShrinkParams p{};
  p.seg = segments(op, sorted, ids, start, ids_name, start_name, T, x.device(), "x");
  check_num_slices(op, w_name, W.size());
  Arg{op, std::string(w_name) + "[0]", W[0]}.defined();
  TORCH_CHECK(W[0].dim() == 3, op, ": ", w_name, "[0] must be 3-D [capacity, r, d_in], got shape ",
              shape_str(W[0].sizes()));
  const int64_t r = W[0].size(1);
  const std::string meaning = std::string("[capacity, r, d_in] (capacity from ") + ids_name +
                              ", r from " + w_name + "[0], d_in from x)";
  check_stacks(op, w_name, W, p.seg.capacity, r, d_in, x, "x", meaning.c_str(), false, qscales, qname);
  check_intermediate(op, "h", h, static_cast<int64_t>(W.size()), T, r, x.device(), "x");
  check_no_self_overlap(op, "h", h);
  p.x = activation(x);
  p.weights = stack_list(W, qscales);
  p.h = intermediate(h);
  return p;
}

ExpandParams expand_params(const char* op, const at::Tensor& g, const char* g_name,
                           at::TensorList W, const char* w_name, at::IntArrayRef offsets,
                           const at::Tensor& sorted, const at::Tensor& ids, const at::Tensor& start,
                           const char* ids_name, const char* start_name, const at::Tensor& y,
                           const OptionalStacks& qscales, const char* qname) {
  check_activation(op, "y", y, -1, "[num_tokens, d_out_total]");
  const int64_t T = y.size(0);
  check_num_tokens(op, T, "rows of y");
  check_no_self_overlap(op, "y", y);
  ExpandParams p{};
  p.seg = segments(op, sorted, ids, start, ids_name, start_name, T, y.device(), "y");
  check_num_slices(op, w_name, W.size());
  Arg{op, g_name, g}.defined();
  TORCH_CHECK(g.dim() == 3, op, ": ", g_name, " must be 3-D [num_slices, num_tokens, r], got shape ",
              shape_str(g.sizes()));
  const int64_t r = g.size(2);
  check_intermediate(op, g_name, g, static_cast<int64_t>(W.size()), T, r, y.device(), "y");
  const std::string meaning = std::string("[capacity, d_out, r] (capacity from ") + ids_name +
                              ", r from " + g_name + ")";
  check_stacks(op, w_name, W, p.seg.capacity, -1, r, y, "y", meaning.c_str(), true, qscales, qname);
  p.g = intermediate(g);
  p.weights = stack_list(W, qscales);
  set_offsets(op, p.weights, offsets, W, y);
  p.y = activation(y);
  return p;
}

}  // namespace

ShrinkParams jd_shrink_params(const at::Tensor& x, at::TensorList V_stacks,
                              const at::Tensor& token_indices_sorted,
                              const at::Tensor& active_cluster_ids,
                              const at::Tensor& cluster_token_start, const at::Tensor& h,
                              const OptionalStacks& V_quant_scales) {
  return shrink_params("jd_shrink", x, V_stacks, "V_stacks", token_indices_sorted,
                       active_cluster_ids, cluster_token_start, "active_cluster_ids",
                       "cluster_token_start", h, V_quant_scales, "V_quant_scales");
}

ShrinkParams lora_shrink_params(const at::Tensor& x, at::TensorList A_stacks,
                                const at::Tensor& scales,
                                const at::Tensor& token_indices_sorted,
                                const at::Tensor& active_lora_ids,
                                const at::Tensor& lora_token_start_loc, const at::Tensor& h,
                                const OptionalStacks& A_quant_scales) {
  constexpr const char* op = "lora_shrink";
  ShrinkParams p = shrink_params(op, x, A_stacks, "A_stacks", token_indices_sorted,
                                 active_lora_ids, lora_token_start_loc, "active_lora_ids",
                                 "lora_token_start_loc", h, A_quant_scales, "A_quant_scales");
  Arg a{op, "scales", scales};
  a.defined();
  a.dtype(at::kFloat, "per-adapter scales are float32");
  a.device(x.device(), "x");
  a.shape({p.weights.num_slices, p.seg.capacity},
          "[num_slices, num_adapters] (num_adapters from active_lora_ids)");
  p.scales = Scales{scales.data_ptr<float>(), scales.stride(0), scales.stride(1)};
  return p;
}

CoreParams jd_core_params(const at::Tensor& h, at::TensorList S_stacks,
                          const at::Tensor& token_lora_mapping, const at::Tensor& g) {
  constexpr const char* op = "jd_core";
  Arg{op, "h", h}.defined();
  TORCH_CHECK(h.dim() == 3, op, ": h must be 3-D [num_slices, num_tokens, r], got shape ",
              shape_str(h.sizes()));
  const int64_t S = h.size(0), T = h.size(1), r = h.size(2);
  check_num_tokens(op, T, "h.size(1)");
  check_intermediate(op, "h", h, S, T, r, h.device(), "h");
  TORCH_CHECK(static_cast<int64_t>(S_stacks.size()) == S, op,
              ": S_stacks must hold one tensor per slice of h (", S, "), got ", S_stacks.size());
  check_num_slices(op, "S_stacks", S_stacks.size());
  Arg{op, "S_stacks[0]", S_stacks[0]}.defined();
  Arg{op, "S_stacks[0]", S_stacks[0]}.floating();
  check_core_stacks(op, S_stacks, r, S_stacks[0], "S_stacks[0]");
  Arg{op, "S_stacks[0]", S_stacks[0]}.device(h.device(), "h");
  Arg{op, "token_lora_mapping", token_lora_mapping}.index_vector(T, "[num_tokens] (from h)", h.device(), "h");
  check_intermediate(op, "g", g, S, T, r, h.device(), "h");
  check_no_self_overlap(op, "g", g);
  CoreParams p{};
  p.h = intermediate(h);
  p.g = intermediate(g);
  p.weights = stack_list(S_stacks);
  p.token_lora_mapping = i32(token_lora_mapping);
  p.num_tokens = to_i32(op, "num_tokens", T);
  p.num_adapters = to_i32(op, "num_adapters", S_stacks[0].size(0));
  return p;
}

ExpandParams jd_expand_params(const at::Tensor& g, at::TensorList U_stacks,
                              at::IntArrayRef slice_offsets,
                              const at::Tensor& token_indices_sorted,
                              const at::Tensor& active_cluster_ids,
                              const at::Tensor& cluster_token_start, const at::Tensor& y,
                              const OptionalStacks& U_quant_scales) {
  return expand_params("jd_expand", g, "g", U_stacks, "U_stacks", slice_offsets,
                       token_indices_sorted, active_cluster_ids, cluster_token_start,
                       "active_cluster_ids", "cluster_token_start", y, U_quant_scales, "U_quant_scales");
}

ExpandParams lora_expand_params(const at::Tensor& h, at::TensorList B_stacks,
                                at::IntArrayRef slice_offsets,
                                const at::Tensor& token_indices_sorted,
                                const at::Tensor& active_lora_ids,
                                const at::Tensor& lora_token_start_loc, const at::Tensor& y,
                                const OptionalStacks& B_quant_scales) {
  return expand_params("lora_expand", h, "h", B_stacks, "B_stacks", slice_offsets,
                       token_indices_sorted, active_lora_ids, lora_token_start_loc,
                       "active_lora_ids", "lora_token_start_loc", y, B_quant_scales, "B_quant_scales");
}

FusedParams jd_fused_params(const at::Tensor& x, at::TensorList V_stacks,
                            at::TensorList S_stacks, at::TensorList U_stacks,
                            at::IntArrayRef slice_offsets, const at::Tensor& token_lora_mapping,
                            const at::Tensor& token_indices_sorted,
                            const at::Tensor& active_cluster_ids,
                            const at::Tensor& cluster_token_start, const at::Tensor& y,
                            const OptionalStacks& V_quant_scales, const OptionalStacks& U_quant_scales) {
  constexpr const char* op = "jd_fused";
  check_activation(op, "x", x, -1, "[num_tokens, d_in]");
  const int64_t T = x.size(0);
  check_num_tokens(op, T, "rows of x");
  const int64_t d_in = x.size(1);
  FusedParams p{};
  p.seg = segments(op, token_indices_sorted, active_cluster_ids, cluster_token_start,
                   "active_cluster_ids", "cluster_token_start", T, x.device(), "x");
  check_num_slices(op, "V_stacks", V_stacks.size());
  Arg{op, "V_stacks[0]", V_stacks[0]}.defined();
  TORCH_CHECK(V_stacks[0].dim() == 3, op,
              ": V_stacks[0] must be 3-D [num_clusters, r, d_in], got shape ",
              shape_str(V_stacks[0].sizes()));
  const int64_t r = V_stacks[0].size(1);
  const int64_t S = static_cast<int64_t>(V_stacks.size());
  check_stacks(op, "V_stacks", V_stacks, p.seg.capacity, r, d_in, x, "x",
               "[num_clusters, r, d_in] (num_clusters from active_cluster_ids, r from V_stacks[0], d_in from x)",
               false, V_quant_scales, "V_quant_scales");
  TORCH_CHECK(static_cast<int64_t>(S_stacks.size()) == S && static_cast<int64_t>(U_stacks.size()) == S,
              op, ": V_stacks, S_stacks and U_stacks must hold one tensor per slice each, got ",
              V_stacks.size(), ", ", S_stacks.size(), " and ", U_stacks.size());
  check_core_stacks(op, S_stacks, r, x, "x");
  check_stacks(op, "U_stacks", U_stacks, p.seg.capacity, -1, r, x, "x",
               "[num_clusters, d_out, r] (num_clusters from active_cluster_ids, r from V_stacks[0])", true,
               U_quant_scales, "U_quant_scales");
  Arg{op, "token_lora_mapping", token_lora_mapping}.index_vector(T, "[num_tokens] (from x)", x.device(), "x");
  check_activation(op, "y", y, T, "[num_tokens, d_out_total] (num_tokens from x)");
  Arg{op, "y", y}.device(x.device(), "x");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": y must have the dtype of x (",
              x.scalar_type(), "), got ", y.scalar_type());
  check_no_self_overlap(op, "y", y);
  p.x = activation(x);
  p.shrink = stack_list(V_stacks, V_quant_scales);
  p.core = stack_list(S_stacks);
  p.expand = stack_list(U_stacks, U_quant_scales);
  set_offsets(op, p.expand, slice_offsets, U_stacks, y);
  p.y = activation(y);
  p.token_lora_mapping = i32(token_lora_mapping);
  p.r = static_cast<int32_t>(r);
  p.num_adapters = to_i32(op, "num_adapters", S_stacks[0].size(0));
  return p;
}

void validate_segments(const char* op, const SegmentTable& seg, const char* ids_name,
                       const char* start_name, int64_t num_groups) {
  const int32_t T = seg.num_tokens;
  // A repeated token would be written by two threads at once.
  std::vector<bool> seen(T, false);
  for (int32_t i = 0; i < T; ++i) {
    const int32_t v = seg.token_indices_sorted[i];
    TORCH_CHECK(v >= 0 && v < T, op, ": token_indices_sorted[", i, "] = ", v,
                " is out of range [0, ", T, ") (num_tokens)");
    TORCH_CHECK(!seen[v], op, ": token_indices_sorted must be a permutation of [0, ", T,
                "), but token ", v, " appears twice (again at position ", i, ")");
    seen[v] = true;
  }
  int32_t prev = 0;
  for (int32_t j = 0; j <= seg.capacity; ++j) {
    const int32_t s = seg.seg_start[j];
    TORCH_CHECK(s >= prev && s <= T, op, ": ", start_name, "[", j, "] = ", s,
                " must be non-decreasing and within [", prev, ", ", T, "]");
    prev = s;
  }
  for (int32_t j = 0; j < seg.capacity; ++j) {
    const int32_t id = seg.active_ids[j];
    const bool empty = seg.seg_start[j + 1] == seg.seg_start[j];
    TORCH_CHECK((id >= 0 && id < num_groups) || (id == -1 && empty), op, ": ", ids_name, "[", j,
                "] = ", id, " is out of range: expected an id in [0, ", num_groups,
                ") or -1 for an empty segment");
  }
}

void validate_slots(const char* op, const int32_t* token_lora_mapping, int32_t num_tokens,
                    int64_t num_adapters, const char* capacity_source) {
  for (int32_t t = 0; t < num_tokens; ++t) {
    const int32_t a = token_lora_mapping[t];
    TORCH_CHECK(a >= -1 && a < num_adapters, op, ": token_lora_mapping[", t, "] = ", a,
                " is out of range: expected -1 (no adapter) or a slot in [0, ", num_adapters,
                ") (the number of adapter slots, from ", capacity_source, ")");
  }
}

}  // namespace jdlora::torch_ext
