"""Baselines in the compressor's API: per-adapter truncated SVD, and no compression.

Both give every adapter its own bases (a "cluster" of one), so they share the
:class:`~jdlora_ops.compress.result.CompressedCollection` type, the store
format and the export path with the joint methods.
"""

from __future__ import annotations

import time

import torch

from ._linalg import F64, product_spectrum
from .collection import AdapterCollection, ModuleFactors
from .jd import check_rank
from .result import CompressedCollection, CompressedModule, ProjectionReport, check_nonzero, merge_metadata, relative

__all__ = ["truncated_svd", "squared_singular_values", "compress_svd", "compress_none", "append_individual"]


def truncated_svd(factors: ModuleFactors, rank: int):
    """Best rank-``rank`` approximation of every ``dW_i``, from the factors.

    ``B_i = Q_B R_B`` and ``A_i^T = Q_A R_A`` (thin QR), then the SVD of the
    ``r_i x r_i`` core ``R_B R_A^T = P S Q^T`` gives ``dW_i = (Q_B P) S (Q_A Q)^T``.
    Returns ``(U [n, d_out, rank], s [n, rank], V [n, d_in, rank], errors [n],
    norms_sq [n])``; adapters of rank below ``rank`` get zero columns, and
    ``errors`` (float64) is the exact sum of the discarded ``s^2``.
    """
    spec, n = factors.spec, factors.num_adapters
    dt, dev = factors.dtype, factors.device
    U = torch.zeros(n, spec.d_out, rank, dtype=dt, device=dev)
    V = torch.zeros(n, spec.d_in, rank, dtype=dt, device=dev)
    s = torch.zeros(n, rank, dtype=dt, device=dev)
    errors = torch.zeros(n, dtype=F64, device=dev)
    norms = torch.zeros(n, dtype=F64, device=dev)
    for g in factors.groups:
        QB, RB = torch.linalg.qr(g.Bt.transpose(1, 2))
        QA, RA = torch.linalg.qr(g.A.transpose(1, 2))
        core = torch.bmm(RB, RA.transpose(1, 2))
        P, S, Qh = torch.linalg.svd(core)
        k = min(rank, g.rank)
        U[g.index, :, :k] = torch.bmm(QB, P[:, :, :k])
        V[g.index, :, :k] = torch.bmm(QA, Qh.transpose(1, 2)[:, :, :k])
        s[g.index, :k] = S[:, :k]
        S64 = S.to(F64).square()
        norms[g.index] = S64.sum(1)
        errors[g.index] = S64[:, k:].sum(1)
    return U, s, V, errors, norms


def squared_singular_values(factors: ModuleFactors) -> torch.Tensor:
    """float64 ``[n, rho]`` squared singular values of every ``dW_i`` (descending; zero past an adapter's
    rank), ``rho`` the largest rank, from the ``r_i x r_i`` Grams of the two factors
    (:func:`~._linalg.product_spectrum`)."""
    rho = max([0] + [g.rank for g in factors.groups])
    s2 = torch.zeros(factors.num_adapters, rho, dtype=F64)
    for g in factors.groups:
        s2[g.index.cpu(), :g.rank] = product_spectrum(g.Bt @ g.Bt.transpose(1, 2), g.A @ g.A.transpose(1, 2)).cpu()
    return s2


def _svd_module(f: ModuleFactors, rank: int) -> CompressedModule:
    U, s, V, err, norms = truncated_svd(f, rank)
    return CompressedModule(f.spec, U, V.transpose(1, 2).contiguous(), s, norms, err, relative(err, norms))


def _none_module(f: ModuleFactors, rank: int) -> CompressedModule:
    spec, n = f.spec, f.num_adapters
    dt, dev = f.dtype, f.device
    U = torch.zeros(n, spec.d_out, rank, dtype=dt, device=dev)
    Vt = torch.zeros(n, rank, spec.d_in, dtype=dt, device=dev)
    s = torch.zeros(n, rank, dtype=dt, device=dev)
    for g in f.groups:
        if g.rank > rank:
            raise ValueError(f"module {spec.name}: an adapter has rank {g.rank}, more than the collection's {rank}")
        U[g.index, :, : g.rank] = g.Bt.transpose(1, 2)
        Vt[g.index, : g.rank] = g.A
        s[g.index, : g.rank] = 1
    norms = f.norms_sq().to(F64)
    zero = torch.zeros(n, dtype=F64, device=dev)
    return CompressedModule(spec, U, Vt, s, norms, zero, zero.clone())


