"""A byte budget for the whole store: each adapter's representation chosen for the least total error.

Given a joint fit (the bases of ``K`` clusters at rank ``r``), each adapter can be stored

- as its core in its cluster's bases (``jd``: ``r^2`` or ``r`` values per module; the joint fit's error),
- as its core plus a private rank-``k`` residual (``jd+res-k``: the core's values plus ``k (d_in + d_out)`` per
  module, capped at the residual's rank; the error is what rank ``k`` leaves of ``dW - U Sigma Vt``, see
  :mod:`.residual`),
- as its own truncated SVD at rank ``k`` (``svd-k``: ``k (d_in + d_out)`` values per module, capped at the
  adapter's rank there; the error is the tail of its spectrum),
- as its original factors (``full``: error 0).

The allocation minimises the sum over adapters of each adapter's mean relative squared error over the
collection's modules, subject to ``bytes(bases) + sum bytes(adapter) <= budget``. It is a multiple-choice
knapsack, solved by Lagrangian relaxation: for a multiplier ``lam`` every adapter takes the option of least
``error + lam * bytes``; ``lam`` is bisected to the budget, then the bytes left buy the upgrades with the
most error removed per byte. ``--max-rel-error E`` removes the options with a module above ``E``.

Bytes are the store's table bytes in its dtype (bases, cores, individual factors), the memory a server
holds; the store's files add a manifest and per-adapter float64 error records.

With no rank or cluster count given, :func:`compress_for_budget` fits a few joint candidates (and the
store without joint tables) and keeps the one of least predicted error at the budget; the curve it
searched (bytes against predicted error, per candidate) is returned for printing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ._linalg import F64
from ._team import SOLO, ModuleTeam
from .baselines import squared_singular_values
from .collection import AdapterCollection, ModuleFactors
from .error_budget import IndividualFactors, all_rel_errors, drop_from_tables
from .residual import (ResidualFactors, ResidualOptions, combine_residual, module_residual, residual_rows,
                       residual_spectra)
from .result import CompressedCollection

__all__ = ["BudgetCurve", "Allocation", "SpectrumOptions", "check_target", "original_bytes", "spectrum_options",
           "allocate", "nominal_ranks", "choose_at_multiplier", "allocate_new_adapters", "JointOption", "joint_option", "bases_bytes", "apply_allocation", "compress_for_budget", "fit_for_budget",
           "CURVE_RATIOS"]

#: Budgets (fractions of the original bytes) at which the searched curve is reported.
CURVE_RATIOS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)
_RANKS = (4, 8, 16, 32)
_CLUSTERS = (1, 4, 16)


def check_target(target_bytes=None, target_ratio=None) -> None:
    """``ValueError`` naming the argument unless at most one is given and it is in range."""
    if target_bytes is not None and target_ratio is not None:
        raise ValueError(f"target_bytes (--target-bytes) and target_ratio (--target-ratio) are exclusive; got "
                         f"{target_bytes!r} and {target_ratio!r}")
    if target_bytes is not None:
        if isinstance(target_bytes, bool) or not isinstance(target_bytes, (int, float)) \
                or not math.isfinite(target_bytes) or target_bytes <= 0:
            raise ValueError(f"target_bytes (--target-bytes) must be a positive number of bytes, got {target_bytes!r}")
    if target_ratio is not None:
        if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) \
                or not math.isfinite(target_ratio) or not 0.0 < target_ratio <= 1.0:
            raise ValueError(f"target_ratio (--target-ratio) must be a number in (0, 1], got {target_ratio!r}")


@dataclass
class SpectrumOptions:
    """The per-adapter options that need no joint fit, from each adapter's spectrum on every module.

    ``svd_error``/``svd_max``: float64 ``[n, kmax + 1]``, column ``k`` the mean resp. max over modules of
    the relative squared error of the rank-``k`` truncated SVD (column 0: no update at all);
    ``svd_values``: int64 ``[n, kmax + 1]`` the values stored at rank ``k``; ``full_values``: int64 ``[n]``
    the values of the original factors; ``full_rank``: int64 ``[n]`` the largest rank over modules;
    ``residual``: a joint fit's residual options read in the same pass (:func:`~.residual.residual_spectra`),
    or None.
    """

    names: list[str]
    svd_error: torch.Tensor
    svd_max: torch.Tensor
    svd_values: torch.Tensor
    full_values: torch.Tensor
    full_rank: torch.Tensor
    modules: int
    residual: ResidualOptions | None = None

    @property
    def kmax(self) -> int:
        return self.svd_error.shape[1] - 1


def original_bytes(options: SpectrumOptions, itemsize: int) -> int:
    """Bytes of every adapter's original factors at ``itemsize`` bytes per value."""
    return int(options.full_values.sum()) * itemsize


