"""The residual representation: an adapter's core in its cluster's bases plus a private rank-``k`` correction.

For adapter ``i`` in cluster ``c`` the joint tables serve ``U_c Sigma_i Vt_c``; what they miss is
``R_i = dW_i - U_c Sigma_i Vt_c``. Its truncated SVD at rank ``k``, ``B_res A_res``, is stored beside the
core and served on the same token by the baseline ops, so the token gets ``U_c Sigma_i Vt_c x + B_res A_res x``.
The relative error is what rank ``k`` leaves of ``R_i``, divided by ``||dW_i||^2``; at ``k = 0`` it is the
joint fit's error.

``R_i`` has rank at most ``p = rank(dW_i) + r`` and is never formed densely: with ``dW_i = B_i A_i``,
``R_i = X Y^T`` with ``X = [B_i, U_c Sigma_i]`` and ``Y^T = [A_i; -Vt_c]``. Its spectrum and truncated SVD
come from the ``p x p`` Grams ``G_X = X^T X`` and ``G_Y = Y^T Y`` (thin products, cheaper than QRs of the
tall factors: every adapter's spectrum is needed when the byte budget weighs this option). With
``G_X = E D E^T`` and ``L = E D^(1/2)``, the eigenvectors ``Q`` and eigenvalues ``lam`` of ``L^T G_Y L`` give
``R_i = (X E D^(-1/2) Q) diag(lam)^(1/2) (...)``: the rank-``k`` truncation is
``B_res = X E D^(-1/2) Q_k lam_k^(1/4)``, ``A_res = lam_k^(-1/4) Q_k^T L^T Y^T``, balanced like the
baselines' factors. The squares ``lam`` carry an absolute error of about the float's resolution times
``||dW_i||^2``; directions below that count as none (:func:`_numerical_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._linalg import F64, product_spectrum
from ._team import SOLO, ModuleTeam
from .collection import AdapterCollection, ModuleFactors
from .result import CompressedCollection, IndividualAdapter

__all__ = ["ResidualOptions", "ResidualFactors", "residual_spectra", "residual_adapters", "module_residual",
           "residual_rows", "combine_residual"]


@dataclass
class ResidualOptions:
    """A joint fit's residual options for the byte budget: ``mean``/``max`` float64 ``[n, kmax + 1]``, column
    ``k`` the mean resp. max over modules of the relative squared error of the core plus a rank-``k``
    residual (column 0: the core alone); ``values`` int64 ``[n, kmax + 1]`` the residual factors' values at
    rank ``k`` (capped at each module's residual rank); ``ranks``: module name -> int64 ``[n]`` each
    adapter's residual rank there, for this process's modules (the factors pass stores exactly the bytes
    these ranks predict, without computing them again)."""

    mean: torch.Tensor
    max: torch.Tensor
    values: torch.Tensor
    ranks: dict[str, torch.Tensor]


class _Block:
    """The adapters of one rank group of a module in one cluster: their positions in the module's factors,
    the pieces of ``X = [B, U Sigma]`` and ``Y^T = [A; -Vt]``, and the float64 Grams ``GL``, ``GR``."""

    def __init__(self, g, sel: torch.Tensor, cm, cluster: int, cores: torch.Tensor):
        dev, dt = g.A.device, g.A.dtype
        s_dev = sel.to(dev)
        self.pos = g.index[s_dev]
        self.U, self.Vt = cm.U[cluster].to(dev, dt), cm.Vt[cluster].to(dev, dt)  # [d_out, r], [r, d_in]
        core = cores.to(dev, dt)
        self.S = torch.diag_embed(core) if core.dim() == 2 else core  # [m, r, r]
        self.Bt, self.A = g.Bt[s_dev], g.A[s_dev]  # [m, rho, d_out], [m, rho, d_in]
        BUS = (self.Bt @ self.U) @ self.S  # [m, rho, r]
        AV = self.A @ self.Vt.t()
        St = self.S.transpose(1, 2)
        self.GL = torch.cat([torch.cat([self.Bt @ self.Bt.transpose(1, 2), BUS], dim=2),
                             torch.cat([BUS.transpose(1, 2), St @ (self.U.t() @ self.U) @ self.S], dim=2)], dim=1).to(F64)
        VVt = (self.Vt @ self.Vt.t()).expand(len(sel), -1, -1)
        self.GR = torch.cat([torch.cat([self.A @ self.A.transpose(1, 2), -AV], dim=2),
                             torch.cat([-AV.transpose(1, 2), VVt], dim=2)], dim=1).to(F64)

    def truncated(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every adapter of the block at rank ``k``: ``(A_res [m, k, d_in], B_res [m, d_out, k], s2)``, ``s2``
        the residuals' squared singular values (float64 ``[m, p]``, descending); the first ``k' < k``
        columns are the rank-``k'`` truncation."""
        D, E = torch.linalg.eigh(self.GL)
        keep = D > D.amax(1, keepdim=True).clamp_min(0) * D.shape[1] * torch.finfo(self.A.dtype).eps
        root_d = torch.where(keep, D.clamp_min(0).sqrt(), torch.zeros_like(D))
        inv_d = torch.where(keep, 1.0 / root_d.clamp_min(torch.finfo(F64).tiny), torch.zeros_like(D))
        L = E * root_d[:, None, :]
        lam, Q = torch.linalg.eigh(L.transpose(1, 2) @ self.GR @ L)
        lam, Qk = lam.flip(1).clamp_min(0), Q.flip(2)[:, :, :k]
        root = lam[:, :k].clamp_min(torch.finfo(F64).tiny) ** 0.25
        left = ((E * inv_d[:, None, :]) @ Qk * root[:, None, :]).to(self.A.dtype)  # B_res = X left
        right = (L @ Qk / root[:, None, :]).to(self.A.dtype)  # A_res = right^T Y^T
        rho = self.Bt.shape[1]
        B = self.Bt.transpose(1, 2) @ left[:, :rho] + self.U @ (self.S @ left[:, rho:])
        A = right[:, :rho].transpose(1, 2) @ self.A - right[:, rho:].transpose(1, 2) @ self.Vt
        return A, B, lam


def _blocks(f: ModuleFactors, cm, rows: torch.Tensor, assignment: torch.Tensor):
    """:class:`_Block` per rank group of ``f`` (adapters ``rows`` of the joint tables ``cm`` of one module,
    in clusters ``assignment``; a row of -1 leaves that adapter out) and cluster."""
    for g in f.groups:
        at = rows[g.index.cpu()]
        kept = at >= 0
        cluster = torch.where(kept, assignment[at.clamp_min(0)], torch.full_like(at, -1))
        for c in torch.unique(cluster[kept]).tolist():
            sel = (cluster == c).nonzero().flatten()
            yield _Block(g, sel, cm, int(c), cm.sigma[at[sel]])


def _rows(result: CompressedCollection, collection: AdapterCollection, names: list[str]) -> torch.Tensor:
    """Each of the collection's adapters' row in the joint tables (the tables keep the collection's order,
    but say so by name rather than assume it)."""
    where = {x: i for i, x in enumerate(result.adapter_names)}
    missing = [x for x in names if x not in where]
    if missing:
        raise ValueError(f"residual: adapter {missing[0]!r} is not in the joint tables")
    return torch.tensor([where[x] for x in names], dtype=torch.long)


def module_residual(f: ModuleFactors, cm, rows: torch.Tensor, assignment: torch.Tensor,
                    kmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One module's part of :func:`residual_spectra` from its loaded factors ``f`` (adapter ``i`` of ``f`` is
    row ``rows[i]`` of the module's joint tables ``cm``, :class:`~.result.CompressedModule`, in clusters
    ``assignment``): ``(rel, values, ranks)``, ``[n, kmax + 1]`` twice and ``[n]``, for ``f``'s adapters."""
    n = f.num_adapters
    s2 = torch.zeros(n, kmax + 1, dtype=F64)
    rank = torch.zeros(n, dtype=torch.long)
    norms = cm.norms_sq[rows].to(F64).cpu()
    for b in _blocks(f, cm, rows, assignment):
        p = b.pos.cpu()
        S2 = product_spectrum(b.GL, b.GR).cpu()
        take = min(kmax + 1, S2.shape[1])
        s2[p, :take] = S2[:, :take]
        s2[p, kmax] += S2[:, take:].sum(1)  # beyond kmax: counted in the last column's suffix sums
        rank[p] = _numerical_rank(S2, norms[p], f.dtype)
    tail = s2.flip(1).cumsum(1).flip(1)  # column k: what keeping k directions of R leaves
    rel = torch.where(norms[:, None] > 0, tail / norms.clamp_min(torch.finfo(F64).tiny)[:, None],
                      torch.zeros_like(tail))
    values = torch.minimum(torch.arange(kmax + 1)[None, :], rank[:, None]) * (f.spec.d_in + f.spec.d_out)
    return rel, values, rank


def residual_rows(result: CompressedCollection, collection: AdapterCollection) -> torch.Tensor:
    """The joint-table row of each of the collection's adapters."""
    return _rows(result, collection, list(collection.adapter_names))


def combine_residual(parts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int, kmax: int,
                     modules: int, holders: list[int], team: ModuleTeam = SOLO) -> ResidualOptions:
    """The options over all modules from this process's :func:`module_residual` parts (module name -> part,
    in module order), summed in module order whatever the number of processes (``holders``:
    :meth:`ModuleTeam.holders`)."""
    err_sum = team.ordered_sum(iter([p[0].flatten() for p in parts.values()]), n * (kmax + 1),
                               holders).view(n, kmax + 1)
    values = team.ordered_sum(iter([p[1].flatten() for p in parts.values()]), n * (kmax + 1), holders,
                              dtype=torch.long).view(n, kmax + 1)
    err_max = torch.zeros(n, kmax + 1, dtype=F64)
    for rel, _, _ in parts.values():
        err_max = torch.maximum(err_max, rel)
    return ResidualOptions(err_sum / max(modules, 1), team.maximum(err_max), values,
                           {m: p[2] for m, p in parts.items()})


def residual_spectra(result: CompressedCollection, collection: AdapterCollection, kmax: int, *,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     team: ModuleTeam = SOLO) -> ResidualOptions:
    """The joint fit ``result``'s residual options for ``collection``'s adapters, up to rank ``kmax``, in one
    pass over this process's modules (:func:`~.allocation.spectrum_options` can share its pass)."""
    n = len(collection.adapter_names)
    rows = residual_rows(result, collection)
    specs = [collection.modules[i] for i in team.local(collection.modules, n)]
    parts = team.run(lambda: {spec.name: module_residual(collection.load_module(spec, dtype=dtype, device=device),
                                                         result.modules[spec.name], rows, result.assignment, kmax)
                              for spec in specs})
    return combine_residual(parts, n, kmax, len(collection.modules), team.holders(collection.modules, n), team)


def _numerical_rank(s2: torch.Tensor, norms_sq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rank of each residual from its squared singular values ``s2`` (float64, descending): those above
    the resolution of :func:`~._linalg.product_spectrum` in ``dtype``, relative to the adapter's own
    ``||dW||^2`` (below it they are round-off, not directions; an adapter its core serves exactly has
    none)."""
    tol = norms_sq.to(F64)[:, None] * s2.shape[1] * torch.finfo(dtype).eps
    return (s2 > tol).sum(1)


def residual_adapters(result: CompressedCollection, collection: AdapterCollection, names: list[str],
                      ks: torch.Tensor, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      team: ModuleTeam = SOLO) -> dict[str, IndividualAdapter]:
    """The rank-``ks[j]`` residual of each adapter ``names[j]`` (kept in the joint tables) as an
    :class:`IndividualAdapter` with path ``"residual"``: factors per module (capped at the residual's rank
    there), the final relative errors, and the core-only errors as ``jd_rel_errors``."""
    all_names = list(collection.adapter_names)
    idx = torch.tensor([all_names.index(x) for x in names], dtype=torch.long)
    specs = [collection.modules[i] for i in team.local(collection.modules, len(all_names))]

    def one_pass():
        out = ResidualFactors(result, names, _rows(result, collection, names), ks)
        for spec in specs:
            out.add(collection.load_module(spec, dtype=dtype, device=device), idx)
        return out.adapters()

    return team.run(one_pass)


class ResidualFactors:
    """The residuals of adapters ``names`` (rows ``rows`` of ``result``'s joint tables) at ranks ``ks``, built
    one module at a time from the modules' factors of those adapters (:meth:`add`), so that a pass that
    reads each module once for other purposes too can build them. ``ranks``: each module's residual ranks
    of these adapters from :func:`module_residual` (then not computed again), or None."""

    def __init__(self, result: CompressedCollection, names: list[str], rows: torch.Tensor, ks: torch.Tensor,
                 ranks: dict[str, torch.Tensor] | None = None):
        self.result, self.names, self.rows = result, list(names), rows
        self.ks = torch.as_tensor(ks, dtype=torch.long)
        self.known_ranks = ranks
        m = len(self.names)
        self.factors: list[dict] = [{} for _ in range(m)]
        self.errors: list[dict] = [{} for _ in range(m)]
        self.core_errors: list[dict] = [{} for _ in range(m)]
        self.orig: list[dict] = [{} for _ in range(m)]

    def add(self, f: ModuleFactors, positions: torch.Tensor | None = None) -> None:
        """One module: ``f`` holds these adapters' factors, in ``names`` order, or (``positions``, int64
        ``[len(names)]``) at those positions among others, which are left alone (no copy of the module)."""
        name = f.spec.name
        m = len(self.names)
        positions = torch.arange(m) if positions is None else positions.cpu()
        builder = torch.full((f.num_adapters,), -1, dtype=torch.long)  # position in f -> index in names
        builder[positions] = torch.arange(m)
        rows = torch.full((f.num_adapters,), -1, dtype=torch.long)
        rows[positions] = self.rows
        ranks = f.ranks()[positions]
        cm = self.result.modules[name]
        for j in range(m):
            self.orig[j][name] = int(ranks[j])
            self.errors[j][name] = self.core_errors[j][name] = float(cm.rel_errors[int(self.rows[j])])
        norms = cm.norms_sq[self.rows].to(F64).cpu()
        for b in _blocks(f, cm, rows, self.result.assignment):
            js = builder[b.pos.cpu()]
            # The spectra's rank, so that the bytes are those the allocation counted.
            rank = (self.known_ranks[name][js] if self.known_ranks is not None else
                    _numerical_rank(product_spectrum(b.GL, b.GR).cpu(), norms[js], f.dtype))
            want = [min(int(self.ks[j]), int(rank[t])) for t, j in enumerate(js.tolist())]
            if max(want) == 0:
                continue
            A, B, s2 = b.truncated(max(want))
            for t, (j, k) in enumerate(zip(js.tolist(), want)):
                if k == 0:
                    continue
                self.factors[j][name] = (A[t, :k].contiguous(), B[t, :, :k].contiguous())
                if float(norms[j]) > 0:
                    self.errors[j][name] = float(s2[t, k:].sum()) / float(norms[j])

    def adapters(self) -> dict[str, IndividualAdapter]:
        return {name: IndividualAdapter(name, "residual", int(self.ks[j]), self.factors[j], self.errors[j],
                                        self.orig[j], self.core_errors[j])
                for j, name in enumerate(self.names)}
