// Shared by the emulation drivers: device-like buffers with guard bytes,
// conversions, random data, float and quantized weight stacks, token
// popularity patterns, the reference batch metadata, and the failure count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "emu_runtime.h"
#include "jdlora/params.h"
#include "tc_hw_emu.h"

namespace emu_harness {

constexpr size_t kGuard = 64;
constexpr unsigned char kGuardByte = 0xa5;

// A device-like buffer: registered for the copy bounds check, with guard
// bytes on both sides that must survive every kernel.
template <typename V>
struct Buf {
  std::vector<unsigned char> raw;
  V* data = nullptr;
  size_t n = 0;

  explicit Buf(size_t count) : raw(count * sizeof(V) + 2 * kGuard + 16, kGuardByte), n(count) {
    auto addr = reinterpret_cast<uintptr_t>(raw.data());
    data = reinterpret_cast<V*>(raw.data() + (16 - addr % 16) % 16 + kGuard);
    emu::buffers().push_back({reinterpret_cast<const unsigned char*>(data), count * sizeof(V)});
  }
  Buf(const Buf&) = delete;
  ~Buf() {
    auto& b = emu::buffers();
    for (size_t i = 0; i < b.size(); ++i)
      if (b[i].begin == reinterpret_cast<const unsigned char*>(data)) {
        b.erase(b.begin() + static_cast<std::ptrdiff_t>(i));
        break;
      }
  }
  bool guards_ok() const {
    const auto* d = reinterpret_cast<const unsigned char*>(data);
    for (size_t i = 1; i <= kGuard; ++i)
      if (d[-static_cast<std::ptrdiff_t>(i)] != kGuardByte || d[n * sizeof(V) + i - 1] != kGuardByte) return false;
    return true;
  }
  V& operator[](size_t i) { return data[i]; }
  const V& operator[](size_t i) const { return data[i]; }
};

template <typename T>
float to_f(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

template <typename T>
T from_f(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return __float2half_rn(v);
  }
}

inline std::mt19937 rng(7);

inline float randn() {
  static std::normal_distribution<float> n(0.f, 1.f);
  return n(rng);
}

inline int randint(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng); }

inline std::vector<int> token_mapping(const std::string& pattern, int T, int A) {
  std::vector<int> m(T);
  if (pattern == "identical") {
    const int a = randint(A);
    for (int& v : m) v = a;
  } else if (pattern == "distinct") {
    std::vector<int> p(A);
    for (int i = 0; i < A; ++i) p[i] = i;
    std::shuffle(p.begin(), p.end(), rng);
    for (int t = 0; t < T; ++t) m[t] = p[t % A];
  } else if (pattern == "uniform") {
    for (int& v : m) v = randint(A);
  } else if (pattern == "zipf") {
    std::vector<double> w(A);
    for (int i = 0; i < A; ++i) w[i] = std::pow(i + 1.0, -1.1);
    std::discrete_distribution<int> d(w.begin(), w.end());
    for (int& v : m) v = randint(10) == 0 ? -1 : d(rng);
  } else if (pattern == "skewed") {
    const int hot = randint(A);
    for (int& v : m) {
      const int u = randint(100);
      v = u >= 95 ? -1 : (u >= 80 ? randint(A) : hot);
    }
  } else if (pattern == "all_none") {
    for (int& v : m) v = -1;
  }
  return m;
}

// The reference batch metadata (reference.build_batch_meta): tokens stably
// sorted by (cluster, adapter), those without an adapter last; segments by
// cluster and by adapter, padded with id -1 and start n_with.
struct Meta {
  std::vector<int> sorted, c_ids, c_start, l_ids, l_start;
};

inline Meta build_meta(const std::vector<int>& mapping, const std::vector<int>& ac, int C) {
  const int T = static_cast<int>(mapping.size());
  const int A = static_cast<int>(ac.size());
  std::vector<long> key(T);
  for (int t = 0; t < T; ++t) {
    const int a = mapping[t];
    key[t] = a >= 0 ? static_cast<long>(ac[a]) * (A + 1) + a : static_cast<long>(C + 1) * (A + 1);
  }
  Meta m;
  m.sorted.resize(T);
  for (int t = 0; t < T; ++t) m.sorted[t] = t;
  std::stable_sort(m.sorted.begin(), m.sorted.end(), [&](int a, int b) { return key[a] < key[b]; });
  int n_with = 0;
  for (int a : mapping) n_with += a >= 0 ? 1 : 0;
  auto segments = [&](auto id_of, int capacity, std::vector<int>& ids, std::vector<int>& start) {
    ids.assign(capacity, -1);
    start.assign(capacity + 1, n_with);
    start[0] = 0;
    int k = 0;
    for (int p = 0; p < n_with; ++p) {
      const int id = id_of(m.sorted[p]);
      if (p == 0 || id != id_of(m.sorted[p - 1])) {
        ids[k] = id;
        start[k] = p;
        ++k;
      }
    }
    if (k < capacity) start[k] = n_with;
  };
  segments([&](int t) { return ac[mapping[t]]; }, C, m.c_ids, m.c_start);
  segments([&](int t) { return mapping[t]; }, A, m.l_ids, m.l_start);
  return m;
}

// How one slice's shrink or expand stack is stored: model-dtype values
// (kNone), or int8 / int4 rows with one scale per `group` values (0: the
// whole row), `pad` bytes past each packed row (and one scale past each
// row's scales), the base `lead` bytes past a 16-byte boundary.
struct QuantFormat {
  jdlora::Quant quant = jdlora::Quant::kNone;
  int group = 0;
  int pad = 0;
  int lead = 0;
};

