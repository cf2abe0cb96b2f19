"""Activation-aware joint compression: keep what the adapters do on the base model's inputs.

With ``C_m = E[x x^T]`` the input second moment of module ``m``
(:mod:`.calibration`) and ``S_m = (C_m + lambda I)^(1/2)``, the
activation-weighted error of a reconstruction ``R`` is
``||(dW - R) S||_F^2 = E ||(dW - R) x||^2 + lambda ||dW - R||_F^2``. Minimising
it is the ordinary problem on whitened factors ``A_i S`` (same JD-Full /
JD-Diag / clustering / baselines, same kernels and store format): compress
``dW_i S = B_i (A_i S)`` to ``U Sigma_i V_w^T``, then serve
``V^T = V_w^T S^(-1)``, so that ``U Sigma_i V^T x`` approximates ``dW_i x``
where inputs actually lie. Only factors are transformed (``r x d_in`` per
adapter); no ``d_out x d_in`` matrix is formed.

The result's ``errors`` / ``rel_errors`` are the plain Frobenius ones (the
store's usual meaning); the activation-weighted relative errors (with the
undamped ``C``) are kept in ``metadata["activation_weighted_rel_errors"]``
(module -> list over adapters), with ``metadata["calibration"]`` describing the
stats and the damping.
"""

from __future__ import annotations

import torch

from ._team import SOLO
from .calibration import CalibrationStats, whitening
from .collection import AdapterCollection, ModuleFactors, RankGroup, column_layout
from .result import CompressedCollection

__all__ = ["WhitenedCollection", "compress_activation_aware", "project_activation_aware", "whiten", "unwhiten",
           "reconstruction_errors", "update_norms", "DEFAULT_DAMPING"]

#: Damping of ``C`` relative to its mean eigenvalue (``lambda = damping * trace(C) / d``).
DEFAULT_DAMPING = 1e-2


class WhitenedCollection(AdapterCollection):
    """``collection`` with every module's ``A_i`` replaced by ``A_i S_m``."""

    def __init__(self, collection: AdapterCollection, factors: dict[str, torch.Tensor]):
        self.base = collection
        self.factors = factors

    @property
    def adapter_names(self):
        return self.base.adapter_names

    @property
    def modules(self):
        return self.base.modules

    @property
    def metadata(self) -> dict:
        return dict(getattr(self.base, "metadata", {}) or {})

    @property
    def dtype(self):
        return getattr(self.base, "dtype", None)

    def module_ranks(self, module):
        return self.base.module_ranks(module)

    def load_module(self, module, *, dtype=torch.float32, device="cpu") -> ModuleFactors:
        f = self.base.load_module(module, dtype=dtype, device=device)
        S = self.factors[f.spec.name].to(device=f.device, dtype=f.dtype)
        groups = [RankGroup(g.index, column_layout(torch.matmul(g.A, S)), g.Bt) for g in f.groups]
        return ModuleFactors(f.spec, f.num_adapters, groups)


def reconstruction_errors(f: ModuleFactors, U: torch.Tensor, Vt: torch.Tensor, sigma: torch.Tensor,
                          assignment: torch.Tensor, M: torch.Tensor | None = None) -> torch.Tensor:
    """``||(dW_i - U_k Sigma_i V_k^T) M||_F^2`` for every adapter (``M``: ``[d_in, d_in]`` or ``None`` = I).

    From factors only: with ``P = (s B)^T U`` and ``Q = A M M^T V`` (``rho x r``)
    and ``G = V^T M M^T V``, the error is
    ``||dW M||^2 - 2 <P^T Q, Sigma> + <(U^T U) Sigma G, Sigma>``. Float64.
    """
    U, Vt, sigma = U.double(), Vt.double(), sigma.double()
    core = sigma if sigma.dim() == 3 else torch.diag_embed(sigma)
    VtM = Vt if M is None else Vt @ M.double()  # [K, r, d_in]
    k = assignment.to(torch.long).cpu()
    UtU = U.transpose(1, 2) @ U  # [K, r, r]
    G = VtM @ VtM.transpose(1, 2)  # [K, r, r]
    recon = torch.einsum("nij,njk,nkl->nil", UtU[k], core, G[k])
    out = (recon * core).sum(dim=(1, 2))
    out += update_norms(f, M)
    for g in f.groups:
        idx = g.index.cpu()
        A = g.A.double() if M is None else g.A.double() @ M.double()
        kk = k[idx]
        P = g.Bt.double() @ U[kk]  # [g, rho, r]
        Q = A @ VtM[kk].transpose(1, 2)  # [g, rho, r]
        out[idx] -= 2 * (P.transpose(1, 2) @ Q * core[idx]).sum(dim=(1, 2))
    return out.clamp_min(0)


