// CPU kernels of every op, written against the plain parameter blocks.
//
// Framework-agnostic: element types only need conversions to and from float
// (float, c10::Half, c10::BFloat16, _Float16, ...) and the caller supplies the
// parallel loop, `parallel_for(n_items, fn(begin, end))`.
//
// Work is split into items of up to kTokenBlock tokens of one segment, so each
// weight matrix is converted to fp32 once per item and then reused by every
// token of the item while it is hot in cache; the segments are what make that
// reuse possible (tokens of one cluster share V and U).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "jdlora/params.h"

namespace jdlora::cpu {

inline constexpr int32_t kTokenBlock = 16;

struct WorkItem {
  int32_t group;  // cluster or adapter id
  int32_t begin;  // sorted positions [begin, end)
  int32_t end;
};

// Items for every non-empty segment, split into blocks of at most kTokenBlock
// tokens. Metadata must already be validated.
inline std::vector<WorkItem> work_items(const SegmentTable& seg) {
  std::vector<WorkItem> items;
  for (int32_t j = 0; j < seg.capacity; ++j) {
    const int32_t b = seg.seg_start[j], e = seg.seg_start[j + 1];
    for (int32_t p = b; p < e; p += kTokenBlock)
      items.push_back({seg.active_ids[j], p, std::min(e, p + kTokenBlock)});
  }
  return items;
}

template <typename T>
inline void to_f32(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_f32(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// A row of a model-dtype matrix as fp32: the row itself when T is float,
// otherwise converted into `buf`.
template <typename T>
inline const float* row_f32(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_f32(src, buf, n);
    return buf;
  }
}

// out[k] = sum_d W[k * ldw + d] * x[d] for k < rows. Four accumulators so the
// reduction vectorises and overlaps (no -ffast-math needed with omp simd).
inline void gemv_rows(const float* __restrict W, int64_t ldw, int32_t rows,
                      const float* __restrict x, int64_t n, float* __restrict out) {
  int32_t k = 0;
  for (; k + 4 <= rows; k += 4) {
    const float* w0 = W + k * ldw;
    const float* w1 = w0 + ldw;
    const float* w2 = w1 + ldw;
    const float* w3 = w2 + ldw;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t d = 0; d < n; ++d) {
      const float xv = x[d];
      a0 += w0[d] * xv;
      a1 += w1[d] * xv;
      a2 += w2[d] * xv;
      a3 += w3[d] * xv;
    }
    out[k] = a0;
    out[k + 1] = a1;
    out[k + 2] = a2;
    out[k + 3] = a3;
  }
  for (; k < rows; ++k) {
    const float* w = W + k * ldw;
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t d = 0; d < n; ++d) a += w[d] * x[d];
    out[k] = a;
  }
}

// acc[j] += sum_k Wt[k * n + j] * g[k]: the expand of one token against a
// transposed [r, n] weight, a stream of axpys over a row that stays in L1.
inline void axpy_rows(const float* __restrict Wt, int32_t r, const float* __restrict g, int64_t n,
                      float* __restrict acc) {
  // Four ranks per pass: one load and store of acc per four multiply-adds.
  int32_t k = 0;
  for (; k + 4 <= r; k += 4) {
    const float* w0 = Wt + k * n;
    const float* w1 = w0 + n;
    const float* w2 = w1 + n;
    const float* w3 = w2 + n;
    const float g0 = g[k], g1 = g[k + 1], g2 = g[k + 2], g3 = g[k + 3];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += w0[j] * g0 + w1[j] * g1 + w2[j] * g2 + w3[j] * g3;
  }
  for (; k < r; ++k) {
    const float gk = g[k];
    const float* w = Wt + k * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += w[j] * gk;
  }
}

// Weight matrix [rows, cols] of group `id` in slice s, as fp32 (converted
// into buf unless T is float and rows are contiguous).
template <typename T>
inline const float* matrix_f32(const WeightStack& w, int32_t id, float* buf, int64_t& ld) {
  const T* base = static_cast<const T*>(w.data) + static_cast<int64_t>(id) * w.stride_n;
  if constexpr (std::is_same_v<T, float>) {
    ld = w.stride_row;
    return base;
  }
  for (int32_t k = 0; k < w.rows; ++k) to_f32(base + k * w.stride_row, buf + int64_t(k) * w.cols, w.cols);
  ld = w.cols;
  return buf;
}