inline QuantFormat q8(int group = 0, int pad = 0, int lead = 0) { return {jdlora::Quant::kInt8, group, pad, lead}; }
inline QuantFormat q4(int group, int pad = 0, int lead = 0) { return {jdlora::Quant::kInt4, group, pad, lead}; }

inline std::string format_names(const std::vector<QuantFormat>& q) {
  std::string s;
  for (const QuantFormat& f : q) {
    s += s.empty() ? "" : "+";
    s += f.quant == jdlora::Quant::kInt4 ? "int4" : (f.quant == jdlora::Quant::kInt8 ? "int8" : "float");
    if (f.quant != jdlora::Quant::kNone) s += "/g" + (f.group > 0 ? std::to_string(f.group) : std::string("row"));
    if (f.pad > 0) s += "/pad" + std::to_string(f.pad);
    if (f.lead > 0) s += "/lead" + std::to_string(f.lead);
  }
  return s.empty() ? "float" : s;
}

// One [N, rows, cols] weight stack as the kernels read it, with random
// values of about `scale` in magnitude drawn from `gen`. at() is an element
// as the format defines it (float(q) * float(scale), in double here): the
// reference's weights.
template <typename E>
struct Table {
  QuantFormat f;
  int N, rows, cols, group = 0;
  int64_t ld = 0, sld = 0;                     // stored elements per row of the values, of the scales
  std::unique_ptr<Buf<E>> vals;                // kNone
  std::unique_ptr<Buf<unsigned char>> bytes;   // int8 / int4
  std::unique_ptr<Buf<E>> scales;
  std::vector<int> q;                          // the integer values, [N, rows, cols]

  Table(int N_, int rows_, int cols_, QuantFormat f_, float scale, std::mt19937& gen)
      : f(f_), N(N_), rows(rows_), cols(cols_) {
    const size_t nrows = static_cast<size_t>(N) * rows;
    if (f.quant == jdlora::Quant::kNone) {
      std::normal_distribution<float> nd(0.f, 1.f);
      ld = cols;
      vals = std::make_unique<Buf<E>>(nrows * cols);
      for (size_t i = 0; i < vals->n; ++i) (*vals)[i] = from_f<E>(nd(gen) * scale);
      return;
    }
    const bool four = f.quant == jdlora::Quant::kInt4;
    const int qmax = four ? 7 : 127;
    group = f.group > 0 ? f.group : cols;
    ld = (four ? cols / 2 : cols) + f.pad;
    sld = cols / group + (f.pad > 0 ? 1 : 0);
    // Padding bytes hold no value and padding scales are NaN: a kernel that
    // reads either gets a wrong or NaN result.
    bytes = std::make_unique<Buf<unsigned char>>(f.lead + nrows * ld);
    for (size_t i = 0; i < bytes->n; ++i) (*bytes)[i] = 0xee;
    scales = std::make_unique<Buf<E>>(nrows * sld);
    for (size_t i = 0; i < scales->n; ++i) (*scales)[i] = from_f<E>(NAN);
    q.resize(nrows * cols);
    std::uniform_int_distribution<int> qd(-qmax, qmax);
    std::uniform_real_distribution<float> ud(0.5f, 1.5f);
    unsigned char* base = bytes->data + f.lead;
    for (size_t row = 0; row < nrows; ++row) {
      // Uniform q has a standard deviation of qmax / sqrt(3).
      for (int j = 0; j < cols / group; ++j)
        (*scales)[row * sld + j] = from_f<E>(scale * 1.7320508f / static_cast<float>(qmax) * ud(gen));
      for (int k = 0; k < cols; ++k) {
        const int v = qd(gen);
        q[row * cols + k] = v;
        if (four) {
          unsigned char& b = base[row * ld + k / 2];
          b = k % 2 == 0 ? static_cast<unsigned char>(v + 8) : static_cast<unsigned char>((b & 0x0f) | ((v + 8) << 4));
        } else {
          base[row * ld + k] = static_cast<unsigned char>(static_cast<int8_t>(v));
        }
      }
    }
  }

  double at(int n, int i, int k) const {
    const size_t row = static_cast<size_t>(n) * rows + i;
    if (f.quant == jdlora::Quant::kNone) return to_f((*vals)[row * cols + k]);
    return static_cast<double>(q[row * cols + k]) * static_cast<double>(to_f((*scales)[row * sld + k / group]));
  }

  jdlora::WeightStack stack() const {
    if (f.quant == jdlora::Quant::kNone) return jdlora::WeightStack{vals->data, rows * ld, ld, rows, cols};
    jdlora::WeightStack w{bytes->data + f.lead, rows * ld, ld, rows, cols};
    w.quant = f.quant;
    w.scales = jdlora::QuantScales{scales->data, rows * sld, sld, group};
    return w;
  }

  bool guards_ok() const { return vals ? vals->guards_ok() : bytes->guards_ok() && scales->guards_ok(); }
};

template <typename E>
using Tables = std::vector<std::unique_ptr<Table<E>>>;

template <typename E>
jdlora::StackList table_list(const Tables<E>& t, const std::vector<int>& offsets) {
  jdlora::StackList l{};
  l.num_slices = static_cast<int>(t.size());
  for (int s = 0; s < l.num_slices; ++s) {
    l.stack[s] = t[s]->stack();
    l.col_offset[s] = offsets[s];
  }
  return l;
}

inline QuantFormat format_of(const std::vector<QuantFormat>& q, int s) { return q.empty() ? QuantFormat{} : q[s]; }

inline int failures = 0;

inline void report(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;  // NaN fails
  if (!ok) ++failures;
  std::printf("  %-52s max err %.3e (tol %.1e) %s\n", what.c_str(), err, tol, ok ? "ok" : "FAIL");
}

}  // namespace emu_harness
