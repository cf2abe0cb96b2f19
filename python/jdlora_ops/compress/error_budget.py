"""Per-adapter error budget: adapters the joint tables fit badly are kept on their own.

After joint compression, an adapter whose relative error exceeds the budget ``E``
on any module leaves the joint tables. It is kept as its own truncated SVD at
the smallest rank ``k`` that meets ``E`` on every module, or as its original
factors when that rank is its full rank (an SVD of full rank saves nothing).
Servers then serve it through the uncompressed baseline ops, in the same batch
as the jointly compressed adapters.

The singular values come from the factors (``truncated_svd``); each module is
read once, for the adapters over budget only. The joint bases are not refitted
without the adapters that leave (they were fitted with them; refitting would
cost another pass over the collection).
"""

from __future__ import annotations

import math

import torch

from ._linalg import F64
from ._team import SOLO, ModuleTeam
from .baselines import truncated_svd
from .collection import AdapterCollection, ModuleFactors
from .result import CompressedCollection, IndividualAdapter

__all__ = ["check_budget", "apply_error_budget", "all_rel_errors", "budget_new_adapters", "smallest_rank",
           "individual_adapters", "individual_at_ranks", "IndividualFactors"]


def check_budget(max_rel_error) -> float:
    """``max_rel_error`` as a float in ``(0, 1]``, or a ``ValueError`` naming it."""
    try:
        e = float(max_rel_error)
    except (TypeError, ValueError):
        raise ValueError(f"max_rel_error (--max-rel-error) must be a number in (0, 1], got {max_rel_error!r}") from None
    if isinstance(max_rel_error, bool) or not math.isfinite(e) or not 0.0 < e <= 1.0:
        raise ValueError(f"max_rel_error (--max-rel-error) must be a number in (0, 1], got {max_rel_error!r}")
    return e


def smallest_rank(s2: torch.Tensor, norms: torch.Tensor, budget: float) -> torch.Tensor:
    """Per row, the smallest ``k`` with ``sum_{j >= k} s2_j <= budget * norm`` (``s2`` descending)."""
    tail = s2.flip(1).cumsum(1).flip(1)  # tail[:, k] = sum_{j >= k} s2_j
    tail = torch.cat([tail, torch.zeros(s2.shape[0], 1, dtype=tail.dtype)], dim=1)
    ok = tail <= budget * norms[:, None] * (1 + 1e-12)
    return ok.to(torch.int64).argmax(dim=1)  # first k that meets the budget


def individual_adapters(
    collection: AdapterCollection,
    names: list[str],
    budget: float,
    *,
    jd_errors: dict[str, dict[str, float]] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    team: ModuleTeam = SOLO,
) -> dict[str, IndividualAdapter]:
    """Truncated SVD (or original factors) of the adapters ``names`` of ``collection`` meeting ``budget``.

    With several processes in ``team`` each computes its own modules (the
    ranks are the maximum over modules, which any order gives exactly); the
    returned factors, errors and ranks then cover those modules only.
    """
    all_names = list(collection.adapter_names)
    idx = torch.tensor([all_names.index(x) for x in names], dtype=torch.long)
    m = len(names)
    specs = [collection.modules[i] for i in team.local(collection.modules, len(all_names))]

    def needed_ranks():
        need = torch.zeros(m, dtype=torch.long)
        full_rank = torch.zeros(m, dtype=torch.long)
        spectra = []
        for spec in specs:
            f = collection.load_module(spec, dtype=dtype, device=device).select(idx)
            ranks = f.ranks()
            k_max = max([0] + [g.rank for g in f.groups])
            if k_max:
                _, s, _, _, norms = truncated_svd(f, k_max)
                need = torch.maximum(need, smallest_rank(s.to(F64).cpu().square(), norms.to(F64).cpu(), budget))
            full_rank = torch.maximum(full_rank, ranks)
            spectra.append(ranks)
            del f
        return need, full_rank, spectra

    need, full_rank, spectra = team.run(needed_ranks)
    need, full_rank = team.maximum(need), team.maximum(full_rank)
    return team.run(_individual_factors, collection, specs, spectra, names, idx, need, full_rank, jd_errors, dtype,
                    device)


