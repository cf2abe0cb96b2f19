// build_batch_meta: stable counting sort of the tokens by (cluster, adapter)
// and the per-cluster and per-adapter segment tables, in one block.
//
// One block keeps every count in shared memory (no scratch buffers, no
// inter-block coordination, a launch shape fixed by A and C alone). The two
// order-dependent steps, placing the active adapters by cluster and the
// tokens by adapter, are stable block-wide placements (block_stable_place):
// rounds of 1024 keys, one per thread, in which every warp ranks its keys
// with one match and a small table of per-warp counts carries the ranks
// across warps. Nothing in a round depends on the order in which threads
// run, so the result is deterministic and equals reference.build_batch_meta.
// Where the 32 KiB table does not fit beside the counters (A + C above about
// 16700 on an A100, 24900 on an H200) one warp walks each round instead.
//
// Tokens are counted per warp (warp_count): a single-adapter prefill would
// otherwise queue one atomic per token on one shared address.
//
// Cost at T = 65536, A + C = 20000 (host emulation's counts and cost model,
// csrc/cuda/emulation/launch_emulation.cpp; bench/results/batch_meta_model.json;
// model estimates, not measurements): the earlier one-warp walk took 10914
// collective steps and 203 barriers, about 148 us (atomics not counted);
// the block-wide placement needs 3 barriers and one match per round of 1024
// keys. With one atomic per token it modelled at 61.5 us (zipf) and 285 us
// (one adapter: 65537 atomics on one address); counted per warp, about 31 us
// for both (462 steps, 328 barriers, at most 2131 atomics on one address).
#pragma once

#include "jdlora/cuda/common.cuh"

namespace jdlora::cuda {

inline constexpr int kMetaThreads = 1024;
inline constexpr int kMetaWarps = kMetaThreads / 32;

// Per-warp key counts of one placement round: one row of kMetaWarps bytes
// per key present in the round (at most 32 per warp, so a byte holds one).
inline constexpr size_t kPlaceTableBytes = static_cast<size_t>(kMetaThreads) * kMetaWarps;

// Keys of one round, for the one-warp walk (place_round).
inline constexpr size_t kWalkKeyBytes = sizeof(int) * kMetaThreads;

// Dynamic shared memory of the kernel: two ints per adapter slot and per
// cluster, two for the "no adapter" key, and the placement table (parallel)
// or the keys of the one-warp walk.
inline size_t batch_meta_smem_bytes(int num_adapters, int num_clusters, bool parallel) {
  return sizeof(int) * (2 * (static_cast<size_t>(num_adapters) + 1) + 2 * static_cast<size_t>(num_clusters)) +
         (parallel ? kPlaceTableBytes : kWalkKeyBytes);
}

// Sum of the bytes of `row` (kMetaWarps of them) before byte `n`. A word
// holds four counts of at most 32, so multiplying by 0x01010101 sums them in
// its top byte without a carry.
__device__ __forceinline__ int byte_prefix(const unsigned* row, int n) {
  int s = 0;
#pragma unroll
  for (int j = 0; j < kMetaWarps / 4; ++j) {
    const int k = n - 4 * j;
    if (k <= 0) break;
    const unsigned w = k >= 4 ? row[j] : row[j] & ((1u << (8 * k)) - 1u);
    s += static_cast<int>((w * 0x01010101u) >> 24);
  }
  return s;
}

// counters[key] += 1 for every lane of the warp with key >= 0, aggregated:
// lanes with the same key find each other with a match and the lowest adds
// their number. A batch of one adapter then costs one atomic per warp, not
// one per token on a single, fully contended address. All lanes call it.
__device__ __forceinline__ void warp_count(int* counters, int key) {
  const int lane = threadIdx.x & 31;
  const unsigned same = __match_any_sync(kFullMask, key >= 0 ? key : -1 - lane);
  if (key >= 0 && (same & lanemask_lt()) == 0) atomicAdd(&counters[key], __popc(same));
}

// One round of a stable block-wide placement: thread i holds the round's
// i-th key (< 0: none). Threads with the same key get consecutive positions
// from cursor[key] in thread order, and cursor[key] advances past them
// before the next round reads it. Returns the position, or -1.
//
// Within a warp a match ranks equal keys. Across warps, the key's first
// thread in the round (found with an atomicMax of round-tagged marks, which
// needs no reset between rounds and no order between threads) names a row
// of `counts`; each warp writes its count of the key there, every thread adds
// the counts of the warps before its own, and the first thread advances the
// cursor and clears the row. `tag` (one per key) starts at 0 before the
// first round; `counts` starts zeroed and is left zeroed. Every thread of
// the block calls it, with round = 0, 1, 2, ... .
__device__ __forceinline__ int block_stable_place(int key, unsigned round, int* cursor, unsigned* tag,
                                                  unsigned* counts) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // Threads without a key get distinct negative keys so they match no one.
  const unsigned peers = __match_any_sync(kFullMask, key >= 0 ? key : -1 - lane);
  const int rank = __popc(peers & lanemask_lt());
  const unsigned last = kMetaThreads - 1;
  if (key >= 0 && rank == 0) atomicMax(&tag[key], ((round + 1u) << 10) | (last - static_cast<unsigned>(tid)));
  __syncthreads();
  int id = -1;
  if (key >= 0) {
    id = static_cast<int>(last - (tag[key] & last));
    if (rank == 0) reinterpret_cast<unsigned char*>(counts + id * (kMetaWarps / 4))[warp] =
        static_cast<unsigned char>(__popc(peers));
  }
  __syncthreads();
  int pos = -1;
  if (key >= 0) pos = cursor[key] + byte_prefix(counts + id * (kMetaWarps / 4), warp) + rank;
  __syncthreads();
  if (id == tid) {
    unsigned* row = counts + id * (kMetaWarps / 4);
    cursor[key] += byte_prefix(row, kMetaWarps);
#pragma unroll
    for (int j = 0; j < kMetaWarps / 4; ++j) row[j] = 0;
  }
  return pos;
}

