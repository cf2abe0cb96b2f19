// CPU kernels of every op, written against the plain parameter blocks.
//
// Framework-agnostic: element types only need conversions to and from float
// (float, c10::Half, c10::BFloat16, _Float16, ...) and the caller supplies the
// parallel loop, `parallel_for(n_items, fn(begin, end))`.
//
// Shrink work is split into items of up to kTokenBlock tokens of one segment,
// so each weight matrix is converted to fp32 once per item and reused by every
// token of the item while it is hot in cache. Expand work is split into units
// of one segment, one slice and kColumnChunk output columns: each unit takes
// its rows of U (or B) as columns once for all tokens of the segment, which is
// what the segments make possible (tokens of one cluster share V and U). A
// column-major U is copied column by column; a row-major one is reordered
// element by element, which costs about as much as the arithmetic when
// segments are short.
//
// Every token's sums run in the same order whatever else is in the batch
// (blocks of tokens are padded by repeating a token, never by changing the
// order), so a token's output is bitwise independent of the other tokens.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "jdlora/params.h"

namespace jdlora::cpu {

// The two inner loops carry almost all of the arithmetic; on x86-64 Linux they
// are compiled for AVX-512 and AVX2+FMA besides the baseline, and the loader
// picks the widest the machine has (the rest of the library stays baseline).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__CUDACC__)
#define JDLORA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define JDLORA_CPU_CLONES
#endif

inline constexpr int32_t kTokenBlock = 16;
inline constexpr int32_t kColumnChunk = 256;

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

// Expand work: tokens [begin, end) of segment `seg` (at most kUnitTokens) against
// columns [c0, c1) of slice `slice` (at most kColumnChunk).
inline constexpr int32_t kUnitTokens = 256;

struct ExpandUnit {
  int32_t seg;
  int32_t slice;
  int32_t begin;
  int32_t end;
  int32_t c0;
  int32_t c1;
};

inline std::vector<ExpandUnit> expand_units(const SegmentTable& seg, const StackList& w) {
  std::vector<ExpandUnit> units;
  for (int32_t j = 0; j < seg.capacity; ++j) {
    const int32_t b = seg.seg_start[j], e = seg.seg_start[j + 1];
    for (int32_t p = b; p < e; p += kUnitTokens)
      for (int32_t s = 0; s < w.num_slices; ++s)
        for (int32_t c = 0; c < w.stack[s].rows; c += kColumnChunk)
          units.push_back({j, s, p, std::min(e, p + kUnitTokens), c, std::min(w.stack[s].rows, c + kColumnChunk)});
  }
  return units;
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

// out[i][j] = sum_d w[i][d] * x[j][d] for four rows and four tokens: eight
// loads feed sixteen multiply-adds (a row at a time needs five for four).
JDLORA_CPU_CLONES static void dot_4x4(const float* const* w, const float* const* x, int64_t n, float out[4][4]) {
  const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  float a00 = 0.f, a01 = 0.f, a02 = 0.f, a03 = 0.f, a10 = 0.f, a11 = 0.f, a12 = 0.f, a13 = 0.f;
  float a20 = 0.f, a21 = 0.f, a22 = 0.f, a23 = 0.f, a30 = 0.f, a31 = 0.f, a32 = 0.f, a33 = 0.f;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)
  for (int64_t d = 0; d < n; ++d) {
    const float v0 = x0[d], v1 = x1[d], v2 = x2[d], v3 = x3[d];
    const float r0 = w0[d], r1 = w1[d], r2 = w2[d], r3 = w3[d];
    a00 += r0 * v0; a01 += r0 * v1; a02 += r0 * v2; a03 += r0 * v3;
    a10 += r1 * v0; a11 += r1 * v1; a12 += r1 * v2; a13 += r1 * v3;
    a20 += r2 * v0; a21 += r2 * v1; a22 += r2 * v2; a23 += r2 * v3;
    a30 += r3 * v0; a31 += r3 * v1; a32 += r3 * v2; a33 += r3 * v3;
  }
  out[0][0] = a00; out[0][1] = a01; out[0][2] = a02; out[0][3] = a03;
  out[1][0] = a10; out[1][1] = a11; out[1][2] = a12; out[1][3] = a13;
  out[2][0] = a20; out[2][1] = a21; out[2][2] = a22; out[2][3] = a23;
  out[3][0] = a30; out[3][1] = a31; out[3][2] = a32; out[3][3] = a33;
}

// h[j][k] = sum_d W[k * ldw + d] * x[j][d] for k < rows and j < ntok, in
// 4 x 4 blocks; short blocks repeat their last row or token, so every output
// takes the same path (and bits) wherever it falls.
inline void gemv_tokens(const float* W, int64_t ldw, int32_t rows, const float* const* x, int32_t ntok,
                        int64_t n, float* const* h) {
  float out[4][4];
  for (int32_t j0 = 0; j0 < ntok; j0 += 4) {
    const float* xs[4];
    for (int32_t j = 0; j < 4; ++j) xs[j] = x[std::min(j0 + j, ntok - 1)];
    for (int32_t k0 = 0; k0 < rows; k0 += 4) {
      const float* ws[4];
      for (int32_t k = 0; k < 4; ++k) ws[k] = W + std::min(k0 + k, rows - 1) * ldw;
      dot_4x4(ws, xs, n, out);
      for (int32_t j = j0; j < std::min(j0 + 4, ntok); ++j)
        for (int32_t k = k0; k < std::min(k0 + 4, rows); ++k) h[j][k] = out[k - k0][j - j0];
    }
  }
}

// acc[j][c] = sum_k wt[k * n + c] * g[j][k] for four tokens, vectorised over
// the columns c, four ranks per pass: each pass loads four rows of wt once
// for sixteen multiply-adds and reads and writes acc once.
JDLORA_CPU_CLONES static void axpy_4(const float* __restrict wt, int32_t r, int64_t n, const float* const* g,
                                     float* __restrict acc, int64_t ld_acc) {
  float* __restrict c0 = acc;
  float* __restrict c1 = acc + ld_acc;
  float* __restrict c2 = acc + 2 * ld_acc;
  float* __restrict c3 = acc + 3 * ld_acc;
  for (int32_t j = 0; j < 4; ++j) std::memset(acc + j * ld_acc, 0, sizeof(float) * n);
  int32_t k = 0;
  for (; k + 4 <= r; k += 4) {
    const float* w0 = wt + k * n;
    const float* w1 = w0 + n;
    const float* w2 = w1 + n;
    const float* w3 = w2 + n;
    const float* g0 = g[0] + k;
    const float* g1 = g[1] + k;
    const float* g2 = g[2] + k;
    const float* g3 = g[3] + k;
    const float g00 = g0[0], g01 = g0[1], g02 = g0[2], g03 = g0[3];
    const float g10 = g1[0], g11 = g1[1], g12 = g1[2], g13 = g1[3];
    const float g20 = g2[0], g21 = g2[1], g22 = g2[2], g23 = g2[3];
    const float g30 = g3[0], g31 = g3[1], g32 = g3[2], g33 = g3[3];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float v0 = w0[c], v1 = w1[c], v2 = w2[c], v3 = w3[c];
      c0[c] += v0 * g00 + v1 * g01 + v2 * g02 + v3 * g03;
      c1[c] += v0 * g10 + v1 * g11 + v2 * g12 + v3 * g13;
      c2[c] += v0 * g20 + v1 * g21 + v2 * g22 + v3 * g23;
      c3[c] += v0 * g30 + v1 * g31 + v2 * g32 + v3 * g33;
    }
  }
  for (; k < r; ++k) {
    const float* w = wt + k * n;
    const float g0 = g[0][k], g1 = g[1][k], g2 = g[2][k], g3 = g[3][k];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float v = w[c];
      c0[c] += v * g0;
      c1[c] += v * g1;
      c2[c] += v * g2;
      c3[c] += v * g3;
    }
  }
}

