// Runs the library's own host launchers (csrc/cuda/kernels.cu and
// tc_kernels.cu, compiled unchanged by g++) on emulated devices
// (emu_cudart.h) and every kernel they launch on the fiber emulation
// (emu_runtime.h): path choice (tensor-core or simple), tile, cluster and
// shrink-step choice, shared-memory accounting (static + dynamic bytes
// against 48 KiB and the per-architecture opt-in limit), the opt-in itself
// and the fallback when a fast launch fails. Results are compared with a
// float64 reference (for int8 and int4 weight stacks, one computed from the
// dequantised values); batch-invariant mode is checked bit for bit across
// batch sizes and devices, and build_batch_meta priced by a cost model.
// Run it with csrc/cuda/emulation/run.sh.
//
// Emulated devices: an A100 (sm_80, 108 SMs, 163 KiB opt-in), an H200 with
// its sm_90a image (132 SMs, 227 KiB, clusters), an H200 running an sm_80
// image (no clusters in the device code), and an A100 whose driver refuses
// the opt-in above 48 KiB.
//
// It also checks tenant isolation on every kernel (one cluster's or one
// adapter's tables poisoned with NaN, +-Inf or 1e30 change no other token's
// bits), an error pending from unrelated work surviving the launchers, two
// host threads opting one kernel in to different shared memory, and that
// kernel attributes are read once per (device, kernel).
//
// What this cannot catch: anything the emulation itself does not model
// (see emu_runtime.h and tc_hw_emu.h: timing, the memory model, the real
// MMA fragment layout, bank conflicts). In particular:
//   * races between threads inside one barrier interval: fibers switch only
//     at barriers, so a read and a write of the same shared word by two
//     threads between two barriers never interleave here (build_batch_meta's
//     cursor read of round n+1 against round n's update was such a race);
//   * races between blocks (blocks run one after another) and between
//     concurrent kernels or streams;
//   * misaligned vector accesses other than __ldg (which checks alignment)
//     and cp.async (which checks its 16-byte source): plain float2/float4/
//     uint4 dereferences of shared or global memory are host loads here;
//   * out-of-bounds global reads other than __ldg and cp.async (both check
//     that they lie in a registered buffer); out-of-bounds writes are caught
//     only when they reach a buffer's guard bytes;
//   * static shared-memory sizes that differ from the registered ones below
//     (the real launchers read them from the loaded image, so only the
//     emulation's table could be stale); launch limits other than shared
//     memory, threads per block and clusters (registers per thread,
//     grid-size limits); runtime error codes that differ from the ones
//     emulated here; per-thread current device and last error (one per
//     process here); and behaviour of the CUDA driver under graph capture.
#define JDLORA_TC_HW_HEADER "tc_hw_emu.h"
#define JDLORA_LAUNCH_ENQUEUE_HEADER "emu_launch.h"
#include "emu_runtime.h"
#include "emu_cudart.h"
#include "../kernels.cu"
#include "jdlora/cuda/tc_kernels.cuh"
#include "emu_harness.h"
#include "jdlora/mode.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>
#include <memory>
#include <tuple>
#include <cstring>
#include <string>

using namespace emu_harness;
using jdlora::Activation;
using jdlora::BatchMetaParams;
using jdlora::CoreParams;
using jdlora::DType;
using jdlora::ExpandParams;
using jdlora::FusedParams;
using jdlora::Intermediate;
using jdlora::Quant;
using jdlora::Scales;
using jdlora::SegmentTable;
using jdlora::ShrinkParams;
using jdlora::StackList;
using jdlora::WeightStack;
namespace jc = jdlora::cuda;

namespace {

enum Device { kA100 = 0, kH200 = 1, kH200Sm80Image = 2, kA100NoOptIn = 3 };

void set_up_devices() {
  emu::rt().devices = {
      {"A100 (sm_80)", 8, 108, 163 * 1024, 80, false},
      {"H200 (sm_90a image)", 9, 132, 227 * 1024, 90, false},
      {"H200 running an sm_80 image", 9, 132, 227 * 1024, 80, false},
      {"A100 refusing the shared-memory opt-in", 8, 108, 163 * 1024, 80, true},
  };
}

// Static shared memory of each kernel: what its __shared__ declarations add
// up to (the real launchers read it from the image instead).
std::map<const void*, std::string>& kernel_names() {
  static std::map<const void*, std::string> n;
  return n;
}

template <typename... P>
void reg(void (*k)(P...), size_t static_bytes, const std::string& name) {
  emu::register_kernel(k, static_bytes);
  kernel_names()[reinterpret_cast<const void*>(k)] = name;
}

// The simple kernels; those with the dequantising reader are named "<..,q>".
template <typename T, int V>
void register_simple(const std::string& t) {
  const std::string v = "<" + t + "," + std::to_string(V) + ">", vq = "<" + t + "," + std::to_string(V) + ",q>";
  constexpr size_t tok = sizeof(int) * (jc::kMaxTileTokens + 1);  // s_tok, s_count
  constexpr size_t tok_slot = sizeof(int) * (2 * jc::kMaxTileTokens + 1);  // + s_slot
  reg(jc::shrink_kernel<T, V, false>, tok, "shrink" + v);
  reg(jc::expand_kernel<T, V, false>, tok, "expand" + v);
  reg(jc::fused_kernel<T, V, false>, tok_slot, "fused" + v);
  reg(jc::shrink_kernel<T, V, true>, tok, "shrink" + vq);
  reg(jc::expand_kernel<T, V, true>, tok, "expand" + vq);
  reg(jc::fused_kernel<T, V, true>, tok_slot, "fused" + vq);
  reg(jc::core_kernel<T, V>, 0, "core" + v);
}

template <typename T, bool Q>
void register_tc(const std::string& t) {
  namespace tc = jc::tc;
  const std::string q = Q ? ",q>" : ">";
  reg(tc::tc_shrink_kernel<T, tc::DecodeTile, Q>, 0, "tc_shrink<" + t + ",16" + q);
  reg(tc::tc_shrink_kernel<T, tc::PrefillTile, Q>, 0, "tc_shrink<" + t + ",64" + q);
  reg(tc::tc_expand_kernel<T, tc::DecodeTile, Q>, 0, "tc_expand<" + t + ",16" + q);
  reg(tc::tc_expand_kernel<T, tc::PrefillTile, Q>, 0, "tc_expand<" + t + ",64" + q);
  reg(tc::tc_fused_kernel<T, tc::DecodeTile, Q>, 0, "tc_fused<" + t + ",16" + q);
  reg(tc::tc_fused_kernel<T, tc::PrefillTile, Q>, 0, "tc_fused<" + t + ",64" + q);
}

// build_batch_meta's static arrays: s_scan.
constexpr size_t kMetaStaticBytes = sizeof(int) * 32;

void register_kernels() {
  reg(jc::build_batch_meta_kernel, kMetaStaticBytes, "build_batch_meta");
  register_simple<float, 1>("f32");
  register_simple<float, 4>("f32");
  register_simple<__half, 1>("f16");
  register_simple<__half, 8>("f16");
  register_simple<__nv_bfloat16, 1>("bf16");
  register_simple<__nv_bfloat16, 8>("bf16");
  register_tc<__half, false>("f16");
  register_tc<__nv_bfloat16, false>("bf16");
  register_tc<__half, true>("f16");
  register_tc<__nv_bfloat16, true>("bf16");
}

template <typename E>
float tof(E v) {
  if constexpr (std::is_same_v<E, float>) {
    return v;
  } else {
    return to_f(v);
  }
}

template <typename E>
E fromf(float v) {
  if constexpr (std::is_same_v<E, float>) {
    return v;
  } else {
    return from_f<E>(v);
  }
}

template <typename E>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<E, float>) return DType::kFloat32;
  if constexpr (std::is_same_v<E, __half>) return DType::kFloat16;
  return DType::kBFloat16;
}

template <typename E>
const char* dtype_name() {
  if constexpr (std::is_same_v<E, float>) return "fp32";
  if constexpr (std::is_same_v<E, __half>) return "fp16";
  return "bf16";
}

template <typename E>
double tolerance() {
  if constexpr (std::is_same_v<E, float>) return 2e-5;
  if constexpr (std::is_same_v<E, __half>) return 2e-3;
  return 1.6e-2;
}

// Launches recorded since `from`, as "name grid smem cluster" lines.
std::string launches_since(size_t from) {
  std::string s;
  const auto& L = emu::rt().launches;
  for (size_t i = from; i < L.size(); ++i) {
    const auto& l = L[i];
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s%s grid %ux%u smem %zu cl %d", s.empty() ? "" : "; ",
                  kernel_names()[l.kernel].c_str(), l.grid.x, l.grid.y, l.smem, l.cluster);
    s += buf;
  }
  return s;
}

bool launched_since(size_t from, const std::string& prefix, int* cluster = nullptr) {
  const auto& L = emu::rt().launches;
  for (size_t i = from; i < L.size(); ++i)
    if (kernel_names()[L[i].kernel].rfind(prefix, 0) == 0) {
      if (cluster) *cluster = L[i].cluster;
      return true;
    }
  return false;
}

void check(bool ok, const std::string& what) {
  if (!ok) ++failures;
  std::printf("  %-60s %s\n", what.c_str(), ok ? "ok" : "FAIL");
}

void check_no_pending_error(const std::string& op) {
  check(cudaGetLastError() == cudaSuccess, op + ": no error left pending");
}