// Places the keys of one warp-wide chunk in order: lanes with the same key get
// consecutive positions from cursor[key], in lane order, and the highest of
// them advances the cursor. key < 0: no place. Returns the position or -1.
__device__ __forceinline__ int warp_stable_place(int key, int* cursor) {
  const int lane = threadIdx.x & 31;
  // Lanes without a key get distinct negative keys so they match no one.
  const unsigned peers = __match_any_sync(kFullMask, key >= 0 ? key : -1 - lane);
  int pos = -1;
  if (key >= 0) pos = cursor[key] + __popc(peers & lanemask_lt());
  __syncwarp();
  if (key >= 0 && lane == 31 - __clz(peers)) cursor[key] += __popc(peers);
  __syncwarp();
  return pos;
}

// One round of a stable placement, with block_stable_place's contract: all
// warps when the placement table fits the device (`parallel`), else warp 0
// walks the round's keys in order, which needs 4 KiB instead of 32 and so
// keeps the largest tables within an A100's shared memory, at the earlier
// one-warp speed. Same positions either way. `scratch`: the table or the keys.
__device__ __forceinline__ int place_round(bool parallel, int key, unsigned round, int* cursor, unsigned* tag,
                                           unsigned* scratch) {
  if (parallel) return block_stable_place(key, round, cursor, tag, scratch);
  int* s_keys = reinterpret_cast<int*>(scratch);
  const int tid = threadIdx.x;
  s_keys[tid] = key;
  __syncthreads();
  if (tid < 32) {
    for (int i = 0; i < kMetaThreads; i += 32) {
      const int k = s_keys[i + tid];
      if (__ballot_sync(kFullMask, k >= 0) != 0) s_keys[i + tid] = warp_stable_place(k, cursor);
    }
  }
  __syncthreads();
  return key >= 0 ? s_keys[tid] : -1;
}