// The dequantising loops, cloned like the arithmetic (a conversion per value
// is as much work as a multiply-add). o[i] = float(q[i]) * s:
JDLORA_CPU_CLONES static void dequant_i8(const int8_t* __restrict q, float s, float* __restrict o, int32_t n) {
#pragma omp simd
  for (int32_t i = 0; i < n; ++i) o[i] = static_cast<float>(q[i]) * s;
}

// o[2i] and o[2i + 1] from the low and high nibbles of p[i]:
JDLORA_CPU_CLONES static void dequant_i4(const uint8_t* __restrict p, float s, float* __restrict o, int32_t nbytes) {
#pragma omp simd
  for (int32_t i = 0; i < nbytes; ++i) {
    const int v = p[i];
    o[2 * i] = static_cast<float>((v & 15) - 8) * s;
    o[2 * i + 1] = static_cast<float>((v >> 4) - 8) * s;
  }
}

// One value from each of n rows (a column of a column-major stack), each
// with its row's scale: o[j] = float(q[j]) * s[j], or the nibble at `shift`.
JDLORA_CPU_CLONES static void dequant_i8_rows(const int8_t* __restrict q, const float* __restrict s,
                                              float* __restrict o, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(q[j]) * s[j];
}

JDLORA_CPU_CLONES static void dequant_i4_rows(const uint8_t* __restrict p, int shift, const float* __restrict s,
                                              float* __restrict o, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(((p[j] >> shift) & 15) - 8) * s[j];
}