// ---------------------------------------------------------------------------
// build_batch_meta through its launcher, against the reference.

struct MetaBufs {
  Buf<int> mapping, ac, sorted, c_ids, c_cnt, c_start, l_ids, l_cnt, l_start;
  Buf<bool> flag;
  int T, A, C;
  MetaBufs(int T_, int A_, int C_)
      : mapping(std::max(T_, 1)), ac(A_), sorted(std::max(T_, 1)), c_ids(C_), c_cnt(C_), c_start(C_ + 1),
        l_ids(A_), l_cnt(A_), l_start(A_ + 1), flag(1), T(T_), A(A_), C(C_) {}
  BatchMetaParams params() {
    return BatchMetaParams{mapping.data, ac.data,     T,           A,           C,           sorted.data, c_ids.data,
                           c_cnt.data,   c_start.data, l_ids.data, l_cnt.data, l_start.data, flag.data};
  }
  SegmentTable clusters() const { return SegmentTable{sorted.data, c_ids.data, c_start.data, C, T}; }
  SegmentTable loras() const { return SegmentTable{sorted.data, l_ids.data, l_start.data, A, T}; }
};

// Fills mb with a batch, runs the op; returns the launcher's status.
cudaError_t build_meta_op(MetaBufs& mb, const std::vector<int>& mapping, const std::vector<int>& ac) {
  for (int t = 0; t < mb.T; ++t) mb.mapping[t] = mapping[t];
  for (int a = 0; a < mb.A; ++a) mb.ac[a] = ac[a];
  for (Buf<int>* b : {&mb.sorted, &mb.c_ids, &mb.c_cnt, &mb.c_start, &mb.l_ids, &mb.l_cnt, &mb.l_start})
    for (size_t i = 0; i < b->n; ++i) (*b)[i] = INT32_MIN;
  return jc::build_batch_meta_cuda(mb.params(), nullptr);
}

bool meta_matches(const MetaBufs& mb, const std::vector<int>& mapping, const std::vector<int>& ac) {
  const Meta ref = build_meta(mapping, ac, mb.C);
  int n_with = 0;
  for (int a : mapping) n_with += a >= 0 ? 1 : 0;
  bool ok = *mb.flag.data == (n_with == 0);
  for (int t = 0; t < mb.T; ++t) ok = ok && mb.sorted[t] == ref.sorted[t];
  auto segs = [&](const Buf<int>& ids, const Buf<int>& cnt, const Buf<int>& start, const std::vector<int>& rids,
                  const std::vector<int>& rstart, int cap) {
    for (int k = 0; k < cap; ++k) {
      const int want_cnt = rids[k] >= 0 ? rstart[k + 1] - rstart[k] : 0;
      ok = ok && ids[k] == rids[k] && cnt[k] == want_cnt && start[k] == rstart[k];
    }
    ok = ok && start[cap] == rstart[cap];
  };
  segs(mb.c_ids, mb.c_cnt, mb.c_start, ref.c_ids, ref.c_start, mb.C);
  segs(mb.l_ids, mb.l_cnt, mb.l_start, ref.l_ids, ref.l_start, mb.A);
  return ok;
}

// Cost model of build_batch_meta (no timing exists in the emulation, so this
// is a model, not a measurement): its serial resources are the busiest
// warp's collective steps (votes, matches, shuffles, each with a shared-memory
// round trip), the block barriers, and the atomics on the busiest shared
// address (atomics on one address serialise). Assumed: 25 cycles per
// collective step, 100 per 1024-thread barrier, 8 per atomic on the busiest
// address, 1.98 GHz (H200 boost clock). With JDLORA_META_COST_JSON set, the
// figures are also appended there, one JSON object per line.
void report_meta_cost(const std::string& pattern, int T, int A, int C, double secs) {
  const auto& st = emu::m().stats;
  const long steps = st.max_warp_collectives();
  const long hot = st.max_atomics_one_address();
  const double cycles =
      25.0 * static_cast<double>(steps) + 100.0 * static_cast<double>(st.block_barriers) + 8.0 * static_cast<double>(hot);
  const double us = cycles / 1980.0;
  std::printf("  cost model: busiest warp %ld collective steps, %ld block barriers, %ld atomics (%ld on the busiest"
              " address); estimate %.0f cycles = %.1f us at 1.98 GHz (emulated in %.1f s)\n",
              steps, st.block_barriers, st.total_atomics(), hot, cycles, us, secs);
  if (const char* path = std::getenv("JDLORA_META_COST_JSON")) {
    if (FILE* f = std::fopen(path, "a")) {
      std::fprintf(f,
                   "{\"spread\": \"%s\", \"num_tokens\": %d, \"num_adapters\": %d, \"num_clusters\": %d, "
                   "\"warp_steps\": %ld, \"block_barriers\": %ld, \"atomics\": %ld, \"atomics_busiest_address\": %ld, "
                   "\"cycles\": %.0f, \"estimate_us\": %.1f}\n",
                   pattern.c_str(), T, A, C, steps, st.block_barriers, st.total_atomics(), hot, cycles, us);
      std::fclose(f);
    }
  }
}

void meta_case(Device dev, const std::string& pattern, int T, int A, int C, bool cost = false) {
  cudaSetDevice(dev);
  MetaBufs mb(T, A, C);
  const bool parallel = jc::batch_meta_smem_bytes(A, C, true) <= jc::build_batch_meta_shared_limit();
  std::printf("build_batch_meta on %s: T=%d A=%d C=%d %s (static %zu + dynamic %zu bytes, %s)\n",
              emu::rt().devices[dev].name, T, A, C, pattern.c_str(), kMetaStaticBytes,
              jc::build_batch_meta_shared_bytes(mb.params()), parallel ? "all warps place" : "one warp places");
  const std::vector<int> mapping = token_mapping(pattern, T, A);
  std::vector<int> ac(A);
  for (int& v : ac) v = randint(C);
  const size_t launches_before = emu::rt().launches.size();
  const auto t0 = std::chrono::steady_clock::now();
  const cudaError_t err = build_meta_op(mb, mapping, ac);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  check(err == cudaSuccess, std::string("launch: ") + cudaGetErrorName(err));
  check_no_pending_error("build_batch_meta");
  if (err == cudaSuccess) check(meta_matches(mb, mapping, ac), "tables match the reference");
  check(mb.mapping.guards_ok() && mb.sorted.guards_ok() && mb.l_start.guards_ok() && mb.c_start.guards_ok(),
        "guard bytes intact");
  check(emu::rt().launches.size() == launches_before + 1 &&
            emu::rt().launches.back().smem == jc::batch_meta_smem_bytes(A, C, parallel),
        "launched with the shared memory of its placement");
  if (cost) report_meta_cost(pattern, T, A, C, secs);
}

void meta_too_large(Device dev, int A, int C) {
  cudaSetDevice(dev);
  std::printf("build_batch_meta on %s: A=%d C=%d does not fit\n", emu::rt().devices[dev].name, A, C);
  std::vector<int> mapping(16, 0), ac(A, 0);
  MetaBufs mb(16, A, C);
  const size_t before = emu::rt().launches.size();
  const cudaError_t err = build_meta_op(mb, mapping, ac);
  check(err == jc::kErrorTooMuchSharedMemory, std::string("refused as too much shared memory, got ") + cudaGetErrorName(err));
  check(emu::rt().launches.size() == before, "nothing launched");
  check(jc::build_batch_meta_shared_limit() == static_cast<size_t>(emu::rt().devices[dev].smem_optin) - kMetaStaticBytes,
        "reported limit is the opt-in limit less the static bytes");
  check_no_pending_error("build_batch_meta");
}

// ---------------------------------------------------------------------------
// The other ops through their launchers.

struct OpsCase {
  std::string name;
  Device dev;
  int T, A, C, d, r;
  std::vector<int> widths;
  std::string pattern;
  int x_lead = 0, x_extra = 0;  // x is columns [x_lead, x_lead + d) of rows x_lead + d + x_extra wide
  int y_lead = 0, y_extra = 0;
  int gap = 0;                  // columns between y slices
  float x_scale = 1.f, v_scale = 1.f, g_scale = 1.f, u_scale = 1.f;
  bool rel_to_ref = false;      // y starts at 0 and the error is relative to max |ref|, not max(1, max |ref|)
  unsigned ops = 0x3f;          // 1 shrink, 2 lora_shrink, 4 core, 8 expand, 16 lora_expand, 32 fused
  std::string expect_fused;     // kernel name prefix fused must launch ("" : any)
  int expect_cluster = 0;       // cluster size of the fused launch (0: any)
  std::vector<QuantFormat> shrink_q, expand_q;  // per slice: V and A, U and B (empty: float)
  bool expect_simple = false;   // every op must take the simple kernels
  bool expect_tc = false;       // every op but jd_core must take the tensor-core kernels
};

// The StackList of one weight stack per slice: [groups, r, d] on the
// shrink side, [groups, widths[s], r] on the expand side.
template <typename E>
StackList stack_list(const std::vector<std::unique_ptr<Buf<E>>>& b, const std::vector<int>& widths,
                     const std::vector<int>& offsets, int r, int d, bool expand_side) {
  StackList l{};
  l.num_slices = static_cast<int>(b.size());
  for (int s = 0; s < l.num_slices; ++s) {
    const int rows = expand_side ? widths[s] : r, cols = expand_side ? r : d;
    l.stack[s] = WeightStack{b[s]->data, static_cast<int64_t>(rows) * cols, cols, rows, cols};
    l.col_offset[s] = offsets[s];
  }
  return l;
}

