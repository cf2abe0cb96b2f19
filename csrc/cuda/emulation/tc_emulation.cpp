// Runs the tensor-core kernels (jdlora/cuda/tc_kernels.cuh) on the host
// emulation of emu_runtime.h / tc_hw_emu.h and compares them with a float64
// reference: shrink (jd and lora), expand (jd and lora) and fused, decode and
// prefill tiles, cluster sizes 1 to 8, several shrink steps, ranks 8 to 128,
// fp16 and bf16, popularity patterns, corrupt metadata, q/k/v slices with
// column offsets, float and int8/int4 weight stacks. Not part of the library
// build; run it with
//
//   csrc/cuda/emulation/run.sh          (from the repository root)
//
// Exit status 0 when every case matches; out-of-bounds copies, writes past a
// buffer (guard bytes), unwritten outputs (NaN) and deadlocks fail it.
#define JDLORA_TC_HW_HEADER "tc_hw_emu.h"
#include "emu_runtime.h"
#include "jdlora/cuda/tc_kernels.cuh"
#include "emu_harness.h"

#include <string>

namespace tc = jdlora::cuda::tc;
using jdlora::Activation;
using jdlora::ExpandParams;
using jdlora::FusedParams;
using jdlora::Intermediate;
using jdlora::Scales;
using jdlora::SegmentTable;
using jdlora::ShrinkParams;
using jdlora::StackList;
using jdlora::WeightStack;