def individual_at_ranks(
    collection: AdapterCollection,
    names: list[str],
    ks: torch.Tensor,
    full_rank: torch.Tensor,
    *,
    jd_errors: dict[str, dict[str, float]] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    team: ModuleTeam = SOLO,
) -> dict[str, IndividualAdapter]:
    """The adapters ``names`` as their own truncated SVD at rank ``ks[i]``, or their original factors
    where ``ks[i]`` reaches ``full_rank[i]`` (their largest rank over modules): the byte budget's
    choice (:mod:`.allocation`), in one pass over this process's modules."""
    all_names = list(collection.adapter_names)
    idx = torch.tensor([all_names.index(x) for x in names], dtype=torch.long)
    specs = [collection.modules[i] for i in team.local(collection.modules, len(all_names))]
    return team.run(_individual_factors, collection, specs, None, names, idx, torch.as_tensor(ks, dtype=torch.long),
                    torch.as_tensor(full_rank, dtype=torch.long), jd_errors, dtype, device)


class IndividualFactors:
    """Adapters ``names`` as their own truncated SVD at rank ``need[j]``, or their original factors where
    that reaches ``full_rank[j]``, built one module at a time (:meth:`add`) so that a pass reading each
    module for other purposes too can build them."""

    def __init__(self, names: list[str], need: torch.Tensor, full_rank: torch.Tensor,
                 jd_errors: dict[str, dict[str, float]] | None = None):
        self.names, self.jd_errors = list(names), jd_errors or {}
        self.keep_full = need >= full_rank
        self.ks = torch.where(self.keep_full, full_rank, need).clamp_min(1)
        m = len(self.names)
        self.factors: list[dict] = [{} for _ in range(m)]
        self.errors: list[dict] = [{} for _ in range(m)]
        self.orig: list[dict] = [{} for _ in range(m)]

    def add(self, f: ModuleFactors, ranks: torch.Tensor | None = None) -> None:
        """One module: ``f`` holds these adapters' factors in ``names`` order; ``ranks`` their ranks there
        when already known."""
        name = f.spec.name
        ranks = f.ranks() if ranks is None else ranks
        for j in range(len(self.names)):
            self.orig[j][name] = int(ranks[j])
        if not f.groups:
            return
        U, s, V, err, norms = truncated_svd(f, int(self.ks.max()))
        for g in f.groups:
            for t, j in enumerate(g.index.tolist()):
                if bool(self.keep_full[j]):
                    A, B = g.A[t].clone(), g.Bt[t].t().clone()
                    self.errors[j][name] = 0.0
                else:
                    k = min(int(self.ks[j]), g.rank)
                    root = s[j, :k].sqrt()
                    B = U[j, :, :k] * root
                    A = root[:, None] * V[j, :, :k].t()
                    s2 = s[j].to(F64).square()
                    tail = float(s2[k:].sum()) + float(err[j]) if k < s.shape[1] else float(err[j])
                    self.errors[j][name] = tail / float(norms[j]) if float(norms[j]) > 0 else 0.0
                self.factors[j][name] = (A.contiguous(), B.contiguous())

    def adapters(self) -> dict[str, IndividualAdapter]:
        return {name: IndividualAdapter(name, "full" if bool(self.keep_full[j]) else "svd", int(self.ks[j]),
                                        self.factors[j], self.errors[j], self.orig[j],
                                        dict(self.jd_errors.get(name, {})))
                for j, name in enumerate(self.names)}


def _individual_factors(collection, specs, spectra, names, idx, need, full_rank, jd_errors, dtype, device):
    out = IndividualFactors(names, need, full_rank, jd_errors)
    for j_spec, spec in enumerate(specs):
        out.add(collection.load_module(spec, dtype=dtype, device=device).select(idx),
                spectra[j_spec] if spectra is not None else None)  # None: ranks read here, one pass
    return out.adapters()


def all_rel_errors(result: CompressedCollection, team: ModuleTeam = SOLO) -> tuple[torch.Tensor, list[str]]:
    """``[n, M]`` relative errors of every module and the module names, gathered from ``team``'s processes."""
    if team.world == 1:
        return result.rel_errors(), list(result.modules)
    parts = team.all_objects({m: cm.rel_errors.double().cpu() for m, cm in result.modules.items()})
    merged = {m: r for part in parts for m, r in part.items()}
    # Process blocks are contiguous in module order, so rank order is module order.
    mods = list(merged)
    return (torch.stack([merged[m] for m in mods], dim=1) if mods
            else torch.zeros(result.num_adapters, 0, dtype=F64)), mods


