"""The punica wrapper vLLM uses when the jdlora plugin is loaded.

A subclass of the platform's own wrapper: embeddings, logits and the sampler
keep vLLM's code. For every LoRA linear layer, ``add_lora_linear`` adds

* the store adapters' update through ``jd_fused`` (every cluster's bases
  resident in the layer's :class:`~.tables.LayerTables`, the adapters' cores
  in vLLM's slots), and
* ordinary PEFT adapters' update through the baseline ``lora_shrink`` /
  ``lora_expand`` ops on vLLM's own dense stacks (also where a store adapter
  kept outside the joint tables, or the residual of one inside them, sits),

each with a :class:`~jdlora_ops.BatchMeta` built once per step in
:meth:`update_metadata` (vLLM calls it when the token-to-slot mapping or the
slot table changes) from the same token-to-slot mapping, masked to the slots
of its kind. Tokens without an adapter (slot -1) get nothing added.

With no store, PEFT adapters alone go through the baseline ops when the
PEFT-ops mode is on (``JDLORA_PEFT_OPS=1``); otherwise the wrapper is the
platform's own wrapper.
"""

from __future__ import annotations

import torch

from ...meta import BatchMeta
from ...ops import jd_fused, lora_expand, lora_shrink
from . import _vllm_private as vp
from .state import SLOT_BOTH, SLOT_JD, SLOT_PEFT, STATE

__all__ = ["JDLoRAPunicaWrapper"]

_Base = vp.platform_punica_wrapper_class()


class JDLoRAPunicaWrapper(_Base):
    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._jd_max_tokens = int(max_num_batched_tokens)
        self._jd_meta: BatchMeta | None = None
        self._peft_meta: BatchMeta | None = None
        self._jd_tokens = 0
        self._has_jd = False
        self._has_peft = False
        self._lora_scales: torch.Tensor | None = None
        self._jd_slots: torch.Tensor | None = None
        self._jd_clusters = -1

    # -- per step ------------------------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        if not STATE.active or STATE.slot_kind is None:
            return
        for slot, lora_id in enumerate(lora_index_to_id):
            if STATE.slot_owner[slot] != lora_id:
                STATE.assign_slot(slot, lora_id)
        slots = STATE.num_slots
        dev = STATE.adapter_cluster.device
        if self._jd_meta is None:
            self._peft_meta = BatchMeta.allocate(self._jd_max_tokens, slots, 1, dev)
            self._lora_scales = torch.ones(slots, dtype=torch.float32, device=dev)
            self._zero_cluster = torch.zeros(slots, dtype=torch.int32, device=dev)
        # The flags come from the host-side mapping, so no device value is read.
        kinds = set()
        for lid in set(mapping.index_mapping):
            if lid is not None and lid > 0:
                model = STATE.store_models.get(lid)
                kinds.add(SLOT_PEFT if model is None else SLOT_BOTH if model.jdlora_residual else SLOT_JD)
        self._has_jd = bool(kinds & {SLOT_JD, SLOT_BOTH})
        # Store-only layers have rank-0 dense stacks: vLLM's warm-up dummies add nothing there.
        self._has_peft = bool(kinds & {SLOT_PEFT, SLOT_BOTH}) and not STATE.store_only
        m = self.token_lora_indices.to(torch.int32)
        kind = STATE.slot_kind[m.long().remainder(slots + 1)]  # slot -1 reads the trailing "empty" entry
        none = torch.full_like(m, -1)
        # A core with a residual is on both paths: its tokens get the sum.
        both = kind == SLOT_BOTH
        self._jd_slots = torch.where((kind == SLOT_JD) | both, m, none)
        self._jd_clusters = -1
        self._build_jd_meta()
        self._peft_meta.build(torch.where((kind == SLOT_PEFT) | both, m, none), self._zero_cluster)
        self._jd_tokens = int(m.shape[0])

    def _build_jd_meta(self) -> None:
        """The store adapters' batch metadata, for as many clusters as the tables hold now.

        A store update can add cluster slots to the tables between two steps
        whose token mapping is the same (vLLM then skips update_metadata), and
        the metadata's cluster count must match the tables'.
        """
        clusters = STATE.table_clusters
        if clusters == self._jd_clusters:
            return
        if self._jd_meta is None or self._jd_meta.max_clusters != max(clusters, 1):
            self._jd_meta = BatchMeta.allocate(self._jd_max_tokens, STATE.num_slots, max(clusters, 1),
                                               STATE.adapter_cluster.device)
        self._jd_meta.build(self._jd_slots, STATE.adapter_cluster)
        self._jd_clusters = clusters

    # -- per layer -----------------------------------------------------------
    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        if not STATE.active or self._jd_meta is None:
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        T = self._jd_tokens
        if x.shape[0] < T:
            raise RuntimeError(f"jdlora: the layer got {x.shape[0]} tokens but the step's LoRA mapping has {T}")
        if not (self._has_jd or self._has_peft):
            return None
        # Rows past the mapping are padding (no adapter); the ops see the mapped rows only.
        xs, ys = x[:T], y[:T]
        dtype = lora_a_stacked[0].dtype
        out = ys if ys.dtype == dtype else torch.zeros(ys.shape, dtype=dtype, device=ys.device)
        xs = xs if xs.dtype == dtype else xs.to(dtype)
        offsets = [sum(output_slices[:s]) for s in range(len(output_slices))]
        tables = STATE.layers.get(id(lora_a_stacked))
        if self._has_jd and tables is not None:
            self._build_jd_meta()
            jd_fused(xs, tables.Vt, tables.S, tables.U, self._jd_meta, out, tables.offsets)
        if self._has_peft:
            A = [a[:, 0] for a in lora_a_stacked]
            B = [b[:, 0] for b in lora_b_stacked]
            # vLLM folds the scaling into B and passes 1.0; only another scale costs a tensor.
            scales = self._lora_scales if scale == 1.0 else self._lora_scales * float(scale)
            h = lora_shrink(xs, A, scales, self._peft_meta)
            lora_expand(h, B, self._peft_meta, out, offsets)
        if out is not ys:
            ys.add_(out.to(ys.dtype))
        return None