namespace {

using namespace emu_harness;

struct Case {
  std::string name;
  int T, A, C, d, r;
  std::vector<int> widths;
  std::vector<int> offsets;
  int ycols;
  std::string pattern;
  int M;
  int cl;
  int k_tile;
  int span_tiles;
  bool corrupt;
  std::vector<QuantFormat> shrink_q, expand_q;  // per slice: V and A, U and B (empty: float)
};

template <typename E, typename Cfg, bool Q>
void run_case(const Case& c) {
  const int T = c.T, A = c.A, C = c.C, d = c.d, r = c.r;
  const int S = static_cast<int>(c.widths.size());
  const double tol = std::is_same_v<E, __nv_bfloat16> ? 1.6e-2 : 2e-3;
  std::printf("%s: T=%d A=%d C=%d d=%d r=%d S=%d %s M=%d cl=%d k_tile=%d %s\n", c.name.c_str(), T, A, C, d, r, S,
              c.pattern.c_str(), Cfg::M, c.cl, c.k_tile, std::is_same_v<E, __nv_bfloat16> ? "bf16" : "fp16");
  if (Q)
    std::printf("  shrink stacks %s, expand stacks %s\n", format_names(c.shrink_q).c_str(),
                format_names(c.expand_q).c_str());

  std::vector<int> mapping = token_mapping(c.pattern, T, A);
  std::vector<int> ac(A);
  for (int& v : ac) v = randint(C);
  const Meta meta = build_meta(mapping, ac, C);

  Buf<int> sorted(T), c_ids(C), c_start(C + 1), l_ids(A), l_start(A + 1), map_d(T);
  for (int t = 0; t < T; ++t) sorted[t] = meta.sorted[t], map_d[t] = mapping[t];
  for (int i = 0; i < C; ++i) c_ids[i] = meta.c_ids[i];
  for (int i = 0; i <= C; ++i) c_start[i] = meta.c_start[i];
  for (int i = 0; i < A; ++i) l_ids[i] = meta.l_ids[i];
  for (int i = 0; i <= A; ++i) l_start[i] = meta.l_start[i];
  // What the kernels see as each token's cluster and slot (corrupt cases
  // change them below; the reference follows).
  std::vector<int> tok_cluster(T, -1), lora_group(T, -1), fused_slot(T, -1);
  for (int t = 0; t < T; ++t)
    if (mapping[t] >= 0) tok_cluster[t] = ac[mapping[t]], lora_group[t] = fused_slot[t] = mapping[t];
  if (c.corrupt && meta.c_ids[0] >= 0) {
    // Segment 0's cluster id out of range: its tokens get nothing from the
    // shared-basis ops.
    c_ids[0] = C + 7;
    for (int p = meta.c_start[0]; p < meta.c_start[1]; ++p) tok_cluster[meta.sorted[p]] = -1;
    // Every 5th token's adapter slot out of range in the mapping the fused
    // core reads (the segment tables stay valid).
    for (int t = 0; t < T; t += 5)
      if (fused_slot[t] >= 0) map_d[t] = A + 3, fused_slot[t] = -1;
  }

  Buf<E> x(static_cast<size_t>(T) * d), y(static_cast<size_t>(T) * c.ycols);
  auto fill = [](Buf<E>& b, float scale) {
    for (size_t i = 0; i < b.n; ++i) b[i] = from_f<E>(randn() * scale);
  };
  fill(x, 1.f);
  Tables<E> V, U, Af, Bf;
  std::vector<std::unique_ptr<Buf<E>>> Sg;
  std::vector<bool> diag(S);
  for (int s = 0; s < S; ++s) {
    diag[s] = s == 1;
    const QuantFormat fs = format_of(c.shrink_q, s), fe = format_of(c.expand_q, s);
    V.push_back(std::make_unique<Table<E>>(C, r, d, fs, 1.f / std::sqrt(d), rng));
    U.push_back(std::make_unique<Table<E>>(C, c.widths[s], r, fe, 1.f / std::sqrt(r), rng));
    Sg.push_back(std::make_unique<Buf<E>>(static_cast<size_t>(A) * r * (diag[s] ? 1 : r)));
    fill(*Sg[s], diag[s] ? 1.f : 1.f / std::sqrt(r));
    Af.push_back(std::make_unique<Table<E>>(A, r, d, fs, 1.f / std::sqrt(d), rng));
    Bf.push_back(std::make_unique<Table<E>>(A, c.widths[s], r, fe, 1.f / std::sqrt(r), rng));
  }
  Buf<float> scales(static_cast<size_t>(S) * A);
  for (size_t i = 0; i < scales.n; ++i) scales[i] = 0.5f + std::uniform_real_distribution<float>(0, 1)(rng);
  Buf<float> h(static_cast<size_t>(S) * T * r), gin(static_cast<size_t>(S) * T * r);
  for (size_t i = 0; i < gin.n; ++i) gin[i] = randn();
  std::vector<E> y0(y.n);
  for (size_t i = 0; i < y.n; ++i) y0[i] = from_f<E>(randn());

  const StackList Vl = table_list(V, c.offsets), Al = table_list(Af, c.offsets);
  const StackList Ul = table_list(U, c.offsets), Bl = table_list(Bf, c.offsets);
  StackList Sl{};
  Sl.num_slices = S;
  for (int s = 0; s < S; ++s) {
    Sl.stack[s] = WeightStack{Sg[s]->data, static_cast<int64_t>(r) * (diag[s] ? 1 : r), diag[s] ? 0 : r,
                              diag[s] ? 1 : r, r};
    Sl.diagonal[s] = diag[s];
  }
  const SegmentTable seg_c{sorted.data, c_ids.data, c_start.data, C, T};
  const SegmentTable seg_l{sorted.data, l_ids.data, l_start.data, A, T};
  const Activation xa{x.data, d, d};
  const Activation ya{y.data, c.ycols, c.ycols};
  const Intermediate ha{h.data, static_cast<int64_t>(T) * r, r, r};
  const Intermediate ga{gin.data, static_cast<int64_t>(T) * r, r, r};

  const int r_pad = (r + 15) / 16 * 16;
  const int windows = (T + Cfg::M - 1) / Cfg::M;
  tc::TcArgs a{};
  a.cl = c.cl;
  a.k_tile = c.k_tile;
  a.r_pad = r_pad;
  a.span = Cfg::kNTile * c.span_tiles;
  a.s_vec = 1;
  const size_t plan = sizeof(tc::WindowPlan<Cfg::M>);
  auto layout = [&](tc::Kernel k) {
    return tc::smem_layout(k, Cfg::M, Cfg::kStages, Cfg::kNTile, r, r_pad, a.k_tile, sizeof(E), plan).total;
  };
  auto launch_clustered = [&](auto body, int gy, size_t smem) {
    for (int by = 0; by < gy; ++by)
      for (int w = 0; w < windows; ++w)
        emu::run_cluster(body, uint3{static_cast<unsigned>(windows * c.cl), static_cast<unsigned>(gy), 1},
                         static_cast<unsigned>(w * c.cl), static_cast<unsigned>(by), c.cl, Cfg::kThreads, smem);
  };
  auto guards = [&]() {
    bool ok = x.guards_ok() && y.guards_ok() && h.guards_ok() && gin.guards_ok();
    for (int s = 0; s < S; ++s)
      ok = ok && V[s]->guards_ok() && U[s]->guards_ok() && Sg[s]->guards_ok() && Af[s]->guards_ok() &&
           Bf[s]->guards_ok();
    if (!ok) {
      ++failures;
      std::printf("  FAIL: guard bytes overwritten\n");
    }
  };

  // --- shrink (jd, then lora with scales) ---
  for (int lora = 0; lora < 2; ++lora) {
    ShrinkParams p{};
    p.x = xa;
    p.weights = lora ? Al : Vl;
    p.h = ha;
    p.scales = lora ? Scales{scales.data, A, 1} : Scales{nullptr, 0, 0};
    p.seg = lora ? seg_l : seg_c;
    for (size_t i = 0; i < h.n; ++i) h[i] = NAN;
    launch_clustered([&] { tc::tc_shrink_kernel<E, Cfg, Q>(p, a); }, S, layout(tc::Kernel::kShrink));
    double err = 0, ref_max = 1;
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < T; ++t) {
        const int grp = lora ? lora_group[t] : tok_cluster[t];
        for (int i = 0; i < r; ++i) {
          double ref = 0;
          if (grp >= 0) {
            const Table<E>& w = lora ? *Af[s] : *V[s];
            for (int k = 0; k < d; ++k) ref += w.at(grp, i, k) * to_f(x[static_cast<size_t>(t) * d + k]);
            if (lora) ref *= scales[static_cast<size_t>(s) * A + grp];
          }
          const double got = h[(static_cast<size_t>(s) * T + t) * r + i];
          err = std::isnan(got) ? NAN : std::max(err, std::fabs(got - ref));
          if (std::isnan(err)) break;
          ref_max = std::max(ref_max, std::fabs(ref));
        }
      }
    report(lora ? "lora_shrink h" : "jd_shrink h", err / ref_max, tol);
    guards();
  }