def nominal_ranks(collection: AdapterCollection, team: ModuleTeam = SOLO) -> tuple[int, int] | None:
    """``(values of every adapter's factors, largest rank)`` from ranks the collection knows without
    reading factors (:meth:`~.collection.AdapterCollection.module_ranks`), or None when it does not."""
    values, top = 0, 0
    for spec in collection.modules:
        ranks = collection.module_ranks(spec)
        if ranks is None:
            return None
        values += int(ranks.sum()) * (spec.d_in + spec.d_out)
        top = max(top, int(ranks.max()) if ranks.numel() else 0)
    return values, top


def spectrum_options(collection: AdapterCollection, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", team: ModuleTeam = SOLO,
                     joint: CompressedCollection | None = None, kmax: int | None = None) -> SpectrumOptions:
    """One pass over the modules (each process its own): every adapter's spectrum, errors and sizes per rank;
    with ``joint`` (and ``kmax``, the largest rank, :func:`nominal_ranks`) also the joint fit's residual
    options, from the same reads (:class:`FitSpectra` reads both during the joint fit itself)."""
    n = len(collection.adapter_names)
    specs = [collection.modules[i] for i in team.local(collection.modules, n)]
    rows = residual_rows(joint, collection) if joint is not None else None

    def local():
        parts, res = {}, {}
        for spec in specs:
            f = collection.load_module(spec, dtype=dtype, device=device)
            parts[spec.name] = _module_spectrum(f)
            if joint is not None:
                res[spec.name] = module_residual(f, joint.modules[spec.name], rows, joint.assignment, kmax)
            del f
        return parts, res

    parts, res = team.run(local)
    return _options(collection, parts, res if joint is not None else None, kmax, team)


def _module_spectrum(f: ModuleFactors) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(d_in + d_out, ranks [n], squared singular values [n, rho])`` of one module's adapters."""
    return f.spec.d_in + f.spec.d_out, f.ranks(), squared_singular_values(f)


class FitSpectra:
    """What :func:`spectrum_options` reads, read during a joint fit instead (a ``module_hook`` of
    :func:`~.clustering.compress`): the fit reads every module anyway, so the spectra (``spectra``) and
    the fit's residual options up to rank ``kmax`` (``residual``) cost no pass of their own. The fit's
    last round decides; :meth:`options` then combines them over the team's modules."""

    def __init__(self, collection: AdapterCollection, kmax: int, *, spectra: bool = True, residual: bool = True):
        self.collection, self.kmax = collection, kmax
        self.want_spectra, self.want_residual = spectra, residual
        self.n = len(collection.adapter_names)
        self.spectra: dict[str, tuple] = {}
        self.residual: dict[str, tuple] = {}
        self.seconds = 0.0  # spent in the calls: what riding on the fit adds to it

    def __call__(self, spec, members: list[torch.Tensor], parts: list, cm) -> None:
        t0 = time.perf_counter()
        self._read(spec, members, parts, cm)
        self.seconds += time.perf_counter() - t0

    def _read(self, spec, members: list[torch.Tensor], parts: list, cm) -> None:
        n, kmax = self.n, self.kmax
        assignment = torch.zeros(n, dtype=torch.long)
        for k, idx in enumerate(members):
            assignment[idx] = k
        ranks = torch.zeros(n, dtype=torch.long)
        s2 = torch.zeros(n, kmax, dtype=F64)
        rel = torch.zeros(n, kmax + 1, dtype=F64)
        values = torch.zeros(n, kmax + 1, dtype=torch.long)
        res_rank = torch.zeros(n, dtype=torch.long)
        for idx, part in zip(members, parts):
            if idx.numel() == 0:
                continue
            if self.want_spectra:
                _, ranks[idx], s2_k = _module_spectrum(part)
                if s2_k.shape[1] > kmax:
                    raise ValueError(f"the collection's factors have rank {s2_k.shape[1]} on module {spec.name}, "
                                     f"above the {kmax} it reported")
                s2[idx, :s2_k.shape[1]] = s2_k
            if self.want_residual:
                rel[idx], values[idx], res_rank[idx] = module_residual(part, cm, idx, assignment, kmax)
        if self.want_spectra:
            self.spectra[spec.name] = (spec.d_in + spec.d_out, ranks, s2)
        if self.want_residual:
            self.residual[spec.name] = (rel, values, res_rank)

    def options(self, team: ModuleTeam = SOLO) -> SpectrumOptions:
        """The spectra the last round read (``spectra=True``), as :func:`spectrum_options` without ``joint``."""
        return _options(self.collection, self.spectra, None, self.kmax, team)

    def residual_options(self, team: ModuleTeam = SOLO) -> ResidualOptions:
        """The fit's residual options the last round read (``residual=True``)."""
        n = self.n
        return combine_residual(self.residual, n, self.kmax, len(self.collection.modules),
                                team.holders(self.collection.modules, n), team)