// Values [c0, c1) of row k of group id's matrix of a quantized stack as fp32
// float(q) * float(scale), in one vectorised pass per group. c0 is even for
// a 4-bit stack (groups are), so no byte is split.
template <typename T>
inline void dequant_range(const WeightStack& w, int32_t id, int32_t k, int32_t c0, int32_t c1,
                          float* __restrict out) {
  const T* sc = static_cast<const T*>(w.scales.data) + int64_t(id) * w.scales.stride_n + int64_t(k) * w.scales.stride_row;
  const int64_t off = int64_t(id) * w.stride_n + int64_t(k) * w.stride_row;
  const int32_t G = w.scales.group;
  for (int32_t a = c0; a < c1;) {
    const int32_t b = std::min(c1, (a / G + 1) * G);
    const float s = static_cast<float>(sc[a / G]);
    if (w.quant == Quant::kInt8)
      dequant_i8(static_cast<const int8_t*>(w.data) + off + a, s, out + (a - c0), b - a);
    else
      dequant_i4(static_cast<const uint8_t*>(w.data) + off + a / 2, s, out + (a - c0), (b - a) / 2);
    a = b;
  }
}

// Values per dequantised chunk of a row in gemv_quantized: four rows of it
// (16 KiB) stay in L1 while every token of the item reads them.
inline constexpr int32_t kDequantChunk = 1024;

// gemv_tokens over a quantized [rows, n] matrix of group id without a
// dequantised copy of it: four rows at a time, chunk by chunk, each chunk
// dequantised once into buf (4 x kDequantChunk floats) for all tokens. (Its
// conversions inside the dot product instead measured slower: they compete
// with the multiply-adds for every token block.) The chunks' partial sums
// add up in a fixed order, so a token's result does not depend on the other
// tokens.
template <typename T>
inline void gemv_quantized(const WeightStack& w, int32_t id, int32_t rows, const float* const* x, int32_t ntok,
                           int64_t n, float* const* h, float* buf) {
  for (int32_t j = 0; j < ntok; ++j) std::memset(h[j], 0, sizeof(float) * rows);
  float out[4][4];
  for (int32_t k0 = 0; k0 < rows; k0 += 4) {
    const float* ws[4];
    for (int32_t c0 = 0; c0 < n; c0 += kDequantChunk) {
      const int32_t c1 = static_cast<int32_t>(std::min<int64_t>(n, c0 + kDequantChunk));
      for (int32_t k = 0; k < 4; ++k) {
        ws[k] = buf + k * kDequantChunk;
        dequant_range<T>(w, id, std::min(k0 + k, rows - 1), c0, c1, buf + k * kDequantChunk);
      }
      for (int32_t j0 = 0; j0 < ntok; j0 += 4) {
        const float* xs[4];
        for (int32_t j = 0; j < 4; ++j) xs[j] = x[std::min(j0 + j, ntok - 1)] + c0;
        dot_4x4(ws, xs, c1 - c0, out);
        for (int32_t j = j0; j < std::min(j0 + 4, ntok); ++j)
          for (int32_t k = k0; k < std::min(k0 + 4, rows); ++k) h[j][k] += out[k - k0][j - j0];
      }
    }
  }
}

