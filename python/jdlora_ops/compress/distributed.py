"""Module-parallel compression on ``torch.distributed``: several processes, one store.

Clustered JD parallelises by module: within a round every (cluster, module)
fit and every adapter's cost on a module are independent; only sums over
modules tie the modules together. Each process takes a contiguous block of
modules (balanced by ``d_in x d_out x n``), and every sum over modules (the
``n x K`` cost matrix, the objective, the per-adapter norms, the subspace
affinities of the partition search, the sizes for ``--clusters auto``) is
combined in module order by a relay (:class:`~._team.ModuleTeam`), so the
partition and every tensor are bitwise those of one process for the same seed
(float64 or float32 on CPU; on GPU as far as the kernels themselves are
deterministic). The error budget takes the maximum of per-module ranks
(exact in any order) and gathers the per-module relative errors.

Per fit/reassign round each process sends one float64 vector of
``n K + 2 n + 3`` values to the next process and the last one broadcasts the
total: ``(n K + 2 n + 3) x 8`` bytes per hop, ``2 (W - 1)`` such transfers in
all for ``W`` processes, whatever the number of modules. The partition search
additionally relays ``3 n^2`` float64 once (the affinities on its few modules).

Writing: every process writes its modules (and the error budget's individual
factors of its modules) into the store's staging directory, a hidden sibling
of ``out``; after all have written, process 0 assembles the store there and
renames it into place (:func:`~jdlora_ops.store.save_store`, format
unchanged). ``out`` must be on a filesystem every process sees; process 0
checks that every other process's file arrived. Any failure on any process
fails every process with the failing one's message, and the staging
directory is removed: no partial store is left.

From Python, with a process group already initialised::

    from jdlora_ops.compress.distributed import compress_to_store
    result = compress_to_store(collection, 16, "store", num_clusters=8)   # on every process

From the shell::

    torchrun --nproc-per-node 4 -m jdlora_ops.cli compress ADAPTERS... --rank 16 --clusters 8 --out STORE
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time

import torch

from ._team import SOLO, ModuleTeam, RankFailed
from .allocation import apply_allocation, bases_bytes, check_target, compress_for_budget
from .collection import AdapterCollection
from .result import CompressedCollection, CompressedModule, IndividualAdapter

__all__ = ["compress_to_store", "team_of", "init_from_env", "ModuleTeam", "RankFailed", "TIMEOUT_ENV"]

#: Seconds a process waits in a collective before failing (a peer that died without a word).
TIMEOUT_ENV = "JDLORA_DIST_TIMEOUT"
_DEFAULT_TIMEOUT = 1800


def team_of(group=None) -> ModuleTeam:
    """The team of ``group``; without one, the default group when initialised, else this process alone."""
    import torch.distributed as dist

    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    return ModuleTeam(group) if group is not None else SOLO


def init_from_env(device: str | torch.device = "cpu") -> ModuleTeam:
    """The team torchrun started this process in (``WORLD_SIZE`` > 1), or this process alone.

    Initialises the default process group: NCCL when the compute device is
    CUDA, gloo otherwise; collectives time out after ``$JDLORA_DIST_TIMEOUT``
    seconds (default 1800).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SOLO
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, _DEFAULT_TIMEOUT)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return ModuleTeam(dist.group.WORLD)


# ------------------------------------------------------------------ agreement
def _describe(collection: AdapterCollection, rank: int, options: dict) -> dict:
    specs = [(s.name, s.d_out, s.d_in) for s in collection.modules]
    names = list(collection.adapter_names)
    digest = hashlib.sha256(json.dumps([names, specs], default=str).encode()).hexdigest()[:16]
    return {
        "arguments": {"rank": rank, **{k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                                       for k, v in sorted(options.items())}},
        "collection": {"adapters": len(names), "modules": len(specs), "fingerprint": digest},
    }


