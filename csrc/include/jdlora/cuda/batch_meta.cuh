// build_batch_meta: stable counting sort of the tokens by (cluster, adapter)
// and the per-cluster and per-adapter segment tables, in one block.
//
// One block keeps every count in shared memory (no scratch buffers, no
// inter-block coordination) and makes the result deterministic: the only
// order-dependent steps, placing adapters and tokens, run in one warp that
// walks its input in order. That walk is the cost of this simple version:
// about 100 cycles per 32 tokens. At T = 65536 the host emulation counts
// 10914 collective steps on the walking warp and 203 block barriers, which
// its cost model (25 cycles per step, 100 per barrier) puts at about 150 us
// on an H200 (csrc/cuda/emulation/launch_emulation.cpp); a parallel
// placement is still to be written.
#pragma once

#include "jdlora/cuda/common.cuh"

namespace jdlora::cuda {

inline constexpr int kMetaThreads = 1024;

// Dynamic shared memory of the kernel: two ints per adapter slot and per cluster.
inline size_t batch_meta_smem_bytes(int num_adapters, int num_clusters) {
  return sizeof(int) * (2 * static_cast<size_t>(num_adapters) + 2 * static_cast<size_t>(num_clusters));
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

__global__ void __launch_bounds__(kMetaThreads)
    build_batch_meta_kernel(const __grid_constant__ BatchMetaParams p) {
  int* s_meta = dynamic_shared<int>();
  __shared__ int s_keys[kMetaThreads];
  __shared__ int s_scan[32];

  const int T = p.num_tokens;
  const int A = p.num_adapters;
  const int C = p.num_clusters;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  int* s_cnt = s_meta;      // [A] tokens per adapter slot, later its next sorted position
  int* s_clu = s_cnt + A;   // [A] cluster of the slot, -1 when out of range
  int* s_ctok = s_clu + A;  // [C] tokens per cluster
  int* s_cadp = s_ctok + C;  // [C] active adapters per cluster, later the next active position

  for (int a = tid; a < A; a += nt) {
    const int c = p.adapter_cluster[a];
    s_cnt[a] = 0;
    s_clu[a] = c >= 0 && c < C ? c : -1;
  }
  for (int c = tid; c < C; c += nt) {
    s_ctok[c] = 0;
    s_cadp[c] = 0;
  }
  __syncthreads();

  // A token has an adapter when its slot and the slot's cluster are in range.
  auto slot_of = [&](int t) {
    const int a = p.token_lora_mapping[t];
    return a >= 0 && a < A && s_clu[a] >= 0 ? a : -1;
  };

  for (int t = tid; t < T; t += nt) {
    const int a = slot_of(t);
    if (a >= 0) {
      atomicAdd(&s_cnt[a], 1);
      atomicAdd(&s_ctok[s_clu[a]], 1);
    }
  }
  __syncthreads();
  for (int a = tid; a < A; a += nt)
    if (s_cnt[a] > 0) atomicAdd(&s_cadp[s_clu[a]], 1);
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
    if (c < C) s_cadp[c] = adp_start;
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
  if (tid < 32) {
    for (int base = 0; base < A; base += 32) {
      const int a = base + tid;
      const bool active = a < A && s_cnt[a] > 0;
      if (__ballot_sync(kFullMask, active) == 0) continue;
      const int k = warp_stable_place(active ? s_clu[a] : -1, s_cadp);
      if (k >= 0) p.active_lora_ids[k] = a;
    }
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

  // Tokens in increasing index order, one block-wide tile of slots at a time:
  // those with an adapter at their slot's cursor, the others after all of
  // them (from n_with on), each group keeping the original order.
  int no_adapter_next = n_with;
  for (int base = 0; base < T; base += nt) {
    s_keys[tid] = base + tid < T ? slot_of(base + tid) : -1;
    __syncthreads();
    if (tid < 32) {
      const int lim = min(nt, T - base);
      for (int i = 0; i < lim; i += 32) {
        const int j = i + tid;
        const int a = j < lim ? s_keys[j] : -1;
        const bool none = j < lim && a < 0;
        const unsigned nones = __ballot_sync(kFullMask, none);
        int pos = warp_stable_place(a, s_cnt);
        if (none) pos = no_adapter_next + __popc(nones & lanemask_lt());
        no_adapter_next += __popc(nones);
        if (pos >= 0) p.token_indices_sorted[pos] = base + j;
      }
    }
    __syncthreads();
  }
}

}  // namespace jdlora::cuda
