"""``jdlora compress`` as the steps a user runs: read, calibrate, partition and fit, quantize, allocate, write.

:func:`compress_to_store` is the one path from a collection to a store, on one
process or on several (``torch.distributed``, see :mod:`.distributed`: each
process reads, fits and writes its own modules, and every decision that spans
modules is combined in module order, so the store is bitwise the one-process
store):

1. **read**: the arguments are checked, the processes agree on them, the
   target can be written, and every factor is finite, all before any work;
2. **calibrate** (``calibration``): the collection is whitened by the
   activation statistics (:func:`~.activation_aware.whiten`), so that every
   later step minimises the activation-weighted error;
3. **partition and fit**: clustered JD (:func:`~.clustering.compress`), or
   for a byte budget the candidates it searches (:mod:`.allocation`);
4. **quantize** (``quantize``): the shared bases on an int8 or 4-bit grid,
   every core refitted to them (:func:`~.quantized_bases.quantize_bases`),
   before the error budget weighs the adapters' errors;
5. **allocate**: the error budget (``max_rel_error``) or the byte budget
   (``target_bytes``/``target_ratio``) chooses each adapter's representation;
   a calibrated result is turned back (:func:`~.activation_aware.unwhiten`);
6. **write**: one store, atomically (:func:`~.distributed.write_store`).
"""

from __future__ import annotations

import os
import time

import torch

from ._team import ModuleTeam
from .activation_aware import DEFAULT_DAMPING, unwhiten, whiten
from .allocation import check_target, fit_for_budget
from .clustering import compress
from .collection import AdapterCollection
from .distributed import check_agreement, team_of, write_store
from .error_budget import apply_error_budget, check_budget
from .quantized_bases import quantize_bases
from .result import CompressedCollection

__all__ = ["compress_to_store"]


def compress_to_store(
    collection: AdapterCollection,
    rank: int | None,
    out: str | os.PathLike,
    *,
    group=None,
    team: ModuleTeam | None = None,
    calibration=None,
    calibration_path: str | None = None,
    damping: float | None = None,
    max_rel_error: float | None = None,
    store_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    target_bytes: float | None = None,
    target_ratio: float | None = None,
    residual: bool = True,
    log_curve=None,
    quantize: str | None = None,
    group_size: int | None = None,
    **compress_args,
) -> CompressedCollection:
    """Compress ``collection`` and write the store ``out``; under ``torch.distributed``, call on every process.

    ``compress_args`` go to :func:`~jdlora_ops.compress.compress` (method
    ``"full"`` or ``"diag"`` with several processes or a byte budget).
    ``calibration`` (:class:`~.calibration.CalibrationStats`, read from
    ``calibration_path``) makes every step activation-aware, with ``damping``
    (default :data:`~.activation_aware.DEFAULT_DAMPING`). ``max_rel_error``
    applies the error budget. ``target_bytes`` or ``target_ratio`` (of the
    original bytes) choose each adapter's representation within a byte budget
    (:mod:`.allocation`; then ``rank`` may be None and ``num_clusters`` None or
    ``"auto"`` to search them, ``max_rel_error`` is each adapter's floor,
    ``residual=False`` leaves out the core-plus-residual representation for
    servers that serve the joint tables and own factors only, and
    ``log_curve(lines)`` receives the searched curve). With calibration the
    budget weighs activation-weighted errors (``metadata["byte_budget"]["metric"]``).
    ``quantize`` (``"int8"`` or ``"int4"``, with ``group_size`` for 4-bit)
    stores the shared bases quantized (:mod:`jdlora_ops.quant`), the cores
    refitted to them; not with a byte budget, calibration or several
    processes yet. ``store_dtype``/``overwrite`` go to :func:`~jdlora_ops.store.save_store`.
    ``group``: a process group (default: the default group when initialised,
    else this process alone); ``team``: a :class:`~._team.ModuleTeam` instead
    (it counts the bytes sent).

    Returns, on process 0, the whole compressed collection; on the others
    their modules only. Every process raises when any fails (the others with
    :class:`~._team.RankFailed` naming it); the store is then not written.
    Factors holding NaN or an infinity are refused before any compression
    work (:class:`~jdlora_ops.NonFiniteError` naming the adapter, module and
    factor).
    """
    t0 = time.perf_counter()
    team = team or team_of(group)
    budgeted = target_bytes is not None or target_ratio is not None
    method = compress_args.get("method", "full")

    # 1. read: every refusal before any work.
    options = {k: v for k, v in compress_args.items() if k not in ("log", "progress", "team")}
    options.update(max_rel_error=max_rel_error, target_bytes=target_bytes, target_ratio=target_ratio,
                   residual=residual, damping=damping, store_dtype=store_dtype, overwrite=overwrite,
                   quantize=quantize, group_size=group_size,
                   out=os.path.basename(os.path.abspath(os.fspath(out))),
                   calibration=None if calibration is None else (calibration.model, calibration.token_count,
                                                                 len(calibration.second_moments)))
    check_agreement(team, collection, rank, options)
    _check_arguments(team, method, rank, max_rel_error, budgeted, target_bytes, target_ratio)
    if quantize is not None or group_size is not None:
        _check_quantize(team, collection, method, rank, quantize, group_size, budgeted, calibration, store_dtype)
    team.run(_check_out, out, overwrite, team.is_root)
    # Each process reads only its own modules' factors; a refusal on one fails all of them.
    specs = collection.modules
    team.run(collection.require_finite, [specs[i] for i in team.local(specs, len(collection.adapter_names))])

    # 2. calibrate
    source = collection if calibration is None else whiten(collection, calibration, damping or DEFAULT_DAMPING)

    # 3 and 4. partition and fit; allocate
    args = dict(compress_args, team=team)
    dtype, device = args.get("dtype", torch.float32), args.get("device", "cpu")
    if budgeted:
        fit_args = {k: v for k, v in args.items() if k not in ("num_clusters", "cluster_range", "tradeoff")}

        def fit(r: int, k: int, hook) -> CompressedCollection:
            return compress(source, r, num_clusters=k, module_hook=hook, **fit_args)

        itemsize = (store_dtype or getattr(collection, "dtype", None) or torch.float32).itemsize
        result = fit_for_budget(source, rank, args.get("num_clusters"), fit, target_bytes=target_bytes,
                                target_ratio=target_ratio, floor=max_rel_error, itemsize=itemsize, dtype=dtype,
                                device=device, team=team, residual=residual, log=args.get("log"),
                                log_curve=log_curve)
        result.metadata["byte_budget"]["metric"] = "relative" if calibration is None else "activation-weighted"
    else:
        result = compress(source, rank, **args)
        if quantize is not None:
            quantize_bases(result, source, quantize, group_size, scale_dtype=store_dtype or result_dtype(result),
                           device=device)
        if max_rel_error is not None:
            apply_error_budget(result, source, max_rel_error, dtype=dtype, device=device, team=team)
    if calibration is not None:
        unwhiten(result, source, stats_path=calibration_path, original_full=True)
    result.metadata.setdefault("compressor", {})["seconds"] = round(time.perf_counter() - t0, 3)

    # 6. write
    return write_store(team, result, collection, out, dtype=store_dtype, overwrite=overwrite)


