"""Choosing the clusters of a clustered JD: subspace affinities, spectral restarts, moves.

Fit/reassign rounds (k-means on the JD objective) only ever move one adapter at a
time to the cluster that already fits it best, so they stop in local minima: a
cluster that holds two true groups keeps them (neither group fits elsewhere
better), and a cluster of one adapter of rank <= r has zero error and never
empties. Three things get out of them:

* **An initialisation that sees the subspaces.** Two adapters can share bases
  exactly when their column spaces and their row spaces overlap. Per module, the
  affinity of adapters ``i`` and ``j`` is the normalised inner product of the
  soft projectors ``C_i = sum_t (s_t / s_1) u_t u_t^T`` onto their dominant
  column spaces (the squared cosines of the principal angles, weighted by the
  singular values), and the same for the row spaces. Bases wider than the sketch
  are compared after a Gaussian sketch to ``sketch_dim`` dimensions (the QR of
  the sketched basis keeps the comparison about subspaces); at most
  ``_AFFINITY_RANK`` directions per adapter count. For ``n`` adapters this costs
  ``O((n k)^2 sketch_dim)`` per module side, a few seconds for ``n = 1000``.
  Spectral clustering of the affinity matrix (normalised, top-``K``
  eigenvectors, rows normalised, k-means++) gives the candidate partitions.
* **Restarts scored by the true objective.** Several views of the affinities
  (column and row spaces together, each alone) and k-means seeds give
  candidates; each is scored by a JD fit of the summed objective, and the best
  one is refined by fit/reassign rounds.
* **Moves.** Split a cluster with a large error in two and free a cluster id
  for the second half, then refit. The id is freed by dissolving the cluster
  that is cheapest to dissolve (its members go to the clusters that fit them
  next best; a cluster of one is usually the cheapest), or by merging into the
  split cluster the one that fits its members next best (two clusters that
  share two groups then trade them). The split follows the members'
  affinities (spectral, two ways) or their costs under a refit of the changed
  cluster (the worst-fitted members leave). Clusters are tried from the
  costliest down. A move is kept only if the refitted objective is lower, so
  the objective of the kept partitions falls strictly; the search stops when
  no candidate move lowers it or after ``max_moves`` tries.

Everything is deterministic for a seed. The caller supplies the fit: a function
from a partition to a :class:`Trial`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ._linalg import F64
from .baselines import truncated_svd
from ._team import SOLO, ModuleTeam

__all__ = ["Trial", "SearchResult", "kmeans", "fill_empty", "same_partition", "subspace_affinities",
           "spectral_embedding", "search_partition"]

# Directions per adapter and module that enter the affinities. The dominant ones decide
# which adapters can share bases; more make the (n k)^2 Gram product dearer.
_AFFINITY_RANK = 8
# Floor added to every affinity so that the graph stays connected (an adapter with no
# update on the sampled modules would otherwise be a component of its own).
_AFFINITY_FLOOR = 1e-6
# Upper bound on elements of one chunk of the (n k) x (n k) Gram product.
_CHUNK_ELEMS = 1 << 24


@dataclass
class Trial:
    """A partition and its fit.

    ``assignment``: the partition that was fitted; ``objective``: its summed
    weighted JD error; ``cost``: float64 ``[n, K]`` cost of every adapter under
    every cluster's fitted bases; ``total``: the objective of reconstructing
    nothing (``sum w_i ||dW_i||^2``), the scale for tolerances; ``proposed``:
    the reassignment the fit suggests (equal to ``assignment`` when no adapter
    would move); ``warm``: the fitted bases, to warm-start a continuation;
    ``rounds``: fit rounds spent; ``norms``: float64 ``[n]`` ``||dW_i||^2``
    summed over the fitted modules; ``scale``: float64 ``[n]`` each adapter's
    share of ``total``.
    """

    assignment: torch.Tensor
    objective: float
    cost: torch.Tensor
    total: float
    proposed: torch.Tensor
    warm: dict = field(default_factory=dict)
    rounds: int = 1
    norms: torch.Tensor | None = None
    scale: torch.Tensor | None = None


#: ``fit(assignment, max_rounds, warm) -> Trial``: fit/reassign rounds from ``assignment``.
Fitter = Callable[[torch.Tensor, int, dict | None], Trial]


@dataclass
class SearchResult:
    best: Trial
    view: str
    steps: list[dict]
    seconds: float


# ------------------------------------------------------------- small tools
def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to renaming the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def fill_empty(labels: torch.Tensor, cost: torch.Tensor, K: int) -> torch.Tensor:
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
        new = fill_empty(new, dist.gather(1, new[:, None]).squeeze(1), K)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


# ------------------------------------------------------------- affinities
def _side_affinity(U: torch.Tensor, w: torch.Tensor, sketch: torch.Tensor | None) -> torch.Tensor:
    """``[n, n]`` normalised inner products of the soft projectors ``U_i diag(w_i) U_i^T``."""
    n, _, k = U.shape
    if sketch is not None:
        # Orthonormalising the sketched basis keeps the comparison about subspaces: a
        # Gaussian sketch is only nearly an isometry.
        U = torch.linalg.qr(torch.matmul(sketch.t(), U))[0]
    Z = U * w.sqrt()[:, None, :]
    flat = Z.transpose(1, 2).reshape(n * k, -1)
    out = torch.empty(n, n, dtype=F64)
    step = max(1, _CHUNK_ELEMS // max(1, k * n * k))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        G = flat[lo * k : hi * k] @ flat.t()
        out[lo:hi] = G.view(hi - lo, k, n, k).square().sum(dim=(1, 3)).to(F64).cpu()
    norm = w.to(F64).square().sum(1).sqrt().cpu()
    scale = norm[:, None] * norm[None, :]
    return torch.where(scale > 0, out / scale.clamp_min(torch.finfo(F64).tiny), torch.zeros_like(out))


def subspace_affinities(
    collection,
    modules,
    *,
    rank: int,
    sketch_dim: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    team: ModuleTeam = SOLO,
) -> dict[str, torch.Tensor]:
    """Affinities of adapters' dominant subspaces, averaged over ``modules``.

    Returns float64 ``[n, n]`` matrices in ``[0, 1]`` for three views:
    ``"column and row spaces"`` (per module the product of the two, so a pair
    scores high only where both subspaces overlap), ``"column spaces"`` and
    ``"row spaces"``. See the module docstring. ``team`` shares the modules among processes
    with the same result bitwise.
    """
    n = len(collection.adapter_names)
    modules = list(modules)
    gen = torch.Generator().manual_seed(int(seed) + 7919)

    def sketch(d):
        if d <= sketch_dim:
            return None
        return torch.randn(d, sketch_dim, generator=gen, dtype=torch.float32) / sketch_dim**0.5

    # Drawn for every module in module order, so that each process's modules get the sketches
    # one process would give them.
    sketches = [(sketch(spec.d_out), sketch(spec.d_in)) for spec in modules]

    def per_module():
        for i in team.local(modules, n):
            f = collection.load_module(modules[i], dtype=dtype, device=device)
            k = max([1] + [min(rank, _AFFINITY_RANK, g.rank) for g in f.groups])
            U, s, V, _, _ = truncated_svd(f, k)
            del f
            w = s / s[:, :1].clamp_min(torch.finfo(s.dtype).tiny)
            g_out, g_in = (None if G is None else G.to(dtype=U.dtype, device=U.device) for G in sketches[i])
            a_out = _side_affinity(U, w, g_out)
            a_in = _side_affinity(V, w, g_in)
            yield torch.stack([a_out * a_in, a_out, a_in])

    both, col, row = team.ordered_sum(per_module(), 3 * n * n, team.holders(modules, n)).view(3, n, n)
    m = max(1, len(modules))
    return {"column and row spaces": both / m, "column spaces": col / m, "row spaces": row / m}


def spectral_embedding(W: torch.Tensor, K: int) -> torch.Tensor:
    """Rows of the top-``K`` eigenvectors of ``D^-1/2 W D^-1/2``, normalised (``[n, K]``)."""
    W = W.to(F64)
    W = (W + W.t()) / 2 + _AFFINITY_FLOOR
    W.fill_diagonal_(1.0 + _AFFINITY_FLOOR)
    d = W.sum(1).rsqrt()
    _, X = torch.linalg.eigh(d[:, None] * W * d[None, :])
    X = X[:, -K:]
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _split_in_two(W: torch.Tensor, members: torch.Tensor, seed: int) -> torch.Tensor:
    """Bool mask over ``members``: the second half of a spectral 2-way split."""
    m = members.numel()
    if m <= 2:
        return torch.arange(m) >= 1
    lab = kmeans(spectral_embedding(W[members][:, members], 2), 2, seed=seed)
    return lab == 1


# ------------------------------------------------------------- search
def _better(new: float, old: float, tol: float) -> bool:
    return new < old - tol


def search_partition(
    affinities: dict[str, torch.Tensor],
    K: int,
    fit: Fitter,
    *,
    seed: int = 0,
    restarts: int = 1,
    refine_rounds: int = 5,
    move_rounds: int = 1,
    max_moves: int = 4,
    rtol: float = 1e-9,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Best partition found from spectral candidates and moves (see the module docstring).

    ``restarts``: k-means seeds per affinity view; ``refine_rounds``: fit/reassign
    rounds for the winning candidate; ``move_rounds``: rounds after each move;
    ``max_moves``: moves tried in all (kept or not); ``rtol``: a move must lower
    the objective by more than ``rtol`` times the objective of fitting nothing.
    """
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    steps: list[dict] = []
    candidates: list[tuple[str, torch.Tensor]] = []
    for view, W in affinities.items():
        X = spectral_embedding(W, K)
        for r in range(max(1, restarts)):
            lab = kmeans(X, K, seed=seed * 7 + r)
            if not any(same_partition(lab, c) for _, c in candidates):
                candidates.append((view, lab))
    scored: list[tuple[Trial, str]] = []
    clock = time.perf_counter()

    def lap() -> float:
        nonlocal clock
        now = time.perf_counter()
        spent, clock = now - clock, now
        return round(spent, 3)

    for view, lab in candidates:
        trial = fit(lab, 1, None)
        scored.append((trial, view))
        steps.append({"step": "candidate", "view": view, "objective": trial.objective, "seconds": lap()})
    best, view = min(scored, key=lambda tv: tv[0].objective)
    say(f"cluster search: {len(candidates)} spectral candidates, best from {view} (objective {best.objective:.6g})")
    if not torch.equal(best.proposed, best.assignment) and refine_rounds > 0:
        refined = fit(best.proposed, refine_rounds, best.warm)
        if refined.objective <= best.objective:
            best = refined
    steps.append({"step": "refined", "objective": best.objective, "rounds": best.rounds, "seconds": lap()})
    tol = rtol * max(best.total, 0.0)
    W = affinities[view]

    tries = 0
    while tries < max_moves:
        if not torch.equal(best.proposed, best.assignment):
            # The last refinement stopped at its round cap with adapters still wanting to move.
            tries += 1
            trial = fit(best.proposed, move_rounds, best.warm)
            kept = _better(trial.objective, best.objective, tol)
            steps.append({"step": "reassign", "objective": trial.objective, "kept": kept, "seconds": lap()})
            if kept:
                best = trial
                continue
            best.proposed = best.assignment  # tried once; asking again would repeat the same fit
        own = best.cost.gather(1, best.assignment[:, None]).squeeze(1)
        per_cluster = torch.bincount(best.assignment, weights=own, minlength=K)
        sizes = torch.bincount(best.assignment, minlength=K)
        order = [int(c) for c in torch.argsort(per_cluster, descending=True, stable=True)
                 if sizes[c] >= 2 and per_cluster[c] > tol]
        kept = False
        proposals = [(c, how) for c in order for how in ("affinity", "cost", "pair")]
        for c, how in proposals:
            if tries >= max_moves:
                break
            tries += 1
            proposal, freed = _propose(best, W, c, K, how, seed + tries, fit)
            if proposal is None:
                continue
            warm = {key: v for key, v in best.warm.items() if key[1] not in (c, freed)}
            trial = fit(proposal, move_rounds, warm)
            kept = _better(trial.objective, best.objective, tol)
            steps.append({"step": "move", "split": c, "by": how, "freed": freed, "objective": trial.objective,
                          "kept": kept, "seconds": lap()})
            if kept:
                say(f"cluster search: {how} move on cluster {c} (freeing {freed}): objective "
                    f"{best.objective:.6g} -> {trial.objective:.6g}")
                best = trial
                break
        if not kept:
            break
    return SearchResult(best, view, steps, time.perf_counter() - t0)