// The core stacks: [A, r, r], or [A, r] where diag[s].
template <typename E>
StackList core_list(const std::vector<std::unique_ptr<Buf<E>>>& b, const std::vector<bool>& diag, int r) {
  StackList l{};
  l.num_slices = static_cast<int>(b.size());
  for (int s = 0; s < l.num_slices; ++s) {
    l.stack[s] = WeightStack{b[s]->data, static_cast<int64_t>(r) * (diag[s] ? 1 : r), diag[s] ? 0 : r,
                             diag[s] ? 1 : r, r};
    l.diagonal[s] = diag[s];
  }
  return l;
}

template <typename E>
void ops_case(const OpsCase& c) {
  cudaSetDevice(c.dev);
  const int T = c.T, A = c.A, C = c.C, d = c.d, r = c.r;
  const int S = static_cast<int>(c.widths.size());
  std::printf("%s on %s: T=%d A=%d C=%d d=%d r=%d S=%d %s %s\n", c.name.c_str(), emu::rt().devices[c.dev].name, T, A,
              C, d, r, S, c.pattern.c_str(), dtype_name<E>());
  if (!c.shrink_q.empty() || !c.expand_q.empty())
    std::printf("  shrink stacks %s, expand stacks %s\n", format_names(c.shrink_q).c_str(),
                format_names(c.expand_q).c_str());
  const std::vector<int> mapping = token_mapping(c.pattern, T, A);
  std::vector<int> ac(A);
  for (int& v : ac) v = randint(C);
  MetaBufs mb(T, A, C);
  if (build_meta_op(mb, mapping, ac) != cudaSuccess || !meta_matches(mb, mapping, ac)) {
    check(false, "batch metadata");
    return;
  }

  std::vector<int> offsets;
  int ycols = c.gap;
  for (int w : c.widths) {
    offsets.push_back(ycols);
    ycols += w + c.gap;
  }
  const int x_ld = c.x_lead + d + c.x_extra, y_ld = c.y_lead + ycols + c.y_extra;
  Buf<E> xb(static_cast<size_t>(T) * x_ld), yb(static_cast<size_t>(T) * y_ld);
  E* x = xb.data + c.x_lead;
  E* y = yb.data + c.y_lead;
  for (size_t i = 0; i < xb.n; ++i) xb[i] = fromf<E>(randn() * c.x_scale);
  std::vector<E> y0(yb.n);
  for (size_t i = 0; i < yb.n; ++i) y0[i] = fromf<E>(c.rel_to_ref ? 0.f : randn());

  auto fill = [](Buf<E>& b, float scale) {
    for (size_t i = 0; i < b.n; ++i) b[i] = fromf<E>(randn() * scale);
  };
  Tables<E> V, U, Af, Bf;
  std::vector<std::unique_ptr<Buf<E>>> Sg;
  std::vector<bool> diag(S);
  const float sd = 1.f / std::sqrt(static_cast<float>(d)), sr = 1.f / std::sqrt(static_cast<float>(r));
  for (int s = 0; s < S; ++s) {
    diag[s] = s == 1;
    const QuantFormat fs = format_of(c.shrink_q, s), fe = format_of(c.expand_q, s);
    V.push_back(std::make_unique<Table<E>>(C, r, d, fs, c.v_scale * sd, rng));
    U.push_back(std::make_unique<Table<E>>(C, c.widths[s], r, fe, c.u_scale * sr, rng));
    Sg.emplace_back(new Buf<E>(static_cast<size_t>(A) * r * (diag[s] ? 1 : r)));
    fill(*Sg[s], diag[s] ? 1.f : sr);
    Af.push_back(std::make_unique<Table<E>>(A, r, d, fs, sd, rng));
    Bf.push_back(std::make_unique<Table<E>>(A, c.widths[s], r, fe, c.u_scale * sr, rng));
  }
  Buf<float> scales(static_cast<size_t>(S) * A);
  for (size_t i = 0; i < scales.n; ++i) scales[i] = 0.5f + std::uniform_real_distribution<float>(0, 1)(rng);
  Buf<float> h(static_cast<size_t>(S) * T * r), g(static_cast<size_t>(S) * T * r);
  std::vector<float> gin(g.n);
  for (float& v : gin) v = randn() * c.g_scale;

  auto stacks = [&](const Tables<E>& t, bool) { return table_list(t, offsets); };
  const StackList Sl = core_list(Sg, diag, r);
  const Activation xa{x, x_ld, d};
  const Activation ya{y, y_ld, ycols};
  const Intermediate ha{h.data, static_cast<int64_t>(T) * r, r, r};
  const Intermediate ga{g.data, static_cast<int64_t>(T) * r, r, r};
  const double tol = tolerance<E>();
  const DType dt = dtype_of<E>();

  auto X = [&](int t, int k) { return static_cast<double>(tof(x[static_cast<size_t>(t) * x_ld + k])); };
  auto W = [&](const Buf<E>& b, size_t i) { return static_cast<double>(tof(b[i])); };
  auto ref_h = [&](int s, int t, bool lora) {
    std::vector<double> out(r, 0.0);
    const int a = mapping[t];
    if (a < 0) return out;
    const int grp = lora ? a : ac[a];
    for (int i = 0; i < r; ++i) {
      const Table<E>& w = lora ? *Af[s] : *V[s];
      for (int k = 0; k < d; ++k) out[i] += w.at(grp, i, k) * X(t, k);
      if (lora) out[i] *= scales[static_cast<size_t>(s) * A + a];
    }
    return out;
  };
  auto ref_core = [&](int s, int t, const std::vector<double>& hv) {
    std::vector<double> out(r, 0.0);
    const int a = mapping[t];
    if (a < 0) return out;
    for (int i = 0; i < r; ++i) {
      if (diag[s]) {
        out[i] = W(*Sg[s], static_cast<size_t>(a) * r + i) * hv[i];
      } else {
        for (int k = 0; k < r; ++k) out[i] += W(*Sg[s], (static_cast<size_t>(a) * r + i) * r + k) * hv[k];
      }
    }
    return out;
  };
  // y reference: y0 plus, per token with an adapter, W_s[grp] g_s for every slice.
  auto ref_y = [&](auto g_of, bool lora) {
    std::vector<double> ref(yb.n);
    for (size_t i = 0; i < yb.n; ++i) ref[i] = tof(y0[i]);
    for (int t = 0; t < T; ++t) {
      const int a = mapping[t];
      if (a < 0) continue;
      const int grp = lora ? a : ac[a];
      for (int s = 0; s < S; ++s) {
        const std::vector<double> gv = g_of(s, t);
        const Table<E>& w = lora ? *Bf[s] : *U[s];
        for (int j = 0; j < c.widths[s]; ++j) {
          double acc = 0;
          for (int i = 0; i < r; ++i) acc += w.at(grp, j, i) * gv[i];
          ref[static_cast<size_t>(t) * y_ld + c.y_lead + offsets[s] + j] += acc;
        }
      }
    }
    return ref;
  };
  auto compare = [&](const std::string& what, auto got_at, const std::vector<double>& ref) {
    double err = 0, ref_max = c.rel_to_ref ? 0 : 1;
    for (size_t i = 0; i < ref.size(); ++i) ref_max = std::max(ref_max, std::fabs(ref[i]));
    for (size_t i = 0; i < ref.size(); ++i) {
      const double v = got_at(i);
      err = std::isfinite(v) ? std::max(err, std::fabs(v - ref[i])) : INFINITY;
    }
    report(what, err / ref_max, tol);
  };
  auto run = [&](const std::string& op, auto&& launch) {
    const size_t before = emu::rt().launches.size();
    const cudaError_t err = launch();
    check(err == cudaSuccess, op + " launch: " + cudaGetErrorName(err));
    check_no_pending_error(op);
    std::printf("    %s\n", launches_since(before).c_str());
    if (c.expect_simple) check(!launched_since(before, "tc_"), op + " took the simple kernels");
    if (c.expect_tc && op != "jd_core") check(launched_since(before, "tc_"), op + " took the tensor-core kernels");
    return before;
  };
  auto h_at = [&](size_t i) { return static_cast<double>(h[i]); };
  auto y_at = [&](size_t i) { return static_cast<double>(tof(yb[i])); };
  auto ref_hs = [&](bool lora) {
    std::vector<double> ref(h.n);
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < T; ++t) {
        const auto hv = ref_h(s, t, lora);
        for (int i = 0; i < r; ++i) ref[(static_cast<size_t>(s) * T + t) * r + i] = hv[i];
      }
    return ref;
  };
  auto reset_y = [&] {
    for (size_t i = 0; i < yb.n; ++i) yb[i] = y0[i];
  };

  for (int lora = 0; lora < 2; ++lora) {
    if (!(c.ops & (lora ? 2u : 1u))) continue;
    ShrinkParams p{xa, stacks(lora ? Af : V, false), ha,
                   lora ? Scales{scales.data, A, 1} : Scales{nullptr, 0, 0}, lora ? mb.loras() : mb.clusters()};
    for (size_t i = 0; i < h.n; ++i) h[i] = NAN;
    const char* op = lora ? "lora_shrink" : "jd_shrink";
    run(op, [&] { return lora ? jc::lora_shrink_cuda(p, dt, nullptr) : jc::jd_shrink_cuda(p, dt, nullptr); });
    compare(std::string(op) + " h", h_at, ref_hs(lora));
  }
  if (c.ops & 4u) {
    for (size_t i = 0; i < h.n; ++i) h[i] = gin[i];
    for (size_t i = 0; i < g.n; ++i) g[i] = NAN;
    CoreParams p{ha, ga, Sl, mb.mapping.data, T, A};
    run("jd_core", [&] { return jc::jd_core_cuda(p, dt, nullptr); });
    std::vector<double> ref(g.n);
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < T; ++t) {
        std::vector<double> hv(r);
        for (int i = 0; i < r; ++i) hv[i] = gin[(static_cast<size_t>(s) * T + t) * r + i];
        const auto gv = ref_core(s, t, hv);
        for (int i = 0; i < r; ++i) ref[(static_cast<size_t>(s) * T + t) * r + i] = gv[i];
      }
    compare("jd_core g", [&](size_t i) { return static_cast<double>(g[i]); }, ref);
  }
  auto g_in = [&](int s, int t) {
    std::vector<double> gv(r);
    for (int i = 0; i < r; ++i) gv[i] = gin[(static_cast<size_t>(s) * T + t) * r + i];
    return gv;
  };
  for (int lora = 0; lora < 2; ++lora) {
    if (!(c.ops & (lora ? 16u : 8u))) continue;
    for (size_t i = 0; i < g.n; ++i) g[i] = gin[i];
    reset_y();
    ExpandParams p{ga, stacks(lora ? Bf : U, true), ya, lora ? mb.loras() : mb.clusters()};
    const char* op = lora ? "lora_expand" : "jd_expand";
    run(op, [&] { return lora ? jc::lora_expand_cuda(p, dt, nullptr) : jc::jd_expand_cuda(p, dt, nullptr); });
    compare(std::string(op) + " y (all columns)", y_at, ref_y(g_in, lora));
  }
  if (c.ops & 32u) {
    reset_y();
    FusedParams p{xa, stacks(V, false), Sl, stacks(U, true), ya, mb.mapping.data, mb.clusters(), r, A};
    const size_t before = run("jd_fused", [&] { return jc::jd_fused_cuda(p, dt, nullptr); });
    compare("jd_fused y (all columns)", y_at, ref_y([&](int s, int t) { return ref_core(s, t, ref_h(s, t, false)); }, false));
    if (!c.expect_fused.empty()) {
      int cl = 0;
      check(launched_since(before, c.expect_fused, &cl), "fused ran " + c.expect_fused);
      if (c.expect_cluster > 0)
        check(cl == c.expect_cluster, "fused cluster size " + std::to_string(cl) + " == " + std::to_string(c.expect_cluster));
    }
  }
  bool guards = xb.guards_ok() && yb.guards_ok() && h.guards_ok() && g.guards_ok();
  for (int s = 0; s < S; ++s)
    guards = guards && V[s]->guards_ok() && U[s]->guards_ok() && Sg[s]->guards_ok() && Af[s]->guards_ok() &&
             Bf[s]->guards_ok();
  check(guards, "guard bytes intact");
}