def apply_error_budget(
    result: CompressedCollection,
    collection: AdapterCollection,
    max_rel_error: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    team: ModuleTeam = SOLO,
) -> list[str]:
    """Move the adapters of ``result`` whose joint error exceeds ``max_rel_error`` on some
    module out of the joint tables, into ``result.individual`` (in place). Returns their names.

    Clusters left without adapters are dropped. ``result.metadata["max_rel_error"]``
    records the budget so that adapters added later follow the same rule.
    With several processes in ``team``, ``result`` holds each one's modules
    and the decision looks at all of them.
    """
    budget = check_budget(max_rel_error)
    result.metadata["max_rel_error"] = budget
    if result.method not in ("full", "diag") or result.num_adapters == 0:
        return []
    rel, mods = all_rel_errors(result, team)
    over = (rel > budget).any(dim=1)
    if not bool(over.any()):
        return []
    names = [x for x, o in zip(result.adapter_names, over.tolist()) if o]
    jd = {x: {m: float(rel[i, j]) for j, m in enumerate(mods)} for i, x in enumerate(result.adapter_names) if over[i]}
    result.individual.update(individual_adapters(collection, names, budget, jd_errors=jd, dtype=dtype, device=device,
                                                 team=team))
    drop_from_tables(result, over)
    return names


def drop_from_tables(result: CompressedCollection, drop: torch.Tensor) -> None:
    """Remove the adapters where ``drop`` (bool ``[n]``) from the joint tables; renumber clusters."""
    keep = (~drop).nonzero().flatten()
    assign = result.assignment[keep]
    used = torch.unique(assign)
    remap = torch.full((max(result.num_clusters, 1),), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    for cm in result.modules.values():
        kd = keep.to(cm.sigma.device)
        cm.sigma = cm.sigma[kd].contiguous()
        cm.norms_sq = cm.norms_sq[kd]
        cm.errors = cm.errors[kd]
        cm.rel_errors = cm.rel_errors[kd]
        ud = used.to(cm.U.device)
        cm.U = cm.U[ud].contiguous()
        cm.Vt = cm.Vt[ud].contiguous()
        if cm.quantized is not None:
            cm.quantized = tuple(t.take(used.to(t.data.device)) for t in cm.quantized)
    ranks = result.metadata.get("ranks") or {}
    for mod, per in ranks.items():
        ranks[mod] = [per[i] for i in keep.tolist() if i < len(per)]
    result.adapter_names = [result.adapter_names[i] for i in keep.tolist()]
    result.assignment = remap[assign] if assign.numel() else assign
    result.num_clusters = int(used.numel())



def budget_new_adapters(
    compressed: CompressedCollection,
    collection: AdapterCollection,
    report,
    budget: float,
    *,
    device: torch.device | str = "cpu",
) -> list[str]:
    """After :func:`~.projection.project_adapters` added ``collection``'s adapters (``report``), move those
    over ``budget`` out of the joint tables as in :func:`apply_error_budget` (in place).

    Returns every new adapter's serving path (``"jd"``, ``"svd-k"`` or ``"full"``), in ``report.names`` order.
    """
    paths = ["jd"] * len(report.names)
    compressed.metadata["max_rel_error"] = budget
    if compressed.method not in ("full", "diag") or not report.rel_errors.numel():
        return paths
    over = (report.rel_errors > budget).any(dim=1)
    if not bool(over.any()):
        return paths
    n0 = compressed.num_adapters - len(report.names)
    names = [x for x, o in zip(report.names, over.tolist()) if o]
    mods = list(compressed.modules)
    jd = {x: dict(zip(mods, report.rel_errors[j].tolist())) for j, x in enumerate(report.names) if over[j]}
    dtype = next(iter(compressed.modules.values())).U.dtype
    compressed.individual.update(individual_adapters(collection, names, budget, jd_errors=jd,
                                                     dtype=torch.float64, device=device))
    for name in names:
        ind = compressed.individual[name]
        ind.factors = {m: (A.to(dtype), B.to(dtype)) for m, (A, B) in ind.factors.items()}
    drop_from_tables(compressed, torch.cat([torch.zeros(n0, dtype=torch.bool), over]))
    return [compressed.individual[x].label if o else "jd" for x, o in zip(report.names, over.tolist())]