def _check_agreement(team: ModuleTeam, described: dict) -> None:
    """``ValueError`` on every process unless all processes compress the same collection the same way."""
    views = team.all_objects(described)
    for part in ("arguments", "collection"):
        for r, view in enumerate(views):
            if view[part] != views[0][part]:
                diff = {k: (views[0][part].get(k), view[part].get(k))
                        for k in set(views[0][part]) | set(view[part]) if views[0][part].get(k) != view[part].get(k)}
                raise ValueError(f"every rank must compress the same collection with the same arguments; the {part} "
                                 f"of rank {r} differ from rank 0's (rank 0 vs rank {r}): {diff}")


# ------------------------------------------------------------------ compress
def compress_to_store(
    collection: AdapterCollection,
    rank: int,
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
    """Compress ``collection`` with the processes of ``group`` and write the store ``out``; call on every process.

    ``compress_args`` go to :func:`~jdlora_ops.compress.compress` (method
    ``"full"`` or ``"diag"``); ``calibration`` (:class:`~.calibration.CalibrationStats`)
    makes it activation-aware; ``max_rel_error`` applies the error budget;
    ``target_bytes`` or ``target_ratio`` (of the original bytes) choose each
    adapter's representation within a byte budget (:mod:`.allocation`; then
    ``rank`` may be None and ``num_clusters`` None or ``"auto"`` to search
    them, and ``max_rel_error`` is each adapter's floor; ``residual=False``
    leaves out the core-plus-residual representation, for servers that serve
    the joint tables and own factors only); ``log_curve(lines)`` receives the
    searched curve;
    ``store_dtype``/``overwrite`` go to :func:`~jdlora_ops.store.save_store`.
    ``group``: a process group (default: the default group when initialised,
    else this process alone); ``team``: a :class:`ModuleTeam` instead (it
    counts the bytes sent).

    Returns, on process 0, the whole compressed collection; on the others
    their modules only. Every process raises when any fails (the others with
    :class:`RankFailed` naming it); the store is then not written. Factors
    holding NaN or an infinity are refused before any compression work
    (:class:`~jdlora_ops.NonFiniteError` naming the adapter, module
    and factor).
    """
    from . import compress  # the package's name, which callers (and tests) may replace
    from .activation_aware import DEFAULT_DAMPING, compress_activation_aware
    from .error_budget import apply_error_budget, check_budget

    t0 = time.perf_counter()
    team = team or team_of(group)
    method = compress_args.get("method", "full")
    options = {k: v for k, v in compress_args.items() if k not in ("log", "progress", "team")}
    options.update(max_rel_error=max_rel_error, target_bytes=target_bytes, target_ratio=target_ratio,
                   residual=residual, damping=damping, store_dtype=store_dtype, overwrite=overwrite,
                   out=os.path.basename(os.path.abspath(os.fspath(out))),
                   calibration=None if calibration is None else (calibration.model, calibration.token_count,
                                                                 len(calibration.second_moments)))
    _check_agreement(team, _describe(collection, rank, options))
    if team.world > 1 and method not in ("full", "diag"):
        raise ValueError(f"method must be 'full' or 'diag' with several processes (per-adapter baselines do not "
                         f"share work by module), got {method!r}")
    if max_rel_error is not None:
        check_budget(max_rel_error)
    budgeted = target_bytes is not None or target_ratio is not None
    if budgeted:
        check_target(target_bytes, target_ratio)
        if calibration is not None:
            raise ValueError("target_bytes/target_ratio (--target-bytes/--target-ratio) with calibration "
                             "(--calibration): the byte budget weighs plain relative errors only; give one of them")
        if method not in ("full", "diag"):
            raise ValueError(f"target_bytes/target_ratio (--target-bytes/--target-ratio) choose between the joint "
                             f"tables and per-adapter SVD themselves: method must be 'full' or 'diag', got {method!r}")
    elif rank is None:
        raise ValueError("rank (--rank) is required unless a byte budget (--target-bytes/--target-ratio) is given")
    team.run(_check_target, out, overwrite, team.is_root)
    # Each process reads only its own modules' factors; a refusal on one fails all of them.
    specs = collection.modules
    team.run(collection.require_finite, [specs[i] for i in team.local(specs, len(collection.adapter_names))])
    args = dict(compress_args, team=team)
    if calibration is not None:
        result = compress_activation_aware(collection, calibration, rank, damping=damping or DEFAULT_DAMPING,
                                           max_rel_error=max_rel_error, stats_path=calibration_path, **args)
    elif budgeted:
        result = _compress_for_budget(collection, rank, args, target_bytes, target_ratio, max_rel_error, store_dtype,
                                      team, log_curve, residual)
    else:
        result = compress(collection, rank, **args)
        if max_rel_error is not None:
            apply_error_budget(result, collection, max_rel_error, dtype=args.get("dtype", torch.float32),
                               device=args.get("device", "cpu"), team=team)
    result.metadata.setdefault("compressor", {})["seconds"] = round(time.perf_counter() - t0, 3)
    return write_store(team, result, collection, out, dtype=store_dtype, overwrite=overwrite)


def _compress_for_budget(collection, rank, args, target_bytes, target_ratio, floor, store_dtype, team, log_curve,
                         residual):
    """The byte budget's pipeline: spectra, joint candidates, allocation, the chosen representations."""
    from . import compress

    itemsize = (store_dtype or getattr(collection, "dtype", None) or torch.float32).itemsize
    clusters = args.get("num_clusters")
    clusters = clusters if isinstance(clusters, int) else None
    fit_args = {k: v for k, v in args.items() if k not in ("num_clusters", "cluster_range", "tradeoff")}

    def fit(r: int, k: int) -> CompressedCollection:
        return compress(collection, r, num_clusters=k, **fit_args)

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
        fit=fit, dtype=args.get("dtype", torch.float32), device=args.get("device", "cpu"), team=team,
        per_adapter=not joint_fixed, residual=residual, log=args.get("log"))
    if result is None:  # every adapter on its own: a joint fit of one rank-1 cluster that they all leave
        result = fit(1, 1)
    if list(result.adapter_names) != list(collection.adapter_names):
        raise RuntimeError("the joint fit reordered the adapters; the allocation cannot be applied")
    apply_allocation(result, collection, alloc, dtype=args.get("dtype", torch.float32),
                     device=args.get("device", "cpu"), team=team)
    if floor is not None:
        result.metadata["max_rel_error"] = floor
    # The multiplier, item size and options are the rule for adapters added later (`jdlora add`).
    result.metadata["byte_budget"] = {**curve.as_dict(), "predicted_mean_rel_error": alloc.mean_error,
                                      "predicted_table_bytes": alloc.table_bytes, "representations": alloc.counts(),
                                      "multiplier": alloc.multiplier, "itemsize": itemsize, "residual": residual}
    if log_curve is not None and team.is_root:
        log_curve(curve.lines())
    return result