// ---------------------------------------------------------------------------
// Batch-invariant mode: one probe token (the batch's last, with the same
// slot, x row, h and g rows and y row in every batch) through every op at
// several batch sizes and on both architectures. The weights and the
// probe's rows come from a fixed seed; the other tokens from one that
// changes with T.

struct ProbeRun {
  std::vector<uint32_t> bits;  // the probe's outputs, op after op, as raw bits
  std::vector<int> clusters;   // cluster size of each shrink and fused launch
};

template <typename E>
ProbeRun probe_run(Device dev, int T, bool invariant, bool quant) {
  constexpr int A = 12, C = 3, r = 16, S = 2, kProbeSlot = 5;
  // Quantized: int4 and int8 slices on both sides (int4 groups divide d).
  const int d = quant ? 256 : 520;
  const std::vector<QuantFormat> shrink_q = {q4(64, 8), q8()}, expand_q = {q8(), q4(8)};
  const std::vector<int> widths = {64, 32}, offsets = {0, 64};
  constexpr int ycols = 96;
  cudaSetDevice(dev);
  jdlora::set_batch_invariant(invariant);
  std::mt19937 fixed(99), other(static_cast<unsigned>(T));
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](auto& buf, size_t from, size_t to, std::mt19937& g, float scale) {
    for (size_t i = from; i < to; ++i) buf[i] = fromf<E>(nd(g) * scale);
  };
  std::vector<int> ac(A), mapping(T);
  for (int& v : ac) v = std::uniform_int_distribution<int>(0, C - 1)(fixed);
  for (int& v : mapping) v = std::uniform_int_distribution<int>(-1, A - 1)(other);
  mapping[T - 1] = kProbeSlot;
  MetaBufs mb(T, A, C);
  ProbeRun out;
  if (build_meta_op(mb, mapping, ac) != cudaSuccess) return out;

  const size_t probe_x = static_cast<size_t>(T - 1) * d, probe_y = static_cast<size_t>(T - 1) * ycols;
  Buf<E> xb(static_cast<size_t>(T) * d), yb(static_cast<size_t>(T) * ycols);
  std::vector<E> y0(yb.n);
  fill(xb, 0, probe_x, other, 1.f);
  fill(xb, probe_x, xb.n, fixed, 1.f);
  fill(y0, 0, probe_y, other, 1.f);
  fill(y0, probe_y, y0.size(), fixed, 1.f);
  Tables<E> V, U, Af, Bf;
  std::vector<std::unique_ptr<Buf<E>>> Sg;
  for (int s = 0; s < S; ++s) {
    const QuantFormat fs = quant ? shrink_q[s] : QuantFormat{}, fe = quant ? expand_q[s] : QuantFormat{};
    const size_t sn = static_cast<size_t>(A) * r * (s == 1 ? 1 : r);
    V.push_back(std::make_unique<Table<E>>(C, r, d, fs, 1.f / std::sqrt(float(d)), fixed));
    U.push_back(std::make_unique<Table<E>>(C, widths[s], r, fe, 1.f / std::sqrt(float(r)), fixed));
    Sg.emplace_back(new Buf<E>(sn));
    fill(*Sg.back(), 0, sn, fixed, 1.f);
    Af.push_back(std::make_unique<Table<E>>(A, r, d, fs, 1.f / std::sqrt(float(d)), fixed));
    Bf.push_back(std::make_unique<Table<E>>(A, widths[s], r, fe, 1.f, fixed));
  }
  Buf<float> scales(static_cast<size_t>(S) * A), h(static_cast<size_t>(S) * T * r), g(h.n);
  for (size_t i = 0; i < scales.n; ++i) scales[i] = 0.5f + 0.1f * static_cast<float>(i % 7);
  std::vector<float> gin(g.n);
  for (int s = 0; s < S; ++s)
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < r; ++i) gin[(static_cast<size_t>(s) * T + t) * r + i] = nd(t == T - 1 ? fixed : other);

  auto stacks = [&](const Tables<E>& t, bool) { return table_list(t, offsets); };
  const StackList Sl = core_list(Sg, {false, true}, r);
  const Activation xa{xb.data, d, d}, ya{yb.data, ycols, ycols};
  const Intermediate ha{h.data, static_cast<int64_t>(T) * r, r, r}, ga{g.data, static_cast<int64_t>(T) * r, r, r};
  const DType dt = dtype_of<E>();
  auto keep_f32 = [&](const Buf<float>& b) {
    for (int s = 0; s < S; ++s)
      for (int i = 0; i < r; ++i) {
        uint32_t u;
        std::memcpy(&u, &b[(static_cast<size_t>(s) * T + T - 1) * r + i], 4);
        out.bits.push_back(u);
      }
  };
  auto keep_y = [&] {
    for (int j = 0; j < ycols; ++j) {
      uint32_t u = 0;
      std::memcpy(&u, &yb[probe_y + j], sizeof(E));
      out.bits.push_back(u);
    }
  };
  auto launch = [&](const std::string& op, bool split_k, auto&& f) {
    const size_t before = emu::rt().launches.size();
    check(f() == cudaSuccess, op + " launch");
    for (size_t i = before; i < emu::rt().launches.size(); ++i)
      if (split_k) out.clusters.push_back(emu::rt().launches[i].cluster);
  };
  auto reset_y = [&] {
    for (size_t i = 0; i < yb.n; ++i) yb[i] = y0[i];
  };
  for (int lora = 0; lora < 2; ++lora) {
    ShrinkParams p{xa, stacks(lora ? Af : V, false), ha, lora ? Scales{scales.data, A, 1} : Scales{nullptr, 0, 0},
                   lora ? mb.loras() : mb.clusters()};
    launch("shrink", true, [&] { return lora ? jc::lora_shrink_cuda(p, dt, nullptr) : jc::jd_shrink_cuda(p, dt, nullptr); });
    keep_f32(h);
  }
  for (size_t i = 0; i < h.n; ++i) h[i] = gin[i];
  CoreParams cp{ha, ga, Sl, mb.mapping.data, T, A};
  launch("jd_core", false, [&] { return jc::jd_core_cuda(cp, dt, nullptr); });
  keep_f32(g);
  for (int lora = 0; lora < 2; ++lora) {
    for (size_t i = 0; i < g.n; ++i) g[i] = gin[i];
    reset_y();
    ExpandParams p{ga, stacks(lora ? Bf : U, true), ya, lora ? mb.loras() : mb.clusters()};
    launch("expand", false, [&] { return lora ? jc::lora_expand_cuda(p, dt, nullptr) : jc::jd_expand_cuda(p, dt, nullptr); });
    keep_y();
  }
  reset_y();
  FusedParams fp{xa, stacks(V, false), Sl, stacks(U, true), ya, mb.mapping.data, mb.clusters(), r, A};
  launch("jd_fused", true, [&] { return jc::jd_fused_cuda(fp, dt, nullptr); });
  keep_y();
  jdlora::set_batch_invariant(false);
  return out;
}

