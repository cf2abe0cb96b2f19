"""The JD tables of one vLLM LoRA linear layer, built from a store.

A vLLM LoRA linear layer packs one or more of the model's projections into
slices (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up; ``o_proj`` and
``down_proj`` one slice each). Per slice ``s`` the layer's tables are

* ``Vt[s]``: ``[K, r, d_in_local]``, every cluster's shrink basis;
* ``U[s]``: ``[K, d_out_local_s, r]``, every cluster's expand basis
  (column-major on the CPU, where the expand kernels then copy its columns
  instead of reordering its rows on every call);
* ``S[s]``: ``[slots, r, r]`` (or ``[slots, r]``), the core of the adapter in
  each of vLLM's LoRA slots, zero for empty slots and PEFT adapters;

``K`` counts cluster slots: at start-up the store's clusters in its order; as
the store is updated while it is served, :mod:`.live` loads new clusters into
free or added slots, so a slot need not hold the store's cluster of its number.
Tables are sharded for tensor parallelism as :mod:`.sharding` describes: a
column-parallel slice keeps the block of ``U``'s rows that vLLM gives the
rank for a PEFT ``B`` (``geometry["output_shards"]``: with KV heads replicated
over ranks, ranks share a k/v block), a row-parallel one its columns of
``V^T``. A slice whose projection the store does not cover has zero bases
(it adds nothing).
"""

from __future__ import annotations

import torch

from .sharding import shard_expand_side, shard_shrink_side

__all__ = ["LayerTables", "StoreMismatchError"]


class StoreMismatchError(ValueError):
    """The store does not fit the model vLLM loaded (another base model, other shapes)."""


def _expand_layout(U: torch.Tensor) -> torch.Tensor:
    """``U`` in the layout the expand kernels of its device read fastest (see the module docstring)."""
    if U.device.type != "cpu":
        return U.contiguous()
    return U.transpose(1, 2).contiguous().transpose(1, 2)


class LayerTables:
    """See the module docstring. ``slice_modules[s]`` is the store module name of slice ``s`` (or ``None``)."""

    def __init__(self, name: str, kind: str, slice_modules: list[str | None], reader, module_index: dict,
                 geometry: dict, num_slots: int):
        self.name = name
        self.kind = kind
        self.slice_modules = slice_modules
        r, K = int(reader.rank), int(reader.num_clusters)
        self.rank = r
        self.dtype, self.device = geometry["dtype"], geometry["device"]
        self.tp_rank, self.tp = geometry["tp_rank"], geometry["tp_size"]
        widths = geometry["output_slices"]
        self.d_in_local = geometry["input_size"]
        self.widths = list(widths)
        shards = geometry["output_shards"]
        if isinstance(shards, str):
            raise StoreMismatchError(
                f"jdlora: vLLM layer {name} at tensor-parallel size {self.tp}: {shards}; the store's tables can only "
                "be sharded into one contiguous block of rows per rank and slice (run it at tensor_parallel_size 1)")
        if len(shards) != len(widths):
            raise ValueError(f"LayerTables({name}): output_shards has {len(shards)} entries, expected one per "
                             f"output slice ({len(widths)})")
        # (shard, number of shards) of each slice's U rows; row-parallel layers keep all rows.
        self.shards = [tuple(sh) if kind == "column" else (0, 1) for sh in shards]
        self.offsets = [sum(widths[:s]) for s in range(len(widths))]
        self.Vt: list[torch.Tensor] = []
        self.U: list[torch.Tensor] = []
        self.S: list[torch.Tensor] = []
        self.covered = [m is not None for m in slice_modules]
        for s, module in enumerate(slice_modules):
            d_out_local = widths[s]
            if module is None:
                Vt = torch.zeros(K, r, self.d_in_local, dtype=self.dtype, device=self.device)
                U = torch.zeros(K, d_out_local, r, dtype=self.dtype, device=self.device)
            else:
                spec = reader.modules[module_index[module]]
                d_out_full = d_out_local * self.shards[s][1]
                d_in_full = self.d_in_local * self.tp if kind == "row" else self.d_in_local
                if (spec.d_out, spec.d_in) != (d_out_full, d_in_full):
                    raise StoreMismatchError(
                        f"jdlora store {reader.path}: module {module} is {spec.d_out} x {spec.d_in} in the store but "
                        f"{d_out_full} x {d_in_full} in the model vLLM loaded (a store for another base model?)"
                    )
                U, Vt = self._local(s, *reader.read_module_bases(module_index[module]))
            core = (num_slots, r) if reader.diagonal else (num_slots, r, r)
            self.Vt.append(Vt)
            self.U.append(_expand_layout(U))
            self.S.append(torch.zeros(core, dtype=self.dtype, device=self.device))

    def _local(self, s: int, U: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice ``s``'s bases ``[K, d_out, r]``, ``[K, r, d_in]`` as this rank serves them: its shard, the
        layer's dtype."""
        shard, n_shards = self.shards[s]
        if n_shards > 1:
            U = shard_expand_side(U, shard, n_shards)
        elif self.kind == "row" and self.tp > 1:
            Vt = shard_shrink_side(Vt, self.tp_rank, self.tp)
        return (U.to(device=self.device, dtype=self.dtype).contiguous(),
                Vt.to(device=self.device, dtype=self.dtype).contiguous())

    @property
    def num_clusters(self) -> int:
        return int(self.Vt[0].shape[0]) if self.Vt else 0

    def grow(self, clusters: int) -> None:
        """Room for ``clusters`` clusters; the new ones are zero and the existing ones keep their values."""
        extra = clusters - self.num_clusters
        if extra <= 0:
            return
        for s in range(len(self.Vt)):
            self.Vt[s] = torch.cat([self.Vt[s], self.Vt[s].new_zeros(extra, *self.Vt[s].shape[1:])])
            self.U[s] = _expand_layout(torch.cat([self.U[s], self.U[s].new_zeros(extra, *self.U[s].shape[1:])]))

    def load_cluster(self, slot: int, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write one cluster's bases (store module name -> ``(U [d_out, r], Vt [r, d_in])``) into ``slot``."""
        for s, module in enumerate(self.slice_modules):
            if module is None:
                continue
            U, Vt = bases[module]
            U, Vt = self._local(s, U.unsqueeze(0), Vt.unsqueeze(0))
            self.U[s][slot].copy_(U[0])
            self.Vt[s][slot].copy_(Vt[0])

    def set_slot(self, slot: int, cores: dict[str, torch.Tensor]) -> None:
        """Copy an adapter's cores (store module name -> core) into ``slot``."""
        for s, module in enumerate(self.slice_modules):
            if module is None:
                continue
            self.S[s][slot].copy_(cores[module])

    def clear_slot(self, slot: int) -> None:
        for S in self.S:
            S[slot].zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.Vt, *self.U, *self.S))