def _check_target(out, overwrite: bool, root: bool) -> None:
    """Fail before any work when the store could not be written at the end (process 0 writes it)."""
    from ..store import check_target

    if root:
        check_target(os.path.abspath(os.fspath(out)), replace=overwrite)


# ------------------------------------------------------------------ writing
def _shard_path(staging: str, rank: int, ext: str) -> str:
    return os.path.join(staging, f".shard-{rank}.{ext}")


def write_store(team: ModuleTeam, result: CompressedCollection, collection: AdapterCollection, out, *,
                dtype: torch.dtype | None = None, overwrite: bool = False) -> CompressedCollection:
    """Write ``result`` (each process's modules) as one store at ``out``; see the module docstring."""
    from ..store import new_staging_dir, save_store

    if team.world == 1:
        save_store(out, result, overwrite=overwrite, dtype=dtype)
        return result
    staging = team.broadcast_object(team.run(lambda: new_staging_dir(out) if team.is_root else None))
    try:
        if not team.is_root:
            team.run(_write_shard, result, staging, team.rank)
            team.check(None)  # process 0 assembles and publishes, or fails
            return result
        team.check(None)  # every shard written
        full, error = None, None
        try:
            full = _assemble(result, collection, staging, team.world)
            save_store(out, full, overwrite=overwrite, dtype=dtype, staging=staging)
        except Exception as exc:
            error = exc
        team.check(error)
        return full
    except BaseException:
        if team.is_root:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_shard(result: CompressedCollection, staging: str, rank: int) -> None:
    from .._files import write_json
    from ..store import write_tensors

    tensors = {}
    for m, cm in result.modules.items():
        for key in ("U", "Vt", "sigma", "norms_sq", "errors", "rel_errors"):
            tensors[f"{m}::{key}"] = getattr(cm, key)
    individual = {}
    for name, ind in result.individual.items():
        for m, (A, B) in ind.factors.items():
            tensors[f"{name}::{m}::A"], tensors[f"{name}::{m}::B"] = A, B
        individual[name] = {"modules": list(ind.factors), "rel_errors": ind.rel_errors, "ranks": ind.ranks,
                            "jd_rel_errors": ind.jd_rel_errors}
    md = result.metadata
    meta = {"modules": list(result.modules), "individual": individual, "ranks": md.get("ranks") or {},
            "activation_weighted_rel_errors": md.get("activation_weighted_rel_errors") or {}}
    write_tensors(_shard_path(staging, rank, "safetensors"), tensors)
    # Floats go through JSON as their shortest repr, which reads back bitwise.
    write_json(_shard_path(staging, rank, "json"), meta)