// [rows, cols] weight of group `id` transposed into buf as fp32 [cols, rows].
template <typename T>
inline void transpose_f32(const WeightStack& w, int32_t id, float* __restrict buf) {
  const T* base = static_cast<const T*>(w.data) + static_cast<int64_t>(id) * w.stride_n;
  // 16-row tiles: reads stay within a few cache lines per tile and writes are
  // 16 contiguous floats, instead of one write per cache line.
  constexpr int32_t kTile = 16;
  for (int32_t j0 = 0; j0 < w.rows; j0 += kTile) {
    const int32_t j1 = std::min(w.rows, j0 + kTile);
    for (int32_t k = 0; k < w.cols; ++k) {
      float* dst = buf + int64_t(k) * w.rows;
      for (int32_t j = j0; j < j1; ++j) dst[j] = static_cast<float>(base[j * w.stride_row + k]);
    }
  }
}

// g = S h for a full [r, r] core, g = sigma * h for a diagonal one.
template <typename T>
inline void apply_core(const WeightStack& w, bool diagonal, int32_t slot, int32_t r,
                       const float* __restrict h, float* __restrict g) {
  const T* base = static_cast<const T*>(w.data) + static_cast<int64_t>(slot) * w.stride_n;
  if (diagonal) {
    for (int32_t k = 0; k < r; ++k) g[k] = static_cast<float>(base[k]) * h[k];
    return;
  }
  for (int32_t i = 0; i < r; ++i) {
    const T* row = base + i * w.stride_row;
    float a = 0.f;
    for (int32_t j = 0; j < r; ++j) a += static_cast<float>(row[j]) * h[j];
    g[i] = a;
  }
}

template <typename T>
inline T* act_row(const Activation& a, int32_t t) {
  return static_cast<T*>(a.data) + static_cast<int64_t>(t) * a.stride_t;
}

inline float* inter_row(const Intermediate& m, int32_t s, int32_t t) {
  return m.data + s * m.stride_s + static_cast<int64_t>(t) * m.stride_t;
}

// Zero h rows of the tokens without an adapter (sorted tail of the table).
inline void zero_unassigned(const SegmentTable& seg, const Intermediate& h, int32_t num_slices) {
  for (int32_t p = seg.seg_start[seg.capacity]; p < seg.num_tokens; ++p)
    for (int32_t s = 0; s < num_slices; ++s)
      std::memset(inter_row(h, s, seg.token_indices_sorted[p]), 0, sizeof(float) * h.r);
}

// jd_shrink and lora_shrink (the latter with scales).
template <typename T, typename ParallelFor>
void shrink(const ShrinkParams& p, ParallelFor&& parallel_for) {
  const auto items = work_items(p.seg);
  const int64_t d_in = p.x.cols;
  const int32_t r = p.h.r;
  parallel_for(static_cast<int64_t>(items.size()), [&](int64_t begin, int64_t end) {
    std::vector<float> wbuf(std::is_same_v<T, float> ? 0 : size_t(r) * d_in), xbuf(d_in);
    for (int64_t i = begin; i < end; ++i) {
      const WorkItem& it = items[i];
      for (int32_t s = 0; s < p.weights.num_slices; ++s) {
        int64_t ld = 0;
        const float* W = matrix_f32<T>(p.weights.stack[s], it.group, wbuf.data(), ld);
        const float scale =
            p.scales.data ? p.scales.data[s * p.scales.stride_s + it.group * p.scales.stride_a] : 1.f;
        for (int32_t q = it.begin; q < it.end; ++q) {
          const int32_t t = p.seg.token_indices_sorted[q];
          const float* x = row_f32(act_row<const T>(p.x, t), xbuf.data(), d_in);
          float* h = inter_row(p.h, s, t);
          gemv_rows(W, ld, r, x, d_in, h);
          if (scale != 1.f)
            for (int32_t k = 0; k < r; ++k) h[k] *= scale;
        }
      }
    }
  });
  zero_unassigned(p.seg, p.h, p.weights.num_slices);
}

