"""Shared bases on a quantized grid, with every adapter's core refitted to them.

Quantizing ``U`` and ``V^T`` (:mod:`jdlora_ops.quant`) moves each basis off the orthonormal one the
fit found. The cores then no longer minimise the error; refitted against the quantized bases
``U_q``, ``V_q`` they absorb part of what quantization lost (cores stay in the float dtype, they are
small):

* JD-Full: ``Sigma_i = (U_q^T U_q)^+ U_q^T dW_i V_q (V_q^T V_q)^+``, the least-squares core for
  bases that are no longer orthonormal;
* JD-Diag: ``sigma_i = ((U_q^T U_q) o (V_q^T V_q))^+ diag(U_q^T dW_i V_q)``.

Both need only ``B_i^T U_q`` and ``A_i V_q`` per adapter (factors, never ``dW``). The errors are
recomputed from factors against the quantized bases (float64), so the result's ``errors`` and
``rel_errors`` are those of what is served.

:func:`quantize_bases` works on a :class:`~.result.CompressedCollection` in place: its ``U`` and
``Vt`` become the dequantised tables (``q * s``, :mod:`jdlora_ops.quant`; exact in float32 and
float64, rounded to the dtype in float16/bfloat16), so that every
path that reads float tables (reconstruction, export, serving) serves the quantized bases; the
quantized tables themselves are kept as each module's ``quantized`` (what a store writes) and
returned.
"""

from __future__ import annotations

import torch

from ..quant import QuantizedTable, effective_group_size, quantize
from ._linalg import F64, sym_pinv
from .activation_aware import reconstruction_errors
from .collection import AdapterCollection
from .result import CompressedCollection

__all__ = ["quantize_bases"]


def quantize_bases(result: CompressedCollection, collection: AdapterCollection, fmt: str,
                   group_size: int | None = None, *, scale_dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu") -> dict[str, tuple[QuantizedTable, QuantizedTable]]:
    """Quantize every module's ``U`` and ``Vt`` in format ``fmt`` (scales in ``scale_dtype``, default the
    tables' dtype: the store dtype they will be written in), refit every
    joint-table adapter's core against them and recompute its errors, in place; returns module name ->
    ``(U, Vt)`` quantized. ``collection`` must hold the result's adapters (its factors are read once per
    module). Refuses activation-aware results (their cores minimise another metric) and per-adapter
    methods (no shared bases)."""
    if result.method not in ("full", "diag"):
        raise ValueError(f"quantize_bases: the shared bases of JD-Full or JD-Diag are quantized, got method "
                         f"{result.method!r}")
    if (result.metadata or {}).get("calibration"):
        raise ValueError("quantize_bases: an activation-aware result's cores minimise the activation-weighted "
                         "error; refitting them in the plain metric would undo that")
    names = list(collection.adapter_names)
    where = {x: i for i, x in enumerate(names)}
    missing = [x for x in result.adapter_names if x not in where]
    if missing:
        raise ValueError(f"quantize_bases: adapter {missing[0]!r} of the joint tables is not in the collection")
    for cm in result.modules.values():  # every refusal before any table changes
        effective_group_size(fmt, cm.U.shape[-1], group_size)
        effective_group_size(fmt, cm.Vt.shape[-1], group_size)
    rows = torch.tensor([where[x] for x in result.adapter_names], dtype=torch.long)
    specs = {s.name: s for s in collection.modules}
    out = {}
    for name, cm in result.modules.items():
        Uq = quantize(cm.U, fmt, group_size, scale_dtype=scale_dtype)
        Vq = quantize(cm.Vt, fmt, group_size, scale_dtype=scale_dtype)
        dt = cm.U.dtype
        compute = F64 if dt == F64 else torch.float32  # the ops' float32 accumulation of q * s
        cm.U = Uq.dequantize(compute).to(dt)
        cm.Vt = Vq.dequantize(compute).to(dt)
        f = collection.load_module(specs[name], dtype=F64, device=device).select(rows)
        cm.sigma = _refit(f, cm.U.to(device), cm.Vt.to(device), result.assignment, result.method).to(cm.sigma.dtype)
        err = reconstruction_errors(f, cm.U, cm.Vt, cm.sigma, result.assignment)
        norms = f.norms_sq().to(F64).cpu()
        cm.errors = err.to(cm.errors.dtype)
        cm.rel_errors = torch.where(norms > 0, err / norms.clamp_min(torch.finfo(F64).tiny),
                                    torch.zeros_like(err)).to(cm.rel_errors.dtype)
        out[name] = cm.quantized = (Uq, Vq)
    result.metadata = {**(result.metadata or {}), "quantized_bases": {"format": fmt, "group_size": group_size}}
    return out


def _refit(f, U: torch.Tensor, Vt: torch.Tensor, assignment: torch.Tensor, method: str) -> torch.Tensor:
    """The least-squares cores of ``f``'s adapters under bases ``U [K, d_out, r]``, ``Vt [K, r, d_in]``
    (any bases, not only orthonormal ones), float64 ``[n, r, r]`` or ``[n, r]``."""
    U, Vt = U.to(F64), Vt.to(F64)
    K, _, r = U.shape
    GU_inv = torch.stack([sym_pinv(U[k].T @ U[k]) for k in range(K)])
    GV = Vt @ Vt.transpose(1, 2)
    GV_inv = torch.stack([sym_pinv(GV[k]) for k in range(K)])
    diag = method != "full"
    GD_inv = torch.stack([sym_pinv((U[k].T @ U[k]) * GV[k]) for k in range(K)]) if diag else None
    out = torch.zeros(f.num_adapters, *((r,) if diag else (r, r)), dtype=F64)
    k_of = assignment.to(torch.long).cpu()
    for g in f.groups:
        idx = g.index.cpu()
        kk = k_of[idx]
        Q = g.Bt.to(F64) @ U[kk]  # [m, rho, r]: B^T U
        P = g.A.to(F64) @ Vt[kk].transpose(1, 2)  # [m, rho, r]: A V
        M = Q.transpose(1, 2) @ P  # U^T dW V
        if diag:
            out[idx] = (GD_inv[kk] @ torch.diagonal(M, dim1=1, dim2=2)[..., None])[..., 0].cpu()
        else:
            out[idx] = (GU_inv[kk] @ M @ GV_inv[kk]).cpu()
    return out