inline bool any_quantized(const StackList& l) {
  for (int32_t s = 0; s < l.num_slices; ++s)
    if (l.stack[s].quant != Quant::kNone) return true;
  return false;
}

// Weight matrix [rows, cols] of group `id` in slice s, as fp32 (converted
// into buf unless T is float and rows are contiguous and not quantized).
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

// h = W x for the tokens of an item, W of slice stack w and group id: in
// place for float32 rows, through a converted copy for half types, chunk by
// chunk for quantized ones. wbuf: shrink_buffer_floats of them.
template <typename T>
inline void shrink_item(const WeightStack& w, int32_t id, int32_t rows, const float* const* x, int32_t ntok,
                        int64_t n, float* const* h, float* wbuf) {
  if (w.quant != Quant::kNone) {
    gemv_quantized<T>(w, id, rows, x, ntok, n, h, wbuf);
    return;
  }
  int64_t ld = 0;
  const float* W = matrix_f32<T>(w, id, wbuf, ld);
  gemv_tokens(W, ld, rows, x, ntok, n, h);
}

template <typename T>
inline size_t shrink_buffer_floats(const StackList& l, int32_t rows, int64_t n) {
  size_t need = std::is_same_v<T, float> ? 0 : size_t(rows) * n;
  if (any_quantized(l)) need = std::max(need, size_t(4) * kDequantChunk);
  return need;
}