// With the mode on, the probe's outputs are bitwise equal at every batch
// size on both devices. With it off, on the tensor-core path (split_k), the
// launches differ (the cluster split follows the batch and the device) and
// so do the outputs, so the first check can fail; the simple kernels split
// no sum, and are checked to be invariant in both modes. With quant, the
// stacks are int8 and int4 (bf16: the tensor-core path).
template <typename E>
void batch_invariance(const std::vector<int>& sizes, bool split_k, bool quant = false) {
  std::printf("batch-invariant mode, %s%s: probe token at T =", dtype_name<E>(),
              quant ? " with int8 and int4 stacks" : "");
  for (int T : sizes) std::printf(" %d", T);
  std::printf(" on the A100 and the H200\n");
  // Quantized stacks: the mode on only (the float runs show the mode off
  // differing).
  for (int invariant = 1; invariant >= (quant ? 1 : 0); --invariant) {
    std::vector<ProbeRun> runs;
    for (Device dev : {kH200, kA100})
      for (int T : sizes) runs.push_back(probe_run<E>(dev, T, invariant != 0, quant));
    bool same_bits = true, same_clusters_per_device = true;
    std::string cls;
    for (size_t i = 0; i < runs.size(); ++i) {
      same_bits = same_bits && !runs[i].bits.empty() && runs[i].bits == runs[0].bits;
      const size_t first_of_device = i / sizes.size() * sizes.size();
      same_clusters_per_device = same_clusters_per_device && runs[i].clusters == runs[first_of_device].clusters;
      cls += " " + std::to_string(runs[i].clusters.empty() ? 0 : runs[i].clusters.back());
    }
    std::printf("  mode %s: fused cluster sizes (H200 runs, then A100 runs):%s\n", invariant ? "on" : "off", cls.c_str());
    if (invariant || !split_k) {
      check(same_bits, std::string(invariant ? "on" : "off") + ": the probe's outputs are bitwise equal in every run");
      check(same_clusters_per_device, std::string(invariant ? "on" : "off") + ": each device decides alike at every T");
    } else {
      check(!same_clusters_per_device, "off: the cluster split follows the batch size");
      check(!same_bits, "off: the probe's outputs differ between runs");
    }
  }
}

// A simple kernel whose shared memory exceeds the device: refused, nothing launched.
void simple_fused_too_large(Device dev, int r) {
  cudaSetDevice(dev);
  std::printf("simple jd_fused on %s: r=%d does not fit\n", emu::rt().devices[dev].name, r);
  FusedParams p{};
  p.shrink.num_slices = p.core.num_slices = p.expand.num_slices = 1;
  p.seg.num_tokens = 4;
  p.r = r;
  const size_t before = emu::rt().launches.size();
  const cudaError_t err = jc::jd_fused_cuda(p, DType::kFloat32, nullptr);
  check(err == jc::kErrorTooMuchSharedMemory, std::string("refused as too much shared memory, got ") + cudaGetErrorName(err));
  check(emu::rt().launches.size() == before, "nothing launched");
  check_no_pending_error("jd_fused");
}

// ---------------------------------------------------------------------------
// Tenant isolation: a request's outputs depend on its own adapter and the
// base model only. One cluster's shared tables (V of one slice, U of the
// other) or one adapter's own tables (its core S, its A and B) get one
// poisoned element (NaN, +Inf, -Inf or 1e30); every op then runs on the
// clean and the poisoned tables. Tokens outside the poisoned cluster (or
// adapter) must get bitwise the same h, g and y rows, rows without an adapter
// must keep y's input bits, and some poisoned token's output must change
// (so that the check can fail). A cluster's bases are shared by its
// adapters, so poisoning them may change every token of that cluster. In
// quantized tables (int4 and int8 slices) the poisoned element is a scale.

struct IsolationCase {
  Device dev;
  int T, d;
  bool invariant;
  int x_lead = 0;  // > 0: x and y one element off alignment (the simple kernels' scalar loads)
  float cluster_poison, adapter_poison;
  bool quant = false;
};

// The outputs of every op, per op a row of raw bits per token.
using TokenBits = std::vector<std::vector<uint32_t>>;
using OpBits = std::map<std::string, TokenBits>;