def update_norms(f: ModuleFactors, M: torch.Tensor | None = None) -> torch.Tensor:
    """``||dW_i M||_F^2`` for every adapter (float64 ``[n]``; ``M = None`` is the identity)."""
    if M is None:
        return f.to(torch.float64).norms_sq().cpu()
    out = torch.zeros(f.num_adapters, dtype=torch.float64)
    for g in f.groups:
        A = g.A.double() @ M.double()
        Bt = g.Bt.double()
        out[g.index.cpu()] = ((A @ A.transpose(1, 2)) * (Bt @ Bt.transpose(1, 2))).sum(dim=(1, 2))
    return out


def compress_activation_aware(
    collection: AdapterCollection, stats: CalibrationStats, rank: int, *, damping: float = DEFAULT_DAMPING,
    max_rel_error: float | None = None, stats_path: str | None = None, **compress_args,
) -> CompressedCollection:
    """:func:`~jdlora_ops.compress.compress` in the activation-weighted metric (see the module docstring).

    ``compress_args`` go to ``compress`` unchanged. ``max_rel_error``: the
    per-adapter error budget (:mod:`.error_budget`), applied in the metric
    that was minimised (the damped activation-weighted one); adapters kept on
    their own get whitened SVDs, un-whitened like ``V``. Raises
    :class:`~.calibration.CalibrationError` when ``stats`` lack a module of
    the collection or have another ``d_in``.
    """
    from .clustering import compress
    from .error_budget import apply_error_budget

    whitened = whiten(collection, stats, damping)
    result = compress(whitened, rank, **compress_args)
    if max_rel_error is not None:
        apply_error_budget(result, whitened, max_rel_error, dtype=compress_args.get("dtype", torch.float32),
                           device=compress_args.get("device", "cpu"), team=compress_args.get("team", SOLO))
    return unwhiten(result, whitened, stats_path=stats_path, original_full=True)


def whiten(collection: AdapterCollection, stats: CalibrationStats, damping: float = DEFAULT_DAMPING
           ) -> "WhitenedCollection":
    """``collection`` with every ``A_i`` whitened by the stats' ``S_m`` (computed when a module is first read):
    any compression of it minimises the activation-weighted error; :func:`unwhiten` turns its result back.
    Raises :class:`~.calibration.CalibrationError` when ``stats`` lack a module of the collection or have
    another ``d_in``."""
    stats.check_modules({s.name: s.d_in for s in collection.modules}, where="calibration stats")
    return WhitenedCollection(collection, _Whitening(stats, damping))