def _options(collection: AdapterCollection, parts: dict[str, tuple], res: dict[str, tuple] | None,
             kmax: int | None, team: ModuleTeam) -> SpectrumOptions:
    """Combine this process's per-module spectra (:func:`_module_spectrum`) and residual parts
    (:func:`~.residual.module_residual`; None: none) over the team's modules, in module order."""
    names = list(collection.adapter_names)
    n = len(names)
    parts = list(parts.values())
    kmax_seen = int(team.maximum(torch.tensor(max([0] + [int(p[1].max()) for p in parts if p[1].numel()]))))
    if kmax is not None and kmax_seen > kmax:
        raise ValueError(f"the collection's factors have rank {kmax_seen}, above the {kmax} it reported")
    kmax = kmax_seen if kmax is None else kmax
    ks = torch.arange(kmax + 1)
    err_max = torch.zeros(n, kmax + 1, dtype=F64)
    values = torch.zeros(n, kmax + 1, dtype=torch.long)
    full = torch.zeros(n, dtype=torch.long)
    full_rank = torch.zeros(n, dtype=torch.long)
    rels = []
    for width, ranks, s2 in parts:
        s2 = torch.nn.functional.pad(s2[:, :kmax], (0, kmax - min(s2.shape[1], kmax)))
        norms = s2.sum(1)
        # tail[:, k]: what rank k leaves out, divided by the update's norm (0 for an absent module).
        tail = torch.cat([s2.flip(1).cumsum(1).flip(1), torch.zeros(n, 1, dtype=F64)], dim=1)
        rel = torch.where(norms[:, None] > 0, tail / norms.clamp_min(torch.finfo(F64).tiny)[:, None],
                          torch.zeros_like(tail))
        rels.append(rel)
        err_max = torch.maximum(err_max, rel)
        values += torch.minimum(ks[None, :], ranks[:, None]) * width
        full += ranks * width
        full_rank = torch.maximum(full_rank, ranks)
    # Summed in module order whatever the number of processes, so that every process count
    # chooses the same representations bit for bit.
    holders = team.holders(collection.modules, n)
    err_sum = team.ordered_sum(iter(rels), n * (kmax + 1), holders).view(n, kmax + 1)
    values = team.ordered_sum(iter([values]), n * (kmax + 1), holders, dtype=torch.long).view(n, kmax + 1)
    full = team.ordered_sum(iter([full]), n, holders, dtype=torch.long)
    err_max, full_rank = team.maximum(err_max), team.maximum(full_rank)
    residual = (combine_residual(res, n, kmax, len(collection.modules), holders, team) if res is not None
                else None)
    return SpectrumOptions(names, err_sum / max(len(collection.modules), 1), err_max, values, full, full_rank,
                           len(collection.modules), residual)


@dataclass
class Allocation:
    """Each adapter's representation: ``choice[i]`` is -1 (in the joint tables), ``k`` >= 1 (``svd-k``) or
    its full rank with ``full[i]`` set (original factors); ``residual[i]``: ``k`` >= 1 for a joint-table
    adapter with a rank-``k`` residual (``jd+res-k``), else 0; ``full_rank``: each adapter's largest rank
    over modules; the predicted mean error and the table bytes; ``multiplier``: the error per byte the
    allocation ended at (the price :func:`choose_at_multiplier` charges adapters added later)."""

    choice: torch.Tensor
    full: torch.Tensor
    full_rank: torch.Tensor
    mean_error: float
    table_bytes: int
    bases_bytes: int
    residual: torch.Tensor
    multiplier: float = 0.0
    residual_ranks: dict[str, torch.Tensor] | None = None  # from the residual options, see ResidualOptions

    def label(self, i: int) -> str:
        if bool(self.full[i]):
            return "full"
        if int(self.choice[i]) >= 0:
            return f"svd-{int(self.choice[i])}"
        return f"jd+res-{int(self.residual[i])}" if int(self.residual[i]) else "jd"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(len(self.choice)):
            key = self.label(i).split("-")[0]
            out[key] = out.get(key, 0) + 1
        return out