def _propose(best: Trial, W: torch.Tensor, c: int, K: int, how: str, seed: int, fit: Fitter):
    """A new partition that splits cluster ``c`` in two, and the cluster id the second half takes.

    To keep ``K`` clusters an id must be freed first: ``"affinity"`` and
    ``"cost"`` dissolve the cluster cheapest to dissolve (its members go to the
    clusters that fit them next best; a cluster of one is usually it),
    ``"pair"`` merges into ``c`` the cluster that fits ``c``'s members next
    best (so two clusters that share two groups can trade them). Then
    ``"affinity"`` cuts ``c`` by a spectral 2-way split of its members'
    affinities; ``"cost"`` and ``"pair"`` refit the changed partition once and
    move out the members that ``c``'s new bases fit worst (above the largest
    gap of their sorted log relative costs). ``(None, -1)`` when there is
    nothing to cut.
    """
    assign, cost = best.assignment, best.cost
    n = assign.numel()
    own = cost.gather(1, assign[:, None]).squeeze(1)
    others = cost.clone()
    others[torch.arange(n), assign] = float("inf")
    next_best, where = others.min(dim=1)
    new = assign.clone()
    if how == "pair":
        cost_elsewhere = cost[assign == c].sum(0)
        cost_elsewhere[c] = float("inf")
        freed = int(cost_elsewhere.argmin())
        new[assign == freed] = c
    else:
        delta = torch.full((K,), float("inf"), dtype=F64)
        for k in range(K):
            mine = assign == k
            if k != c and bool(mine.any()):
                # Moving the members to their next-best clusters costs at most this (a refit only lowers it).
                delta[k] = float((next_best[mine] - own[mine]).sum())
        freed = int(delta.argmin())
        gone = (assign == freed).nonzero().flatten()
        new[gone] = where[gone]
    members = (new == c).nonzero().flatten()
    if members.numel() < 2:
        return None, -1
    if how == "affinity":
        half = _split_in_two(W, members, seed)
    else:
        refit = fit(new, 1, {key: v for key, v in best.warm.items() if key[1] not in (c, freed)})
        scale = refit.scale[members] if refit.scale is not None else torch.ones(members.numel(), dtype=F64)
        rel = refit.cost[members, c] / scale.clamp_min(torch.finfo(F64).tiny)
        key = rel.clamp_min(1e-30).log()
        order = torch.argsort(key)
        gaps = key[order].diff()
        if float(gaps.max()) <= 0:
            return None, -1
        half = torch.zeros(members.numel(), dtype=torch.bool)
        half[order[int(gaps.argmax()) + 1 :]] = True
    new[members[half]] = freed
    return new, freed