  // --- expand (jd, then lora) ---
  for (int lora = 0; lora < 2; ++lora) {
    ExpandParams p{};
    p.g = ga;
    p.weights = lora ? Bl : Ul;
    p.y = ya;
    p.seg = lora ? seg_l : seg_c;
    for (size_t i = 0; i < y.n; ++i) y[i] = y0[i];
    int spans = 0;
    for (int s = 0; s < S; ++s) spans += (c.widths[s] + a.span - 1) / a.span;
    for (int by = 0; by < spans; ++by)
      for (int w = 0; w < windows; ++w)
        emu::run_cluster([&] { tc::tc_expand_kernel<E, Cfg, Q>(p, a); },
                         uint3{static_cast<unsigned>(windows), static_cast<unsigned>(spans), 1},
                         static_cast<unsigned>(w), static_cast<unsigned>(by), 1, Cfg::kThreads,
                         layout(tc::Kernel::kExpand));
    double err = 0, ref_max = 1;
    for (int t = 0; t < T; ++t) {
      const int grp = lora ? lora_group[t] : tok_cluster[t];
      std::vector<double> ref(c.ycols);
      for (int j = 0; j < c.ycols; ++j) ref[j] = to_f(y0[static_cast<size_t>(t) * c.ycols + j]);
      if (grp >= 0)
        for (int s = 0; s < S; ++s)
          for (int j = 0; j < c.widths[s]; ++j) {
            const Table<E>& w = lora ? *Bf[s] : *U[s];
            double acc = 0;
            for (int i = 0; i < r; ++i) acc += w.at(grp, j, i) * gin[(static_cast<size_t>(s) * T + t) * r + i];
            ref[c.offsets[s] + j] += acc;
          }
      for (int j = 0; j < c.ycols; ++j) {
        const double got = to_f(y[static_cast<size_t>(t) * c.ycols + j]);
        err = std::isnan(got) ? NAN : std::max(err, std::fabs(got - ref[j]));
        ref_max = std::max(ref_max, std::fabs(ref[j]));
      }
    }
    report(lora ? "lora_expand y" : "jd_expand y", err / ref_max, tol);
    guards();
  }