def unwhiten(result: CompressedCollection, whitened: "WhitenedCollection", *, stats_path: str | None = None,
             original_full: bool = False) -> CompressedCollection:
    """A compression of ``whitened`` (:func:`whiten`) turned into one of its base collection, in place: the
    bases ``V^T S^(-1)``, every own factor ``A S^(-1)`` (truncated SVDs and residuals alike); the joint
    tables' errors become the plain ones, the activation-weighted ones go to
    ``metadata["activation_weighted_rel_errors"]``, and ``metadata["calibration"]`` describes the stats.
    Own adapters keep the errors of the metric they were chosen in. ``original_full``: adapters kept as
    their original factors (path ``"full"``) get them read back from the base collection (one more pass,
    only when there are any), rather than un-whitened in the compute dtype."""
    collection, S = whitened.base, whitened.factors
    stats, damping, S_inv = S.stats, S.damping, S.inverse
    full = [name for name, ind in result.individual.items() if ind.path == "full"] if original_full else []
    for ind in result.individual.values():
        if ind.path != "full" or not original_full:
            ind.factors = {m: ((A.double() @ S_inv[m]).to(A.dtype), B) for m, (A, B) in ind.factors.items()}
    if full:
        _read_originals(result, collection, full)
    weighted = {}
    # Adapters the error budget moved out are no longer in the joint tables.
    names = list(collection.adapter_names)
    kept = torch.tensor([names.index(x) for x in result.adapter_names], dtype=torch.long)
    for name, cm in result.modules.items():
        f = collection.load_module(cm.spec, dtype=torch.float64).select(kept)
        cm.Vt = (cm.Vt.double() @ S_inv[name]).to(cm.Vt.dtype)
        half = _sqrt_psd(stats.second_moments[name])
        norms_c = update_norms(f, half)
        err_c = reconstruction_errors(f, cm.U, cm.Vt, cm.sigma, result.assignment, half)
        weighted[name] = torch.where(norms_c > 0, err_c / norms_c.clamp_min(1e-300), torch.zeros_like(err_c)).tolist()
        plain = reconstruction_errors(f, cm.U, cm.Vt, cm.sigma, result.assignment)
        norms = update_norms(f)
        cm.norms_sq = norms.to(cm.norms_sq.dtype)
        cm.errors = plain.to(cm.errors.dtype)
        cm.rel_errors = torch.where(norms > 0, plain / norms.clamp_min(1e-300), torch.zeros_like(plain)).to(
            cm.rel_errors.dtype)
    meta = dict(result.metadata or {})
    meta["activation_weighted_rel_errors"] = weighted
    meta["calibration"] = {"model": stats.model, "token_count": stats.token_count, "damping": damping,
                           "stats": stats_path}
    result.metadata = meta
    return result


def _read_originals(result: CompressedCollection, collection: AdapterCollection, names: list[str]) -> None:
    """The original factors of the own adapters ``names`` (path ``"full"``), for this result's modules."""
    where = list(collection.adapter_names)
    idx = torch.tensor([where.index(x) for x in names], dtype=torch.long)
    specs = {s.name: s for s in collection.modules}
    for m in {m for x in names for m in result.individual[x].factors}:
        f = collection.load_module(specs[m], dtype=torch.float64).select(idx)
        for g in f.groups:
            for t, j in enumerate(g.index.tolist()):
                ind = result.individual[names[j]]
                if m in ind.factors:
                    A, B = ind.factors[m]
                    ind.factors[m] = (g.A[t].to(A.dtype).contiguous(), g.Bt[t].t().to(B.dtype).contiguous())


class _Whitening(dict):
    """Module name -> ``S_m``, computed when first needed: a process of a team whitens its own modules only."""

    def __init__(self, stats: CalibrationStats, damping: float):
        super().__init__()
        self.stats, self.damping, self.inverse = stats, damping, _Inverse(self)

    def __missing__(self, name: str) -> torch.Tensor:
        self[name], self.inverse[name] = whitening(self.stats.second_moments[name], self.damping)
        return self[name]


class _Inverse(dict):
    def __init__(self, forward: _Whitening):
        super().__init__()
        self.forward = forward

    def __missing__(self, name: str) -> torch.Tensor:
        self.forward[name]  # computes both
        return dict.__getitem__(self, name)


def _sqrt_psd(C: torch.Tensor) -> torch.Tensor:
    w, Q = torch.linalg.eigh(C.double())
    return (Q * w.clamp_min(0).sqrt()) @ Q.T


