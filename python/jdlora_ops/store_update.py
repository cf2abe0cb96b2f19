"""Growing a store on disk: the one code path behind ``jdlora add`` and ``AdapterCache.add(persist=True)``.

New adapters are projected into the store's bases (no recompression), in the
metric the store was compressed with (activation-aware stores need their
calibration stats), under the store's error budget (or the one given) and,
for a store written for a byte budget, its rule for a new adapter's
representation (the least error plus the store's recorded price of a byte;
see :func:`~jdlora_ops.compress.allocation.allocate_new_adapters`), and
written with :func:`~jdlora_ops.store.save_store` ``update=True``: new files
under new names, the manifest switched last, so a writer killed at any step
leaves the old or the new store.
"""

from __future__ import annotations

import os

import torch

from .compress.collection import AdapterCollection
from .store import load_store, save_store

__all__ = ["add_to_store", "StoreAddResult"]


class StoreAddResult:
    """``report`` (:class:`~jdlora_ops.compress.ProjectionReport`), ``paths`` (per new adapter:
    ``"jd"``, ``"jd+res-k"``, ``"svd-k"`` or ``"full"``), ``budget`` and the updated ``collection``."""

    def __init__(self, report, paths, budget, collection):
        self.report, self.paths, self.budget, self.collection = report, paths, budget, collection


def add_to_store(
    store: str | os.PathLike, new: AdapterCollection, *, cluster: int | None = None,
    max_rel_error: float | None = None, calibration: str | None = None, device: torch.device | str = "cpu",
    progress: bool = False, compressed=None,
) -> StoreAddResult:
    """Project ``new``'s adapters into ``store`` and write it (see the module docstring).

    ``compressed``: the store already loaded (``load_store``), to spare a read.
    Raises ``ValueError`` (a clear message) for a cluster out of range, stats
    missing for an activation-aware store or given for a plain one, and
    :class:`~jdlora_ops.NonFiniteError` for factors holding NaN or
    an infinity.
    """
    from .compress.error_budget import budget_new_adapters, check_budget
    from .compress.projection import project_adapters

    new.require_finite()  # before any work: a refused adapter leaves the store byte-for-byte as it was
    compressed = load_store(store) if compressed is None else compressed
    if cluster is not None and compressed.method in ("full", "diag") and not 0 <= cluster < compressed.num_clusters:
        raise ValueError(f"--cluster {cluster} out of range: the store has {compressed.num_clusters} clusters")
    budget = max_rel_error if max_rel_error is not None else (compressed.metadata or {}).get("max_rel_error")
    budget = check_budget(budget) if budget is not None else None
    recorded = (compressed.metadata or {}).get("calibration")
    if recorded:
        from .compress.activation_aware import project_activation_aware
        from .compress.calibration import load_stats

        stats_path = calibration or recorded.get("stats")
        if not stats_path:
            raise ValueError(f"{store} was compressed activation-aware: give its stats with --calibration")
        report, paths = project_activation_aware(compressed, new, load_stats(stats_path), damping=recorded["damping"],
                                                 budget=budget, cluster=cluster, device=device, progress=progress)
    else:
        if calibration:
            raise ValueError(f"--calibration: {store} was not compressed activation-aware")
        report = project_adapters(compressed, new, cluster=cluster, device=device, progress=progress)
        if "multiplier" in ((compressed.metadata or {}).get("byte_budget") or {}):
            from .compress.allocation import allocate_new_adapters

            paths = allocate_new_adapters(compressed, new, report, device=device, floor=budget)
        elif budget is not None:
            paths = budget_new_adapters(compressed, new, report, budget, device=device)
        else:
            paths = ["jd"] * len(report.names)
    save_store(store, compressed, update=True, reuse_bases=compressed.method in ("full", "diag"),
               dtype=next(iter(compressed.modules.values())).U.dtype)
    return StoreAddResult(report, paths, budget, compressed)