  // --- fused ---
  {
    FusedParams p{};
    p.x = xa;
    p.shrink = Vl;
    p.core = Sl;
    p.expand = Ul;
    p.y = ya;
    p.token_lora_mapping = map_d.data;
    p.seg = seg_c;
    p.r = r;
    p.num_adapters = A;
    for (size_t i = 0; i < y.n; ++i) y[i] = y0[i];
    launch_clustered([&] { tc::tc_fused_kernel<E, Cfg, Q>(p, a); }, S, layout(tc::Kernel::kFused));
    double err = 0, ref_max = 1;
    for (int t = 0; t < T; ++t) {
      std::vector<double> ref(c.ycols);
      for (int j = 0; j < c.ycols; ++j) ref[j] = to_f(y0[static_cast<size_t>(t) * c.ycols + j]);
      const int cl = tok_cluster[t], slot = fused_slot[t];
      if (cl >= 0 && slot >= 0)
        for (int s = 0; s < S; ++s) {
          std::vector<double> hv(r, 0.0), gv(r, 0.0);
          for (int i = 0; i < r; ++i)
            for (int k = 0; k < d; ++k) hv[i] += V[s]->at(cl, i, k) * to_f(x[static_cast<size_t>(t) * d + k]);
          for (int i = 0; i < r; ++i) {
            if (diag[s]) {
              gv[i] = to_f(Sg[s]->data[static_cast<size_t>(slot) * r + i]) * hv[i];
            } else {
              for (int k = 0; k < r; ++k)
                gv[i] += static_cast<double>(to_f(Sg[s]->data[(static_cast<size_t>(slot) * r + i) * r + k])) * hv[k];
            }
          }
          for (int j = 0; j < c.widths[s]; ++j) {
            double acc = 0;
            for (int i = 0; i < r; ++i) acc += U[s]->at(cl, j, i) * gv[i];
            ref[c.offsets[s] + j] += acc;
          }
        }
      for (int j = 0; j < c.ycols; ++j) {
        const double got = to_f(y[static_cast<size_t>(t) * c.ycols + j]);
        err = std::isnan(got) ? NAN : std::max(err, std::fabs(got - ref[j]));
        ref_max = std::max(ref_max, std::fabs(ref[j]));
      }
    }
    report("jd_fused y", err / ref_max, tol);
    guards();
  }
}

Case make(const std::string& name, int T, int A, int C, int d, int r, std::vector<int> widths,
          const std::string& pattern, int M, int cl, int k_tile, int span_tiles = 1, bool corrupt = false,
          int gap = 0) {
  Case c{name, T, A, C, d, r, widths, {}, 0, pattern, M, cl, k_tile, span_tiles, corrupt};
  int col = gap;
  for (int w : widths) {
    c.offsets.push_back(col);
    col += w + gap;
  }
  c.ycols = col;
  return c;
}

template <typename T>
void run(const Case& c) {
  const bool q = !c.shrink_q.empty() || !c.expand_q.empty();
  if (c.M == 16) {
    q ? run_case<T, tc::DecodeTile, true>(c) : run_case<T, tc::DecodeTile, false>(c);
  } else {
    q ? run_case<T, tc::PrefillTile, true>(c) : run_case<T, tc::PrefillTile, false>(c);
  }
}