__global__ void __launch_bounds__(kMetaThreads)
    build_batch_meta_kernel(const __grid_constant__ BatchMetaParams p, bool parallel) {
  __shared__ int s_scan[32];

  const int T = p.num_tokens;
  const int A = p.num_adapters;
  const int C = p.num_clusters;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  int* s_cnt = dynamic_shared<int>();  // [A + 1] tokens per slot, later its next sorted position; [A]: no adapter
  int* s_clu = s_cnt + A + 1;          // [A + 1] cluster of the slot (-1 out of range), later placement tags
  int* s_ctok = s_clu + A + 1;         // [C] tokens per cluster, later placement tags
  int* s_cadp = s_ctok + C;            // [C] active adapters per cluster, later the next active position
  unsigned* s_counts = reinterpret_cast<unsigned*>(s_cadp + C);  // placement table or walk keys
  unsigned* s_tag_clu = reinterpret_cast<unsigned*>(s_ctok);
  unsigned* s_tag_slot = reinterpret_cast<unsigned*>(s_clu);

  for (int a = tid; a < A; a += nt) {
    const int c = p.adapter_cluster[a];
    s_cnt[a] = 0;
    s_clu[a] = c >= 0 && c < C ? c : -1;
  }
  for (int c = tid; c < C; c += nt) {
    s_ctok[c] = 0;
    s_cadp[c] = 0;
  }
  if (parallel)
    for (size_t i = tid; i < kPlaceTableBytes / sizeof(unsigned); i += nt) s_counts[i] = 0;
  __syncthreads();

  // A token has an adapter when its slot and the slot's cluster are in range.
  auto slot_of = [&](int t) {
    const int a = p.token_lora_mapping[t];
    return a >= 0 && a < A && s_clu[a] >= 0 ? a : -1;
  };

  // Loop bounds are warp-uniform for warp_count's match.
  for (int base = 0; base < T; base += nt) {
    const int t = base + tid;
    const int a = t < T ? slot_of(t) : -1;
    warp_count(s_cnt, a);
    warp_count(s_ctok, a >= 0 ? s_clu[a] : -1);
  }
  __syncthreads();
  for (int base = 0; base < A; base += nt) {
    const int a = base + tid;
    warp_count(s_cadp, a < A && s_cnt[a] > 0 ? s_clu[a] : -1);
  }
  __syncthreads();

  // Clusters in increasing id order: active position, first sorted token and
  // first active-adapter position of each.
  int n_with = 0, n_lora = 0, n_clu = 0;
  for (int base = 0; base < C; base += nt) {
    const int c = base + tid;
    const int ntok = c < C ? s_ctok[c] : 0;
    const int nadp = c < C ? s_cadp[c] : 0;
    int sum_tok, sum_adp, sum_clu;
    const int tok_start = n_with + block_exclusive_sum(ntok, s_scan, sum_tok);
    const int adp_start = n_lora + block_exclusive_sum(nadp, s_scan, sum_adp);
    const int k = n_clu + block_exclusive_sum(ntok > 0 ? 1 : 0, s_scan, sum_clu);
    if (ntok > 0) {
      p.active_cluster_ids[k] = c;
      p.num_tokens_per_cluster[k] = ntok;
      p.cluster_token_start[k] = tok_start;
    }
    if (c < C) {
      s_cadp[c] = adp_start;
      s_tag_clu[c] = 0;
    }
    n_with += sum_tok;
    n_lora += sum_adp;
    n_clu += sum_clu;
  }
  for (int k = n_clu + tid; k < C; k += nt) {
    p.active_cluster_ids[k] = -1;
    p.num_tokens_per_cluster[k] = 0;
  }
  for (int k = n_clu + tid; k <= C; k += nt) p.cluster_token_start[k] = n_with;
  if (tid == 0) *p.no_lora_flag = n_with == 0;
  __syncthreads();

  // Active adapters ordered by (cluster, slot): slots in increasing order,
  // each placed at its cluster's cursor.
  for (int base = 0; base < A; base += nt) {
    const int a = base + tid;
    const bool active = a < A && s_cnt[a] > 0;
    const int k = place_round(parallel, active ? s_clu[a] : -1, static_cast<unsigned>(base / nt), s_cadp,
                              s_tag_clu, s_counts);
    if (k >= 0) p.active_lora_ids[k] = a;
  }
  __syncthreads();

  // Per-adapter tables by active position; s_cnt[a] becomes the first sorted
  // position of slot a.
  int carry = 0;
  for (int base = 0; base < A; base += nt) {
    const int k = base + tid;
    const int a = k < n_lora ? p.active_lora_ids[k] : -1;
    const int cnt = a >= 0 ? s_cnt[a] : 0;
    int sum;
    const int start = carry + block_exclusive_sum(cnt, s_scan, sum);
    if (a >= 0) {
      p.num_tokens_per_lora[k] = cnt;
      p.lora_token_start_loc[k] = start;
      s_cnt[a] = start;
    } else if (k < A) {
      p.active_lora_ids[k] = -1;
      p.num_tokens_per_lora[k] = 0;
      p.lora_token_start_loc[k] = n_with;
    }
    carry += sum;
  }
  if (tid == 0) p.lora_token_start_loc[A] = n_with;
  __syncthreads();

  // s_clu becomes the tags of the token placement, s_cnt its cursors. Key A
  // (no adapter) places after every token that has one.
  for (int a = tid; a <= A; a += nt) {
    if (a == A) s_cnt[a] = n_with;
    s_tag_slot[a] = 0;
  }
  __syncthreads();

  // Tokens in increasing index order. A slot's validity comes from the
  // read-only cluster table, not from its cursor: the previous round's
  // cursor update may still be in flight while this round's keys are made.
  for (int base = 0; base < T; base += nt) {
    const int t = base + tid;
    int key = -1;
    if (t < T) {
      const int a = p.token_lora_mapping[t];
      const int c = a >= 0 && a < A ? p.adapter_cluster[a] : -1;
      key = c >= 0 && c < C ? a : A;
    }
    const int pos = place_round(parallel, key, static_cast<unsigned>(base / nt), s_cnt, s_tag_slot, s_counts);
    if (pos >= 0) p.token_indices_sorted[pos] = t;
  }
}

}  // namespace jdlora::cuda