template <typename E>
void isolation_case(const IsolationCase& ic) {
  constexpr int A = 12, C = 3, r = 16, S = 2;
  const std::vector<int> widths = {64, 40}, offsets = {0, 64};
  constexpr int ycols = 104;
  const int T = ic.T, d = ic.d, lead = ic.x_lead;
  cudaSetDevice(ic.dev);
  jdlora::set_batch_invariant(ic.invariant);
  std::printf("isolation on %s: T=%d d=%d %s, batch-invariant %s, cluster tables <- %g, adapter tables <- %g%s%s\n",
              emu::rt().devices[ic.dev].name, T, d, dtype_name<E>(), ic.invariant ? "on" : "off",
              static_cast<double>(ic.cluster_poison), static_cast<double>(ic.adapter_poison),
              lead ? ", misaligned" : "", ic.quant ? ", int4 and int8 tables" : "");
  // The poisoned adapter shares its cluster with another adapter; a third
  // adapter is elsewhere; some tokens have none.
  constexpr int kBad = 0;
  std::vector<int> ac(A), mapping(T);
  for (int& v : ac) v = randint(C);
  const int bad_cluster = ac[kBad];
  ac[1] = bad_cluster;
  ac[2] = (bad_cluster + 1) % C;
  for (int& v : mapping) v = randint(A + 1) - 1;
  for (int t = 0; t < std::min(T, 8); ++t) mapping[t] = std::vector<int>{kBad, -1, 1, 2, kBad, -1, 1, 2}[t];
  std::shuffle(mapping.begin(), mapping.end(), rng);
  MetaBufs mb(T, A, C);
  if (build_meta_op(mb, mapping, ac) != cudaSuccess || !meta_matches(mb, mapping, ac)) {
    check(false, "batch metadata");
    return;
  }
  // Aligned rows (the tensor-core path for fp16/bf16) unless misaligned on purpose.
  const int x_ld = lead ? lead + d + 3 : d + 8, y_ld = lead ? lead + ycols + 5 : ycols + 8;
  Buf<E> xb(static_cast<size_t>(T) * x_ld), yb(static_cast<size_t>(T) * y_ld);
  for (size_t i = 0; i < xb.n; ++i) xb[i] = fromf<E>(randn());
  std::vector<E> y0(yb.n);
  for (E& v : y0) v = fromf<E>(randn());
  auto filled = [](size_t n, float scale) {
    auto b = std::make_unique<Buf<E>>(n);
    for (size_t i = 0; i < n; ++i) (*b)[i] = fromf<E>(randn() * scale);
    return b;
  };
  Tables<E> V, U, Af, Bf;
  std::vector<std::unique_ptr<Buf<E>>> Sg;
  std::vector<bool> diag(S);
  const std::vector<QuantFormat> shrink_q = {q4(8), q8()}, expand_q = {q8(), q4(8)};
  for (int s = 0; s < S; ++s) {
    diag[s] = s == 1;
    const QuantFormat fs = ic.quant ? shrink_q[s] : QuantFormat{}, fe = ic.quant ? expand_q[s] : QuantFormat{};
    V.push_back(std::make_unique<Table<E>>(C, r, d, fs, 1.f / std::sqrt(float(d)), rng));
    U.push_back(std::make_unique<Table<E>>(C, widths[s], r, fe, 1.f / std::sqrt(float(r)), rng));
    Sg.push_back(filled(static_cast<size_t>(A) * r * (diag[s] ? 1 : r), 1.f));
    Af.push_back(std::make_unique<Table<E>>(A, r, d, fs, 1.f / std::sqrt(float(d)), rng));
    Bf.push_back(std::make_unique<Table<E>>(A, widths[s], r, fe, 1.f / std::sqrt(float(r)), rng));
  }
  Buf<float> scales(static_cast<size_t>(S) * A), h(static_cast<size_t>(S) * T * r), g(h.n);
  for (size_t i = 0; i < scales.n; ++i) scales[i] = 0.5f + 0.1f * static_cast<float>(i % 7);
  std::vector<float> hin(h.n);
  for (float& v : hin) v = randn();
  const StackList Sl = core_list(Sg, diag, r);
  auto stacks = [&](const Tables<E>& t, bool) { return table_list(t, offsets); };
  const Activation xa{xb.data + lead, x_ld, d}, ya{yb.data + lead, y_ld, ycols};
  const Intermediate ha{h.data, static_cast<int64_t>(T) * r, r, r}, ga{g.data, static_cast<int64_t>(T) * r, r, r};
  const DType dt = dtype_of<E>();
  std::string kernels;

  auto f32_rows = [&](const Buf<float>& b) {
    TokenBits rows(T);
    for (int t = 0; t < T; ++t)
      for (int s = 0; s < S; ++s)
        for (int i = 0; i < r; ++i) {
          uint32_t u;
          std::memcpy(&u, &b[(static_cast<size_t>(s) * T + t) * r + i], 4);
          rows[t].push_back(u);
        }
    return rows;
  };
  auto y_rows = [&] {
    TokenBits rows(T);
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < y_ld; ++j) {
        uint32_t u = 0;
        std::memcpy(&u, &yb[static_cast<size_t>(t) * y_ld + j], sizeof(E));
        rows[t].push_back(u);
      }
    return rows;
  };
  auto run_all = [&](bool record) {
    OpBits out;
    auto launch = [&](const std::string& op, auto&& f) {
      const size_t before = emu::rt().launches.size();
      check(f() == cudaSuccess, op + " launch");
      if (record) kernels += (kernels.empty() ? "" : "; ") + launches_since(before);
    };
    for (int lora = 0; lora < 2; ++lora) {
      for (size_t i = 0; i < h.n; ++i) h[i] = 7.f;  // rows an op does not write compare equal
      ShrinkParams p{xa, stacks(lora ? Af : V, false), ha, lora ? Scales{scales.data, A, 1} : Scales{nullptr, 0, 0},
                     lora ? mb.loras() : mb.clusters()};
      const char* op = lora ? "lora_shrink" : "jd_shrink";
      launch(op, [&] { return lora ? jc::lora_shrink_cuda(p, dt, nullptr) : jc::jd_shrink_cuda(p, dt, nullptr); });
      out[op] = f32_rows(h);
    }
    for (size_t i = 0; i < h.n; ++i) h[i] = hin[i];
    for (size_t i = 0; i < g.n; ++i) g[i] = 7.f;
    CoreParams cp{ha, ga, Sl, mb.mapping.data, T, A};
    launch("jd_core", [&] { return jc::jd_core_cuda(cp, dt, nullptr); });
    out["jd_core"] = f32_rows(g);
    for (int lora = 0; lora < 2; ++lora) {
      for (size_t i = 0; i < g.n; ++i) g[i] = hin[i];
      for (size_t i = 0; i < yb.n; ++i) yb[i] = y0[i];
      ExpandParams p{ga, stacks(lora ? Bf : U, true), ya, lora ? mb.loras() : mb.clusters()};
      const char* op = lora ? "lora_expand" : "jd_expand";
      launch(op, [&] { return lora ? jc::lora_expand_cuda(p, dt, nullptr) : jc::jd_expand_cuda(p, dt, nullptr); });
      out[op] = y_rows();
    }
    for (size_t i = 0; i < yb.n; ++i) yb[i] = y0[i];
    FusedParams fp{xa, stacks(V, false), Sl, stacks(U, true), ya, mb.mapping.data, mb.clusters(), r, A};
    launch("jd_fused", [&] { return jc::jd_fused_cuda(fp, dt, nullptr); });
    out["jd_fused"] = y_rows();
    return out;
  };
  const OpBits clean = run_all(true);
  std::printf("    %s\n", kernels.c_str());
  std::vector<uint32_t> y0_row_bits;
  auto y0_bits = [&](int t) {
    std::vector<uint32_t> row;
    for (int j = 0; j < y_ld; ++j) {
      uint32_t u = 0;
      std::memcpy(&u, &y0[static_cast<size_t>(t) * y_ld + j], sizeof(E));
      row.push_back(u);
    }
    return row;
  };

  // A random element of matrix n of t: its value, or its scale if quantized.
  auto spot = [&](Table<E>& t, int n) -> std::pair<Buf<E>*, size_t> {
    const size_t row = static_cast<size_t>(n) * t.rows + randint(t.rows);
    const int col = randint(t.cols);
    if (t.vals) return {t.vals.get(), row * t.cols + col};
    return {t.scales.get(), row * t.sld + col / t.group};
  };
  // Poisons one element of each table of the group, runs every op, restores.
  auto poison_run = [&](bool cluster, float value) {
    std::vector<std::pair<Buf<E>*, size_t>> spots;
    if (cluster) {
      spots = {spot(*V[0], bad_cluster), spot(*U[1], bad_cluster)};
    } else {
      spots = {{Sg[0].get(), (static_cast<size_t>(kBad) * r + randint(r)) * r + randint(r)}, spot(*Af[1], kBad),
               spot(*Bf[0], kBad)};
    }
    std::vector<E> saved;
    for (auto [b, i] : spots) {
      saved.push_back((*b)[i]);
      (*b)[i] = fromf<E>(value);
    }
    const OpBits out = run_all(false);
    for (size_t k = 0; k < spots.size(); ++k) (*spots[k].first)[spots[k].second] = saved[k];
    return out;
  };
  for (int cluster = 1; cluster >= 0; --cluster) {
    const float value = cluster ? ic.cluster_poison : ic.adapter_poison;
    const OpBits bad = poison_run(cluster != 0, value);
    for (const auto& [op, rows] : clean) {
      // Which tokens the poisoned group may change in this op.
      const bool jd_basis_op = op == "jd_shrink" || op == "jd_expand" || op == "jd_fused";
      const bool adapter_op = op == "jd_core" || op == "jd_fused" || op == "lora_shrink" || op == "lora_expand";
      auto may_change = [&](int t) {
        const int a = mapping[t];
        if (a < 0) return false;
        return cluster ? jd_basis_op && ac[a] == bad_cluster : adapter_op && a == kBad;
      };
      bool others_same = true, none_untouched = true, changed = false, any_may = false;
      const bool writes_y = op.find("expand") != std::string::npos || op == "jd_fused";
      for (int t = 0; t < T; ++t) {
        const bool same = bad.at(op)[t] == rows[t];
        if (may_change(t)) {
          any_may = true;
          changed = changed || !same;
        } else {
          others_same = others_same && same;
        }
        if (writes_y && mapping[t] < 0) none_untouched = none_untouched && bad.at(op)[t] == y0_bits(t);
      }
      const std::string tag = std::string(cluster ? "cluster" : "adapter") + " poisoned: " + op;
      check(others_same, tag + ": other tokens bitwise unchanged");
      if (writes_y) check(none_untouched, tag + ": rows without adapter untouched");
      if (any_may) check(changed, tag + ": the poisoned tokens changed");
    }
  }
  jdlora::set_batch_invariant(false);
}

// A row of g holding +-Inf: its y columns become +-Inf (the sign of U times
// the sign of the infinity), never NaN, on the tensor-core expand, as on the
// simple kernels and the CPU.
template <typename E>
void infinite_g_row(Device dev) {
  constexpr int T = 20, A = 6, C = 2, r = 16, width = 64;
  cudaSetDevice(dev);
  std::printf("infinite g rows through jd_expand on %s, %s\n", emu::rt().devices[dev].name, dtype_name<E>());
  std::vector<int> ac(A), mapping(T);
  for (int& v : ac) v = randint(C);
  for (int& v : mapping) v = randint(A);
  MetaBufs mb(T, A, C);
  if (build_meta_op(mb, mapping, ac) != cudaSuccess) {
    check(false, "batch metadata");
    return;
  }
  Buf<E> yb(static_cast<size_t>(T) * width), ub(static_cast<size_t>(C) * width * r);
  for (size_t i = 0; i < yb.n; ++i) yb[i] = fromf<E>(randn());
  for (size_t i = 0; i < ub.n; ++i) ub[i] = fromf<E>(randn() + (randn() > 0 ? 0.5f : -0.5f));
  Buf<float> g(static_cast<size_t>(T) * r);
  for (size_t i = 0; i < g.n; ++i) g[i] = randn();
  const int t_pos = 3, t_neg = 11, i_pos = 5, i_neg = 9;
  g[t_pos * r + i_pos] = INFINITY;
  g[t_neg * r + i_neg] = -INFINITY;
  std::vector<std::unique_ptr<Buf<E>>> U;
  U.emplace_back(new Buf<E>(ub.n));
  for (size_t i = 0; i < ub.n; ++i) (*U[0])[i] = ub[i];
  ExpandParams p{Intermediate{g.data, static_cast<int64_t>(T) * r, r, r},
                 stack_list(U, {width}, {0}, r, 0, true), Activation{yb.data, width, width}, mb.clusters()};
  const size_t before = emu::rt().launches.size();
  check(jc::jd_expand_cuda(p, dtype_of<E>(), nullptr) == cudaSuccess, "jd_expand launch");
  check(launched_since(before, "tc_expand"), "tensor-core expand ran: " + launches_since(before));
  bool signs = true, finite_elsewhere = true;
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < width; ++j) {
      const float v = tof(yb[static_cast<size_t>(t) * width + j]);
      if (t == t_pos || t == t_neg) {
        const int i = t == t_pos ? i_pos : i_neg;
        const float u = tof((*U[0])[(static_cast<size_t>(ac[mapping[t]]) * width + j) * r + i]);
        const float want = (t == t_pos) == (u > 0) ? INFINITY : -INFINITY;
        signs = signs && v == want;
      } else {
        finite_elsewhere = finite_elsewhere && std::isfinite(v);
      }
    }
  check(signs, "rows with an infinite g element are +-Inf with the sign of U g, no NaN");
  check(finite_elsewhere, "other rows finite");
}

// An error some earlier work left pending stays pending through the
// launchers' first use (device and kernel queries included): it is not
// theirs to clear.
void pending_error_survives() {
  std::printf("an error pending before the first launch\n");
  check(cudaSetDevice(kA100) == cudaSuccess, "set device");
  check(cudaSetDevice(99) == cudaErrorInvalidDevice, "an unrelated call fails");
  MetaBufs mb(16, 9, 3);
  const cudaError_t err = build_meta_op(mb, std::vector<int>(16, 2), std::vector<int>(9, 1));
  check(err == cudaSuccess, std::string("build_batch_meta launched: ") + cudaGetErrorName(err));
  check(cudaGetLastError() == cudaErrorInvalidDevice, "the unrelated error is still pending afterwards");
}

