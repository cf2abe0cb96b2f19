// Shared by the emulation drivers: device-like buffers with guard bytes,
// conversions, random data, token popularity patterns, the reference batch
// metadata, and the failure count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "emu_runtime.h"
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
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

template <typename T>
T from_f(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
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

inline int failures = 0;

inline void report(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;  // NaN fails
  if (!ok) ++failures;
  std::printf("  %-52s max err %.3e (tol %.1e) %s\n", what.c_str(), err, tol, ok ? "ok" : "FAIL");
}

}  // namespace emu_harness