def _read_shard(staging: str, rank: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    from .._files import read_json_object
    from ..store import StoreError

    paths = [_shard_path(staging, rank, ext) for ext in ("json", "safetensors")]
    for p in paths:
        if not os.path.isfile(p):
            raise StoreError(f"{p}: the modules of rank {rank} are not visible to rank 0; the store (--out) must be "
                             f"on a filesystem that every rank shares")
    meta = read_json_object(paths[0], StoreError, "a rank's part of a store")
    tensors = load_file(paths[1])
    for p in paths:
        os.remove(p)
    return meta, tensors


def _assemble(result: CompressedCollection, collection: AdapterCollection, staging: str, world: int):
    """Process 0's view of the whole result: its own modules plus every other process's shard, in module order."""
    specs = {s.name: s for s in collection.modules}
    modules = dict(result.modules)
    md = dict(result.metadata)
    ranks = dict(md.get("ranks") or {})
    weighted = dict(md.get("activation_weighted_rel_errors") or {})
    individual = {name: IndividualAdapter(ind.name, ind.path, ind.rank, dict(ind.factors), dict(ind.rel_errors),
                                          dict(ind.ranks), dict(ind.jd_rel_errors))
                  for name, ind in result.individual.items()}
    for r in range(1, world):
        meta, t = _read_shard(staging, r)
        for m in meta["modules"]:
            modules[m] = CompressedModule(specs[m], *(t[f"{m}::{key}"] for key in
                                                      ("U", "Vt", "sigma", "norms_sq", "errors", "rel_errors")))
        for name, part in meta["individual"].items():
            ind = individual[name]
            for m in part["modules"]:
                ind.factors[m] = (t[f"{name}::{m}::A"], t[f"{name}::{m}::B"])
            ind.rel_errors.update(part["rel_errors"])
            ind.ranks.update(part["ranks"])
            ind.jd_rel_errors.update(part["jd_rel_errors"])
        ranks.update(meta["ranks"])
        weighted.update(meta["activation_weighted_rel_errors"])
    order = [s.name for s in collection.modules]
    if "ranks" in md:
        md["ranks"] = {m: ranks[m] for m in order if m in ranks}
    if "activation_weighted_rel_errors" in md:
        md["activation_weighted_rel_errors"] = {m: weighted[m] for m in order if m in weighted}
    return CompressedCollection(result.method, result.rank, list(result.adapter_names), result.assignment,
                                result.num_clusters, {m: modules[m] for m in order if m in modules},
                                weights=result.weights, metadata=md, history=result.history,
                                individual=individual)
