"""Errors of adapters under every cluster's bases, and projection of new adapters.

For a basis pair ``(U_k, V_k)`` the best core of an adapter is
``Sigma = U_k^T dW V_k`` (full, orthonormal bases) or the diagonal least-squares
solution ``sigma = diag(U_k^T dW V_k) ((U_k^T U_k) o (V_k^T V_k))^+`` (diag). Both
need only ``B^T U_k`` and ``A V_k``; all clusters are done with one GEMM per
side and rank group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ._linalg import F64, sym_pinv
from .collection import AdapterCollection, ModuleFactors
from .baselines import append_individual
from .error_budget import drop_from_tables
from .result import CompressedCollection, ProjectionReport, check_nonzero, merge_metadata, relative

__all__ = ["ClusterEvaluation", "evaluate_clusters", "project_adapters", "remove_adapters"]

# Upper bound on elements of one [chunk, rho, K r] intermediate (bounded memory for K x n products).
_CHUNK_ELEMS = 1 << 24


@dataclass
class ClusterEvaluation:
    """Adapters of one module against ``K`` clusters.

    ``errors``: float64 ``[n, K]`` squared errors ``||dW_i - recon_ik||^2``
    (``+inf`` for clusters without bases); ``norms_sq``: float64 ``[n]``;
    ``sigma``: cores for the cluster given in ``own`` (``[n, r, r]`` or
    ``[n, r]``), or for all clusters (``[n, K, r, r]`` / ``[n, K, r]``) when
    ``own`` is ``None`` and ``all_sigma`` is set.
    """

    errors: torch.Tensor
    norms_sq: torch.Tensor
    sigma: torch.Tensor | None


def evaluate_clusters(
    factors: ModuleFactors,
    U: torch.Tensor,
    V: torch.Tensor,
    method: str,
    *,
    own: torch.Tensor | None = None,
    all_sigma: bool = False,
    valid: torch.Tensor | None = None,
) -> ClusterEvaluation:
    """Cores and errors of every adapter of ``factors`` under every cluster.

    ``U: [K, d_out, r]``, ``V: [K, d_in, r]`` in the compute dtype and device;
    ``method``: ``"full"`` (``U``, ``V`` orthonormal) or ``"diag"``;
    ``valid``: bool ``[K]``, clusters that have bases (others get ``+inf``).
    """
    K, d_out, r = U.shape
    d_in = V.shape[1]
    n = factors.num_adapters
    dev, dt = U.device, U.dtype
    norms = factors.norms_sq().to(F64)
    errors = torch.zeros(n, K, dtype=F64, device=dev)
    diag = method != "full"
    sig_shape = (r,) if diag else (r, r)
    sigma = None
    if own is not None:
        sigma = torch.zeros(n, *sig_shape, dtype=dt, device=dev)
        own = own.to(dev)
    elif all_sigma:
        sigma = torch.zeros(n, K, *sig_shape, dtype=dt, device=dev)
    Ucat = U.permute(1, 0, 2).reshape(d_out, K * r)
    Vcat = V.permute(1, 0, 2).reshape(d_in, K * r)
    Gpinv = None
    if diag:
        G = torch.einsum("kai,kaj->kij", U.to(F64), U.to(F64)) * torch.einsum("kai,kaj->kij", V.to(F64), V.to(F64))
        Gpinv = torch.stack([sym_pinv(G[k]) for k in range(K)])
    for g in factors.groups:
        rho = g.rank
        step = max(1, _CHUNK_ELEMS // max(1, rho * K * r))
        for lo in range(0, g.count, step):
            hi = min(g.count, lo + step)
            idx = g.index[lo:hi]
            Q = torch.matmul(g.Bt[lo:hi], Ucat).view(hi - lo, rho, K, r)
            P = torch.matmul(g.A[lo:hi], Vcat).view(hi - lo, rho, K, r)
            if diag:
                d = torch.einsum("gpkr,gpkr->gkr", Q, P).to(F64)  # diag(U_k^T dW V_k)
                s = torch.einsum("gkr,krs->gks", d, Gpinv)
                captured = (s * d).sum(-1)  # d^T G^+ d
                errors[idx] = norms[idx, None] - captured
                if own is not None:
                    sigma[idx] = s[torch.arange(hi - lo, device=dev), own[idx]].to(dt)
                elif all_sigma:
                    sigma[idx] = s.to(dt)
            else:
                cap = torch.empty(hi - lo, K, dtype=F64, device=dev)
                for k in range(K):
                    S = torch.bmm(Q[:, :, k, :].transpose(1, 2), P[:, :, k, :])
                    cap[:, k] = S.to(F64).square().sum(dim=(1, 2))
                    if own is not None:
                        mine = own[idx] == k
                        if bool(mine.any()):
                            sigma[idx[mine]] = S[mine]
                    elif all_sigma:
                        sigma[idx, k] = S
                errors[idx] = norms[idx, None] - cap
    errors = errors.clamp_min(0)
    # Zero updates (absent adapters) keep error 0 under every cluster.
    if valid is not None:
        errors[:, ~valid.to(dev)] = float("inf")
    return ClusterEvaluation(errors, norms, sigma)


def project_adapters(
    compressed: CompressedCollection,
    new: AdapterCollection,
    *,
    cluster: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> ProjectionReport:
    """Add the adapters of ``new`` to ``compressed`` without recompressing (in place).

    Every adapter goes to the cluster whose bases give it the lowest summed
    error over the modules (relative errors if the collection was fitted with
    relative weights, else absolute ones), or to ``cluster`` when given; its
    cores are ``Sigma = U_k^T dW V_k`` (full) or the diagonal least-squares
    solve (diag). For ``svd``/``none`` collections every new adapter gets its
    own truncated SVD resp. its own factors. Modules of ``compressed`` missing
    in ``new`` count as zero updates; a module of ``new`` unknown to
    ``compressed``, a shape mismatch or a duplicate name raises ``ValueError``.
    """
    t0 = time.perf_counter()
    if compressed.method in ("full", "diag") and compressed.num_clusters == 0:
        raise ValueError("the collection's joint tables are empty (every adapter is kept on its own under the error "
                         "budget): there are no bases to project onto; recompress with the new adapters")
    names = list(new.adapter_names)
    dup = set(names) & set(compressed.all_names)
    if dup or len(set(names)) != len(names):
        raise ValueError(f"adapter names already in the collection or repeated: {sorted(dup) or names}")
    known = {m.name: m for m in compressed.module_specs}
    for spec in new.modules:
        if spec.name not in known:
            raise ValueError(f"module {spec.name} of the new adapters is not in the compressed collection")
        ks = known[spec.name]
        if (ks.d_out, ks.d_in) != (spec.d_out, spec.d_in):
            raise ValueError(
                f"module {spec.name}: new adapters are {spec.d_out} x {spec.d_in}, the collection has {ks.d_out} x {ks.d_in}"
            )
    if compressed.method in ("svd", "none"):
        return append_individual(compressed, new, dtype=dtype, device=device, t0=t0)

    K = compressed.num_clusters
    if cluster is not None and not 0 <= cluster < K:
        raise ValueError(f"cluster {cluster} out of range [0, {K})")
    m = len(names)
    new_specs = {s.name for s in new.modules}
    per_module: dict[str, ClusterEvaluation] = {}
    new_ranks: dict[str, list[int]] = {}
    cost = torch.zeros(m, K, dtype=F64)
    mods = list(compressed.modules.items())
    it = mods
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(mods, desc="project", unit="module")
    for name, cm in it:
        dt = dtype or cm.U.dtype
        if name in new_specs:
            f = new.load_module(name, dtype=dt, device=device)
        else:
            f = ModuleFactors(cm.spec, m, [])
        U = cm.U.to(device=device, dtype=dt)
        V = cm.Vt.to(device=device, dtype=dt).transpose(1, 2)
        ev = evaluate_clusters(f, U, V, compressed.method, all_sigma=True)
        per_module[name] = ev
        new_ranks[name] = f.ranks().tolist()
        if compressed.weights == "relative":
            cost += relative(ev.errors, ev.norms_sq).cpu()
        else:
            cost += ev.errors.cpu()
    check_nonzero(names, sum(ev.norms_sq.cpu() for ev in per_module.values()) if per_module else torch.zeros(m))
    if cluster is None:
        chosen = cost.argmin(dim=1) if K else torch.zeros(m, dtype=torch.long)
    else:
        chosen = torch.full((m,), cluster, dtype=torch.long)
    rel_cols = []
    for name, cm in compressed.modules.items():
        ev = per_module[name]
        ar = torch.arange(m, device=ev.errors.device)
        ch = chosen.to(ev.errors.device)
        err = ev.errors[ar, ch]
        sig = ev.sigma[ar, ch].to(device=cm.sigma.device, dtype=cm.sigma.dtype)
        rel = relative(err, ev.norms_sq)
        cm.sigma = torch.cat([cm.sigma, sig], dim=0)
        cm.norms_sq = torch.cat([cm.norms_sq, ev.norms_sq.to(cm.norms_sq)], dim=0)
        cm.errors = torch.cat([cm.errors, err.to(cm.errors)], dim=0)
        cm.rel_errors = torch.cat([cm.rel_errors, rel.to(cm.rel_errors)], dim=0)
        rel_cols.append(rel.cpu())
    compressed.adapter_names.extend(names)
    compressed.assignment = torch.cat([compressed.assignment, chosen.to(compressed.assignment)])
    merge_metadata(compressed, new, new_ranks)
    rel = torch.stack(rel_cols, dim=1) if rel_cols else torch.zeros(m, 0, dtype=F64)
    return ProjectionReport(names, chosen, rel, cost, time.perf_counter() - t0)


def remove_adapters(compressed: CompressedCollection, names) -> int:
    """Remove adapters ``names`` from ``compressed`` (in place); returns how many clusters emptied.

    Adapters in the joint tables lose their cores (a cluster left without
    adapters loses its bases and the others are renumbered); adapters kept on
    their own lose their factors. Unknown or repeated names raise ``KeyError``
    before anything changes.
    """
    names = list(names)
    known = set(compressed.all_names)
    bad = [x for x in names if x not in known]
    if bad or len(set(names)) != len(names):
        raise KeyError(f"remove: no adapter named {bad[0]!r} in the store ({len(known)} adapters)" if bad
                       else f"remove: a name is given twice: {names}")
    drop = torch.tensor([x in names for x in compressed.adapter_names], dtype=torch.bool)
    before = compressed.num_clusters
    weighted = compressed.metadata.get("activation_weighted_rel_errors")
    if weighted:
        keep = (~drop).tolist()
        compressed.metadata["activation_weighted_rel_errors"] = {
            m: [v for v, k in zip(vals, keep) if k] for m, vals in weighted.items()}
    if bool(drop.any()):
        drop_from_tables(compressed, drop)
    for x in names:
        compressed.individual.pop(x, None)
    return before - compressed.num_clusters
