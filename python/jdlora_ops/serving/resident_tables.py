"""Device-resident weight tables: allocated once, fixed shapes, filled slot by slot.

Per adapted module (one per layer and projection) the tables are the stacks
the ops read (see DESIGN section 4 and :mod:`jdlora_ops.ops`):

* compressed path: ``V [C, r, d_in]`` (shrink side), ``U [C, d_out, r]``
  (expand side), ``S [A, r, r]`` or ``[A, r]`` (cores, PEFT scaling inside);
* uncompressed path: ``lora_A [Au, ru, d_in]``, ``lora_B [Au, d_out, ru]``
  (PEFT scaling folded into ``B``; adapters of rank below ``ru`` are padded
  with zeros).

and, shared by every module: ``adapter_cluster`` int32 ``[A]`` (cluster slot
of each adapter slot) and ``lora_scales`` float32 ``[Au]`` (ones: the scaling
is in ``B``; kept because the baseline ops take it).

``C``, ``A``, ``Au`` are slot capacities. Slot ``j`` of every module's tables
holds the same cluster or adapter, so one batch metadata serves all modules.
Shapes never change after allocation, so a CUDA graph that captured the ops
keeps reading valid memory while slots are refilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..compress.collection import ModuleSpec

__all__ = ["ModuleTables", "ResidentTables", "table_bytes"]


@dataclass
class ModuleTables:
    """The stacks of one module (``None`` where that path has no capacity)."""

    spec: ModuleSpec
    V: torch.Tensor | None
    U: torch.Tensor | None
    S: torch.Tensor | None
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.V, self.U, self.S, self.lora_A, self.lora_B) if t is not None]


def table_bytes(
    modules: Sequence[ModuleSpec], *, rank: int, max_clusters: int, max_adapters: int, diagonal: bool = False,
    max_uncompressed: int = 0, uncompressed_rank: int = 0, dtype: torch.dtype = torch.float32,
) -> dict:
    """Bytes the tables of these capacities take, without allocating them.

    Returns ``{"compressed": ..., "uncompressed": ..., "total": ...}`` (the
    int32/float32 per-slot vectors are included).
    """
    es = torch.empty(0, dtype=dtype).element_size()
    core = rank if diagonal else rank * rank
    comp = 0
    unc = 0
    for s in modules:
        comp += es * (max_clusters * rank * (s.d_in + s.d_out) + max_adapters * core)
        unc += es * max_uncompressed * uncompressed_rank * (s.d_in + s.d_out)
    comp += 4 * max_adapters
    unc += 4 * max_uncompressed
    return {"compressed": comp, "uncompressed": unc, "total": comp + unc}


class ResidentTables:
    """Every module's tables plus the shared per-slot vectors (see the module docstring).

    Freshly allocated tables are zero, so an unused slot contributes nothing.
    """

    def __init__(
        self, modules: Sequence[ModuleSpec], *, rank: int, diagonal: bool, max_clusters: int, max_adapters: int,
        max_uncompressed: int, uncompressed_rank: int, dtype: torch.dtype, device: torch.device,
    ):
        self.rank = int(rank)
        self.diagonal = bool(diagonal)
        self.max_clusters = int(max_clusters)
        self.max_adapters = int(max_adapters)
        self.max_uncompressed = int(max_uncompressed)
        self.uncompressed_rank = int(uncompressed_rank)
        self.dtype = dtype
        self.device = torch.device(device)
        comp = self.max_clusters > 0 and self.max_adapters > 0 and self.rank > 0
        unc = self.max_uncompressed > 0 and self.uncompressed_rank > 0
        self.modules: dict[str, ModuleTables] = {}

        def z(*shape):
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        r, C, A, Au, ru = self.rank, self.max_clusters, self.max_adapters, self.max_uncompressed, self.uncompressed_rank
        for s in modules:
            self.modules[s.name] = ModuleTables(
                s,
                z(C, r, s.d_in) if comp else None,
                z(C, s.d_out, r) if comp else None,
                (z(A, r) if diagonal else z(A, r, r)) if comp else None,
                z(Au, ru, s.d_in) if unc else None,
                z(Au, s.d_out, ru) if unc else None,
            )
        self.adapter_cluster = torch.zeros(max(A, 1), dtype=torch.int32, device=self.device)
        self.lora_scales = torch.ones(max(Au, 1), dtype=torch.float32, device=self.device)

    @property
    def has_compressed(self) -> bool:
        return self.max_clusters > 0 and self.max_adapters > 0 and self.rank > 0

    @property
    def has_uncompressed(self) -> bool:
        return self.max_uncompressed > 0 and self.uncompressed_rank > 0

    def __getitem__(self, module: str) -> ModuleTables:
        try:
            return self.modules[module]
        except KeyError:
            raise KeyError(f"no resident tables for module {module!r} ({len(self.modules)} modules are served)") from None

    def nbytes(self) -> dict:
        """Bytes allocated: ``{"compressed", "uncompressed", "total"}``."""
        comp = unc = 0
        for t in self.modules.values():
            for x in (t.V, t.U, t.S):
                if x is not None:
                    comp += x.numel() * x.element_size()
            for x in (t.lora_A, t.lora_B):
                if x is not None:
                    unc += x.numel() * x.element_size()
        comp += self.adapter_cluster.numel() * 4
        unc += self.lora_scales.numel() * 4
        return {"compressed": comp, "uncompressed": unc, "total": comp + unc}
