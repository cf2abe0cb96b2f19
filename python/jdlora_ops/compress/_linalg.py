"""Thin-matrix helpers shared by the compressors.

Every product with the adapters' factors goes through :func:`project` and
:func:`expand`; they turn a list of rank groups into one GEMM per group, so the
cost of a pass is set by the bytes of the factors, not by Python loops.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

F64 = torch.float64


def gemm_width(m: int, dtype: torch.dtype, device: torch.device) -> int:
    """The width at which to run a thin ``[rows, d] @ [d, m]`` GEMM of ``dtype`` on ``device``.

    On CPUs, MKL runs very thin single- and double-precision GEMMs far below its
    usual rate: on a 2-core AVX2 machine a ``[1600, 4096] @ [4096, m]`` product
    took 15-17 ms for m = 2..11 and 2.0 ms for m = 16 (float32), 25-34 ms for
    m = 2..11 and 4.9 ms for m = 12 (float64). Padding the block with zero
    columns to that width costs at most one such GEMM and never changes the
    result; one-column products (GEMV) are fast and left alone.
    """
    if torch.device(device).type != "cpu" or m < 2:
        return m
    floor = 16 if dtype == torch.float32 else 12
    return max(m, floor)


def _pad_columns(X: torch.Tensor, width: int) -> torch.Tensor:
    if X.shape[-1] == width:
        return X
    out = X.new_zeros(*X.shape[:-1], width)
    out[..., : X.shape[-1]] = X
    return out


def project(data: Sequence[torch.Tensor], X: torch.Tensor) -> list[torch.Tensor]:
    """``[D_g @ X for each group]``: ``D_g: [g, rho, d]``, ``X: [d, m]`` -> ``[g, rho, m]``."""
    m = X.shape[1]
    Xp = _pad_columns(X, gemm_width(m, X.dtype, X.device))
    return [torch.matmul(D, Xp)[..., :m] for D in data]


def expand(data: Sequence[torch.Tensor], C: Sequence[torch.Tensor], d: int, m: int, like: torch.Tensor) -> torch.Tensor:
    """``sum_i D_i^T C_i`` over all adapters of all groups: ``[d, m]``.

    ``D_g: [g, rho, d]``, ``C_g: [g, rho, m]``; each group is one
    ``[d, g rho] @ [g rho, m]`` GEMM, on contiguous memory when ``D_g`` is in
    the column layout (:func:`~jdlora_ops.compress.collection.empty_factors`).
    """
    width = gemm_width(m, like.dtype, like.device)
    out = torch.zeros(d, width, dtype=like.dtype, device=like.device)
    for D, c in zip(data, C):
        if D.shape[0]:
            out.addmm_(D.reshape(-1, d).t(), _pad_columns(c.reshape(-1, m), width))
    return out[:, :m]


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def psd_sqrt(G: torch.Tensor) -> torch.Tensor:
    """A factor ``L`` with ``L L^T = G`` for a batch of PSD matrices ``[..., k, k]``.

    Cholesky where it succeeds (cheap); an eigendecomposition for the
    singular ones (zero or rank-deficient updates).
    """
    G64 = G.to(F64)
    L, info = torch.linalg.cholesky_ex(G64)
    bad = info != 0
    if bool(bad.any()):
        lam, E = torch.linalg.eigh(G64[bad])
        L[bad] = E * lam.clamp_min(0).sqrt().unsqueeze(-2)
    return L.to(G.dtype)


def product_spectrum(GL: torch.Tensor, GR: torch.Tensor) -> torch.Tensor:
    """Squared singular values (float64, descending, clamped at 0) of ``X Y^T`` from the Gram matrices
    ``GL = X^T X`` and ``GR = Y^T Y`` (``[..., p, p]``): the eigenvalues of ``L^T GR L`` with ``L L^T = GL``.

    Thin products instead of QRs of the tall factors; the squares carry an absolute error of about the
    Grams' float resolution times ``||X Y^T||^2``."""
    L = psd_sqrt(GL.to(F64))
    return torch.linalg.eigvalsh(L.transpose(-1, -2) @ GR.to(F64) @ L).flip(-1).clamp_min(0)


