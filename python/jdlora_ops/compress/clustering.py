"""Clustered joint compression of a whole collection, streamed module by module.

Each adapter belongs to one of ``K`` clusters, the same for all of its modules;
each (cluster, module) has its own bases. The objective is summed over modules:
``sum_m sum_i w_im ||dW_im - U_{c(i),m} Sigma_im V_{c(i),m}^T||^2``. A round reads
every module once: it fits JD per cluster (warm-started from the previous
round's bases), then scores every adapter under every cluster's bases. After the
round each adapter moves to the cluster with the lowest summed cost; rounds
repeat until no adapter moves (or ``max_rounds``). Both steps lower the
objective, so it decreases from round to round like k-means. Such rounds stop
in local minima, so the starting partition comes from a search on a few
modules (:mod:`~jdlora_ops.compress.partition_search`).

Only one module's factors are in memory at a time; the bases and cores of all
modules are kept (they are the output).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ._linalg import F64, eps_of
from .baselines import compress_none, compress_svd, truncated_svd
from .collection import AdapterCollection, ModuleSpec
from ._team import SOLO, ModuleTeam
from .jd import JDResult, check_rank, jd_diag, jd_full
from .cluster_count import candidate_counts, choose_num_clusters
from .partition_search import Trial, fill_empty, search_partition, subspace_affinities
from .projection import evaluate_clusters
from .result import METHODS, CompressedCollection, CompressedModule, check_nonzero, relative

__all__ = ["compress", "adapter_signatures"]


def adapter_signatures(
    collection: AdapterCollection,
    *,
    modules: list[ModuleSpec] | None = None,
    rank: int = 8,
    dim: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Cheap per-adapter signatures of the column and row spaces of ``dW_i``.

    Per module, ``dW_i``'s top-``rank`` singular triplets ``(u_j, s_j, v_j)``
    (from its factors) give ``C_out = sum_j (s_j / s_1) u_j u_j^T`` and
    ``C_in = sum_j (s_j / s_1) v_j v_j^T``; the signature is
    ``(G_o^T C_out G_o, G_i^T C_in G_i)`` flattened, with fixed Gaussian
    ``G_o: [d_out, dim]``, ``G_i: [d_in, dim]``. These are sketches of soft
    projectors onto the adapter's dominant subspaces: adapters whose updates
    share subspaces get nearby signatures whatever their scale and core.
    Zero updates get zero signatures. Returns float64
    ``[n, 2 dim^2 x modules]``.
    """
    modules = collection.modules if modules is None else modules
    n = len(collection.adapter_names)
    gen = torch.Generator(device=device).manual_seed(int(seed) + 7919)
    parts = []
    for spec in modules:
        f = collection.load_module(spec, dtype=dtype, device=device)
        Go = torch.randn(spec.d_out, dim, generator=gen, dtype=dtype, device=device) / spec.d_out**0.5
        Gi = torch.randn(spec.d_in, dim, generator=gen, dtype=dtype, device=device) / spec.d_in**0.5
        k = max([1] + [min(rank, g.rank) for g in f.groups])
        U, s, V, _, _ = truncated_svd(f, k)
        w = s / s[:, :1].clamp_min(torch.finfo(s.dtype).tiny)
        Qo = torch.matmul(Go.t(), U) * w.sqrt()[:, None, :]  # [n, dim, k]
        Qi = torch.matmul(Gi.t(), V) * w.sqrt()[:, None, :]
        sig = torch.cat([torch.bmm(Qo, Qo.transpose(1, 2)).reshape(n, -1), torch.bmm(Qi, Qi.transpose(1, 2)).reshape(n, -1)], 1)
        parts.append(sig.to(F64).cpu())
    return torch.cat(parts, dim=1) if parts else torch.zeros(n, 0, dtype=F64)


def _spread(modules: list[ModuleSpec], k: int) -> list[ModuleSpec]:
    if k <= 0 or k >= len(modules):
        return list(modules)
    step = len(modules) / k
    return [modules[int(i * step)] for i in range(k)]


