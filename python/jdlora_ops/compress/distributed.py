"""Module-parallel compression on ``torch.distributed``: the team of processes, their agreement, one store.

The steps themselves are :mod:`.pipeline`'s, the same for one process or many;
this module holds what several processes add to them.

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

    from jdlora_ops.compress import compress_to_store
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

import torch

from ._team import SOLO, ModuleTeam, RankFailed
from .collection import AdapterCollection
from .result import CompressedCollection, CompressedModule, IndividualAdapter

__all__ = ["team_of", "init_from_env", "check_agreement", "write_store", "ModuleTeam", "RankFailed", "TIMEOUT_ENV"]

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
def check_agreement(team: ModuleTeam, collection: AdapterCollection, rank, options: dict) -> None:
    """``ValueError`` on every process unless all processes compress the same collection the same way."""
    _check_agreement(team, _describe(collection, rank, options))


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
