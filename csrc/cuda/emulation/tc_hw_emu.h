// Host emulation of jdlora/cuda/tc_hw.cuh (same names and signatures), on
// top of emu_runtime.h. Substituted through JDLORA_TC_HW_HEADER.
#pragma once

#include "emu_runtime.h"

namespace emu {

inline unsigned char* block_smem(int block) {
  auto& v = m().smem[block];
  auto addr = reinterpret_cast<uintptr_t>(v.data());
  return v.data() + ((16 - addr % 16) % 16);
}

template <typename T>
inline float half_to_float(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(bits));
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

}  // namespace emu

namespace jdlora::cuda::tc {

inline void cp_async16(void* smem, const void* gmem, bool pred) {
  emu::Fiber& f = emu::cur();
  unsigned char* base = emu::block_smem(f.block);
  auto* d = static_cast<unsigned char*>(smem);
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || d < base ||
      d + 16 > base + emu::m().smem_bytes) {
    std::fprintf(stderr, "emulation: cp.async destination %p misaligned or outside shared memory\n", smem);
    std::abort();
  }
  if (pred && reinterpret_cast<uintptr_t>(gmem) % 16 != 0) {
    std::fprintf(stderr, "emulation: cp.async source %p not 16-byte aligned\n", gmem);
    std::abort();
  }
  if (pred) emu::check_global(gmem, 16, "cp.async source");
  f.copies.push_back({smem, gmem, pred, f.committed});
}

inline void cp_async_commit() { ++emu::cur().committed; }

// Copies land only here: every group but the N most recent committed ones.
template <int N>
inline void cp_async_wait() {
  emu::Fiber& f = emu::cur();
  const long limit = f.committed - N;
  std::vector<emu::Fiber::Copy> keep;
  for (const auto& c : f.copies) {
    if (c.group < limit) {
      if (c.pred) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    } else {
      keep.push_back(c);
    }
  }
  f.copies.swap(keep);
}

inline unsigned char* smem_base() { return emu::block_smem(emu::cur().block); }

inline void prefetch_l1(const void*) {}

// D += A B for one m16n8k16 tile, from the fragments of the 32 lanes as the
// PTX ISA describes them (see tc_hw.cuh).
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& x = emu::warp_x();
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) x.u[l][i] = a[i];
  x.u[l][4] = b0;
  x.u[l][5] = b1;
  emu::warp_sync();
  auto elem = [&](int lane, int reg, int half) {
    const uint32_t u = x.u[lane][reg];
    return emu::half_to_float<T>(static_cast<uint16_t>(half ? u >> 16 : u & 0xffffu));
  };
  auto A = [&](int row, int k) { return elem((row % 8) * 4 + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k % 2); };
  auto B = [&](int k, int n) { return elem(n * 4 + (k % 8) / 2, k >= 8 ? 5 : 4, k % 2); };
  const int g = l / 4;
  const int q = l % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0);
    const int col = 2 * q + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = acc;
  }
  emu::warp_sync();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// An image compiled below sm_90 has no clusters: the device code traps on
// cl > 1 (tc_hw.cuh), and so does this emulation of such an image.
inline void cluster_barrier(int cl) {
  if (cl > 1 && emu::m().image_arch < 90) __trap();
  if (cl > 1) {
    emu::wait_at(emu::m().cluster_bar);
  } else {
    __syncthreads();
  }
}

template <typename P>
inline P* cluster_peer(P* p, int rank, int cl) {
  if (cl <= 1) return p;
  if (emu::m().image_arch < 90) __trap();
  const auto* mine = emu::block_smem(emu::cur().block);
  const ptrdiff_t off = reinterpret_cast<const unsigned char*>(p) - mine;
  if (rank < 0 || rank >= cl || off < 0 || static_cast<size_t>(off) >= emu::m().smem_bytes) {
    std::fprintf(stderr, "emulation: cluster_peer(rank %d) of a pointer outside shared memory\n", rank);
    std::abort();
  }
  return reinterpret_cast<P*>(emu::block_smem(rank) + off);
}

}  // namespace jdlora::cuda::tc