Case quantized(Case c, std::vector<QuantFormat> shrink_q, std::vector<QuantFormat> expand_q) {
  c.shrink_q = std::move(shrink_q);
  c.expand_q = std::move(expand_q);
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  using bf16 = __nv_bfloat16;
  // Decode tiles: one token; one-token adapters (16 runs per window);
  // clusters splitting d_in in 2, 4, 8; d with a short last step; r = 8
  // (padded MMA depth); q/k/v slices at 8-aligned offsets with gaps.
  run<bf16>(make("decode one token", 1, 5, 3, 256, 16, {64}, "identical", 16, 8, 64));
  run<bf16>(make("decode distinct adapters", 37, 60, 4, 128, 16, {64, 16, 16}, "distinct", 16, 2, 64, 1, false, 8));
  run<__half>(make("decode zipf r=8", 50, 40, 5, 200, 8, {200}, "zipf", 16, 4, 64));
  run<bf16>(make("decode uniform k_tile 128", 45, 30, 3, 256, 32, {136, 24}, "uniform", 16, 2, 128, 2, false, 16));
  run<bf16>(make("decode corrupt metadata", 40, 20, 4, 128, 16, {64}, "uniform", 16, 4, 64, 1, true));
  if (!quick) {
    run<bf16>(make("decode skewed r=64", 33, 20, 3, 192, 64, {64, 16, 16}, "skewed", 16, 1, 64, 1, false, 8));
    run<bf16>(make("decode all none", 20, 8, 2, 64, 16, {64}, "all_none", 16, 2, 64));
    run<__half>(make("decode r=128 k_tile 256", 18, 10, 3, 512, 128, {128}, "uniform", 16, 2, 256));
  }
  // Prefill tiles: windows of 64 with several runs, clusters of 2 and 8 rows
  // each, two column tiles per expand block.
  run<bf16>(make("prefill uniform", 150, 12, 4, 128, 16, {128, 32, 32}, "uniform", 64, 2, 64, 2, false, 8));
  run<__half>(make("prefill zipf r=32", 130, 50, 6, 256, 32, {64}, "zipf", 64, 8, 64));
  if (!quick) {
    run<bf16>(make("prefill one cluster", 100, 4, 1, 64, 16, {64}, "skewed", 64, 1, 64));
    run<bf16>(make("prefill corrupt metadata", 96, 12, 3, 128, 16, {64}, "uniform", 64, 4, 64, 1, true));
    run<bf16>(make("prefill distinct adapters", 100, 120, 5, 128, 16, {64, 16}, "distinct", 64, 4, 64, 1, false, 8));
    run<__half>(make("prefill r=64 k_tile 128", 80, 9, 3, 384, 64, {128}, "zipf", 64, 8, 128));
  }
  // Quantized stacks, dequantised into the shared-memory tiles: int8 and int4
  // slices in one call, groups of 8 to 128 values and whole rows, padded
  // rows, a d_in split whose last share ends inside a tile, corrupt metadata.
  run<bf16>(quantized(make("quantized decode, mixed slices", 37, 60, 4, 256, 16, {64, 16, 16}, "distinct", 16, 2, 64,
                           1, false, 8),
                      {q4(32), q8(), q4(128, 8)}, {q8(), q4(8), q4(16, 4)}));
  run<__half>(quantized(make("quantized decode, short last share", 20, 10, 3, 200, 32, {136, 24}, "uniform", 16, 4,
                             64, 2, false, 16),
                        {q4(40, 4), q8(8)}, {q8(0, 8), q4(8)}));
  run<bf16>(quantized(make("quantized decode, corrupt metadata", 40, 20, 4, 128, 16, {64}, "uniform", 16, 4, 64, 1,
                           true),
                      {q4(64)}, {q8()}));
  run<__half>(quantized(make("quantized prefill", 130, 50, 6, 256, 32, {64}, "zipf", 64, 8, 64), {q8(64, 8)},
                        {q4(32)}));
  if (!quick)
    run<bf16>(quantized(make("quantized prefill r=64 k_tile 128", 96, 12, 3, 384, 64, {128, 16}, "skewed", 64, 1,
                             128, 2),
                        {q4(128), q8(32, 16)}, {q4(64, 8), q8(16)}));
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "all cases match", failures);
  return failures ? 1 : 0;
}