// Two host threads and one kernel: the first opts in to more dynamic shared
// memory than the second needs, and the second's launch lands between the
// first's opt-in and its launch (the runtime's after_set_attribute hook lets
// it run, waiting for it up to a second). Lowering the limit to the second
// call's bytes would make the first launch fail.
void concurrent_opt_in() {
  std::printf("two host threads opt build_batch_meta in to different shared memory on the A100\n");
  cudaSetDevice(kA100);
  constexpr int kBigA = 8000, kSmallA = 2100, C = 64, T = 64;
  check(jc::batch_meta_smem_bytes(kSmallA, C, true) + kMetaStaticBytes > jc::kDefaultSharedBytes,
        "both calls need the opt-in");
  std::mutex m;
  std::condition_variable cv;
  bool other_done = false;
  cudaError_t other_err = cudaErrorUnknown;
  std::atomic<bool> fired{false};
  std::thread other;
  const std::vector<int> small_map(T, 3), big_map(T, 5);
  std::vector<int> small_ac(kSmallA), big_ac(kBigA);
  for (int& v : small_ac) v = randint(C);
  for (int& v : big_ac) v = randint(C);
  MetaBufs small(T, kSmallA, C), big(T, kBigA, C);
  emu::rt().after_set_attribute = [&] {
    if (fired.exchange(true)) return;
    other = std::thread([&] {
      const cudaError_t e = build_meta_op(small, small_map, small_ac);
      const std::lock_guard<std::mutex> lock(m);
      other_err = e;
      other_done = true;
      cv.notify_all();
    });
    std::unique_lock<std::mutex> lock(m);
    cv.wait_for(lock, std::chrono::seconds(1), [&] { return other_done; });
  };
  const cudaError_t err = build_meta_op(big, big_map, big_ac);
  if (other.joinable()) other.join();
  emu::rt().after_set_attribute = nullptr;
  check(fired.load(), "the second thread ran between opt-in and launch");
  check(err == cudaSuccess && meta_matches(big, big_map, big_ac),
        std::string("the larger call launched and is right: ") + cudaGetErrorName(err));
  check(other_err == cudaSuccess && meta_matches(small, small_map, small_ac),
        std::string("the smaller call launched and is right: ") + cudaGetErrorName(other_err));
  check_no_pending_error("build_batch_meta");
}

// Each kernel's attributes were read at most once per device in the whole run.
void attributes_queried_once() {
  int most = 0;
  for (const auto& [key, n] : emu::rt().attribute_queries) most = std::max(most, n);
  check(!emu::rt().attribute_queries.empty() && most == 1,
        "kernel attributes queried once per (device, kernel): at most " + std::to_string(most) + " over " +
            std::to_string(emu::rt().attribute_queries.size()) + " pairs");
}

template <typename E>
void isolation_grid(const std::vector<Device>& devs, int T, int d, int x_lead, int& k, bool quant = false) {
  const float poisons[] = {NAN, INFINITY, -INFINITY, 1e30f};
  for (Device dev : devs)
    for (bool inv : {false, true}) {
      isolation_case<E>({dev, T, d, inv, x_lead, poisons[k % 4], poisons[(k + 1) % 4], quant});
      ++k;
    }
}

