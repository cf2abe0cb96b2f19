"""Batch metadata: tokens sorted by (cluster, adapter), built once per forward.

Names follow vLLM's ``LoRAKernelMeta`` so that integrators recognise them. The
buffers are allocated once for ``max_tokens`` tokens and reused, so a forward
captured in a CUDA graph stays valid; :meth:`BatchMeta.build` fills them on the
device with no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BatchMeta"]


@dataclass
class BatchMeta:
    """Preallocated metadata of one batch (all int32 unless noted).

    Attributes (``T``: tokens of the current batch, ``A``: adapter slots,
    ``C``: cluster slots):

    * ``token_lora_mapping`` ``[max_tokens]``: adapter slot per token, ``-1`` = none.
    * ``token_indices_sorted`` ``[max_tokens]``: token indices stably sorted by
      ``(adapter_cluster[slot], slot)``; tokens without an adapter come last.
    * ``active_cluster_ids`` ``[C]``, ``num_tokens_per_cluster`` ``[C]``,
      ``cluster_token_start`` ``[C + 1]``: the ``j``-th cluster present in the
      batch, its token count and its first sorted position; padded with -1, 0
      and the number of tokens that have an adapter.
    * ``active_lora_ids`` ``[A]``, ``num_tokens_per_lora`` ``[A]``,
      ``lora_token_start_loc`` ``[A + 1]``: the same per adapter, in sorted order.
    * ``no_lora_flag`` ``bool [1]``: true when no token has an adapter.
    * ``num_tokens``: ``T`` of the last :meth:`build` (a host integer).
    """

    token_lora_mapping: torch.Tensor
    token_indices_sorted: torch.Tensor
    active_cluster_ids: torch.Tensor
    num_tokens_per_cluster: torch.Tensor
    cluster_token_start: torch.Tensor
    active_lora_ids: torch.Tensor
    num_tokens_per_lora: torch.Tensor
    lora_token_start_loc: torch.Tensor
    no_lora_flag: torch.Tensor
    num_tokens: int = 0

    @classmethod
    def allocate(
        cls, max_tokens: int, max_adapters: int, max_clusters: int, device: torch.device | str = "cpu"
    ) -> "BatchMeta":
        """Buffers for up to ``max_tokens`` tokens over ``max_adapters`` adapter
        slots and ``max_clusters`` cluster slots, on ``device``."""
        for name, v, lo in (("max_tokens", max_tokens, 0), ("max_adapters", max_adapters, 1),
                            ("max_clusters", max_clusters, 1)):
            if not isinstance(v, int) or v < lo or v >= 2**31 - 1:
                raise ValueError(f"BatchMeta.allocate: {name} must be an int in [{lo}, 2**31 - 1), got {v!r}")

        def i32(n: int, fill: int = 0) -> torch.Tensor:
            return torch.full((n,), fill, dtype=torch.int32, device=device)

        return cls(
            token_lora_mapping=i32(max_tokens, -1),
            token_indices_sorted=i32(max_tokens),
            active_cluster_ids=i32(max_clusters, -1),
            num_tokens_per_cluster=i32(max_clusters),
            cluster_token_start=i32(max_clusters + 1),
            active_lora_ids=i32(max_adapters, -1),
            num_tokens_per_lora=i32(max_adapters),
            lora_token_start_loc=i32(max_adapters + 1),
            no_lora_flag=torch.ones(1, dtype=torch.bool, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return self.token_lora_mapping.shape[0]

    @property
    def max_adapters(self) -> int:
        return self.active_lora_ids.shape[0]

    @property
    def max_clusters(self) -> int:
        return self.active_cluster_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.token_lora_mapping.device

    def mapping(self) -> torch.Tensor:
        """``token_lora_mapping[:num_tokens]`` (a view)."""
        return self.token_lora_mapping[: self.num_tokens]

    def sorted_indices(self) -> torch.Tensor:
        """``token_indices_sorted[:num_tokens]`` (a view)."""
        return self.token_indices_sorted[: self.num_tokens]

    def build(
        self, token_lora_mapping: torch.Tensor, adapter_cluster: torch.Tensor, *, validate: bool = False
    ) -> "BatchMeta":
        """Fill the buffers for a batch of ``T = len(token_lora_mapping)`` tokens.

        ``token_lora_mapping`` (int32 ``[T]``, values in ``[-1, A)``) is copied
        into this object's buffer (a no-op copy when it is a view of it).
        ``adapter_cluster`` (int32 ``[A]``) maps adapter slots to cluster slots
        in ``[0, C)``; pass zeros when only the uncompressed baseline ops are
        used. On the CPU invalid values raise before anything is written. On
        CUDA the kernels treat them as "no adapter" unless ``validate=True``,
        which checks them first at the price of one host synchronisation
        (the default on CUDA is no check, so the call can be captured in a CUDA
        graph).
        """
        from . import ops  # local: ops imports this module

        T = token_lora_mapping.shape[0] if token_lora_mapping.dim() == 1 else -1
        if token_lora_mapping.dim() != 1 or T > self.max_tokens:
            raise ValueError(
                f"BatchMeta.build: token_lora_mapping must be 1-D with at most max_tokens={self.max_tokens} "
                f"entries, got shape {tuple(token_lora_mapping.shape)}"
            )
        if validate:
            ops.check_batch_values(token_lora_mapping, adapter_cluster, self.max_clusters)
        # The op reads the caller's tensor and checks it (values too, on the
        # CPU) before writing; only then is the mapping kept for later ops.
        torch.ops.jdlora_ops.build_batch_meta(
            token_lora_mapping, adapter_cluster, self.token_indices_sorted[:T], self.active_cluster_ids,
            self.num_tokens_per_cluster, self.cluster_token_start, self.active_lora_ids,
            self.num_tokens_per_lora, self.lora_token_start_loc, self.no_lora_flag,
        )
        self.token_lora_mapping[:T].copy_(token_lora_mapping)
        self.num_tokens = T
        return self