template <typename T, typename ParallelFor>
void core(const CoreParams& p, ParallelFor&& parallel_for) {
  const int32_t r = p.h.r;
  parallel_for(p.num_tokens, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(r);
    for (int64_t t = begin; t < end; ++t) {
      const int32_t a = p.token_lora_mapping[t];
      for (int32_t s = 0; s < p.weights.num_slices; ++s) {
        float* g = inter_row(p.g, s, static_cast<int32_t>(t));
        if (a < 0) {
          std::memset(g, 0, sizeof(float) * r);
          continue;
        }
        // Through tmp so that g may alias h.
        apply_core<T>(p.weights.stack[s], p.weights.diagonal[s], a, r,
                      inter_row(p.h, s, static_cast<int32_t>(t)), tmp.data());
        std::memcpy(g, tmp.data(), sizeof(float) * r);
      }
    }
  });
}

// Adds acc (fp32) into a model-dtype row.
template <typename T>
inline void add_into(T* __restrict y, const float* __restrict acc, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] += acc[j];
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = static_cast<T>(static_cast<float>(y[j]) + acc[j]);
  }
}

// Largest d_out over the slices, for scratch sizing.
inline int64_t max_rows(const StackList& l) {
  int64_t m = 0;
  for (int32_t s = 0; s < l.num_slices; ++s) m = std::max<int64_t>(m, l.stack[s].rows);
  return m;
}

// y[t, slice s] += W_s[group] g[s, t] for the tokens of one work item, with
// W_s transposed once per item.
template <typename T, typename GetG>
inline void expand_item(const StackList& weights, const Activation& y, const SegmentTable& seg,
                        const WorkItem& it, int32_t r, float* wt, float* acc, GetG&& get_g) {
  for (int32_t s = 0; s < weights.num_slices; ++s) {
    const WeightStack& w = weights.stack[s];
    transpose_f32<T>(w, it.group, wt);
    for (int32_t q = it.begin; q < it.end; ++q) {
      const int32_t t = seg.token_indices_sorted[q];
      std::memset(acc, 0, sizeof(float) * w.rows);
      axpy_rows(wt, r, get_g(s, q, t), w.rows, acc);
      add_into(act_row<T>(y, t) + weights.col_offset[s], acc, w.rows);
    }
  }
}

// jd_expand and lora_expand.
template <typename T, typename ParallelFor>
void expand(const ExpandParams& p, ParallelFor&& parallel_for) {
  const auto items = work_items(p.seg);
  const int32_t r = p.g.r;
  const int64_t d_max = max_rows(p.weights);
  parallel_for(static_cast<int64_t>(items.size()), [&](int64_t begin, int64_t end) {
    std::vector<float> wt(size_t(r) * d_max), acc(d_max);
    for (int64_t i = begin; i < end; ++i)
      expand_item<T>(p.weights, p.y, p.seg, items[i], r, wt.data(), acc.data(),
                     [&](int32_t s, int32_t, int32_t t) { return inter_row(p.g, s, t); });
  });
}

// Shrink, core and expand of one work item at a time; h and g stay in a
// per-thread [slices, kTokenBlock, r] scratch.
template <typename T, typename ParallelFor>
void fused(const FusedParams& p, ParallelFor&& parallel_for) {
  const auto items = work_items(p.seg);
  const int32_t r = p.r;
  const int64_t d_in = p.x.cols;
  const int64_t d_max = max_rows(p.expand);
  const int32_t S = p.shrink.num_slices;
  parallel_for(static_cast<int64_t>(items.size()), [&](int64_t begin, int64_t end) {
    std::vector<float> vbuf(std::is_same_v<T, float> ? 0 : size_t(r) * d_in), xbuf(d_in);
    std::vector<float> h(r), g(size_t(S) * kTokenBlock * r);
    std::vector<float> wt(size_t(r) * d_max), acc(d_max);
    for (int64_t i = begin; i < end; ++i) {
      const WorkItem& it = items[i];
      for (int32_t s = 0; s < S; ++s) {
        int64_t ld = 0;
        const float* V = matrix_f32<T>(p.shrink.stack[s], it.group, vbuf.data(), ld);
        for (int32_t q = it.begin; q < it.end; ++q) {
          const int32_t t = p.seg.token_indices_sorted[q];
          const float* x = row_f32(act_row<const T>(p.x, t), xbuf.data(), d_in);
          gemv_rows(V, ld, r, x, d_in, h.data());
          apply_core<T>(p.core.stack[s], p.core.diagonal[s], p.token_lora_mapping[t], r, h.data(),
                        g.data() + (size_t(s) * kTokenBlock + (q - it.begin)) * r);
        }
      }
      expand_item<T>(p.expand, p.y, p.seg, it, r, wt.data(), acc.data(),
                     [&](int32_t s, int32_t q, int32_t) {
                       return g.data() + (size_t(s) * kTokenBlock + (q - it.begin)) * r;
                     });
    }
  });
}