def _individual(collection, rank, method, dtype, device, progress) -> CompressedCollection:
    names = collection.adapter_names
    n = len(names)
    modules = {}
    ranks = {}
    specs = collection.modules
    it = specs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(specs, desc=method, unit="module")
    for spec in it:
        f = collection.load_module(spec, dtype=dtype, device=device)
        ranks[spec.name] = f.ranks().tolist()
        if method == "svd":
            check_rank(rank, spec.d_out, spec.d_in, f"module {spec.name}")
            modules[spec.name] = _svd_module(f, rank)
        else:
            modules[spec.name] = _none_module(f, rank)
    check_nonzero(list(names), sum(cm.norms_sq.double().cpu() for cm in modules.values()) if modules
                  else torch.zeros(n))
    md = dict(getattr(collection, "metadata", {}) or {})
    md["ranks"] = ranks
    return CompressedCollection(
        method, rank, list(names), torch.arange(n), n, modules, weights="relative", metadata=md
    )


def compress_svd(
    collection: AdapterCollection,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> CompressedCollection:
    """Per-adapter truncated SVD to rank ``rank`` on every module (the baseline
    a server can apply without joint compression). Adapter ``i`` is cluster ``i``."""
    return _individual(collection, rank, "svd", dtype, device, progress)


def compress_none(
    collection: AdapterCollection,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> CompressedCollection:
    """No compression: every adapter keeps its factors (``U = s B``, ``Vt = A``,
    ``sigma = 1``), zero-padded to the largest rank in the collection."""
    rank = 0
    for spec in collection.modules:
        f = collection.load_module(spec, dtype=dtype, device=device)
        rank = max([rank] + [g.rank for g in f.groups])
    return _individual(collection, max(rank, 1), "none", dtype, device, progress)


def append_individual(
    compressed: CompressedCollection,
    new: AdapterCollection,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    t0: float | None = None,
) -> ProjectionReport:
    """Add adapters to an ``svd``/``none`` collection: each gets its own bases."""
    t0 = time.perf_counter() if t0 is None else t0
    names = list(new.adapter_names)
    m = len(names)
    new_specs = {s.name for s in new.modules}
    rel_cols = []
    new_ranks = {}
    adds = {}
    for name, cm in compressed.modules.items():
        dt = dtype or cm.U.dtype
        f = new.load_module(name, dtype=dt, device=device) if name in new_specs else ModuleFactors(cm.spec, m, [])
        new_ranks[name] = f.ranks().tolist()
        adds[name] = _svd_module(f, cm.rank) if compressed.method == "svd" else _none_module(f, cm.rank)
    # Checked before anything is appended, so a refused adapter leaves the collection as it was.
    check_nonzero(names, sum(a.norms_sq.double().cpu() for a in adds.values()) if adds else torch.zeros(m))
    for name, cm in compressed.modules.items():
        add = adds[name]
        cm.U = torch.cat([cm.U, add.U.to(cm.U)], dim=0)
        cm.Vt = torch.cat([cm.Vt, add.Vt.to(cm.Vt)], dim=0)
        cm.sigma = torch.cat([cm.sigma, add.sigma.to(cm.sigma)], dim=0)
        cm.norms_sq = torch.cat([cm.norms_sq, add.norms_sq.to(cm.norms_sq)], dim=0)
        cm.errors = torch.cat([cm.errors, add.errors.to(cm.errors)], dim=0)
        cm.rel_errors = torch.cat([cm.rel_errors, add.rel_errors.to(cm.rel_errors)], dim=0)
        rel_cols.append(add.rel_errors.double().cpu())
    n0 = compressed.num_adapters
    clusters = torch.arange(n0, n0 + m)
    compressed.adapter_names.extend(names)
    compressed.assignment = torch.cat([compressed.assignment, clusters.to(compressed.assignment)])
    compressed.num_clusters += m
    merge_metadata(compressed, new, new_ranks)
    rel = torch.stack(rel_cols, dim=1) if rel_cols else torch.zeros(m, 0, dtype=F64)
    return ProjectionReport(names, clusters, rel, torch.zeros(m, 0, dtype=F64), time.perf_counter() - t0)
