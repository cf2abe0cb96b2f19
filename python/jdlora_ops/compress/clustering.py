"""Clustered joint compression of a whole collection, streamed module by module.

Each adapter belongs to one of ``K`` clusters, the same for all of its modules;
each (cluster, module) has its own bases. The objective is summed over modules:
``sum_m sum_i w_im ||dW_im - U_{c(i),m} Sigma_im V_{c(i),m}^T||^2``. A round reads
every module once: it fits JD per cluster (warm-started from the previous
round's bases), then scores every adapter under every cluster's bases. After the
round each adapter moves to the cluster with the lowest summed cost; rounds
repeat until no adapter moves (or ``max_rounds``). Both steps lower the
objective, so it decreases from round to round like k-means.

Only one module's factors are in memory at a time; the bases and cores of all
modules are kept (they are the output).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ._linalg import F64
from .collection import AdapterCollection, CallableCollection, ModuleSpec
from .jd import JDResult, check_rank, jd_diag, jd_full
from .projection import evaluate_clusters, relative
from .result import METHODS, CompressedCollection, CompressedModule

__all__ = ["compress", "adapter_signatures", "kmeans"]


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
    from .baselines import truncated_svd

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


def kmeans(X: torch.Tensor, K: int, *, seed: int = 0, iters: int = 50) -> torch.Tensor:
    """k-means++ seeding and Lloyd iterations; int64 labels ``[n]`` in ``[0, K)``.

    Deterministic for a given ``seed``. Every cluster is non-empty when
    ``K <= n`` (an emptied cluster takes the point farthest from its centre).
    """
    X = X.to(F64)
    n = X.shape[0]
    if K >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(int(seed) + 104729)
    centers = [int(torch.randint(n, (1,), generator=gen))]
    d2 = (X - X[centers[0]]).square().sum(1)
    for _ in range(1, K):
        p = d2.clone()
        p[centers] = 0
        if float(p.sum()) <= 0:
            p = torch.ones(n, dtype=F64)
            p[centers] = 0
        c = int(torch.multinomial(p, 1, generator=gen))
        centers.append(c)
        d2 = torch.minimum(d2, (X - X[c]).square().sum(1))
    C = X[centers].clone()
    labels = torch.cdist(X, C).argmin(1)
    for _ in range(iters):
        for k in range(K):
            members = labels == k
            if bool(members.any()):
                C[k] = X[members].mean(0)
        dist = torch.cdist(X, C)
        new = dist.argmin(1)
        new = _fill_empty(new, dist.gather(1, new[:, None]).squeeze(1), K)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _fill_empty(labels: torch.Tensor, cost: torch.Tensor, K: int) -> torch.Tensor:
    """Give every empty cluster the costliest point of a cluster that has two or more."""
    labels = labels.clone()
    cost = cost.clone().to(F64)
    for k in range(K):
        if bool((labels == k).any()):
            continue
        counts = torch.bincount(labels, minlength=K)
        movable = counts[labels] >= 2
        if not bool(movable.any()):
            break
        c = torch.where(movable, cost, torch.full_like(cost, -float("inf")))
        i = int(c.argmax())
        labels[i] = k
        cost[i] = -float("inf")
    return labels


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


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
    init_assignment: torch.Tensor | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> CompressedCollection:
    """Compress a collection jointly: ``K`` clusters, JD-Full or JD-Diag per (cluster, module).

    * ``method``: ``"full"`` or ``"diag"`` (``"svd"``/``"none"`` dispatch to the
      baselines, ignoring clustering arguments).
    * ``num_clusters``: ``K >= 1``; ``K >= n`` gives every adapter its own
      cluster. Clusters are initialised by k-means++ over
      :func:`adapter_signatures` of ``signature_modules`` modules spread over
      the model (on the column-space part, the row-space part and both; the
      partition with the lowest JD objective on those modules wins), refined
      by up to ``warmup_rounds`` fit/reassign rounds on those modules alone
      (cheap, and close to the full objective), or taken from
      ``init_assignment``.
    * ``max_iter``, ``tol``: per-(cluster, module) JD stopping rule (see
      :func:`~jdlora_ops.compress.jd.jd_full`); ``max_rounds``: cap on the
      fit/reassign rounds, i.e. on passes over the data. If adapters would
      still move after the last round, the moves are not applied (the result
      stays consistent with the last fit) and the history says so.
    * ``weights``: ``"relative"`` or ``"uniform"``; also decides whether
      reassignment compares summed relative or absolute errors.
    * ``dtype``: compute dtype (float32/float64); factors are converted as
      each module is read.

    Raises ``ValueError`` for a rank a module cannot hold, ``K < 1``, an
    empty collection or an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "svd":
        from .baselines import compress_svd

        return compress_svd(collection, rank, dtype=dtype, device=device, progress=progress)
    if method == "none":
        from .baselines import compress_none

        return compress_none(collection, dtype=dtype, device=device, progress=progress)
    if not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"the number of clusters must be an integer >= 1, got {num_clusters!r}")
    if weights not in ("relative", "uniform"):
        raise ValueError(f"weights must be 'relative' or 'uniform', got {weights!r}")
    names = list(collection.adapter_names)
    n = len(names)
    if n == 0:
        raise ValueError("the collection holds no adapters")
    specs = list(collection.modules)
    if not specs:
        raise ValueError("the collection has no modules")
    for spec in specs:
        check_rank(rank, spec.d_out, spec.d_in, f"module {spec.name}")
    say = log or (lambda _msg: None)
    device = torch.device(device)

    K = min(num_clusters, n)
    if init_assignment is not None:
        assign = torch.as_tensor(init_assignment, dtype=torch.long).clone()
        if assign.shape != (n,) or int(assign.min()) < 0 or int(assign.max()) >= K:
            raise ValueError(f"init_assignment must be [n] integers in [0, {K})")
        assign = _fill_empty(assign, torch.zeros(n), K)
    elif K == 1:
        assign = torch.zeros(n, dtype=torch.long)
    elif K == n:
        assign = torch.arange(n)
    else:
        t = time.perf_counter()
        subset = _spread(specs, signature_modules)
        sig = adapter_signatures(collection, modules=subset, rank=rank, seed=seed, dtype=dtype, device=device)
        sides = sig.view(n, len(subset), 2, -1)
        # Which of the two subspaces should group adapters depends on the collection (in real
        # LoRA collections A stays close to its seed's initialisation, so row spaces group by
        # seed while column spaces group by task). Cluster on each view and on both, and keep
        # the partition whose JD fit on the signature modules has the lowest objective.
        candidates: dict[str, torch.Tensor] = {}
        for view, X in (("column and row spaces", sig), ("column spaces", sides[:, :, 0].reshape(n, -1)),
                        ("row spaces", sides[:, :, 1].reshape(n, -1))):
            lab = kmeans(X, K, seed=seed)
            if not any(_same_partition(lab, c) for c in candidates.values()):
                candidates[view] = lab
        sub = CallableCollection(names, subset, lambda spec, dt, dev: collection.load_module(spec, dtype=dt, device=dev))
        scores = {}
        if len(candidates) > 1:
            for view, lab in candidates.items():
                trial = compress(
                    sub, rank, method=method, num_clusters=K, weights=weights, max_iter=max_iter, tol=tol,
                    max_rounds=1, seed=seed, dtype=dtype, device=device, init_assignment=lab, warmup_rounds=0,
                )
                scores[view] = trial.history[0]["objective"]
        best = min(scores, key=scores.get) if scores else next(iter(candidates))
        assign = candidates[best]
        say(f"initial clusters: k-means++ on signatures of {best} ({len(subset)} modules; objectives "
            + ", ".join(f"{k}: {v:.5g}" for k, v in scores.items()) + f") in {time.perf_counter() - t:.1f} s")
        if warmup_rounds > 0 and len(subset) < len(specs):
            t = time.perf_counter()
            pre = compress(
                sub, rank, method=method, num_clusters=K, weights=weights, max_iter=max_iter, tol=tol,
                max_rounds=warmup_rounds, seed=seed, dtype=dtype, device=device, init_assignment=assign,
            )
            assign = pre.assignment
            say(f"refined the clusters on {len(subset)} modules in {len(pre.history)} rounds, "
                f"{time.perf_counter() - t:.1f} s")

    fit = jd_full if method == "full" else jd_diag
    warm: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    history: list[dict] = []
    ranks: dict[str, list[int]] = {}
    out_modules: dict[str, CompressedModule] = {}
    rounds = max(1, int(max_rounds))
    for rnd in range(rounds):
        t_round = time.perf_counter()
        cost = torch.zeros(n, K, dtype=F64)
        members = [(assign == k).nonzero().flatten() for k in range(K)]
        inner = 0
        objective = 0.0
        it = specs
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(specs, desc=f"round {rnd + 1}", unit="module", leave=False)
        for mi, spec in enumerate(it):
            f = collection.load_module(spec, dtype=dtype, device=device)
            if rnd == 0:
                ranks[spec.name] = f.ranks().tolist()
            parts = f.partition(assign, K) if K > 1 else [f]
            del f
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
            out_modules[spec.name] = _assemble(spec, n, K, rank, method, results, members, dtype, device)
            if K > 1:
                valid = torch.tensor([r is not None for r in results])
                U = out_modules[spec.name].U
                V = out_modules[spec.name].Vt.transpose(1, 2)
                for k in range(K):
                    if members[k].numel() == 0:
                        continue
                    ev = evaluate_clusters(parts[k], U, V, method, valid=valid)
                    c = relative(ev.errors, ev.norms_sq) if weights == "relative" else ev.errors
                    cost[members[k]] += c.cpu()
            del parts
        entry = {"round": rnd + 1, "objective": objective, "jd_iterations": inner, "seconds": time.perf_counter() - t_round}
        if K == 1:
            entry["moved"] = 0
            history.append(entry)
            break
        own = cost.gather(1, assign[:, None]).squeeze(1)
        best_cost, best = cost.min(dim=1)
        stay = own <= best_cost * (1 + 1e-9) + 1e-300
        new = torch.where(stay, assign, best)
        new = _fill_empty(new, cost.gather(1, new[:, None]).squeeze(1), K)
        moved = int((new != assign).sum())
        entry["moved"] = moved
        entry["cost"] = float(own.sum())
        history.append(entry)
        say(f"round {rnd + 1}: objective {objective:.6g}, {moved} adapters would move, {entry['seconds']:.1f} s")
        if moved == 0:
            break
        if rnd + 1 == rounds:
            # At the cap the fitted bases and cores belong to the current assignment; moving
            # adapters now would need one more pass over the data, so the moves are dropped.
            entry["moved"] = 0
            entry["moves_not_applied"] = moved
            say("round cap reached; keeping the last fitted assignment")
            break
        fresh = [k for k in range(K) if members[k].numel() == 0 and bool((new == k).any())]
        for k in fresh:
            for mi in range(len(specs)):
                warm.pop((mi, k), None)
        assign = new

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
        "requested_clusters": num_clusters,
    }
    return CompressedCollection(
        method, rank, names, remap[assign], int(used.numel()), out_modules, weights=weights, metadata=md, history=history
    )


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