def compress(
    collection: AdapterCollection,
    rank: int,
    *,
    method: str = "full",
    num_clusters: int = 1,
    weights: str = "relative",
    max_iter: int = 50,
    tol: float = 1e-6,
    max_rounds: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    signature_modules: int = 4,
    warmup_rounds: int = 5,
    restarts: int = 1,
    max_moves: int = 4,
    move_rounds: int = 1,
    init_assignment: torch.Tensor | None = None,
    cluster_range: tuple[int, int] | None = None,
    tradeoff: float = 1.0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    team: ModuleTeam = SOLO,
    module_hook: Callable | None = None,
) -> CompressedCollection:
    """Compress a collection jointly: ``K`` clusters, JD-Full or JD-Diag per (cluster, module).

    * ``method``: ``"full"`` or ``"diag"`` (``"svd"``/``"none"`` dispatch to the
      baselines, ignoring clustering arguments).
    * ``num_clusters``: ``1 <= K <= n``; ``K = n`` gives every adapter its own
      cluster. ``"auto"``: picked from ``cluster_range`` (``(low, high)``,
      default ``(1, min(n, 64))``) by the error-per-byte ``tradeoff`` (see
      :mod:`~jdlora_ops.compress.cluster_count`); the curve it saw goes to
      ``metadata["cluster_count"]``.
    * The partition is searched on ``signature_modules`` modules spread over
      the model (all of them when there are no more), where the summed JD
      objective is cheap to evaluate (see
      :mod:`~jdlora_ops.compress.partition_search`): spectral clustering of
      subspace affinities with ``restarts`` k-means seeds per view, each
      candidate scored by a JD fit, the best refined by up to
      ``warmup_rounds`` fit/reassign rounds, then up to ``max_moves``
      split-and-dissolve moves (each followed by ``move_rounds`` rounds), kept
      only when they lower the objective. ``init_assignment`` skips the search.
    * Then fit/reassign rounds over all modules: ``max_rounds`` caps them, i.e.
      the passes over the data, and they stop early when moving adapters would
      lower the objective by at most ``tol`` times ``sum w_i ||dW_i||^2`` (a
      pass over the data is not worth less). Moves not applied are recorded in
      the history (the result stays consistent with the last fit). The
      objective never rises from round to round.
    * ``max_iter``, ``tol``: per-(cluster, module) JD stopping rule (see
      :func:`~jdlora_ops.compress.jd.jd_full`).
    * ``weights``: ``"relative"`` or ``"uniform"``; also decides whether
      reassignment compares summed relative or absolute errors.
    * ``dtype``: compute dtype (float32/float64); factors are converted as
      each module is read.
    * ``team``: the processes sharing the work module by module (see
      :mod:`~jdlora_ops.compress.distributed`); the partition and every sum are
      bitwise those of one process, and ``modules`` (and ``metadata["ranks"]``)
      hold this process's modules only.

    * ``module_hook(spec, members, parts, module)``: called for each of this
      process's modules in every round of the final fit, once the module is
      fitted, with the adapters of each cluster (``members[k]``, positions in
      the collection), their factors (``parts[k]``) and the fitted
      :class:`CompressedModule` (clusters not yet renumbered); for work that
      needs every adapter's factors beside the final tables, without a pass of
      its own. The last round's calls describe the returned tables.

    Raises ``ValueError`` (naming the argument, the expected and the actual
    value) for a rank a module cannot hold, ``K`` outside ``[1, n]``, an empty
    collection, duplicate adapter names, an adapter whose update is zero on
    every module, or an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    names = list(collection.adapter_names)
    n = len(names)
    if n == 0:
        raise ValueError("the collection holds no adapters")
    _check_unique(names)
    if method == "svd":
        return compress_svd(collection, rank, dtype=dtype, device=device, progress=progress)
    if method == "none":
        return compress_none(collection, dtype=dtype, device=device, progress=progress)
    auto = num_clusters == "auto"
    if auto:
        low, high = cluster_range if cluster_range is not None else (1, min(n, 64))
        counts = candidate_counts(int(low), int(high))
        if high > n:
            raise ValueError(f"cluster range (--clusters-range) must lie in [1, {n}] (the number of adapters), "
                             f"got {low}:{high}")
        num_clusters = counts[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= n:
        raise ValueError(
            f"num_clusters (--clusters) must be an integer from 1 to the number of adapters ({n}), got {num_clusters!r}"
        )
    if weights not in ("relative", "uniform"):
        raise ValueError(f"weights must be 'relative' or 'uniform', got {weights!r}")
    specs = list(collection.modules)
    if not specs:
        raise ValueError("the collection has no modules")
    for spec in specs:
        check_rank(rank, spec.d_out, spec.d_in, f"module {spec.name}")
    say = log or (lambda _msg: None)
    device = torch.device(device)
    K = num_clusters
    opts = dict(rank=rank, method=method, weights=weights, max_iter=max_iter, tol=tol, seed=seed, dtype=dtype,
                device=device, team=team)

    search = None
    count_curve = None
    if auto and init_assignment is None:
        subset = _spread(specs, signature_modules)
        choice = choose_num_clusters(
            collection, rank, counts, tradeoff=tradeoff, subset=subset, method=method, seed=seed, dtype=dtype,
            device=device, log=say, team=team,
            fit_subset=lambda k: (lambda start, rounds, warm: _fit_rounds(collection, subset, start, k, rounds, warm,
                                                                          **opts)[0]),
            search_options=dict(restarts=restarts, refine_rounds=warmup_rounds, move_rounds=move_rounds,
                                max_moves=max_moves),
        )
        K = choice.clusters
        init_assignment = choice.assignment
        count_curve = [p.as_dict() for p in choice.curve]
        say(f"chose {K} clusters from {counts} (tradeoff {tradeoff:g})")
    if init_assignment is not None:
        assign = torch.as_tensor(init_assignment, dtype=torch.long).clone()
        if assign.shape != (n,) or int(assign.min()) < 0 or int(assign.max()) >= K:
            raise ValueError(f"init_assignment must be [{n}] integers in [0, {K}), got shape {tuple(assign.shape)}")
        assign = fill_empty(assign, torch.zeros(n), K)
    elif K == 1:
        assign = torch.zeros(n, dtype=torch.long)
    elif K == n:
        assign = torch.arange(n)
    else:
        t = time.perf_counter()
        subset = _spread(specs, signature_modules)
        aff = subspace_affinities(collection, subset, rank=rank, seed=seed, dtype=dtype, device=device, team=team)
        say(f"subspace affinities of {n} adapters on {len(subset)} modules in {time.perf_counter() - t:.1f} s")

        def fit_subset(start: torch.Tensor, rounds: int, warm: dict | None) -> Trial:
            return _fit_rounds(collection, subset, start, K, rounds, warm, **opts)[0]

        search = search_partition(aff, K, fit_subset, seed=seed, restarts=restarts, refine_rounds=warmup_rounds,
                                  move_rounds=move_rounds, max_moves=max_moves, log=say)
        assign = search.best.assignment
        say(f"cluster search on {len(subset)} modules: objective {search.best.objective:.6g} in "
            f"{search.seconds:.1f} s")

    trial, history, out_modules, ranks = _fit_rounds(
        collection, specs, assign, K, max(1, int(max_rounds)), None, keep=True, say=say, progress=progress,
        module_hook=module_hook, **opts
    )
    assign = trial.assignment
    check_nonzero(names, trial.norms)

    # Drop clusters that ended empty and renumber the rest.
    used = torch.unique(assign)
    remap = torch.full((K,), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    if used.numel() < K:
        for cm in out_modules.values():
            cm.U = cm.U[used].contiguous()
            cm.Vt = cm.Vt[used].contiguous()
    md = dict(getattr(collection, "metadata", {}) or {})
    md["ranks"] = ranks
    md["compressor"] = {
        "max_iter": max_iter,
        "tol": tol,
        "max_rounds": max_rounds,
        "seed": seed,
        "dtype": str(dtype).replace("torch.", ""),
        "requested_clusters": "auto" if auto else num_clusters,
    }
    if count_curve is not None:
        md["cluster_count"] = {"tradeoff": tradeoff, "curve": count_curve, "chosen": K}
    if search is not None:
        md["cluster_search"] = {"view": search.view, "seconds": round(search.seconds, 3), "steps": search.steps}
    return CompressedCollection(
        method, rank, names, remap[assign], int(used.numel()), out_modules, weights=weights, metadata=md, history=history
    )


def _check_unique(names: list[str]) -> None:
    seen: set[str] = set()
    dup = sorted({x for x in names if x in seen or seen.add(x)})
    if dup:
        raise ValueError(f"adapter names must be unique; repeated: {', '.join(map(repr, dup))}")


def _fit_rounds(collection, specs, assign, K, rounds, warm, *, rank, method, weights, max_iter, tol, seed, dtype,
                device, keep=False, say=None, progress=False, team=SOLO, module_hook=None):
    """Fit/reassign rounds over ``specs`` from ``assign``, at most ``rounds`` fits.

    Each round reads every module once: JD per cluster (warm-started from the
    previous round's bases), then every adapter's cost under every cluster.
    Adapters then move to their cheapest cluster; rounds end when none moves.
    The returned :class:`Trial` describes the last fit (its partition, objective
    and costs); with ``keep`` the assembled modules, history and ranks come too
    (of ``team``'s local modules only when it has several processes).
    """
    say = say or (lambda _msg: None)
    n = assign.numel()
    warm = dict(warm or {})
    history: list[dict] = []
    ranks: dict[str, list[int]] = {}
    out_modules: dict[str, CompressedModule] = {}
    mine = team.local(specs, n)
    for rnd in range(rounds):
        t_round = time.perf_counter()
        members = [(assign == k).nonzero().flatten() for k in range(K)]
        it = [(mi, specs[mi]) for mi in mine]
        if progress and team.is_root:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"round {rnd + 1}", unit="module", leave=False)
        fitted = (_fit_module(collection, mi, spec, assign, members, K, warm, rank=rank, method=method,
                              weights=weights, max_iter=max_iter, tol=tol, seed=seed, dtype=dtype, device=device,
                              keep=keep and rnd == 0, ranks=ranks, out_modules=out_modules if keep else None,
                              module_hook=module_hook)
                  for mi, spec in it)
        sums = team.ordered_sum(fitted, n * K + 2 * n + 3, team.holders(specs, n))
        cost = sums[: n * K].view(n, K)
        norms, scale = sums[n * K : n * K + n], sums[n * K + n : n * K + 2 * n]
        objective, total, inner = (float(x) for x in sums[n * K + 2 * n :])
        entry = {"round": rnd + 1, "objective": objective, "jd_iterations": int(inner),
                 "seconds": time.perf_counter() - t_round}
        if K == 1:
            entry["moved"] = 0
            history.append(entry)
            trial = Trial(assign, objective, cost, total, assign, warm, rnd + 1)
            break
        own = cost.gather(1, assign[:, None]).squeeze(1)
        best_cost, best = cost.min(dim=1)
        # Differences at the rounding level of an adapter's own scale are ties, not moves
        # (an exactly fitted adapter would otherwise wander between clusters on noise).
        stay = own <= best_cost * (1 + 1e-9) + 100 * eps_of(dtype) * scale
        new = torch.where(stay, assign, best)
        new = fill_empty(new, cost.gather(1, new[:, None]).squeeze(1), K)
        moved = int((new != assign).sum())
        gain = float((own - cost.gather(1, new[:, None]).squeeze(1)).sum())
        entry["moved"] = moved
        entry["cost"] = float(own.sum())
        history.append(entry)
        if keep:
            say(f"round {rnd + 1}: objective {objective:.6g}, {moved} adapters would move (gain {gain:.3g}), "
                f"{entry['seconds']:.1f} s")
        trial = Trial(assign, objective, cost, total, new, warm, rnd + 1)
        if moved == 0:
            break
        if gain <= tol * total and not bool(torch.isinf(own).any()):
            # The JD stopping rule's scale: another pass over every module would gain less than
            # one more JD iteration is allowed to, so the moves are not worth their cost.
            entry["moved"] = 0
            entry["moves_not_applied"] = moved
            if keep:
                say(f"stopping: moving would lower the objective by {gain:.3g} <= tol x {total:.6g}")
            break
        if rnd + 1 == rounds:
            # At the cap the fitted bases and cores belong to the current assignment; moving
            # adapters now would need one more pass over the data, so the moves are dropped.
            entry["moved"] = 0
            entry["moves_not_applied"] = moved
            if keep:
                say("round cap reached; keeping the last fitted assignment")
            break
        # A cluster that was empty has no bases to warm-start from.
        for k in range(K):
            if members[k].numel() == 0:
                for mi in range(len(specs)):
                    warm.pop((mi, k), None)
        assign = new
    trial.norms, trial.scale = norms, scale
    return trial, history, out_modules, ranks


def _fit_module(collection, mi, spec, assign, members, K, warm, *, rank, method, weights, max_iter, tol, seed, dtype,
                device, keep, ranks, out_modules, module_hook=None) -> torch.Tensor:
    """One module of a round: JD per cluster, then every adapter's cost under every cluster.

    Returns the module's flat contribution to the round's sums (see
    :func:`_fit_rounds`): costs ``[n, K]``, ``||dW_i||^2``, ``w_i ||dW_i||^2``,
    the objective, the objective of fitting nothing and the JD iterations.
    """
    fit = jd_full if method == "full" else jd_diag
    n = assign.numel()
    f = collection.load_module(spec, dtype=dtype, device=device)
    if keep:
        ranks[spec.name] = f.ranks().tolist()
    parts = f.partition(assign, K) if K > 1 else [f]
    del f
    cost = torch.zeros(n, K, dtype=F64)
    norms = torch.zeros(n, dtype=F64)
    scale = torch.zeros(n, dtype=F64)
    objective = total = inner = 0.0
    results: list[JDResult | None] = [None] * K
    for k in range(K):
        if members[k].numel() == 0:
            continue
        res = fit(
            parts[k], rank, weights=weights, max_iter=max_iter, tol=tol,
            seed=seed * 1_000_003 + mi * 1009 + k, dtype=dtype, device=device, init=warm.get((mi, k)),
        )
        warm[(mi, k)] = (res.U, res.V)
        results[k] = res
        inner += res.iterations
        objective += res.history[-1]
        total += float((res.weights.to(F64) * res.norms_sq.to(F64)).sum())
        norms[members[k]] = res.norms_sq.to(F64).cpu()
        scale[members[k]] = (res.weights.to(F64) * res.norms_sq.to(F64)).cpu()
    U = torch.stack([r.U if r is not None else torch.zeros(spec.d_out, rank, dtype=dtype, device=device)
                     for r in results])
    V = torch.stack([r.V if r is not None else torch.zeros(spec.d_in, rank, dtype=dtype, device=device)
                     for r in results])
    if out_modules is not None:
        out_modules[spec.name] = _assemble(spec, n, K, rank, method, results, members, dtype, device)
    # Costs under every cluster's bases (with K = 1 too: they are the per-adapter errors).
    valid = torch.tensor([r is not None for r in results])
    for k in range(K):
        if members[k].numel() == 0:
            continue
        ev = evaluate_clusters(parts[k], U, V, method, valid=valid)
        c = relative(ev.errors, ev.norms_sq) if weights == "relative" else ev.errors
        cost[members[k]] = c.cpu()
    if module_hook is not None and out_modules is not None:
        module_hook(spec, members, parts, out_modules[spec.name])
    return torch.cat([cost.reshape(-1), norms, scale, torch.tensor([objective, total, inner], dtype=F64)])


def _assemble(spec, n, K, rank, method, results, members, dtype, device) -> CompressedModule:
    U = torch.zeros(K, spec.d_out, rank, dtype=dtype, device=device)
    Vt = torch.zeros(K, rank, spec.d_in, dtype=dtype, device=device)
    sig_shape = (rank, rank) if method == "full" else (rank,)
    sigma = torch.zeros(n, *sig_shape, dtype=dtype, device=device)
    norms = torch.zeros(n, dtype=dtype, device=device)
    errors = torch.zeros(n, dtype=dtype, device=device)
    rel = torch.zeros(n, dtype=dtype, device=device)
    for k, res in enumerate(results):
        if res is None:
            continue
        idx = members[k].to(device)
        U[k] = res.U
        Vt[k] = res.V.t()
        sigma[idx] = res.sigma
        norms[idx] = res.norms_sq.to(dtype)
        errors[idx] = res.errors.to(dtype)
        rel[idx] = res.rel_errors.to(dtype)
    return CompressedModule(spec, U, Vt, sigma, norms, errors, rel)
