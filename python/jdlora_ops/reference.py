"""Plain-PyTorch float64 oracles for every jdlora_ops op.

These functions define the semantics the kernels are tested against. They are
slow (per-token gathers, float64 everywhere) and allocate freely; use them to
check an integration, never to serve.

Every function takes the same arguments as the op of the same name, except
that outputs are returned (as float64 tensors) instead of written in place.
Integer metadata is read on the host.

Conventions shared by all ops (see ``jdlora_ops.ops`` for the full contract):

* ``token_lora_mapping[t]`` is the adapter slot of token ``t`` (``-1``: none).
* ``adapter_cluster[a]`` is the cluster of adapter slot ``a``.
* Tokens with slot ``-1`` contribute nothing to ``y`` and get zero rows in the
  intermediates ``h`` and ``g``.
* Multi-slice ops take one weight stack per slice; slice ``s`` writes columns
  ``slice_offsets[s] : slice_offsets[s] + d_out_s`` of ``y``.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "build_batch_meta",
    "jd_shrink",
    "jd_core",
    "jd_expand",
    "jd_fused",
    "lora_shrink",
    "lora_expand",
    "token_clusters",
]

_F64 = torch.float64


def _cpu_long(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.long)


def token_clusters(token_lora_mapping: torch.Tensor, adapter_cluster: torch.Tensor) -> torch.Tensor:
    """Cluster id per token (``-1`` where the token has no adapter)."""
    slots = _cpu_long(token_lora_mapping)
    cmap = _cpu_long(adapter_cluster)
    out = torch.full_like(slots, -1)
    has = slots >= 0
    out[has] = cmap[slots[has]]
    return out


def _groups(index: torch.Tensor):
    """``(group id, token indices)`` for every id >= 0 in ``index``; grouping
    keeps the float64 copies to one weight matrix at a time."""
    for gid in torch.unique(index[index >= 0]).tolist():
        yield gid, (index == gid).nonzero().squeeze(1)


def build_batch_meta(
    token_lora_mapping: torch.Tensor, adapter_cluster: torch.Tensor, num_clusters: int
) -> dict[str, torch.Tensor]:
    """Reference batch metadata (int32 tensors on the CPU).

    Tokens are stably sorted by ``(cluster, adapter)``; tokens with slot ``-1``
    go last, in their original order. Per-cluster and per-adapter tables are
    indexed by *active position* (the order in which groups appear in the
    sorted token list), padded with ``-1`` (ids), ``0`` (counts) and the number
    of tokens that have an adapter (start offsets).
    """
    slots = _cpu_long(token_lora_mapping)
    cmap = _cpu_long(adapter_cluster)
    num_adapters = cmap.numel()
    T = slots.numel()
    clusters = token_clusters(slots, cmap)
    has = slots >= 0
    big = num_adapters + 1
    key = torch.where(has, clusters * big + slots, torch.full_like(slots, num_clusters * big + big))
    order = torch.sort(key, stable=True).indices
    n_with = int(has.sum())

    def segments(ids_sorted: torch.Tensor, capacity: int):
        active = torch.full((capacity,), -1, dtype=torch.long)
        counts = torch.zeros(capacity, dtype=torch.long)
        start = torch.full((capacity + 1,), n_with, dtype=torch.long)
        uniq, cnt = torch.unique_consecutive(ids_sorted, return_counts=True)
        k = uniq.numel()
        active[:k] = uniq
        counts[:k] = cnt
        start[0] = 0
        start[1 : k + 1] = torch.cumsum(cnt, 0)
        return active, counts, start

    sorted_with = order[:n_with]
    ac, nc, cs = segments(clusters[sorted_with], num_clusters)
    al, nl, ls = segments(slots[sorted_with], num_adapters)
    i32 = torch.int32
    return {
        "token_indices_sorted": order.to(i32),
        "active_cluster_ids": ac.to(i32),
        "num_tokens_per_cluster": nc.to(i32),
        "cluster_token_start": cs.to(i32),
        "active_lora_ids": al.to(i32),
        "num_tokens_per_lora": nl.to(i32),
        "lora_token_start_loc": ls.to(i32),
        "no_lora_flag": torch.tensor([n_with == 0], dtype=torch.bool),
    }


def jd_shrink(
    x: torch.Tensor, V_stacks: Sequence[torch.Tensor], token_lora_mapping: torch.Tensor,
    adapter_cluster: torch.Tensor,
) -> torch.Tensor:
    """``h[s, t] = V_stacks[s][c(t)] @ x[t]``; returns ``[S, T, r]`` float64."""
    clusters = token_clusters(token_lora_mapping, adapter_cluster)
    xs = x.detach().cpu().to(_F64)
    T = xs.shape[0]
    r = V_stacks[0].shape[1]
    h = torch.zeros(len(V_stacks), T, r, dtype=_F64)
    for s, V in enumerate(V_stacks):
        for c, idx in _groups(clusters):
            h[s, idx] = xs[idx] @ V[c].detach().cpu().to(_F64).T
    return h


def jd_core(
    h: torch.Tensor, S_stacks: Sequence[torch.Tensor], token_lora_mapping: torch.Tensor
) -> torch.Tensor:
    """``g[s, t] = S[a(t)] @ h[s, t]`` (full ``[A, r, r]``) or ``sigma[a(t)] * h[s, t]``
    (diagonal ``[A, r]``); returns ``[S, T, r]`` float64."""
    slots = _cpu_long(token_lora_mapping)
    hs = h.detach().cpu().to(_F64)
    g = torch.zeros_like(hs)
    has = slots >= 0
    for s, S in enumerate(S_stacks):
        Sg = S.detach().cpu().to(_F64)[slots[has]]
        if S.dim() == 3:
            g[s, has] = torch.einsum("nij,nj->ni", Sg, hs[s, has])
        else:
            g[s, has] = Sg * hs[s, has]
    return g


def _expand(y, g, stacks, slice_offsets, index):
    out = y.detach().cpu().to(_F64).clone()
    gs = g.detach().cpu().to(_F64)
    for s, (W, off) in enumerate(zip(stacks, slice_offsets)):
        d_out = W.shape[1]
        for gid, idx in _groups(index):
            out[idx, off : off + d_out] += gs[s, idx] @ W[gid].detach().cpu().to(_F64).T
    return out


def jd_expand(
    g: torch.Tensor, U_stacks: Sequence[torch.Tensor], slice_offsets: Sequence[int],
    token_lora_mapping: torch.Tensor, adapter_cluster: torch.Tensor, y: torch.Tensor,
) -> torch.Tensor:
    """``y[t, off_s : off_s + d_out_s] += U_stacks[s][c(t)] @ g[s, t]``; returns the new ``y``."""
    return _expand(y, g, U_stacks, slice_offsets, token_clusters(token_lora_mapping, adapter_cluster))


def jd_fused(
    x: torch.Tensor, V_stacks: Sequence[torch.Tensor], S_stacks: Sequence[torch.Tensor],
    U_stacks: Sequence[torch.Tensor], slice_offsets: Sequence[int], token_lora_mapping: torch.Tensor,
    adapter_cluster: torch.Tensor, y: torch.Tensor,
) -> torch.Tensor:
    """``y[t, slice s] += U_s[c(t)] S_s[a(t)] V_s[c(t)] x[t]`` in one step; returns the new ``y``."""
    h = jd_shrink(x, V_stacks, token_lora_mapping, adapter_cluster)
    g = jd_core(h, S_stacks, token_lora_mapping)
    return jd_expand(g, U_stacks, slice_offsets, token_lora_mapping, adapter_cluster, y)


def lora_shrink(
    x: torch.Tensor, A_stacks: Sequence[torch.Tensor], scales: torch.Tensor,
    token_lora_mapping: torch.Tensor,
) -> torch.Tensor:
    """``h[s, t] = scales[s, a(t)] * A_stacks[s][a(t)] @ x[t]``; returns ``[S, T, r]`` float64.

    ``scales`` is ``[S, A]`` (or ``[A]``, shared by every slice).
    """
    slots = _cpu_long(token_lora_mapping)
    xs = x.detach().cpu().to(_F64)
    sc = scales.detach().cpu().to(_F64)
    if sc.dim() == 1:
        sc = sc.expand(len(A_stacks), -1)
    r = A_stacks[0].shape[1]
    h = torch.zeros(len(A_stacks), xs.shape[0], r, dtype=_F64)
    for s, A in enumerate(A_stacks):
        for a, idx in _groups(slots):
            h[s, idx] = (xs[idx] @ A[a].detach().cpu().to(_F64).T) * sc[s, a]
    return h


def lora_expand(
    h: torch.Tensor, B_stacks: Sequence[torch.Tensor], slice_offsets: Sequence[int],
    token_lora_mapping: torch.Tensor, y: torch.Tensor,
) -> torch.Tensor:
    """``y[t, off_s : off_s + d_out_s] += B_stacks[s][a(t)] @ h[s, t]``; returns the new ``y``."""
    return _expand(y, h, B_stacks, slice_offsets, _cpu_long(token_lora_mapping))