def project_activation_aware(
    compressed: CompressedCollection, new: AdapterCollection, stats: CalibrationStats, *, damping: float,
    budget: float | None = None, cluster: int | None = None, device: torch.device | str = "cpu",
    progress: bool = False,
):
    """:func:`~.projection.project_adapters` (and the error budget) in the activation-weighted metric
    of an activation-aware ``compressed`` (in place). Returns ``(report, paths)``.

    The cores minimise the same damped metric the collection was compressed
    with: the stored ``V^T`` is whitened back (``V_w^T = V^T S``), the new
    adapters' ``A`` whitened, and the original ``V^T`` restored afterwards.
    ``report.rel_errors`` and the stored errors of the new adapters are the
    plain ones; their activation-weighted errors are appended to
    ``metadata["activation_weighted_rel_errors"]``.
    """
    from .allocation import allocate_new_adapters
    from .error_budget import budget_new_adapters
    from .projection import project_adapters

    stats.check_modules({s.name: s.d_in for s in compressed.module_specs}, where="calibration stats")
    S, S_inv = {}, {}
    for name in compressed.modules:
        S[name], S_inv[name] = whitening(stats.second_moments[name], damping)
    n_old = compressed.num_adapters
    saved = {name: cm.Vt for name, cm in compressed.modules.items()}
    for name, cm in compressed.modules.items():
        cm.Vt = (cm.Vt.double() @ S[name]).to(cm.Vt.dtype)
    whitened = WhitenedCollection(new, S)
    try:
        report = project_adapters(compressed, whitened, cluster=cluster, device=device, progress=progress)
        if "multiplier" in (compressed.metadata.get("byte_budget") or {}):
            # A byte-budget store's rule, priced in the metric its allocation weighed.
            paths = allocate_new_adapters(compressed, whitened, report, device=device, floor=budget)
        elif budget is not None:
            paths = budget_new_adapters(compressed, whitened, report, budget, device=device)
        else:
            paths = ["jd"] * len(report.names)
    finally:
        for name, cm in compressed.modules.items():
            cm.Vt = saved[name]
    for name in [x for x, p in zip(report.names, paths) if p != "jd"]:
        ind = compressed.individual[name]
        ind.factors = {m: ((A.double() @ S_inv[m]).to(A.dtype), B) for m, (A, B) in ind.factors.items()}
    # plain and activation-weighted errors of the new adapters still in the joint tables
    kept = list(range(n_old, compressed.num_adapters))
    names_kept = [compressed.adapter_names[i] for i in kept]
    weighted = dict(compressed.metadata.get("activation_weighted_rel_errors") or {})
    plain_rows = {x: {} for x in names_kept}
    if kept:
        idx = torch.tensor(kept, dtype=torch.long)
        sub = torch.tensor([list(new.adapter_names).index(x) for x in names_kept], dtype=torch.long)
        for name, cm in compressed.modules.items():
            f = new.load_module(cm.spec, dtype=torch.float64).select(sub)
            half = _sqrt_psd(stats.second_moments[name])
            asg = compressed.assignment[idx]
            core = cm.sigma[idx]
            plain = reconstruction_errors(f, cm.U, cm.Vt, core, asg)
            norms = update_norms(f)
            rel = torch.where(norms > 0, plain / norms.clamp_min(1e-300), torch.zeros_like(plain))
            wn = update_norms(f, half)
            w = reconstruction_errors(f, cm.U, cm.Vt, core, asg, half)
            weighted[name] = list(weighted.get(name, []))[:n_old] + torch.where(
                wn > 0, w / wn.clamp_min(1e-300), torch.zeros_like(w)).tolist()
            cm.norms_sq[idx] = norms.to(cm.norms_sq.dtype)
            cm.errors[idx] = plain.to(cm.errors.dtype)
            cm.rel_errors[idx] = rel.to(cm.rel_errors.dtype)
            for j, x in enumerate(names_kept):
                plain_rows[x][name] = float(rel[j])
    compressed.metadata["activation_weighted_rel_errors"] = weighted
    mods = list(compressed.modules)
    for j, x in enumerate(report.names):
        if x in plain_rows:
            report.rel_errors[j] = torch.tensor([plain_rows[x][m] for m in mods], dtype=report.rel_errors.dtype)
    return report, paths