@dataclass
class _Table:
    """Options as one matrix: column 0 ``jd``, columns ``1..kmax`` ``svd-k``, ``kmax + 1`` ``full``, then
    ``kmax + 1 + k`` ``jd+res-k`` for ``k = 1..kmax`` (when the joint fit's residual spectra are known)."""

    error: torch.Tensor  # float64 [n, P]
    bytes: torch.Tensor  # float64 [n, P], inf where not allowed
    bases: int


@dataclass
class JointOption:
    """What a joint fit offers each adapter (see :func:`joint_option`): ``mean``/``max`` float64 ``[n]`` its
    relative error over the modules under the joint tables, ``bases`` the bases' bytes, ``cores_values``
    one adapter's core values; ``residual``: the core plus a rank-``k`` residual
    (:func:`~.residual.residual_spectra`), or None (no residual options)."""

    mean: torch.Tensor
    max: torch.Tensor
    bases: int
    cores_values: int
    residual: ResidualOptions | None = None


def _table(opts: SpectrumOptions, jd: JointOption | None, itemsize: int, floor: float | None) -> _Table:
    n, kmax = opts.svd_error.shape[0], opts.svd_error.shape[1] - 1
    error = torch.cat([torch.full((n, 1), math.inf, dtype=F64), opts.svd_error[:, 1:],
                       torch.zeros(n, 1, dtype=F64), torch.full((n, kmax), math.inf, dtype=F64)], dim=1)
    size = torch.cat([torch.full((n, 1), math.inf, dtype=F64), opts.svd_values[:, 1:].to(F64) * itemsize,
                      opts.full_values[:, None].to(F64) * itemsize, torch.full((n, kmax), math.inf, dtype=F64)],
                     dim=1)
    # svd-k at or above an adapter's own rank stores as much as its factors: "full" is that option.
    ks = torch.arange(1, kmax + 1)
    size[:, 1:kmax + 1][ks[None, :] >= opts.full_rank[:, None]] = math.inf
    if floor is not None:
        size[:, 1:kmax + 1][opts.svd_max[:, 1:] > floor * (1 + 1e-12)] = math.inf
    bases = 0
    if jd is not None:
        bases = jd.bases
        cores = float(jd.cores_values * itemsize)
        error[:, 0] = jd.mean
        size[:, 0] = cores
        if floor is not None:
            size[:, 0][jd.max > floor * (1 + 1e-12)] = math.inf
        if jd.residual is not None:
            r_mean, r_max, r_values = (t[:, :kmax + 1] for t in (jd.residual.mean, jd.residual.max,
                                                                   jd.residual.values))
            res = slice(kmax + 2, 2 * kmax + 2)
            error[:, res] = r_mean[:, 1:]
            size[:, res] = cores + r_values[:, 1:].to(F64) * itemsize
            # A residual as wide as the adapter itself costs more than its factors; one that stops growing
            # (the residual's rank reached) repeats the smaller k: neither is an option.
            size[:, res][(ks[None, :] >= opts.full_rank[:, None]) | (r_values[:, 1:] == r_values[:, :-1])] = math.inf
            if floor is not None:
                size[:, res][r_max[:, 1:] > floor * (1 + 1e-12)] = math.inf
    return _Table(error, size, bases)


def _pick(t: _Table, lam: float) -> torch.Tensor:
    cost = torch.where(torch.isfinite(t.bytes), t.error + lam * t.bytes, torch.full_like(t.error, math.inf))
    return cost.argmin(dim=1)


