"""Choosing the number of clusters by an error-per-byte trade-off.

More clusters lower the error and cost bytes (every cluster has its own bases in
every module). For each candidate ``K`` the partition search of
:mod:`~jdlora_ops.compress.partition_search` runs on the same few modules the
clustered fit searches on (the affinities are computed once), which gives the
mean relative error of that partition there; the bytes are those of the whole
store (bases of ``K`` clusters plus every adapter's core, all modules) over the
bytes of the original factors. The chosen ``K`` minimises

    mean relative error + tradeoff * (compressed bytes / original bytes),

so ``tradeoff`` is the error the user would accept to save the whole original
size once: a small one buys accuracy, a large one buys compression.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ._team import SOLO, ModuleTeam
from .collection import AdapterCollection
from .partition_search import Trial, search_partition, subspace_affinities

__all__ = ["ClusterCountPoint", "ClusterCountChoice", "candidate_counts", "choose_num_clusters"]


@dataclass
class ClusterCountPoint:
    clusters: int
    mean_rel_error: float
    bytes_ratio: float
    score: float
    seconds: float

    def as_dict(self) -> dict:
        return {"clusters": self.clusters, "mean_rel_error": self.mean_rel_error, "bytes_ratio": self.bytes_ratio,
                "score": self.score, "seconds": round(self.seconds, 3)}


@dataclass
class ClusterCountChoice:
    clusters: int
    assignment: torch.Tensor
    curve: list[ClusterCountPoint]


def candidate_counts(low: int, high: int, points: int = 6) -> list[int]:
    """About ``points`` cluster counts from ``low`` to ``high``, spaced geometrically (both ends included)."""
    if not 1 <= low <= high:
        raise ValueError(f"the cluster range must satisfy 1 <= low <= high, got {low}:{high}")
    if points < 2 or low == high:
        return [low] if low == high else [low, high]
    out = {int(round(low * (high / low) ** (j / (points - 1)))) for j in range(points)}
    return sorted(out | {low, high})


def _mean_rel_error(trial: Trial) -> float:
    own = trial.cost.gather(1, trial.assignment[:, None]).squeeze(1)
    scale = trial.scale if trial.scale is not None else torch.ones_like(own)
    live = scale > 0
    return float((own[live] / scale[live]).mean()) if bool(live.any()) else 0.0


def choose_num_clusters(
    collection: AdapterCollection,
    rank: int,
    counts: list[int],
    *,
    tradeoff: float,
    fit_subset: Callable[[int], Callable],
    subset,
    method: str = "full",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    search_options: dict | None = None,
    log: Callable[[str], None] | None = None,
    team: ModuleTeam = SOLO,
) -> ClusterCountChoice:
    """Pick ``K`` from ``counts`` (each in ``[1, n]``) by the trade-off in the module docstring.

    ``fit_subset(K)`` returns the fitter that :func:`search_partition` uses for
    ``K`` clusters on ``subset`` (the modules searched on).
    """
    if not (isinstance(tradeoff, (int, float)) and math.isfinite(tradeoff) and tradeoff >= 0):
        raise ValueError(f"the error-per-byte tradeoff (--tradeoff) must be a number >= 0, got {tradeoff!r}")
    say = log or (lambda _msg: None)
    n = len(collection.adapter_names)
    bad = [K for K in counts if not 1 <= K <= n]
    if bad or not counts:
        raise ValueError(f"cluster counts (--clusters-range) must lie in [1, {n}] (the number of adapters), got {counts}")
    width_total = 0
    for spec in collection.modules:
        width_total += spec.d_out + spec.d_in
    specs = list(collection.modules)

    def module_sizes():
        # The original size needs every module's ranks; reading them costs one pass over the factors.
        for i in team.local(specs, n):
            f = collection.load_module(specs[i], dtype=dtype, device=device)
            yield f.ranks().sum().reshape(1) * (specs[i].d_out + specs[i].d_in)

    ranks_sum = int(team.ordered_sum(module_sizes(), 1, team.holders(specs, n), dtype=torch.int64))
    core = rank * rank if method == "full" else rank
    original = max(ranks_sum, 1)
    aff = None
    curve: list[ClusterCountPoint] = []
    best: tuple[float, int, torch.Tensor] | None = None
    for K in sorted(set(counts)):
        t = time.perf_counter()
        fit = fit_subset(K)
        if K == 1 or K == n:
            trial = fit(torch.zeros(n, dtype=torch.long) if K == 1 else torch.arange(n), 1, None)
        else:
            if aff is None:
                aff = subspace_affinities(collection, subset, rank=rank, seed=seed, dtype=dtype, device=device,
                                          team=team)
            trial = search_partition(aff, K, fit, seed=seed, **(search_options or {})).best
        err = _mean_rel_error(trial)
        after = K * rank * width_total + n * core * len(collection.modules)
        point = ClusterCountPoint(K, err, after / original, err + tradeoff * after / original,
                                  time.perf_counter() - t)
        curve.append(point)
        say(f"clusters {K}: mean relative error {err:.4f} on {len(subset)} modules, bytes x{after / original:.4f} of "
            f"the original, score {point.score:.4f}")
        if best is None or point.score < best[0]:
            best = (point.score, K, trial.assignment)
    assert best is not None
    return ClusterCountChoice(best[1], best[2].clone(), curve)