def orth_complement(Y: torch.Tensor, X: torch.Tensor | None, rtol: float) -> torch.Tensor:
    """Orthonormal basis of the part of ``span(Y)`` orthogonal to ``span(X)``.

    ``X: [d, m]`` has orthonormal columns (or is ``None``). Directions of the
    projected ``Y`` whose singular value is below ``rtol * ||Y||_F`` are
    dropped, so the result has between 0 and ``Y.shape[1]`` columns. Two rounds
    of projection and Gram-eigendecomposition orthonormalisation (cheap for a
    thin ``Y``; the second round restores orthogonality lost in the first) keep
    it orthonormal and orthogonal to ``X`` to working precision.
    """
    if Y.numel() == 0:
        return Y.new_zeros(Y.shape[0], 0)
    scale = float(torch.linalg.vector_norm(Y))
    if not math.isfinite(scale):  # the float32 sum of squares overflowed
        scale = float(torch.linalg.vector_norm(Y, dtype=F64))
    if scale == 0.0:
        return Y.new_zeros(Y.shape[0], 0)
    # The 1/scale normalisation is folded into the small matrices unless Y is so large or
    # small that its Gram matrix could leave the dtype's range.
    Z = Y
    if not 1e-12 < scale < 1e12:
        Z, scale = Y / scale, 1.0
    eps = eps_of(Y.dtype)
    project_out = X is not None and X.shape[1] > 0
    if project_out:
        Z = torch.addmm(Z, X, X.t() @ Z, alpha=-1)
    lam, E = torch.linalg.eigh((Z.t() @ Z).to(F64) / (scale * scale))
    # Below rtol (relative to Y) a direction is rounding noise of the projection; below
    # 100 eps of the largest Gram eigenvalue its eigenvector is not resolved.
    keep = lam > max(rtol * rtol, 100 * eps * float(lam[-1]))
    if not bool(keep.any()):
        return Y.new_zeros(Y.shape[0], 0)
    Z = Z @ (E[:, keep] / (lam[keep].sqrt() * scale)).to(Z.dtype)
    # Second round: Z is orthonormal up to the rounding of the first; project again and
    # re-orthonormalise (Cholesky suffices now), which makes both properties hold to eps.
    if project_out:
        Z = torch.addmm(Z, X, X.t() @ Z, alpha=-1)
    G = (Z.t() @ Z).to(F64)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0 and float(torch.diagonal(L).min()) > 0.5:
        return Z @ torch.linalg.solve_triangular(L.t(), torch.eye(G.shape[0], dtype=F64, device=G.device), upper=True).to(Z.dtype)
    lam, E = torch.linalg.eigh(G)
    keep = lam > 0.25
    if not bool(keep.any()):
        return Y.new_zeros(Y.shape[0], 0)
    return Z @ (E[:, keep] / lam[keep].sqrt()).to(Z.dtype)


def orth_fill(Y: torch.Tensor, m: int, gen: torch.Generator, rtol: float) -> torch.Tensor:
    """``[d, m]`` orthonormal columns spanning ``span(Y)`` first, then random directions."""
    d = Y.shape[0]
    Q = orth_complement(Y, None, rtol)[:, :m]
    while Q.shape[1] < m:
        extra = torch.randn(d, m - Q.shape[1], generator=gen, dtype=Y.dtype, device=Y.device)
        Z = orth_complement(extra, Q, rtol)
        Q = torch.cat([Q, Z], dim=1)
    return Q


def random_orthonormal(d: int, m: int, gen: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    Y = torch.randn(d, m, generator=gen, dtype=dtype, device=device)
    return orth_fill(Y, m, gen, 100 * eps_of(dtype))


def extend_basis(U: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """``U`` (orthonormalised) followed by random orthonormal columns, ``m`` in all."""
    rtol = 100 * eps_of(U.dtype)
    Q = orth_complement(U, None, rtol)
    if Q.shape[1] == U.shape[1]:
        # Keep U's own columns (not a rotation of them), so a warm start resumes exactly.
        Q, R = torch.linalg.qr(U)
        Q = Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones_like(torch.diagonal(R)))
    while Q.shape[1] < m:
        extra = torch.randn(U.shape[0], m - Q.shape[1], generator=gen, dtype=U.dtype, device=U.device)
        Q = torch.cat([Q, orth_complement(extra, Q, rtol)], dim=1)
    return Q[:, :m]


def sym_pinv(G: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix (float64), small eigenvalues dropped."""
    lam, E = torch.linalg.eigh(G.to(F64))
    cut = rtol * lam.abs().max().clamp_min(torch.finfo(F64).tiny)
    inv = torch.where(lam > cut, 1.0 / lam, torch.zeros_like(lam))
    return (E * inv) @ E.t()