def _solve(t: _Table, budget: float) -> tuple[torch.Tensor, float] | None:
    """Column per adapter of least summed error with ``sum bytes <= budget - bases``, and the multiplier
    (the error a byte is worth at that budget); None when impossible."""
    room = budget - t.bases
    ar = torch.arange(t.error.shape[0])
    smallest = _pick(t, 1e30)
    if room < 0 or float(t.bytes[ar, smallest].sum()) > room:
        return None
    lo, hi = -40.0, 30.0  # log10 of the multiplier: errors are O(1), bytes up to O(1e12)
    best = smallest
    for _ in range(60):
        mid = (lo + hi) / 2
        c = _pick(t, 10.0 ** mid)
        if float(t.bytes[ar, c].sum()) <= room:
            best, hi = c, mid
        else:
            lo = mid
    # Spend what the relaxation leaves: the upgrade with the most error removed per byte, while one fits.
    used = float(t.bytes[ar, best].sum())
    for _ in range(t.error.shape[0] * 4):
        cur_e, cur_b = t.error[ar, best], t.bytes[ar, best]
        d_e = cur_e[:, None] - t.error
        d_b = t.bytes - cur_b[:, None]
        # An upgrade must remove error beyond round-off (errors are relative, O(1)), or it spends bytes on nothing.
        ok = torch.isfinite(t.bytes) & (d_e > 1e-12) & (d_b <= room - used)
        if not bool(ok.any()):
            break
        gain = torch.where(ok, d_e / d_b.clamp_min(1.0), torch.full_like(d_e, -1.0))
        flat = int(gain.argmax())
        i, c = divmod(flat, t.error.shape[1])
        used += float(d_b[i, c])
        best = best.clone()
        best[i] = c
    return best, 10.0 ** hi


def _as_allocation(t: _Table, cols: torch.Tensor, opts: SpectrumOptions, multiplier: float,
                   jd: JointOption | None) -> Allocation:
    ar = torch.arange(len(cols))
    kmax = opts.svd_error.shape[1] - 1
    full = cols == kmax + 1
    in_tables = (cols == 0) | (cols > kmax + 1)
    choice = torch.where(in_tables, torch.full_like(cols, -1), torch.where(full, opts.full_rank, cols))
    residual = torch.where(cols > kmax + 1, cols - (kmax + 1), torch.zeros_like(cols))
    return Allocation(choice, full, opts.full_rank, float(t.error[ar, cols].mean()), int(t.bytes[ar, cols].sum()) + t.bases,
                      t.bases, residual, multiplier,
                      jd.residual.ranks if jd is not None and jd.residual is not None else None)


def allocate(opts: SpectrumOptions, budget: float, *, jd: JointOption | None = None, itemsize: int = 2,
             floor: float | None = None) -> Allocation | None:
    """The allocation of least predicted mean error within ``budget`` table bytes, or None when none fits.

    ``jd``: what the joint fit offers (:func:`joint_option`; None: no joint tables); ``floor``:
    ``--max-rel-error``.
    """
    t = _table(opts, jd, itemsize, floor)
    solved = _solve(t, budget)
    return None if solved is None else _as_allocation(t, solved[0], opts, solved[1], jd)


def choose_at_multiplier(opts: SpectrumOptions, jd: JointOption, multiplier: float, *, itemsize: int = 2,
                         floor: float | None = None) -> Allocation:
    """Each adapter's option of least ``error + multiplier * bytes``, the bases already paid for: the rule
    for adapters added to a byte-budget store (``multiplier``: the one its allocation ended at, the error
    a byte was worth there). An adapter with no option within ``floor`` keeps its original factors."""
    t = _table(opts, jd, itemsize, floor)
    t.bases = 0
    return _as_allocation(t, _pick(t, multiplier), opts, multiplier, jd)


def joint_option(result: CompressedCollection, itemsize: int, team: ModuleTeam = SOLO, width: int | None = None, *,
                 residual: ResidualOptions | None = None) -> JointOption:
    """What a joint fit offers for :func:`allocate`. ``width``: the sum of ``d_in + d_out`` over all
    modules (needed with several processes, each holding some); ``residual``: its residual options
    (:func:`~.residual.residual_spectra`, or read with the spectra by :func:`spectrum_options`)."""
    rel, _ = all_rel_errors(result, team)
    if width is None:
        width = sum(cm.spec.d_in + cm.spec.d_out for cm in result.modules.values())
    return _joint_option(result, rel, result.num_clusters * result.rank * width * itemsize, residual)


def _joint_option(result: CompressedCollection, rel: torch.Tensor, bases: int,
                  residual: ResidualOptions | None) -> JointOption:
    """The option of adapters with relative errors ``rel`` (float64 ``[n, modules]``) under ``result``'s tables."""
    count = rel.shape[1] if rel.numel() else 1
    per_core = result.rank * result.rank if result.method == "full" else result.rank
    return JointOption(rel.sum(1) / max(count, 1),
                       rel.max(1).values if rel.numel() else torch.zeros(rel.shape[0], dtype=F64),
                       bases, per_core * count, residual)


