"""Batch preparation: from requests to slots and batch metadata, once per forward.

A forward pass serves a flat list of tokens (vLLM layout): request ``j``
contributes ``num_tokens[j]`` consecutive tokens (a prefill chunk, or 1 for a
decode step), all with adapter ``adapters[j]`` (``None``: base model only).
:meth:`BatchPlanner.prepare` acquires the adapters' slots from the
:class:`~jdlora_ops.serving.adapter_cache.AdapterCache` and builds one
:class:`~jdlora_ops.meta.BatchMeta` per path (compressed adapters; uncompressed
adapters) into preallocated buffers. Every (layer, module) then calls
:meth:`BatchPlan.apply`, which adds the adapters' contribution to the base
layer's output with the library's ops, reusing that metadata.

The planner owns its buffers (metadata for ``max_tokens`` tokens, the
intermediate of the uncompressed path), so one planner prepares one batch at
a time: release a plan before preparing the next. Use one planner per
concurrent forward.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..meta import BatchMeta
from ..ops import jd_fused, lora_expand, lora_shrink
from .adapter_cache import AdapterCache, Lease

__all__ = ["BatchPlanner", "BatchPlan", "MAX_SLICES"]

#: The ops take at most this many slices (stacks) per call.
MAX_SLICES = 8


class BatchPlan:
    """The slots and metadata of one prepared batch (see :meth:`BatchPlanner.prepare`).

    * ``num_tokens``: ``T``, tokens of the batch;
    * ``meta``: :class:`BatchMeta` of the compressed path (``None`` when the
      cache has no compressed tables); ``meta_uncompressed``: that of the
      uncompressed path;
    * ``has_compressed`` / ``has_uncompressed``: whether any token uses that
      path (a path no token uses is skipped by :meth:`apply`);
    * ``token_adapters``: the adapter name of every request, as given.

    Valid until :meth:`release` (also on leaving a ``with`` block).
    """

    def __init__(self, planner: "BatchPlanner", lease: Lease, num_tokens: int, has_compressed: bool,
                 has_uncompressed: bool, adapters: list):
        self.planner = planner
        self.cache = planner.cache
        self.lease = lease
        self.num_tokens = num_tokens
        self.meta = planner.meta
        self.meta_uncompressed = planner.meta_uncompressed
        self.has_compressed = has_compressed
        self.has_uncompressed = has_uncompressed
        self.token_adapters = adapters
        self.released = False

    @property
    def has_adapters(self) -> bool:
        return self.has_compressed or self.has_uncompressed

    def apply(
        self, module: str | Sequence[str], x: torch.Tensor, y: torch.Tensor,
        slice_offsets: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``y += `` the batch's adapters' update of ``module`` applied to ``x``; returns ``y``.

        ``x``: ``[T, d_in]``, the module's input; ``y``: ``[T, d_y]``, the base
        layer's output (written in place; row stride free, unit column stride).
        ``x`` and ``y`` may have other dtypes than the tables (and than each
        other, as under autocast): the update is computed in the tables' dtype
        with float32 accumulation and added to ``y`` in ``y``'s dtype.
        ``module`` may list several modules that share the input (e.g.
        ``q_proj``, ``k_proj``, ``v_proj`` of one layer) whose outputs are
        column slices of ``y`` at ``slice_offsets`` (default: back to back);
        they are done in one call per path. Token ``t`` gets
        ``U_c Sigma_a V_c^T x_t`` (compressed adapter ``a`` in cluster ``c``) or
        ``s_a B_a A_a x_t`` (uncompressed adapter ``a``) or nothing.
        """
        if self.released:
            raise RuntimeError("BatchPlan.apply: the plan was released")
        names = [module] if isinstance(module, str) else list(module)
        if not names or len(names) > MAX_SLICES:
            raise ValueError(f"BatchPlan.apply: expected 1 to {MAX_SLICES} modules, got {len(names)}")
        T = self.num_tokens
        if x.dim() != 2 or x.shape[0] != T or y.dim() != 2 or y.shape[0] != T:
            raise ValueError(
                f"BatchPlan.apply({names[0]!r}): x must be [T, d_in] and y [T, d_y] with T = {T} tokens of this "
                f"batch, got x {list(x.shape)} and y {list(y.shape)}"
            )
        if not (self.has_compressed or self.has_uncompressed):
            return y
        tabs = [self.cache.tables[n] for n in names]
        # The ops take one dtype for x, y and the tables. Autocast (a bf16 base
        # layer output for fp32 hidden states) or tables kept in another dtype
        # than the model meet here: x is cast to the tables' dtype and the
        # update is added to y in y's dtype; the ops never cast.
        td = self.cache.dtype
        xs = x if x.dtype == td else x.to(td)
        # Filled with -0.0, not 0.0: y + (-0.0) is y bit for bit (y = -0.0 included),
        # so rows that no adapter touches come back exactly as the base layer left them.
        out = y if y.dtype == td else torch.full(y.shape, -0.0, dtype=td, device=y.device)
        if self.has_compressed:
            jd_fused(xs, [t.V for t in tabs], [t.S for t in tabs], [t.U for t in tabs], self.meta, out, slice_offsets)
        if self.has_uncompressed:
            ru = self.cache.tables.uncompressed_rank
            h = self.planner._h_flat[: len(tabs) * T * ru].view(len(tabs), T, ru)
            scales = self.cache.tables.lora_scales
            lora_shrink(xs, [t.lora_A for t in tabs], scales, self.meta_uncompressed, out=h)
            lora_expand(h, [t.lora_B for t in tabs], self.meta_uncompressed, out, slice_offsets)
        if out is not y:
            y.add_(out.to(y.dtype))
        return y

    def release(self) -> None:
        """Unpin the batch's slots; call after the forward's ops have been launched."""
        if not self.released:
            self.released = True
            self.cache.release(self.lease)
            self.planner._active = None

    def __enter__(self) -> "BatchPlan":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class BatchPlanner:
    """Prepares batches for one :class:`AdapterCache` with buffers for ``max_tokens`` tokens."""

    def __init__(self, cache: AdapterCache, max_tokens: int):
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"BatchPlanner: max_tokens must be an integer >= 1, got {max_tokens!r}")
        self.cache = cache
        self.max_tokens = max_tokens
        t = cache.tables
        dev = cache.device
        self.meta = BatchMeta.allocate(max_tokens, t.max_adapters, t.max_clusters, dev) if t.has_compressed else None
        self.meta_uncompressed = (
            BatchMeta.allocate(max_tokens, t.max_uncompressed, 1, dev) if t.has_uncompressed else None
        )
        # This batch's adapter-slot -> cluster-slot map (a private copy: the cache's
        # table may change for other slots while this batch runs).
        self._adapter_cluster = torch.zeros(max(t.max_adapters, 1), dtype=torch.int32, device=dev)
        self._unc_cluster = torch.zeros(max(t.max_uncompressed, 1), dtype=torch.int32, device=dev)
        self._h_flat = torch.empty(
            MAX_SLICES * max_tokens * t.uncompressed_rank if t.has_uncompressed else 0, dtype=torch.float32, device=dev
        )
        self._cuda = dev.type == "cuda"
        pin = self._cuda
        self._stage_c = torch.empty(max_tokens, dtype=torch.int32, pin_memory=pin)
        self._stage_u = torch.empty(max_tokens, dtype=torch.int32, pin_memory=pin)
        self._stage_cl = torch.zeros(max(t.max_adapters, 1), dtype=torch.int32, pin_memory=pin)
        self._stage_event = None
        self._active: BatchPlan | None = None

    def prepare(self, adapters: Sequence[str | None], num_tokens: Sequence[int] | int) -> BatchPlan:
        """Acquire the adapters' slots and build the batch metadata.

        ``adapters``: one name (or ``None``) per request; ``num_tokens``: the
        tokens of each request (or one integer for all). Tokens are laid out
        request after request. Raises ``ValueError`` for malformed counts or
        more than ``max_tokens`` tokens, ``RuntimeError`` while a plan of this
        planner is unreleased, and the cache's errors (unknown adapter,
        capacity); nothing is changed or left pinned when it raises.
        """
        if self._active is not None:
            raise RuntimeError("BatchPlanner.prepare: the previous plan of this planner is not released yet")
        adapters = list(adapters)
        counts = [num_tokens] * len(adapters) if isinstance(num_tokens, int) else list(num_tokens)
        if len(counts) != len(adapters):
            raise ValueError(
                f"BatchPlanner.prepare: {len(adapters)} adapters but {len(counts)} token counts (one per request)"
            )
        for c in counts:
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise ValueError(f"BatchPlanner.prepare: token counts must be integers >= 0, got {c!r}")
        T = sum(counts)
        if T > self.max_tokens:
            raise ValueError(f"BatchPlanner.prepare: {T} tokens exceed this planner's max_tokens={self.max_tokens}")
        lease = self.cache.acquire(a for a, c in zip(adapters, counts) if c > 0)
        try:
            plan = self._build(lease, adapters, counts, T)
        except BaseException:
            self.cache.release(lease)
            raise
        self._active = plan
        return plan

    def _build(self, lease: Lease, adapters: list, counts: list, T: int) -> BatchPlan:
        comp = [lease.adapter_slots.get(a, -1) if a is not None else -1 for a in adapters]
        unc = [lease.uncompressed_slots.get(a, -1) if a is not None else -1 for a in adapters]
        has_c = any(s >= 0 and c > 0 for s, c in zip(comp, counts))
        has_u = any(s >= 0 and c > 0 for s, c in zip(unc, counts))
        cnt = torch.tensor(counts, dtype=torch.int64)
        map_c = torch.repeat_interleave(torch.tensor(comp, dtype=torch.int32), cnt)
        map_u = torch.repeat_interleave(torch.tensor(unc, dtype=torch.int32), cnt)
        if self._cuda and self._stage_event is not None:
            self._stage_event.synchronize()  # the previous batch's copies out of the staging buffers are done
        cl = self._stage_cl
        cl.zero_()
        if lease.adapter_cluster:
            cl[torch.tensor(list(lease.adapter_cluster))] = torch.tensor(list(lease.adapter_cluster.values()),
                                                                         dtype=torch.int32)
        self._stage_c[:T].copy_(map_c)
        self._stage_u[:T].copy_(map_u)
        nb = self._cuda
        if self._cuda:
            lease.wait(torch.cuda.current_stream(self.cache.device))  # copies into its slots precede its ops
        if self.meta is not None:
            self.meta.token_lora_mapping[:T].copy_(self._stage_c[:T], non_blocking=nb)
            self._adapter_cluster.copy_(cl, non_blocking=nb)
            self.meta.build(self.meta.token_lora_mapping[:T], self._adapter_cluster)
        if self.meta_uncompressed is not None:
            self.meta_uncompressed.token_lora_mapping[:T].copy_(self._stage_u[:T], non_blocking=nb)
            self.meta_uncompressed.build(self.meta_uncompressed.token_lora_mapping[:T], self._unc_cluster)
        if self._cuda:
            self._stage_event = torch.cuda.Event()
            self._stage_event.record(torch.cuda.current_stream(self.cache.device))
        return BatchPlan(self, lease, T, has_c, has_u, adapters)