OpsCase ops(const std::string& name, Device dev, int T, int A, int C, int d, int r, std::vector<int> widths,
            const std::string& pattern) {
  OpsCase c;
  c.name = name;
  c.dev = dev;
  c.T = T, c.A = A, c.C = C, c.d = d, c.r = r;
  c.widths = std::move(widths);
  c.pattern = pattern;
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  set_up_devices();
  register_kernels();
  using bf16 = __nv_bfloat16;

  // build_batch_meta's cost model alone (bench/batch_meta_model.py).
  if (argc > 1 && std::string(argv[1]) == "--meta-cost") {
    meta_case(kH200, "zipf", 65536, 19936, 64, /*cost=*/true);
    meta_case(kH200, "identical", 65536, 19936, 64, /*cost=*/true);
    return failures ? 1 : 0;
  }

  pending_error_survives();
  concurrent_opt_in();

  // build_batch_meta: the smallest tables; A + C just below and just above
  // the slots whose counters plus the placement table and the static arrays
  // pass 48 KiB (2031 / 2032), inside that window, on both architectures;
  // the largest tables and batches; tables that fit no device.
  meta_case(kA100, "uniform", 3, 1, 1);
  meta_case(kA100, "all_none", 40, 9, 3);
  meta_case(kA100, "uniform", 0, 9, 3);
  meta_case(kA100, "zipf", 64, 1967, 64);
  meta_case(kA100, "zipf", 64, 1968, 64);
  meta_case(kA100, "uniform", 4096, 5700, 64);
  meta_case(kH200, "skewed", 2000, 6080, 64);
  meta_too_large(kA100, 30000, 64);
  // Every token spread at T = 1, 7, 4096 (several rounds of the block-wide
  // placement, so that equal keys meet across warps and rounds; the sorted
  // order is compared exactly, so an unstable placement fails), with many
  // adapters over few clusters and many clusters over fewer adapters (A + C
  // = 20000); then T = 65536 (64 rounds).
  for (const char* spread : {"identical", "distinct", "uniform", "zipf", "skewed"}) {
    meta_case(kA100, spread, 1, 9, 3);
    meta_case(kH200, spread, 7, 9, 3);
    meta_case(kH200, spread, 4096, 19936, 64);
    meta_case(kH200, spread, 4096, 3000, 17000);
    meta_case(kA100, spread, 4096, 19936, 64);  // the table does not fit: one warp places
    if (!quick) meta_case(kH200, spread, 65536, 19936, 64, /*cost=*/true);
  }

  // Simple kernels at the shared-memory edges: fused at r = 383 / 384 and
  // expand at r = 767 / 768 (dynamic bytes at or just under 48 KiB, static
  // arrays on top), fp32 so that the simple kernels run.
  {
    OpsCase c = ops("simple fused at the 48 KiB edge", kA100, 5, 6, 2, 24, 383, {16}, "uniform");
    c.ops = 32;
    c.expect_fused = "fused<";
    ops_case<float>(c);
    c.r = 384;
    ops_case<float>(c);
    OpsCase e = ops("simple expand at the 48 KiB edge", kA100, 5, 6, 2, 8, 767, {24}, "uniform");
    e.ops = 8;
    ops_case<float>(e);
    e.r = 768;
    ops_case<float>(e);
  }
  simple_fused_too_large(kA100, 1400);

  // Every op, simple kernels: fp32 with odd d_in and strided column slices
  // of x and y (q/k/v widths, gaps); fp16 one element off alignment (scalar
  // loads).
  {
    OpsCase c = ops("fp32 strided, d_in 200", kA100, 9, 12, 3, 200, 16, {200, 56, 56}, "zipf");
    c.x_lead = 8, c.x_extra = 24, c.y_lead = 8, c.y_extra = 16, c.gap = 8;
    ops_case<float>(c);
    OpsCase m = ops("fp16 misaligned, d_in 111", kH200, 7, 10, 3, 111, 16, {40, 24}, "uniform");
    m.x_lead = 1, m.x_extra = 5, m.y_lead = 1, m.y_extra = 3, m.gap = 1;
    m.expect_fused = "fused<f16,1>";
    ops_case<__half>(m);
  }
  // Tensor-core kernels through their launchers: strided slices, d_in 5120 + 8
  // with a cluster of 8 on sm_90; d_in 200 on sm_80.
  {
    OpsCase c = ops("bf16 strided, d_in 5128", kH200, 16, 20, 3, 5128, 16, {64, 16, 16}, "distinct");
    c.x_lead = 8, c.x_extra = 16, c.y_lead = 8, c.y_extra = 8, c.gap = 8;
    c.expect_fused = "tc_fused<bf16,16>";
    c.expect_cluster = 8;
    if (!quick) ops_case<bf16>(c);
    OpsCase a = ops("fp16 strided, d_in 200", kA100, 21, 15, 4, 200, 32, {136, 24}, "skewed");
    a.x_lead = 8, a.x_extra = 8, a.y_lead = 16, a.y_extra = 8, a.gap = 16;
    a.expect_fused = "tc_fused<f16,16>";
    a.expect_cluster = 1;
    ops_case<__half>(a);
  }
  // fp16 beyond the half range in g (|g| ~ 1e5: the split into hi + lo
  // halves must not overflow) and tiny g (~1e-6, below fp16's normal range,
  // with large U so that y is a normal fp16 number; compared relative to
  // the result), on the tensor-core path; then x ~ 1e4 through fused, where
  // h and g pass 65520.
  {
    OpsCase big = ops("fp16 large g", kH200, 20, 8, 2, 64, 16, {64}, "uniform");
    big.g_scale = 1e5f, big.u_scale = 1e-3f, big.ops = 8 | 16;
    ops_case<__half>(big);
    OpsCase tiny = big;
    tiny.name = "fp16 tiny g";
    tiny.g_scale = 1e-6f, tiny.u_scale = 1e3f, tiny.rel_to_ref = true;
    ops_case<__half>(tiny);
    OpsCase fx = ops("fp16 large x through fused", kH200, 16, 8, 2, 64, 16, {64}, "uniform");
    fx.x_scale = 1e4f, fx.v_scale = 8.f, fx.u_scale = 1e-3f, fx.ops = 32;
    fx.expect_fused = "tc_fused<f16,16>";
    ops_case<__half>(fx);
  }
  // Clusters follow the image, not the device: an sm_80 image on an sm_90
  // device gets cl = 1 (the same call on the sm_90a image gets 8).
  {
    OpsCase c = ops("cluster choice, sm_80 image on sm_90", kH200Sm80Image, 16, 20, 3, 1024, 16, {64}, "uniform");
    c.ops = 1 | 32;
    c.expect_fused = "tc_fused<bf16,16>";
    c.expect_cluster = 1;
    ops_case<bf16>(c);
    c.name = "cluster choice, sm_90a image";
    c.dev = kH200;
    c.expect_cluster = 8;
    if (!quick) ops_case<bf16>(c);
  }
  // A refused opt-in sends the call to the simple kernels (r = 128 tiles
  // need more than 48 KiB), leaving no error behind.
  {
    OpsCase c = ops("opt-in refused: fallback", kA100NoOptIn, 16, 10, 2, 256, 128, {64}, "uniform");
    c.ops = 1 | 8 | 32;
    c.expect_fused = "fused<bf16,8>";
    ops_case<bf16>(c);
  }
  // Prefill tiles (from 1024 tokens) through the launcher.
  if (!quick) {
    OpsCase c = ops("bf16 prefill", kH200, 1030, 40, 3, 64, 16, {64}, "zipf");
    c.ops = 1 | 8 | 32;
    c.expect_fused = "tc_fused<bf16,64>";
    ops_case<bf16>(c);
  }

  // Quantized stacks: int8 and int4, groups of 6 to 128 values and whole
  // rows, slices of both formats in one op, rows padded past the packed row,
  // every dtype, against the dequantised values. fp16/bf16 rows that allow
  // it take the tensor-core kernels (on both architectures, with and without
  // clusters, decode and prefill tiles); fp32, rows off alignment, groups
  // that split a vector and a refused opt-in take the simple kernels, with
  // vector and scalar loads.
  {
    OpsCase a = ops("quantized fp32, mixed slices", kA100, 9, 12, 3, 256, 64, {64, 32, 40}, "zipf");
    a.shrink_q = {q4(32), q8(), q4(128)};
    a.expand_q = {q8(), q4(32), q4(64)};
    a.x_lead = 4, a.x_extra = 4, a.y_lead = 4, a.y_extra = 4, a.gap = 4;
    a.expect_simple = true;
    a.expect_fused = "fused<f32,4,q>";
    ops_case<float>(a);
    OpsCase b = ops("quantized fp16, padded rows", kH200, 7, 10, 3, 384, 32, {128, 64, 64}, "distinct");
    b.shrink_q = {q8(64, 16), q4(64, 8), q8(0, 8)};
    b.expand_q = {q4(32, 8), q8(16, 8), q4(8, 4)};
    b.expect_tc = true;
    b.expect_fused = "tc_fused<f16,16,q>";
    ops_case<__half>(b);
    OpsCase c = ops("quantized bf16, strided x and y", kA100, 21, 15, 4, 512, 64, {96, 40}, "skewed");
    c.shrink_q = {q4(128, 16), q8(32)};
    c.expand_q = {q4(64), q8(32, 8)};
    c.x_lead = 8, c.x_extra = 8, c.y_lead = 8, c.y_extra = 8, c.gap = 8;
    c.expect_tc = true;
    c.expect_fused = "tc_fused<bf16,16,q>";
    c.expect_cluster = 1;
    ops_case<bf16>(c);
    OpsCase h = ops("quantized bf16, d_in split over a cluster", kH200, 16, 12, 3, 1024, 32, {64, 32}, "uniform");
    h.shrink_q = {q4(128), q8()};
    h.expand_q = {q8(), q4(32)};
    h.ops = 1 | 2 | 32;
    h.expect_tc = true;
    h.expect_fused = "tc_fused<bf16,16,q>";
    h.expect_cluster = 8;
    ops_case<bf16>(h);
    // The tensor-core tiles at r = 128 need the refused opt-in: simple kernels.
    OpsCase r = ops("quantized, opt-in refused: fallback", kA100NoOptIn, 9, 6, 2, 256, 128, {64}, "uniform");
    r.shrink_q = {q4(64)};
    r.expand_q = {q8()};
    r.ops = 1 | 8 | 32;
    r.expect_simple = true;
    r.expect_fused = "fused<bf16,8,q>";
    ops_case<bf16>(r);
    // One element per load: x and y off alignment, odd padding and bases,
    // int8 groups of odd length, int4 values in high and low nibbles alike.
    OpsCase m = ops("quantized fp16, scalar loads", kH200, 13, 9, 3, 222, 16, {40, 24}, "uniform");
    m.shrink_q = {q4(74, 3, 1), q8(37, 1, 3)};
    m.expand_q = {q4(16, 3, 1), q8(8, 1, 1)};
    m.x_lead = 1, m.x_extra = 5, m.y_lead = 1, m.y_extra = 3, m.gap = 1;
    m.expect_simple = true;
    m.expect_fused = "fused<f16,1,q>";
    ops_case<__half>(m);
    OpsCase o = ops("quantized fp32, d_in 111", kH200, 3, 5, 2, 111, 8, {24}, "uniform");
    o.shrink_q = {q8()};
    o.expand_q = {q4(8)};
    o.expect_fused = "fused<f32,1,q>";
    ops_case<float>(o);
    // Aligned rows whose groups are no multiple of the vector.
    OpsCase g = ops("quantized bf16, short groups", kA100, 5, 6, 2, 96, 24, {48}, "zipf");
    g.shrink_q = {q8(12)};
    g.expand_q = {q4(6)};
    g.expect_simple = true;
    g.expect_fused = "fused<bf16,1,q>";
    ops_case<bf16>(g);
    // Only one side of fused quantized, its rows padded off the vector
    // alignment, the other side float.
    OpsCase e = ops("quantized expand side only", kA100, 11, 8, 2, 128, 16, {64, 32}, "identical");
    e.expand_q = {q4(16, 2), q8()};
    e.ops = 8 | 16 | 32;
    e.expect_simple = true;
    e.expect_fused = "fused<bf16,1,q>";
    ops_case<bf16>(e);
    OpsCase f = ops("quantized shrink side only", kH200, 5, 8, 2, 128, 16, {64, 32}, "uniform");
    f.shrink_q = {q8(0, 4), q4(32)};
    f.ops = 1 | 2 | 32;
    f.expect_simple = true;
    f.expect_fused = "fused<f16,1,q>";
    ops_case<__half>(f);
    // And aligned: the tensor-core kernels with one side float.
    f.name = "quantized shrink side only, aligned";
    f.shrink_q = {q8(0, 8), q4(32)};
    f.expect_simple = false;
    f.expect_tc = true;
    f.expect_fused = "tc_fused<f16,16,q>";
    ops_case<__half>(f);
    OpsCase n = ops("quantized, no adapter in the batch", kA100, 6, 4, 2, 64, 16, {32}, "all_none");
    n.shrink_q = {q4(32)};
    n.expand_q = {q8()};
    n.expect_tc = true;
    ops_case<bf16>(n);
    if (!quick) {
      OpsCase pf = ops("quantized bf16 prefill", kH200, 1030, 40, 3, 64, 16, {64}, "zipf");
      pf.shrink_q = {q4(32)};
      pf.expand_q = {q8()};
      pf.ops = 1 | 8 | 32;
      pf.expect_tc = true;
      pf.expect_fused = "tc_fused<bf16,64,q>";
      ops_case<bf16>(pf);
    }
  }

  // Batch-invariant mode: the tensor-core path (bf16, float and quantized
  // stacks) and the simple kernels (fp32), from a single token to prefill
  // tiles.
  // (2200 tokens: the default H200 cluster drops from 8 to 4.)
  batch_invariance<bf16>({1, 37, 2200}, true);
  batch_invariance<float>({1, 37, 1030}, false);
  batch_invariance<bf16>({1, 37, 1030}, true, /*quant=*/true);

  // Tenant isolation on the tensor-core kernels (bf16, fp16) and the simple
  // ones (fp32; fp16 off alignment), both devices, both modes, decode and
  // (not --quick) prefill batches, float and quantized tables.
  {
    int k = 0;
    isolation_grid<bf16>({kA100, kH200}, 37, 136, 0, k);
    isolation_grid<__half>({kA100, kH200}, 29, 200, 0, k);
    isolation_grid<float>({kA100, kH200}, 23, 72, 0, k);
    isolation_grid<__half>({kH200}, 19, 111, 1, k);
    // Quantized tables: the tensor-core kernels (bf16), the simple ones (fp16
    // off alignment).
    isolation_grid<bf16>({kH200}, 37, 136, 0, k, true);
    isolation_grid<__half>({kA100}, 19, 112, 1, k, true);
    if (!quick) {
      isolation_grid<bf16>({kH200}, 1030, 64, 0, k);
      isolation_grid<__half>({kA100}, 1030, 64, 0, k);
    }
    infinite_g_row<__half>(kH200);
    infinite_g_row<bf16>(kA100);
  }
  attributes_queried_once();

  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "all launches match", failures);
  return failures ? 1 : 0;
}