def apply_allocation(result: CompressedCollection, collection: AdapterCollection, alloc: Allocation, *,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     team: ModuleTeam = SOLO) -> list[str]:
    """Apply the allocation of ``collection``'s adapters (all in ``result``'s joint tables) to ``result``, in
    place: the adapters it keeps on their own leave the joint tables, those with a residual get it
    (:mod:`.residual`), both built in one pass over this process's modules; returns the names that left."""
    ours = list(collection.adapter_names)
    with_res = (alloc.residual > 0).nonzero().flatten()
    leave = (alloc.choice >= 0).nonzero().flatten()
    if not with_res.numel() and not leave.numel():
        return []
    names = [ours[i] for i in leave.tolist()]
    jd = None
    if names and result.method in ("full", "diag") and result.num_clusters:
        rel, mods = all_rel_errors(result, team)
        jd = {x: {m: float(rel[result.index(x), j]) for j, m in enumerate(mods)} for x in names}
    specs = [collection.modules[i] for i in team.local(collection.modules, len(ours))]

    def one_pass():
        res_names = [ours[i] for i in with_res.tolist()]
        ranks = None if alloc.residual_ranks is None else {m: r[with_res] for m, r in alloc.residual_ranks.items()}
        residuals = (ResidualFactors(result, res_names, residual_rows(result, collection)[with_res],
                                     alloc.residual[with_res], ranks) if res_names else None)
        own = IndividualFactors(names, alloc.choice[leave], alloc.full_rank[leave], jd) if names else None
        for spec in specs:
            f = collection.load_module(spec, dtype=dtype, device=device)
            if residuals is not None:
                residuals.add(f, with_res)
            if own is not None:
                own.add(f.select(leave))
            del f
        return {**(residuals.adapters() if residuals else {}), **(own.adapters() if own else {})}

    result.individual.update(team.run(one_pass))
    if names:
        gone = set(names)
        drop_from_tables(result, torch.tensor([x in gone for x in result.adapter_names], dtype=torch.bool))
    return names


def allocate_new_adapters(compressed: CompressedCollection, new: AdapterCollection, report, *,
                          device: torch.device | str = "cpu", floor: float | None = None) -> list[str]:
    """After :func:`~.projection.project_adapters` added ``new``'s adapters (``report``) to a byte-budget
    store, give each the representation of least ``error + multiplier * bytes`` at the store's recorded
    multiplier (:func:`choose_at_multiplier`; the bases are paid for), in place. ``floor``: the
    ``--max-rel-error`` to respect (default: the store's). Returns every new adapter's label."""
    bb = compressed.metadata["byte_budget"]
    floor = floor if floor is not None else compressed.metadata.get("max_rel_error")
    opts = spectrum_options(new, dtype=F64, device=device)
    kmax = opts.svd_error.shape[1] - 1
    residual = None
    if bb.get("residual", False) and kmax >= 1:
        residual = residual_spectra(compressed, new, kmax, dtype=F64, device=device)
    jd = _joint_option(compressed, report.rel_errors.to(F64), 0, residual)  # the bases are paid for
    alloc = choose_at_multiplier(opts, jd, float(bb["multiplier"]), itemsize=int(bb["itemsize"]), floor=floor)
    before = set(compressed.individual)
    apply_allocation(compressed, new, alloc, dtype=F64, device=device)
    store_dtype = next(iter(compressed.modules.values())).U.dtype
    for name in set(compressed.individual) - before:
        ind = compressed.individual[name]
        ind.factors = {m: (A.to(store_dtype), B.to(store_dtype)) for m, (A, B) in ind.factors.items()}
    return [compressed.path_of(x) for x in new.adapter_names]