// Stable counting sort of tokens by (cluster, adapter). Values must already be
// validated (slots in [-1, num_adapters), clusters of used slots in range).
inline void build_batch_meta(const BatchMetaParams& p) {
  const int32_t T = p.num_tokens, A = p.num_adapters, C = p.num_clusters;
  std::vector<int32_t> per_adapter(A, 0);
  for (int32_t t = 0; t < T; ++t)
    if (p.token_lora_mapping[t] >= 0) ++per_adapter[p.token_lora_mapping[t]];

  // Active adapters in (cluster, adapter) order: bucket by cluster, ascending ids.
  std::vector<int32_t> cluster_count(C, 0), cluster_adapters(C + 1, 0);
  for (int32_t a = 0; a < A; ++a)
    if (per_adapter[a] > 0) ++cluster_adapters[p.adapter_cluster[a] + 1];
  for (int32_t c = 0; c < C; ++c) cluster_adapters[c + 1] += cluster_adapters[c];
  std::vector<int32_t> order(cluster_adapters[C]);
  {
    std::vector<int32_t> fill(cluster_adapters.begin(), cluster_adapters.end() - 1);
    for (int32_t a = 0; a < A; ++a)
      if (per_adapter[a] > 0) order[fill[p.adapter_cluster[a]]++] = a;
  }

  std::vector<int32_t> next(A, 0);  // next sorted position per adapter
  int32_t pos = 0, nl = 0, nc = 0;
  for (int32_t i = 0; i < static_cast<int32_t>(order.size()); ++i) {
    const int32_t a = order[i];
    const int32_t c = p.adapter_cluster[a];
    if (cluster_count[c] == 0) {
      p.active_cluster_ids[nc] = c;
      p.cluster_token_start[nc] = pos;
      ++nc;
    }
    cluster_count[c] += per_adapter[a];
    p.active_lora_ids[nl] = a;
    p.num_tokens_per_lora[nl] = per_adapter[a];
    p.lora_token_start_loc[nl] = pos;
    ++nl;
    next[a] = pos;
    pos += per_adapter[a];
  }
  const int32_t with_adapter = pos;
  for (int32_t j = 0; j < nc; ++j) p.num_tokens_per_cluster[j] = cluster_count[p.active_cluster_ids[j]];
  for (int32_t j = nc; j < C; ++j) {
    p.active_cluster_ids[j] = -1;
    p.num_tokens_per_cluster[j] = 0;
  }
  for (int32_t j = nc; j <= C; ++j) p.cluster_token_start[j] = with_adapter;
  for (int32_t j = nl; j < A; ++j) {
    p.active_lora_ids[j] = -1;
    p.num_tokens_per_lora[j] = 0;
  }
  for (int32_t j = nl; j <= A; ++j) p.lora_token_start_loc[j] = with_adapter;

  int32_t tail = with_adapter;
  for (int32_t t = 0; t < T; ++t) {
    const int32_t a = p.token_lora_mapping[t];
    p.token_indices_sorted[a >= 0 ? next[a]++ : tail++] = t;
  }
  p.no_lora_flag[0] = with_adapter == 0;
}

}  // namespace jdlora::cpu