def _check_arguments(team: ModuleTeam, method: str, rank, max_rel_error, budgeted: bool, target_bytes,
                     target_ratio) -> None:
    if team.world > 1 and method not in ("full", "diag"):
        raise ValueError(f"method must be 'full' or 'diag' with several processes (per-adapter baselines do not "
                         f"share work by module), got {method!r}")
    if max_rel_error is not None:
        check_budget(max_rel_error)
    if budgeted:
        check_target(target_bytes, target_ratio)
        if method not in ("full", "diag"):
            raise ValueError(f"target_bytes/target_ratio (--target-bytes/--target-ratio) choose between the joint "
                             f"tables and per-adapter SVD themselves: method must be 'full' or 'diag', got {method!r}")
    elif rank is None:
        raise ValueError("rank (--rank) is required unless a byte budget (--target-bytes/--target-ratio) is given")


def result_dtype(result: CompressedCollection) -> torch.dtype:
    return next((cm.U.dtype for cm in result.modules.values()), torch.float32)


def _check_quantize(team: ModuleTeam, collection: AdapterCollection, method: str, rank, fmt, group_size,
                    budgeted: bool, calibration, store_dtype) -> None:
    """Every refusal of quantized bases before any work (argument names as the CLI spells them)."""
    from ..quant import FORMATS, effective_group_size

    if fmt is None:
        raise ValueError("group_size (--group-size) applies to quantized bases: give quantize (--quantize) too")
    if fmt not in FORMATS:
        raise ValueError(f"quantize (--quantize) must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if method not in ("full", "diag"):
        raise ValueError(f"quantize (--quantize) quantizes the shared bases of JD: method must be 'full' or 'diag', "
                         f"got {method!r}")
    if budgeted:
        raise ValueError("quantize (--quantize) with a byte budget (--target-bytes/--target-ratio) is not supported "
                         "yet: the budget prices float tables")
    if calibration is not None:
        raise ValueError("quantize (--quantize) with calibration (--calibration) is not supported yet: the refitted "
                         "cores would minimise the plain error, not the activation-weighted one")
    if team.world > 1:
        raise ValueError("quantize (--quantize) runs on one process for now, got several")
    if store_dtype is not None and store_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize (--quantize) keeps scales in the store dtype, which must then be float32, float16 "
                         f"or bfloat16, got {store_dtype}")
    for spec in collection.modules:
        effective_group_size(fmt, rank, group_size)
        effective_group_size(fmt, spec.d_in, group_size)


def _check_out(out, overwrite: bool, root: bool) -> None:
    """Fail before any work when the store could not be written at the end (process 0 writes it)."""
    from ..store import check_target as check_store_target

    if root:
        check_store_target(os.path.abspath(os.fspath(out)), replace=overwrite)