@dataclass
class BudgetCurve:
    """What :func:`compress_for_budget` searched: per candidate, its predicted mean error at each budget."""

    original_bytes: int
    budget: int
    candidates: list[str] = field(default_factory=list)
    points: dict[str, dict[float, tuple[int, float] | None]] = field(default_factory=dict)
    at_budget: dict[str, float | None] = field(default_factory=dict)
    chosen: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"original_bytes": self.original_bytes, "budget": self.budget, "chosen": self.chosen,
                "candidates": {c: {"at_budget": self.at_budget[c], "seconds": round(self.seconds.get(c, 0.0), 3),
                                   "curve": [{"ratio": r, "bytes": p[0], "mean_rel_error": p[1]} if p else
                                             {"ratio": r, "bytes": None, "mean_rel_error": None}
                                             for r, p in self.points[c].items()]}
                               for c in self.candidates}}

    def lines(self) -> list[str]:
        """The curve as a table: a row per budget, a column per candidate; ``*`` the chosen candidate."""
        head = f"{'budget':>14}  " + "  ".join(f"{c + ('*' if c == self.chosen else ''):>14}" for c in self.candidates)
        rows = [head]
        for r in CURVE_RATIOS:
            cells = []
            for c in self.candidates:
                p = self.points[c].get(r)
                cells.append(f"{p[1]:>14.4f}" if p else f"{'-':>14}")
            rows.append(f"{f'x{r:g} original':>14}  " + "  ".join(cells))
        rows.append(f"{'target':>14}  " + "  ".join(
            f"{self.at_budget[c]:>14.4f}" if self.at_budget[c] is not None else f"{'-':>14}" for c in self.candidates))
        return rows


def bases_bytes(collection: AdapterCollection, rank: int, clusters: int, itemsize: int) -> int:
    """Bytes of the shared bases of ``clusters`` clusters at ``rank`` over every module."""
    return clusters * rank * sum(s.d_in + s.d_out for s in collection.modules) * itemsize


def candidates(n: int, rank: int | None, clusters, max_rank: int | None = None) -> list[tuple[int, int]]:
    """Joint candidates ``(r, K)``: the given rank and count, else a small grid, K at most ``n`` and r at most
    ``max_rank`` (what the smallest module holds)."""
    ranks = [rank] if rank is not None else [r for r in _RANKS if max_rank is None or r <= max_rank]
    ks = [clusters] if isinstance(clusters, int) else list(_CLUSTERS)
    return [(r, k) for r in ranks for k in ks if k <= n]


def compress_for_budget(collection: AdapterCollection, budget_bytes: float | None, budget_ratio: float | None, *,
                        rank: int | None, clusters, itemsize: int, floor: float | None, fit, dtype=torch.float32,
                        device="cpu", team: ModuleTeam = SOLO, per_adapter: bool = True, residual: bool = True,
                        log=None):
    """Fit the joint candidates, allocate each within the budget, keep the best.

    Returns ``(result, allocation, curve)``; ``result`` is None when the best store has no joint tables.

    ``fit(rank, clusters, module_hook)`` returns a joint fit (:class:`CompressedCollection`) and passes
    ``module_hook`` to :func:`~.clustering.compress`. ``per_adapter``: also try
    the store without joint tables (every adapter its own SVD or factors); ``residual``: offer the joint
    adapters a private residual (:mod:`.residual`). Raises ``ValueError`` naming
    the budget when no candidate fits in it (below the smallest possible store).
    """
    # The original bytes come from the ranks when the collection knows them without reading factors; then
    # the spectra are read during the first joint fit (FitSpectra), not in a pass of their own.
    nominal = nominal_ranks(collection, team)
    opts = None if nominal is not None else spectrum_options(collection, dtype=dtype, device=device, team=team)
    orig = nominal[0] * itemsize if nominal is not None else original_bytes(opts, itemsize)
    kmax = nominal[1] if nominal is not None else opts.kmax
    budget = float(budget_bytes) if budget_bytes is not None else budget_ratio * orig
    curve = BudgetCurve(orig, int(budget))
    best = None  # (error, label, result or None, allocation)
    n = len(collection.adapter_names)
    max_rank = min(min(s.d_out, s.d_in) for s in collection.modules)
    fits: list[tuple[str, object, object]] = [(f"r={r} K={k}", r, k)
                                              for r, k in candidates(n, rank, clusters, max_rank)]
    if per_adapter:
        fits.append(("per-adapter", None, None))
    smallest = math.inf
    width = bases_bytes(collection, 1, 1, 1)
    for label, r, k in fits:
        t0 = time.perf_counter()
        if r is None:
            result, jd = None, None
            if opts is None:
                opts = spectrum_options(collection, dtype=dtype, device=device, team=team)
        else:
            # The bases alone: skip the fit when they cannot fit in the budget.
            bases = bases_bytes(collection, r, k, itemsize)
            smallest = min(smallest, bases)
            if bases > budget:
                if log:
                    log(f"budget: {label} skipped, its bases alone take {bases:,} bytes")
                continue
            # The fit reads every module: the spectra (first time) and this fit's residual options ride along.
            hook = FitSpectra(collection, kmax, spectra=opts is None, residual=residual and kmax >= 1)
            result = fit(r, k, hook)
            if opts is None:
                opts = hook.options(team)
            res = hook.residual_options(team) if hook.want_residual else None
            jd = joint_option(result, itemsize, team, width, residual=res)
        curve.candidates.append(label)
        curve.points[label] = {}
        for ratio in CURVE_RATIOS:
            a = allocate(opts, ratio * orig, jd=jd, itemsize=itemsize, floor=floor)
            curve.points[label][ratio] = (a.table_bytes, a.mean_error) if a else None
        a = allocate(opts, budget, jd=jd, itemsize=itemsize, floor=floor)
        curve.at_budget[label] = a.mean_error if a else None
        curve.seconds[label] = time.perf_counter() - t0
        if log:
            log(f"budget: {label}: " + (f"predicted mean error {a.mean_error:.4f} in {a.table_bytes:,} bytes"
                                       if a else "does not fit"))
        if a is not None and (best is None or a.mean_error < best[0]):
            best = (a.mean_error, label, result, a)
    if best is None:
        if opts is None:  # every joint candidate was skipped before any pass
            opts = spectrum_options(collection, dtype=dtype, device=device, team=team)
        need = min(smallest, int(opts.svd_values[:, 1].sum()) * itemsize if opts.kmax >= 1 else math.inf)
        raise ValueError(f"the byte budget ({'target_bytes' if budget_bytes is not None else 'target_ratio'}) "
                         f"allows {int(budget):,} table bytes; the smallest store this collection can have under "
                         f"these settings needs more (its smallest joint bases or every adapter at rank 1: "
                         f"{need:,} bytes, {need / max(orig, 1):.4f} of the original {orig:,})")
    curve.chosen = best[1]
    return best[2], best[3], curve


