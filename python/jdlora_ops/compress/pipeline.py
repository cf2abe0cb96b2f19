"""``jdlora compress`` as the steps a user runs: read, calibrate, partition and fit, allocate, write.

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
4. **allocate**: the error budget (``max_rel_error``) or the byte budget
   (``target_bytes``/``target_ratio``) chooses each adapter's representation;
   a calibrated result is turned back (:func:`~.activation_aware.unwhiten`);
5. **write**: one store, atomically (:func:`~.distributed.write_store`).
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
    ``store_dtype``/``overwrite`` go to :func:`~jdlora_ops.store.save_store`.
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
                   out=os.path.basename(os.path.abspath(os.fspath(out))),
                   calibration=None if calibration is None else (calibration.model, calibration.token_count,
                                                                 len(calibration.second_moments)))
    check_agreement(team, collection, rank, options)
    _check_arguments(team, method, rank, max_rel_error, budgeted, target_bytes, target_ratio)
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
        if max_rel_error is not None:
            apply_error_budget(result, source, max_rel_error, dtype=dtype, device=device, team=team)
    if calibration is not None:
        unwhiten(result, source, stats_path=calibration_path, original_full=True)
    result.metadata.setdefault("compressor", {})["seconds"] = round(time.perf_counter() - t0, 3)

    # 5. write
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


def _check_out(out, overwrite: bool, root: bool) -> None:
    """Fail before any work when the store could not be written at the end (process 0 writes it)."""
    from ..store import check_target as check_store_target

    if root:
        check_store_target(os.path.abspath(os.fspath(out)), replace=overwrite)
