"""A collection for the error-budget tests: planted clusters plus adapters that fit no cluster."""

from __future__ import annotations

import torch

from jdlora_ops.compress import InMemoryCollection
from jdlora_ops.synthetic import planted_partition
from serving_data import MODULES

F64 = torch.float64


def outlier(rank: int, spectrum: list[float], seed: int) -> dict:
    """An adapter with the given singular values on every module (random subspaces), scale 2."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in MODULES:
        U = torch.linalg.qr(torch.randn(spec.d_out, rank, generator=gen, dtype=F64))[0]
        V = torch.linalg.qr(torch.randn(spec.d_in, rank, generator=gen, dtype=F64))[0]
        s = torch.tensor(spectrum, dtype=F64)
        out[spec.name] = (V.t().contiguous(), U * s / 2.0, 2.0)
    return out


def budget_collection(extra: bool = True) -> InMemoryCollection:
    """3 planted clusters (rank 4) of 4 adapters, plus ``flat`` (rank 4, flat spectrum: only its
    full rank meets a small budget) and ``steep`` (rank 8, fast-decaying spectrum: rank 2 does)."""
    col, _ = planted_partition(MODULES, [4, 4, 4], rank=4, adapter_ranks=(4, 2), scale_range=10.0, seed=11)
    adapters = {name: col._adapters[name] for name in col.adapter_names}
    if extra:
        adapters["flat"] = outlier(4, [1.0, 1.0, 1.0, 1.0], seed=1)
        adapters["steep"] = outlier(8, [1.0, 0.5, 0.05, 0.01, 0.01, 0.01, 0.01, 0.01], seed=2)
    return InMemoryCollection(adapters, modules=MODULES, metadata={"base_model": "test/base"})


def near_collection() -> InMemoryCollection:
    """The planted clusters of :func:`budget_collection` plus ``near0``..``near3``: copies of planted adapters
    (rank 4, inside their cluster's subspaces) with one private direction added on every module, carrying
    about a fifth of the update's energy. The joint tables miss exactly that direction, so a rank-1
    residual makes them exact at a fraction of the bytes of their own factors."""
    col = budget_collection(extra=False)
    adapters = {name: col._adapters[name] for name in col.adapter_names}
    gen = torch.Generator().manual_seed(5)
    full_rank = [x for x in col.adapter_names if all(a[0].shape[0] == 4 for a in adapters[x].values())]
    for j, src in enumerate(full_rank[:4]):
        out = {}
        for spec in MODULES:
            A, B, s = adapters[src][spec.name]
            energy = float((s * B @ A).square().sum())
            u = torch.randn(spec.d_out, 1, generator=gen, dtype=F64)
            v = torch.randn(1, spec.d_in, generator=gen, dtype=F64)
            c = (0.25 * energy) ** 0.5 / float(u.norm() * v.norm())
            out[spec.name] = (torch.cat([A, v], 0), torch.cat([B, u * c / s], 1), s)
        adapters[f"near{j}"] = out
    return InMemoryCollection(adapters, modules=MODULES, metadata={"base_model": "test/base"})