def fit_for_budget(collection: AdapterCollection, rank: int | None, clusters, fit, *, target_bytes: float | None,
                   target_ratio: float | None, floor: float | None, itemsize: int, dtype=torch.float32, device="cpu",
                   team: ModuleTeam = SOLO, residual: bool = True, log=None, log_curve=None) -> CompressedCollection:
    """The byte budget's steps on ``collection``: the joint candidates fitted by ``fit(rank, clusters, hook)``
    (:func:`compress_for_budget`), the best one's allocation applied (:func:`apply_allocation`), and the rule
    for adapters added later recorded in ``metadata["byte_budget"]``. ``rank`` and ``clusters`` (an int, or
    None to search) both given fix the joint tables; ``log_curve(lines)`` receives the searched curve."""
    clusters = clusters if isinstance(clusters, int) else None
    # Both given: the user asked for these joint tables, so the store without any is not a candidate.
    joint_fixed = rank is not None and clusters is not None
    if joint_fixed and target_bytes is not None:
        bases = bases_bytes(collection, rank, clusters, itemsize)
        if bases > target_bytes:
            raise ValueError(f"the byte budget (target_bytes, --target-bytes) allows {int(target_bytes):,} table bytes; "
                             f"the bases of rank {rank} and {clusters} clusters (--rank, --clusters) alone take "
                             f"{bases:,}")
    result, alloc, curve = compress_for_budget(
        collection, target_bytes, target_ratio, rank=rank, clusters=clusters, itemsize=itemsize, floor=floor,
        fit=fit, dtype=dtype, device=device, team=team, per_adapter=not joint_fixed, residual=residual, log=log)
    if result is None:  # every adapter on its own: a joint fit of one rank-1 cluster that they all leave
        result = fit(1, 1, None)
    if list(result.adapter_names) != list(collection.adapter_names):
        raise RuntimeError("the joint fit reordered the adapters; the allocation cannot be applied")
    apply_allocation(result, collection, alloc, dtype=dtype, device=device, team=team)
    if floor is not None:
        result.metadata["max_rel_error"] = floor
    # The multiplier, item size and options are the rule for adapters added later (`jdlora add`).
    result.metadata["byte_budget"] = {**curve.as_dict(), "predicted_mean_rel_error": alloc.mean_error,
                                      "predicted_table_bytes": alloc.table_bytes, "representations": alloc.counts(),
                                      "multiplier": alloc.multiplier, "itemsize": itemsize, "residual": residual}
    if log_curve is not None and team.is_root:
        log_curve(curve.lines())
    return result