// Rows [c0, c0 + n) of the [rows, cols] weight of group `id` as fp32
// [cols, n] in buf: from a column-major stack one contiguous copy per column,
// otherwise an element-by-element reorder. (Reading a column-major stack in
// place would be no faster: its columns lie d_out apart, often a multiple of
// 4 KiB, so they compete for the same L1 sets.) Quantized stacks the same
// way, dequantised on the way: a column-major one a column (a byte column
// for 4-bit values) at a time against its rows' scales gathered once per
// group into scratch (n floats), a row-major one value by value like a
// float one.
template <typename T>
inline void columns_f32(const WeightStack& w, int32_t id, int64_t c0, int64_t n, float* __restrict buf,
                        float* __restrict scratch) {
  if (w.quant != Quant::kNone && w.stride_row == 1 && w.rows > 1) {
    const int32_t G = w.scales.group;
    const T* sc = static_cast<const T*>(w.scales.data) + int64_t(id) * w.scales.stride_n + c0 * w.scales.stride_row;
    const int64_t off = int64_t(id) * w.stride_n + c0;
    for (int32_t g = 0; g * G < w.cols; ++g) {
      for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<float>(sc[j * w.scales.stride_row + g]);
      for (int32_t k = g * G; k < (g + 1) * G; ++k) {
        if (w.quant == Quant::kInt8)
          dequant_i8_rows(static_cast<const int8_t*>(w.data) + off + k * w.stride_col, scratch, buf + k * n, n);
        else
          dequant_i4_rows(static_cast<const uint8_t*>(w.data) + off + (k / 2) * w.stride_col, (k & 1) * 4, scratch,
                          buf + k * n, n);
      }
    }
    return;
  }
  if (w.quant != Quant::kNone) {
    const int32_t G = w.scales.group;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = int64_t(id) * w.stride_n + (c0 + j) * w.stride_row;
      const T* sc = static_cast<const T*>(w.scales.data) + int64_t(id) * w.scales.stride_n + (c0 + j) * w.scales.stride_row;
      for (int32_t k0 = 0; k0 < w.cols; k0 += G) {
        const float s = static_cast<float>(sc[k0 / G]);
        if (w.quant == Quant::kInt8) {
          const int8_t* q = static_cast<const int8_t*>(w.data) + row;
          for (int32_t k = k0; k < k0 + G; ++k) buf[k * n + j] = static_cast<float>(q[k]) * s;
        } else {
          const uint8_t* p = static_cast<const uint8_t*>(w.data) + row;
          for (int32_t k = k0; k < k0 + G; k += 2) {
            const int v = p[k / 2];
            buf[k * n + j] = static_cast<float>((v & 15) - 8) * s;
            buf[(k + 1) * n + j] = static_cast<float>((v >> 4) - 8) * s;
          }
        }
      }
    }
    return;
  }
  const T* base = static_cast<const T*>(w.data) + static_cast<int64_t>(id) * w.stride_n;
  if (w.stride_row == 1 && w.rows > 1) {  // column-major: each column is contiguous
    for (int32_t k = 0; k < w.cols; ++k) {
      if constexpr (std::is_same_v<T, float>)
        std::memcpy(buf + k * n, base + k * w.stride_col + c0, sizeof(float) * n);
      else
        to_f32(base + k * w.stride_col + c0, buf + k * n, n);
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* row = base + (c0 + j) * w.stride_row;
    for (int32_t k = 0; k < w.cols; ++k) buf[k * n + j] = static_cast<float>(row[k]);
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

// The fp32 x rows of an item's tokens: the rows themselves when T is float,
// otherwise converted into buf ([kTokenBlock, d_in]).
template <typename T>
inline void item_rows_f32(const Activation& x, const SegmentTable& seg, const WorkItem& it, float* buf,
                          const float** rows) {
  for (int32_t q = it.begin; q < it.end; ++q)
    rows[q - it.begin] = row_f32(act_row<const T>(x, seg.token_indices_sorted[q]),
                                 std::is_same_v<T, float> ? nullptr : buf + int64_t(q - it.begin) * x.cols,
                                 x.cols);
}

// jd_shrink and lora_shrink (the latter with scales).
template <typename T, typename ParallelFor>
void shrink(const ShrinkParams& p, ParallelFor&& parallel_for) {
  const auto items = work_items(p.seg);
  const int64_t d_in = p.x.cols;
  const int32_t r = p.h.r;
  parallel_for(static_cast<int64_t>(items.size()), [&](int64_t begin, int64_t end) {
    constexpr bool kF32 = std::is_same_v<T, float>;
    std::vector<float> wbuf(shrink_buffer_floats<T>(p.weights, r, d_in)), xbuf(kF32 ? 0 : size_t(kTokenBlock) * d_in);
    const float* xs[kTokenBlock];
    float* hs[kTokenBlock];
    for (int64_t i = begin; i < end; ++i) {
      const WorkItem& it = items[i];
      const int32_t n = it.end - it.begin;
      item_rows_f32<T>(p.x, p.seg, it, xbuf.data(), xs);
      for (int32_t s = 0; s < p.weights.num_slices; ++s) {
        for (int32_t q = 0; q < n; ++q) hs[q] = inter_row(p.h, s, p.seg.token_indices_sorted[it.begin + q]);
        shrink_item<T>(p.weights.stack[s], it.group, r, xs, n, d_in, hs, wbuf.data());
        const float scale =
            p.scales.data ? p.scales.data[s * p.scales.stride_s + it.group * p.scales.stride_a] : 1.f;
        if (scale != 1.f)
          for (int32_t q = 0; q < n; ++q)
            for (int32_t k = 0; k < r; ++k) hs[q][k] *= scale;
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

// y[t, columns c0..c1 of slice s] += W_s[group] g for the tokens of one unit,
// four tokens at a time against the unit's rows of W, taken as columns once.
// get_g(s, q): the fp32 g row of sorted position q. wt holds r x kColumnChunk
// floats and kColumnChunk more of scratch.
template <typename T, typename GetG>
inline void expand_unit(const StackList& weights, const Activation& y, const SegmentTable& seg,
                        const ExpandUnit& u, int32_t r, float* wt, float* acc, GetG&& get_g) {
  const int64_t n = u.c1 - u.c0;
  columns_f32<T>(weights.stack[u.slice], seg.active_ids[u.seg], u.c0, n, wt, wt + size_t(r) * kColumnChunk);
  T* const y0 = static_cast<T*>(y.data) + weights.col_offset[u.slice] + u.c0;
  for (int32_t q0 = u.begin; q0 < u.end; q0 += 4) {
    const float* g[4];
    for (int32_t j = 0; j < 4; ++j) g[j] = get_g(u.slice, std::min(q0 + j, u.end - 1));
    axpy_4(wt, r, n, g, acc, kColumnChunk);
    for (int32_t q = q0; q < std::min(q0 + 4, u.end); ++q)
      add_into(y0 + static_cast<int64_t>(seg.token_indices_sorted[q]) * y.stride_t,
               acc + int64_t(q - q0) * kColumnChunk, n);
  }
}

template <typename T, typename GetG, typename ParallelFor>
void expand_units_run(const StackList& weights, const Activation& y, const SegmentTable& seg, int32_t r,
                      GetG&& get_g, ParallelFor&& parallel_for) {
  const auto units = expand_units(seg, weights);
  parallel_for(static_cast<int64_t>(units.size()), [&](int64_t begin, int64_t end) {
    std::vector<float> wt(size_t(r + 1) * kColumnChunk), acc(size_t(4) * kColumnChunk);
    for (int64_t i = begin; i < end; ++i) expand_unit<T>(weights, y, seg, units[i], r, wt.data(), acc.data(), get_g);
  });
}

// jd_expand and lora_expand.
template <typename T, typename ParallelFor>
void expand(const ExpandParams& p, ParallelFor&& parallel_for) {
  expand_units_run<T>(p.weights, p.y, p.seg, p.g.r,
                      [&](int32_t s, int32_t q) -> const float* {
                        return inter_row(p.g, s, p.seg.token_indices_sorted[q]);
                      },
                      parallel_for);
}

// Shrink and core per item into an fp32 g [S, sorted position, r] that never
// leaves the call, then the expand units over it.
template <typename T, typename ParallelFor>
void fused(const FusedParams& p, ParallelFor&& parallel_for) {
  const auto items = work_items(p.seg);
  const int32_t r = p.r;
  const int64_t d_in = p.x.cols;
  const int32_t S = p.shrink.num_slices;
  const int64_t n_sorted = p.seg.seg_start[p.seg.capacity];
  std::vector<float> g(size_t(S) * n_sorted * r);
  parallel_for(static_cast<int64_t>(items.size()), [&](int64_t begin, int64_t end) {
    constexpr bool kF32 = std::is_same_v<T, float>;
    std::vector<float> vbuf(shrink_buffer_floats<T>(p.shrink, r, d_in)), xbuf(kF32 ? 0 : size_t(kTokenBlock) * d_in);
    std::vector<float> h(size_t(kTokenBlock) * r);
    const float* xs[kTokenBlock];
    float* hs[kTokenBlock];
    for (int32_t q = 0; q < kTokenBlock; ++q) hs[q] = h.data() + size_t(q) * r;
    for (int64_t i = begin; i < end; ++i) {
      const WorkItem& it = items[i];
      const int32_t n = it.end - it.begin;
      item_rows_f32<T>(p.x, p.seg, it, xbuf.data(), xs);
      for (int32_t s = 0; s < S; ++s) {
        shrink_item<T>(p.shrink.stack[s], it.group, r, xs, n, d_in, hs, vbuf.data());
        for (int32_t q = 0; q < n; ++q) {
          const int32_t t = p.seg.token_indices_sorted[it.begin + q];
          apply_core<T>(p.core.stack[s], p.core.diagonal[s], p.token_lora_mapping[t], r, hs[q],
                        g.data() + (size_t(s) * n_sorted + it.begin + q) * r);
        }
      }
    }
  });
  expand_units_run<T>(p.expand, p.y, p.seg, r,
                      [&](int32_t s, int32_t q) -> const float* {
                        return g.data() + (size_t(s) * n_sorted + q) * r;
                      },
                      parallel_for);
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
