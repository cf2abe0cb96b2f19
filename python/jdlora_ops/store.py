"""The compressed-store directory format.

A store is a directory::

    STORE/
      manifest.json                   what the store holds (the commit point)
      bases-<id>.safetensors          per module: "<module>::U" [K, d_out, r],
                                      "<module>::Vt" [K, r, d_in]
      cores-<id>.safetensors          "assignment" int64 [n]; per module:
                                      "<module>::sigma" [n, r, r] or [n, r],
                                      "<module>::norms_sq", "::errors",
                                      "::rel_errors" [n]
      individual-<id>.safetensors     only when some adapters have their own
                                      factors: "<j>::<module>::A" [k, d_in],
                                      "<j>::<module>::B" [d_out, k] of the j-th
                                      entry of the manifest's "individual"

``manifest.json`` (format ``jdlora-store``, ``format_version`` 2 or 3) records the
base model, the method, the rank, the weights, the modules with their shapes and
rank, the clusters, every adapter's name, cluster, per-module relative error,
original ranks and PEFT config, how the PEFT scaling was folded, the memory
before and after, the fitting history and the names of the tensor files.
It also records ``generation`` (1 for a new store, one more at every update),
``cluster_digests`` (SHA-256 of each cluster's bases) and per adapter a
``digest`` (of its cores and its cluster's digest): content identities that
stay the same while the content does, e.g. across a renumbering of clusters.
Adapters kept outside the joint tables (``jdlora compress --max-rel-error``)
are listed under ``individual`` with their path (``svd`` at a rank, or
``full``), per-module errors, original ranks and config. ``format_version`` 2
added that list (a version-1 reader would silently miss those adapters, so it
refuses version 2); version-1 stores read as before. Adapters of the joint
tables may also have a residual (``jdlora compress --target-bytes``): an
``individual`` entry with path ``residual`` and the adapter's own name, whose
factors are added to the core's update; the adapter's entry then has path
``jd+res-<k>``, its served ``errors`` and the core's ``jd_errors``. A store with
residuals is written as ``format_version`` 3 (a version-2 reader would serve
the cores alone), any other as version 2.

Quantized bases (``jdlora compress --quantize``, :mod:`jdlora_ops.quant`):
``"<module>::U"`` and ``"<module>::Vt"`` hold the values (int8, or uint8 with
two 4-bit values per byte) and ``"<module>::U_scales"``,
``"<module>::Vt_scales"`` their scales in the store dtype; the manifest's
``quantization`` says ``{"format", "group_size", "tables": ["U", "Vt"]}``.
Such a store is ``format_version`` 4 (an older reader would take the values
for floats); readers hand the dequantised bases to every float path and the
quantized ones to the serving ops. The recorded errors are those of the
quantized bases, with the cores refitted to them.

Writes are atomic. A new store is assembled in a temporary sibling directory
and renamed into place. An existing store is updated by writing tensor files
under fresh names, then replacing ``manifest.json`` with ``os.replace`` (the
commit), then deleting files the new manifest no longer names. A reader always
sees either the old or the new manifest, and the files it names exist; an
interrupted write leaves the old store intact (plus stray files that the next
write removes).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
import shutil
import tempfile
from typing import Sequence

import torch

from ._files import read_json_object, write_json
from ._finite import NonFiniteError, all_finite, nonfinite_problem
from .compress.collection import ModuleSpec
from .compress.result import METHODS, CompressedCollection, CompressedModule, IndividualAdapter, sigma_is_diagonal
from .quant import QuantizedTable, check_quantized

__all__ = ["StoreError", "NonFiniteStoreError", "save_store", "load_store", "read_manifest", "is_store",
           "verify_store", "verify_file",
           "file_sha256", "check_target", "new_staging_dir", "CollectionReader", "StoreReader", "tensor_bytes", "FORMAT", "FORMAT_VERSION"]

FORMAT = "jdlora-store"
FORMAT_VERSION = 4  # what this library reads; each store is written at the lowest version that describes it
_VERSION_RESIDUALS = 3
MANIFEST = "manifest.json"
_OWNED = re.compile(
    r"^(bases|cores|individual)-[0-9a-f]{16}\.safetensors$|^\.(manifest|bases|cores|individual)\..*\.tmp$"
)
SCALING_NOTE = (
    "PEFT scaling folded into the cores: each adapter's update is s * B @ A with s = lora_alpha / r "
    "(lora_alpha / sqrt(r) with use_rslora), r and lora_alpha per module from rank_pattern / alpha_pattern; "
    "the stored reconstruction U[k] @ Sigma @ Vt[k] already includes s"
)


class StoreError(ValueError):
    """A store that cannot be read or written (message names the path and the problem)."""


class NonFiniteStoreError(StoreError, NonFiniteError):
    """A store table (bases, cores, individually stored factors) holding NaN or an infinity."""


def is_store(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (read in 8 MiB blocks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(store: str, manifest: dict, name: str) -> bool:
    """Check one tensor file of a store against its manifest checksum.

    Returns ``False`` when the manifest has no checksum for it (a store written
    before checksums); raises :class:`StoreError` naming the file when it is
    missing, or its bytes differ (truncated, bit-flipped, replaced).
    """
    want = (manifest.get("sha256") or {}).get(name)
    f = os.path.join(store, name)
    if not os.path.isfile(f):
        raise StoreError(f"{store}: missing tensor file {name!r} named by the manifest")
    if want is None:
        return False
    got = file_sha256(f)
    if got != want:
        raise StoreError(f"{f}: checksum mismatch (SHA-256 {got[:16]}... where the manifest records "
                         f"{want[:16]}...): the file is damaged or was changed after the store was written")
    return True


def verify_store(path: str | os.PathLike, *, problems: list | None = None) -> dict:
    """Check every tensor file of a store against the manifest and its tables for NaN or infinite values.

    Returns ``{file: "ok" | "no checksum" | "non-finite" | "no checksum, non-finite"}``; a checksum
    mismatch raises :class:`StoreError`. With ``problems`` (a list), one
    message per table row holding NaN or an infinity (file, adapter, module,
    tensor, counts) is appended to it.
    """
    from safetensors import safe_open

    path = os.path.abspath(os.fspath(path))
    m = read_manifest(path)
    files = dict(m.get("files") or {})
    out = {name: ("ok" if verify_file(path, m, name) else "no checksum") for name in files.values()}
    assignment = None
    # Cores first: their assignment names the adapters of each cluster whose bases are reported.
    for kind in ("cores", "bases", "individual"):
        if kind not in files:
            continue
        f = os.path.join(path, files[kind])
        try:
            with safe_open(f, framework="pt") as fh:
                if kind == "cores":
                    assignment = fh.get_tensor("assignment").tolist()
                found = [f"{f}: {p}" for p in _nonfinite_tables(m, kind, fh.get_tensor, assignment)]
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"{f}: cannot read its tables ({exc})") from exc
        if found:
            out[files[kind]] = "non-finite" if out[files[kind]] == "ok" else "no checksum, non-finite"
            if problems is not None:
                problems.extend(found)
    if m.get("cluster_digests") is not None and "bases" in files and "cores" in files:
        _verify_digests(path, m, files)
    return out


def _verify_digests(path: str, m: dict, files: dict) -> None:
    """Recompute the manifest's cluster and adapter digests from the tables; a mismatch raises StoreError.

    A server following the store's updates trusts them to tell which
    resident bases and cores it may keep, so a manifest whose digests do not
    describe its files (edited, or assembled from two generations) must not
    pass as verified.
    """
    from safetensors.torch import load_file

    bases = load_file(os.path.join(path, files["bases"]))
    cores = load_file(os.path.join(path, files["cores"]))
    assignment = cores["assignment"]
    K = len(m["cluster_digests"])
    try:
        clusters, adapters = _table_digests(m, bases, cores, assignment, K)
    except (KeyError, IndexError, RuntimeError) as exc:
        raise StoreError(f"{path}: cannot recompute the manifest's digests from the tables ({exc})") from exc
    for k, (want, got) in enumerate(zip(m["cluster_digests"], clusters)):
        if want != got:
            raise StoreError(f"{path}: cluster {k}'s digest in the manifest is {str(want)[:16]}... but its bases "
                             f"hash to {got[:16]}...: the manifest does not describe this bases file")
    for entry, got in zip(m["adapters"], adapters):
        want = entry.get("digest")
        if want is not None and want != got:
            raise StoreError(f"{path}: adapter {entry.get('name')!r}'s digest in the manifest is {str(want)[:16]}... "
                             f"but its tables hash to {got[:16]}...: the manifest does not describe these files")


def _bad_rows(t: torch.Tensor) -> list[int]:
    return (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()


def _nonfinite_tables(m: dict, kind: str, get, assignment=None):
    """Yield one message per row holding NaN or an infinity in the served tables of tensor file ``kind``.

    ``get(key)`` reads a tensor; ``assignment`` (cluster per adapter) names
    the adapters sharing a cluster's bases. Rows are a cluster's bases, an
    adapter's cores, or an individually stored adapter's factors, so each
    message names the adapter(s), the module and the tensor.
    """
    names = [str(a["name"]) for a in m["adapters"]]
    if kind == "bases":
        for md in m["modules"]:
            for t in ("U", "Vt", "U_scales", "Vt_scales") if m.get("quantization") else ("U", "Vt"):
                x = get(f"{md['name']}::{t}")
                if all_finite(x):
                    continue
                for k in _bad_rows(x):
                    members = [n for n, c in zip(names, assignment or []) if int(c) == k]
                    yield nonfinite_problem(x[k], adapter=members, module=md["name"],
                                            tensor_name=f"{t} of cluster {k}")
    elif kind == "cores":
        for md in m["modules"]:
            x = get(f"{md['name']}::sigma")
            if all_finite(x):
                continue
            for i in _bad_rows(x):
                who = names[i] if i < len(names) else f"#{i}"
                yield nonfinite_problem(x[i], adapter=who, module=md["name"], tensor_name="sigma")
    elif kind == "individual":
        for j, e in enumerate(m.get("individual") or []):
            for mod in e["modules"]:
                for t in ("A", "B"):
                    p = nonfinite_problem(get(f"{j}::{mod}::{t}"), adapter=str(e["name"]), module=mod,
                                          tensor_name=t)
                    if p is not None:
                        yield p


def _require_finite_tables(where: str, m: dict, kind: str, get, assignment=None) -> None:
    """Raise :class:`NonFiniteStoreError` (``where: <first problem>``) unless the tables of tensor
    file ``kind`` are finite."""
    problem = next(_nonfinite_tables(m, kind, get, assignment), None)
    if problem is not None:
        raise NonFiniteStoreError(f"{where}: {problem}")


def write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file of the store format, flushed to disk (the store and the compress shards write these)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata={"format": FORMAT})
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _tensor_bytes_view(t: torch.Tensor, rows: int):
    """``t``'s bytes as a numpy ``uint8`` array of ``rows`` rows (no copy when ``t`` is contiguous)."""
    return t.detach().contiguous().cpu().reshape(rows, -1).view(torch.uint8).numpy()


def _table_digests(manifest: dict, bases: dict, cores: dict, assignment: torch.Tensor, K: int,
                   kept: list | None = None) -> tuple[list[str], list[str]]:
    """SHA-256 of each cluster's bases and of each adapter's served tables (its cores and its cluster's digest).

    They identify content across generations: a server following a store's
    updates keeps a cluster's resident bases while the digest stays, and
    tells an adapter that was removed and added again with other weights from
    the one it served. ``kept``: the previous manifest's cluster digests when
    the bases file is kept as it was.
    """
    import hashlib

    modules = [md["name"] for md in manifest["modules"]]
    if kept is not None and len(kept) == K:
        clusters = [str(d) for d in kept]
    else:
        hs = [hashlib.sha256() for _ in range(K)]
        for m in modules:
            for key in (f"{m}::U", f"{m}::Vt", f"{m}::U_scales", f"{m}::Vt_scales"):
                if key not in bases:  # scales: quantized bases only
                    continue
                t = bases[key]
                head = f"{key}:{_dtype_name(t.dtype)}:{list(t.shape[1:])};".encode()
                rows = _tensor_bytes_view(t, K) if K else []
                for k in range(K):
                    hs[k].update(head)
                    hs[k].update(rows[k])
        clusters = [h.hexdigest() for h in hs]
    n = int(assignment.numel())
    hs = [hashlib.sha256(clusters[int(c)].encode()) for c in assignment.tolist()]
    for m in modules:
        t = cores[f"{m}::sigma"]
        head = f"{m}::sigma:{_dtype_name(t.dtype)}:{list(t.shape[1:])};".encode()
        rows = _tensor_bytes_view(t, n) if n else []
        for i in range(n):
            hs[i].update(head)
            hs[i].update(rows[i])
    return clusters, [h.hexdigest() for h in hs]


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _manifest(c: CompressedCollection, files: dict, dtype: torch.dtype) -> dict:
    names = list(c.modules)
    rel = c.rel_errors()
    ranks = c.metadata.get("ranks") or {}
    configs = c.metadata.get("configs") or {}
    adapters = []
    for i, name in enumerate(c.adapter_names):
        errs = [float(x) for x in rel[i].tolist()] if rel.numel() else []
        entry = {
            "name": name,
            "path": "jd",
            "cluster": int(c.assignment[i]),
            "errors": errs,
            "mean_error": (sum(errs) / len(errs)) if errs else 0.0,
            "max_error": max(errs) if errs else 0.0,
        }
        if ranks:
            entry["ranks"] = [int(ranks[m][i]) if m in ranks and i < len(ranks[m]) else 0 for m in names]
        if name in configs:
            entry["peft_config"] = configs[name]
        adapters.append(entry)
    modules = []
    for m, cm in c.modules.items():
        modules.append(
            {
                "name": m,
                "layer": cm.spec.layer,
                "kind": cm.spec.kind,
                "d_out": cm.spec.d_out,
                "d_in": cm.spec.d_in,
                "rank": cm.rank,
                "sigma": "diag" if cm.sigma.dim() == 2 else "full",
            }
        )
    residuals = c.residuals
    for entry in adapters:
        res = residuals.get(entry["name"])
        if res is not None:
            entry["path"] = res.label
            entry["jd_errors"] = entry["errors"]
            errs = [float(res.rel_errors.get(m, 0.0)) for m in names]
            entry.update(errors=errs, mean_error=(sum(errs) / len(errs)) if errs else 0.0,
                         max_error=max(errs) if errs else 0.0)
    individual = []
    for ind in c.individual.values():
        errs = [float(ind.rel_errors.get(m, 0.0)) for m in names]
        entry = {
            "name": ind.name,
            "path": ind.path,
            "rank": ind.rank,
            "errors": errs,
            "mean_error": (sum(errs) / len(errs)) if errs else 0.0,
            "max_error": max(errs) if errs else 0.0,
            "ranks": [int(ind.ranks.get(m, 0)) for m in names],
            "modules": [m for m in names if m in ind.factors],
            "factor_ranks": [int(ind.factors[m][0].shape[0]) if m in ind.factors else 0 for m in names],
        }
        if ind.jd_rel_errors:
            entry["jd_errors"] = [float(ind.jd_rel_errors.get(m, 0.0)) for m in names]
        if ind.name in configs:
            entry["peft_config"] = configs[ind.name]
        individual.append(entry)
    extra = {k: v for k, v in c.metadata.items() if k not in ("ranks", "configs", "base_model")}
    return {
        "format": FORMAT,
        "format_version": _VERSION_RESIDUALS if residuals else 2,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": c.metadata.get("base_model"),
        "method": c.method,
        "rank": c.rank,
        "weights": c.weights,
        "dtype": _dtype_name(dtype),
        "scaling": {"folded": True, "rule": SCALING_NOTE},
        "num_adapters": c.num_adapters,
        "num_clusters": c.num_clusters,
        "cluster_sizes": torch.bincount(c.assignment, minlength=c.num_clusters).tolist() if c.num_adapters else [],
        "memory_bf16": c.memory(2),
        "files": files,
        "modules": modules,
        "adapters": adapters,
        "individual": individual,
        "history": c.history,
        "metadata": extra,
    }


def save_store(
    path: str | os.PathLike,
    compressed: CompressedCollection,
    *,
    overwrite: bool = False,
    update: bool = False,
    dtype: torch.dtype | None = None,
    reuse_bases: bool = False,
    staging: str | None = None,
) -> dict:
    """Write ``compressed`` as a store at ``path`` atomically; returns the manifest.

    * A missing path (or an empty directory) gets a new store.
    * An existing store is replaced only with ``overwrite`` or ``update``
      (``update``: the same store grown by :func:`project_adapters`; with
      ``reuse_bases`` its bases file is kept rather than rewritten).
    * ``dtype``: dtype of the stored bases and cores (default: as computed);
      errors and norms are stored as float64.
    * ``staging``: an empty directory from :func:`new_staging_dir` to
      assemble a new store in (default: a fresh one); it is renamed into
      place on success and removed on failure.

    Tables holding NaN or an infinity (after the cast to ``dtype``) raise
    :class:`NonFiniteStoreError` before anything is written.
    """
    path = os.path.abspath(os.fspath(path))
    if compressed.method not in METHODS:
        raise StoreError(f"unknown method {compressed.method!r}")
    dt = dtype or next((cm.U.dtype for cm in compressed.modules.values()), torch.float32)
    existing = check_target(path, replace=overwrite or update)

    old_manifest = read_manifest(path) if existing else None
    bases_name = f"bases-{secrets.token_hex(8)}.safetensors"
    cores_name = f"cores-{secrets.token_hex(8)}.safetensors"
    if existing and reuse_bases and old_manifest is not None:
        old_bases = old_manifest["files"]["bases"]
        if os.path.isfile(os.path.join(path, old_bases)):
            bases_name = old_bases
    write_bases = not (existing and reuse_bases and old_manifest is not None and bases_name == old_manifest["files"]["bases"])

    bases, cores = {}, {"assignment": compressed.assignment.to(torch.int64)}
    quantization = _quantization(compressed)
    for m, cm in compressed.modules.items():
        if quantization is None:
            bases[f"{m}::U"] = cm.U.to(dt)
            bases[f"{m}::Vt"] = cm.Vt.to(dt)
        else:
            for key, t in zip(("U", "Vt"), cm.quantized):
                bases[f"{m}::{key}"], bases[f"{m}::{key}_scales"] = t.data, t.scales.to(dt)
        cores[f"{m}::sigma"] = cm.sigma.to(dt)
        cores[f"{m}::norms_sq"] = cm.norms_sq.to(torch.float64)
        cores[f"{m}::errors"] = cm.errors.to(torch.float64)
        cores[f"{m}::rel_errors"] = cm.rel_errors.to(torch.float64)
    files = {"bases": bases_name, "cores": cores_name}
    individual = {}
    for j, ind in enumerate(compressed.individual.values()):
        for m, (A, B) in ind.factors.items():
            individual[f"{j}::{m}::A"] = A.to(dt)
            individual[f"{j}::{m}::B"] = B.to(dt)
    if compressed.individual:
        files["individual"] = f"individual-{secrets.token_hex(8)}.safetensors"
    manifest = _manifest(compressed, files, dt)
    if quantization is not None:
        manifest["quantization"] = quantization
        manifest["format_version"] = FORMAT_VERSION
    manifest["generation"] = int((old_manifest or {}).get("generation", 0)) + 1
    kept = (old_manifest or {}).get("cluster_digests") if not write_bases else None
    clusters, adapters = _table_digests(manifest, bases, cores, compressed.assignment, compressed.num_clusters, kept)
    manifest["cluster_digests"] = clusters
    for entry, digest in zip(manifest["adapters"], adapters):
        entry["digest"] = digest
    # A table that is not finite would be refused by every reader (and casting to a narrower
    # dtype can overflow); refuse it here, before the first byte is written. Kept bases were
    # checked when the store was read.
    written = {"bases": bases, "cores": cores, "individual": individual}
    if not write_bases:
        del written["bases"]
    try:
        for kind, tensors in written.items():
            _require_finite_tables(f"{path}: not written", manifest, kind, tensors.__getitem__,
                                   compressed.assignment.tolist())
    except NonFiniteStoreError:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise

    if staging is not None and existing:
        shutil.rmtree(staging, ignore_errors=True)  # an existing store is updated in place
    if not existing:
        parent = os.path.dirname(path)
        tmp = staging or new_staging_dir(path)
        try:
            write_tensors(os.path.join(tmp, bases_name), bases)
            write_tensors(os.path.join(tmp, cores_name), cores)
            if "individual" in files:
                write_tensors(os.path.join(tmp, files["individual"]), individual)
            manifest["sha256"] = {name: file_sha256(os.path.join(tmp, name)) for name in files.values()}
            _write_json(os.path.join(tmp, MANIFEST), manifest)
            os.chmod(tmp, 0o755)
            _fsync_dir(tmp)
            if os.path.isdir(path):
                os.rmdir(path)  # empty; rename cannot replace a directory otherwise
            os.rename(tmp, path)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    # Update in place: new files under fresh names, then the manifest swap is the commit.
    staged = []
    try:
        writes = [(bases_name, bases, write_bases), (cores_name, cores, True)]
        if "individual" in files:
            writes.append((files["individual"], individual, True))
        for name, tensors, needed in writes:
            if not needed:
                continue
            kind = name.split("-")[0]
            tmp_file = os.path.join(path, f".{kind}.{secrets.token_hex(4)}.tmp")
            staged.append(tmp_file)
            write_tensors(tmp_file, tensors)
            os.replace(tmp_file, os.path.join(path, name))
            staged[-1] = os.path.join(path, name)
        old_sums = (old_manifest or {}).get("sha256") or {}
        manifest["sha256"] = {
            name: old_sums[name] if (name == bases_name and not write_bases and name in old_sums)
            else file_sha256(os.path.join(path, name)) for name in files.values()}
        tmp_manifest = os.path.join(path, f".manifest.{secrets.token_hex(4)}.tmp")
        staged.append(tmp_manifest)
        _write_json(tmp_manifest, manifest)
        os.replace(tmp_manifest, os.path.join(path, MANIFEST))
        staged.clear()
        _fsync_dir(path)
    except BaseException:
        for f in staged:
            try:
                os.remove(f)
            except OSError:
                pass
        raise
    keep = {MANIFEST, *files.values()}
    for f in os.listdir(path):
        if f not in keep and _OWNED.match(f):
            try:
                os.remove(os.path.join(path, f))
            except OSError:
                pass
    return manifest


def _quantization(c: CompressedCollection) -> dict | None:
    """The manifest's ``quantization`` entry of ``c``'s bases (None for float bases); a ``StoreError`` when only
    some modules are quantized, in different formats, or when a module's bases no longer match their quantized
    form (changed since they were quantized: writing the quantized form would serve something else)."""
    forms = {m: cm.quantized for m, cm in c.modules.items()}
    if not forms or all(q is None for q in forms.values()):
        return None
    plain = [m for m, q in forms.items() if q is None]
    if plain:
        raise StoreError(f"module {plain[0]!r} has float bases while others are quantized: a store's bases are "
                         f"quantized all alike or not at all")
    fmts = {t.fmt for q in forms.values() for t in q}
    if len(fmts) > 1:
        raise StoreError(f"the modules' bases are quantized in different formats {sorted(fmts)}")
    for m, cm in c.modules.items():
        for key, t, f in (("U", cm.quantized[0], cm.U), ("Vt", cm.quantized[1], cm.Vt)):
            exact = t.dequantize(torch.float64 if f.dtype == torch.float64 else torch.float32).to(f.dtype)
            if tuple(t.shape) != tuple(f.shape) or not torch.equal(exact, f):
                raise StoreError(f"module {m!r}: {key} no longer matches its quantized form (changed after "
                                 f"quantize_bases); quantize the bases again")
    fmt = next(iter(forms.values()))[0].fmt
    group = (c.metadata or {}).get("quantized_bases", {}).get("group_size")
    return {"format": fmt, "group_size": group, "tables": ["U", "Vt"]}


def _read_quantized(where: str, m: dict, name: str, key: str, data: torch.Tensor, scales: torch.Tensor,
                    length: int, leading: tuple[int, ...]) -> QuantizedTable:
    """A quantized base of a store, checked against the manifest's format (``StoreError`` naming it)."""
    q = m["quantization"]
    try:
        return check_quantized(f"{name}::{key}", data, scales, str(q["format"]), length, q.get("group_size"),
                               leading=leading)
    except NonFiniteError as exc:
        raise NonFiniteStoreError(f"{where}: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{where}: {exc}") from exc


def _dequantized(t: QuantizedTable) -> torch.Tensor:
    """The float table a quantized base stands for, in its scales' dtype (the ops' float32 ``q * s``)."""
    return t.dequantize(torch.float32).to(t.scales.dtype)


def check_target(path: str, *, replace: bool) -> bool:
    """Whether a store exists at ``path``; a ``StoreError`` when nothing may be written there."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(f"{path}: exists and is not a directory")
    existing = os.path.isdir(path) and bool(os.listdir(path))
    if existing and not is_store(path):
        raise StoreError(f"{path}: exists, is not empty and is not a jdlora store; refusing to write there")
    if existing and not replace:
        raise StoreError(f"{path}: a store already exists (use overwrite to replace it)")
    return existing


def new_staging_dir(path: str | os.PathLike) -> str:
    """A fresh hidden sibling of the store ``path`` to assemble a new store in (same filesystem: renames work)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)


def _write_json(path: str, manifest: dict) -> None:
    write_json(path, manifest, indent=1)  # a module-level step, so tests can fail it


def read_manifest(path: str | os.PathLike) -> dict:
    """The store's manifest, checked for format and version."""
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise StoreError(f"{path}: no such store directory")
    if not os.path.isfile(mpath):
        raise StoreError(f"{path}: not a jdlora store (no {MANIFEST})")
    m = read_json_object(mpath, StoreError, "a store manifest")
    if m.get("format") != FORMAT:
        raise StoreError(f"{mpath}: not a {FORMAT} manifest")
    if int(m.get("format_version", -1)) > FORMAT_VERSION:
        raise StoreError(
            f"{mpath}: format version {m.get('format_version')} is newer than this library reads ({FORMAT_VERSION})"
        )
    for key in ("method", "rank", "modules", "adapters", "files"):
        if key not in m:
            raise StoreError(f"{mpath}: manifest lacks {key!r}")
    return m


def load_store(path: str | os.PathLike, *, device: torch.device | str = "cpu",
               check_finite: bool = True) -> CompressedCollection:
    """Read a store back into a :class:`CompressedCollection`.

    Raises :class:`StoreError` when the manifest or a tensor file is missing
    or damaged or disagrees with the manifest, and :class:`NonFiniteStoreError`
    when a table holds NaN or an infinity. ``check_finite=False`` is for
    repairs only (``jdlora remove`` of the adapters concerned): whatever is
    written back is checked again by :func:`save_store`.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    m = read_manifest(path)
    for name in (m.get("files") or {}).values():
        verify_file(path, m, name)
    tensors = {}
    for kind in ("bases", "cores"):
        f = os.path.join(path, m["files"][kind])
        if not os.path.isfile(f):
            raise StoreError(f"{path}: missing tensor file {m['files'][kind]}")
        try:
            tensors.update(load_file(f, device=str(device)))
        except Exception as exc:
            raise StoreError(f"{f}: damaged tensor file ({exc})") from exc
    n = len(m["adapters"])
    K = int(m.get("num_clusters", 0))
    modules = {}
    try:
        for md in m["modules"]:
            name = md["name"]
            spec = ModuleSpec(name, int(md["d_out"]), int(md["d_in"]))
            r = int(md["rank"])
            U, Vt, quantized = tensors[f"{name}::U"], tensors[f"{name}::Vt"], None
            if m.get("quantization"):
                where = os.path.join(path, m["files"]["bases"])
                quantized = (
                    _read_quantized(where, m, name, "U", U, tensors[f"{name}::U_scales"], r, (K, spec.d_out)),
                    _read_quantized(where, m, name, "Vt", Vt, tensors[f"{name}::Vt_scales"], spec.d_in, (K, r)))
                U, Vt = (_dequantized(t) for t in quantized)
            cm = CompressedModule(
                spec,
                U,
                Vt,
                tensors[f"{name}::sigma"],
                tensors[f"{name}::norms_sq"],
                tensors[f"{name}::errors"],
                tensors[f"{name}::rel_errors"],
                quantized,
            )
            if (
                tuple(cm.U.shape) != (K, spec.d_out, r)
                or tuple(cm.Vt.shape) != (K, r, spec.d_in)
                or cm.sigma.shape[0] != n
                or tuple(cm.sigma.shape[1:]) not in ((r,), (r, r))
                or (cm.sigma.dim() == 2) != sigma_is_diagonal(m["method"])
            ):
                raise StoreError(f"{path}: tensors of module {name} do not match the manifest")
            modules[name] = cm
        assignment = tensors["assignment"].to(torch.long)
    except KeyError as exc:
        raise StoreError(f"{path}: tensor {exc} named by the manifest is missing") from exc
    if assignment.shape != (n,) or (n and (int(assignment.min()) < 0 or int(assignment.max()) >= K)):
        raise StoreError(f"{path}: cluster assignment does not match the manifest")
    for kind in ("bases", "cores") if check_finite else ():
        _require_finite_tables(os.path.join(path, m["files"][kind]), m, kind, tensors.__getitem__,
                               assignment.tolist())
    names = [a["name"] for a in m["adapters"]]
    metadata = dict(m.get("metadata") or {})
    metadata["base_model"] = m.get("base_model")
    configs = {a["name"]: a["peft_config"] for a in m["adapters"] if "peft_config" in a}
    if configs:
        metadata["configs"] = configs
    if any("ranks" in a for a in m["adapters"]):
        metadata["ranks"] = {
            md["name"]: [int(a.get("ranks", [0] * len(m["modules"]))[j]) for a in m["adapters"]]
            for j, md in enumerate(m["modules"])
        }
    individual = _load_individual(path, m, modules, device, check_finite)
    for entry in m.get("individual") or []:
        if "peft_config" in entry:
            metadata.setdefault("configs", {})[entry["name"]] = entry["peft_config"]
    return CompressedCollection(
        m["method"], int(m["rank"]), names, assignment, K, modules,
        weights=m.get("weights", "relative"), metadata=metadata, history=list(m.get("history") or []),
        individual=individual,
    )


def _load_individual(path: str, m: dict, modules: dict, device,
                     check_finite: bool) -> dict[str, IndividualAdapter]:
    entries = m.get("individual") or []
    if not entries:
        return {}
    from safetensors.torch import load_file

    fname = (m.get("files") or {}).get("individual")
    f = os.path.join(path, str(fname))
    if not fname or not os.path.isfile(f):
        raise StoreError(f"{path}: missing tensor file {fname!r} of the individually stored adapters")
    try:
        tensors = load_file(f, device=str(device))
    except Exception as exc:
        raise StoreError(f"{f}: damaged tensor file ({exc})") from exc
    names = [md["name"] for md in m["modules"]]
    out = {}
    try:
        if check_finite:
            _require_finite_tables(f, m, "individual", tensors.__getitem__)
    except KeyError as exc:
        raise StoreError(f"{path}: tensor {exc} of the individually stored adapters is missing") from exc
    try:
        for j, e in enumerate(entries):
            factors = {}
            for mod in e["modules"]:
                A, B = tensors[f"{j}::{mod}::A"], tensors[f"{j}::{mod}::B"]
                spec = modules[mod].spec
                if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != (
                        spec.d_out, spec.d_in):
                    raise StoreError(f"{path}: factors of individual adapter {e['name']!r}, module {mod} do not "
                                     f"match the manifest")
                factors[mod] = (A, B)
            rel = dict(zip(names, (float(x) for x in e["errors"])))
            jd = dict(zip(names, (float(x) for x in e.get("jd_errors", []))))
            ranks = dict(zip(names, (int(x) for x in e.get("ranks", []))))
            out[e["name"]] = IndividualAdapter(e["name"], e["path"], int(e["rank"]), factors, rel, ranks, jd)
    except KeyError as exc:
        raise StoreError(f"{path}: tensor or entry {exc} of the individually stored adapters is missing") from exc
    return out


# --------------------------------------------------------------- lazy reading
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I8": torch.int8, "U8": torch.uint8,
}


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CollectionReader:
    """What the host tier reads a compressed collection through.

    Attributes: ``method`` (``"full"``, ``"diag"``, ``"svd"``, ``"none"``),
    ``rank`` ``r``, ``diagonal`` (cores are ``[r]`` rather than ``[r, r]``),
    ``modules`` (list of :class:`ModuleSpec`, the order of every per-module
    list below), ``adapter_names``, ``assignment`` (int64 ``[n]`` cluster per
    adapter, on the CPU), ``num_clusters`` ``K``, ``weights`` (the
    objective's weights, ``"relative"`` or ``"uniform"``), ``base_model``
    (or ``None``), ``configs`` (adapter name -> PEFT config), ``path`` (the
    store directory or ``None``), ``nbytes`` (bytes of bases and cores as
    stored), ``quantization`` (the store manifest's entry for quantized
    bases, or ``None``; the bases read are then their dequantised values and
    :meth:`read_module_bases_quantized` gives the stored form). A
    :class:`StoreReader` also has ``generation``,
    ``cluster_digests`` (``None`` for stores written before them) and
    ``adapter_digests`` (``None`` entries likewise), see the module docstring.
    """

    method: str
    rank: int
    diagonal: bool
    modules: list[ModuleSpec]
    adapter_names: list[str]
    assignment: torch.Tensor
    num_clusters: int
    weights: str
    base_model: str | None
    configs: dict
    path: str | None
    nbytes: int
    quantization: dict | None = None

    def read_bases(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(U_k [d_out, r], Vt_k [r, d_in]) per module]`` of cluster ``k``."""
        raise NotImplementedError

    def read_cores(self, i: int) -> list[torch.Tensor]:
        """``[Sigma_i per module]`` of adapter ``i`` (``[r, r]`` or ``[r]``)."""
        raise NotImplementedError

    def read_module_bases(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All clusters' bases of module ``m``: ``(U [K, d_out, r], Vt [K, r, d_in])``."""
        raise NotImplementedError

    def read_module_cores(self, m: int) -> torch.Tensor:
        """All adapters' cores of module ``m``: ``[n, r, r]`` or ``[n, r]``."""
        raise NotImplementedError

    def read_module_bases_quantized(self, m: int) -> tuple[QuantizedTable, QuantizedTable]:
        """All clusters' bases of module ``m`` as stored when ``quantization`` is set: ``(U, Vt)``."""
        raise NotImplementedError

    def individual_adapters(self) -> list[tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]], dict | None]]:
        """Adapters stored outside the joint tables (error budget): ``(name, {module: (A, B)},
        config)``, with the scaling folded into ``B``. None by default."""
        return []


class StoreReader(CollectionReader):
    """A store directory, read through memory-mapped safetensors.

    Opening reads the manifest and the tensor files' headers and checks them
    against each other (a missing, truncated or mismatched file raises
    :class:`jdlora_ops.store.StoreError`); tensor data is read only when asked
    for, one cluster or adapter at a time. The files are kept open, so a store
    rewritten in place (``save_store(update=True)`` replaces the manifest and
    removes the old files) keeps serving the version that was opened.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = os.path.abspath(os.fspath(path))
        m = read_manifest(self.path)
        self.manifest = m
        self.method = str(m["method"])
        self.rank = int(m["rank"])
        self.diagonal = sigma_is_diagonal(self.method)
        try:
            self.modules = [ModuleSpec(md["name"], int(md["d_out"]), int(md["d_in"])) for md in m["modules"]]
            self.adapter_names = [str(a["name"]) for a in m["adapters"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{self.path}: manifest entries are malformed ({exc!r})") from exc
        self.num_clusters = int(m.get("num_clusters", 0))
        self.weights = str(m.get("weights", "relative"))
        self.base_model = m.get("base_model")
        self.configs = {a["name"]: a["peft_config"] for a in m["adapters"] if "peft_config" in a}
        self._files = {}
        self._verified: set[str] = set()
        for kind in ("bases", "cores"):
            f = os.path.join(self.path, str(m["files"].get(kind, "")))
            if not os.path.isfile(f):
                raise StoreError(f"{self.path}: missing tensor file {m['files'].get(kind)!r} named by the manifest")
            try:
                self._files[kind] = safe_open(f, framework="pt")
            except Exception as exc:  # safetensors raises its own error types for damaged files
                raise StoreError(f"{f}: damaged tensor file ({exc})") from exc
        n, K, r = len(self.adapter_names), self.num_clusters, self.rank
        core_shape = (n, r) if self.diagonal else (n, r, r)
        self.quantization = m.get("quantization") or None
        nbytes = 0
        for spec in self.modules:
            for kind, key, shape in (
                ("bases", f"{spec.name}::U", (K, spec.d_out, r)),
                ("bases", f"{spec.name}::Vt", (K, r, spec.d_in)),
                ("cores", f"{spec.name}::sigma", core_shape),
            ):
                got, dt = self._header(kind, key)
                if kind == "bases" and self.quantization:
                    # Values as stored (two 4-bit values per byte); their scales and the format are checked
                    # against each other when the bases are read.
                    if dt == torch.uint8:
                        shape = (*shape[:-1], shape[-1] // 2)
                    scales, sdt = self._header(kind, f"{key}_scales")
                    nbytes += torch.Size(scales).numel() * torch.empty(0, dtype=sdt).element_size()
                if got != shape:
                    raise StoreError(
                        f"{self.path}: tensor {key} is {list(got)} in {m['files'][kind]}, the manifest implies {list(shape)}"
                    )
                nbytes += torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size()
        self.nbytes = nbytes
        got, _ = self._header("cores", "assignment")
        if got != (n,):
            raise StoreError(f"{self.path}: assignment is {list(got)}, expected [{n}]")
        self.assignment = self._read("cores", "assignment").to(torch.int64)
        if n and (int(self.assignment.min()) < 0 or int(self.assignment.max()) >= K):
            raise StoreError(f"{self.path}: cluster assignment holds ids outside [0, {K})")
        self._module_index = {s.name: j for j, s in enumerate(self.modules)}
        self.generation = int(m.get("generation", 0))
        digests = m.get("cluster_digests")
        self.cluster_digests = [str(d) for d in digests] if isinstance(digests, list) and len(digests) == K else None
        self.adapter_digests = [a.get("digest") for a in m["adapters"]]

    def table_bytes(self, kind: str) -> int:
        """Bytes of every tensor in tensor file ``kind`` (``"bases"`` or ``"cores"``) as stored, from the headers."""
        total = 0
        for key in self._files[kind].keys():
            shape, dt = self._header(kind, key)
            total += torch.Size(shape).numel() * dt.itemsize
        return total

    def verify(self, kinds=("bases", "cores")) -> None:
        """Check the tensor files ``kinds`` now (checksum, NaN and infinities) rather than at their first use."""
        for kind in kinds:
            self._verify(kind)

    def _header(self, kind: str, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        fh = self._files[kind]
        try:
            sl = fh.get_slice(key)
        except Exception as exc:
            raise StoreError(f"{self.path}: tensor {key} named by the manifest is missing from its file") from exc
        dt = _SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dt is None:
            raise StoreError(f"{self.path}: tensor {key} has unsupported dtype {sl.get_dtype()}")
        return tuple(int(x) for x in sl.get_shape()), dt

    def _verify(self, kind: str) -> None:
        # Hashing a file reads all of it, so a memory-mapped store checks each
        # file once, just before its data is first used (headers were checked
        # at open); a damaged file is then an error, never wrong output. The
        # scan for NaN and infinities rides on the same single pass per file:
        # a checksum only proves the bytes are those written, not that they
        # are finite (a store written before the policy, or by another program).
        if kind in self._verified:
            return
        name = str(self.manifest["files"][kind])
        verify_file(self.path, self.manifest, name)
        f = os.path.join(self.path, name)
        fh = self._files.get(kind)
        try:
            if fh is None:
                from safetensors import safe_open

                fh = safe_open(f, framework="pt")
            # The bases are first read after open, when the assignment that names their adapters is known.
            assignment = self.assignment.tolist() if kind == "bases" else None
            _require_finite_tables(f, self.manifest, kind, fh.get_tensor, assignment)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"{f}: cannot read its tables ({exc})") from exc
        self._verified.add(kind)

    def _read(self, kind: str, key: str, index: int | None = None) -> torch.Tensor:
        self._verify(kind)
        try:
            sl = self._files[kind].get_slice(key)
            return sl[:] if index is None else sl[index : index + 1][0]
        except Exception as exc:
            raise StoreError(f"{self.path}: cannot read {key} from {self.manifest['files'][kind]} ({exc})") from exc

    def _quantized(self, m: int, k: int | None) -> tuple[QuantizedTable, QuantizedTable]:
        """Module m's bases as stored (all clusters, or cluster k), checked against the format."""
        spec, r = self.modules[m], self.rank
        where = os.path.join(self.path, str(self.manifest["files"]["bases"]))
        out = []
        for key, length, rows in (("U", r, spec.d_out), ("Vt", spec.d_in, r)):
            data = self._read("bases", f"{spec.name}::{key}", k)
            scales = self._read("bases", f"{spec.name}::{key}_scales", k)
            lead = (rows,) if k is not None else (self.num_clusters, rows)
            out.append(_read_quantized(where, self.manifest, spec.name, key, data, scales, length, lead))
        return out[0], out[1]

    def read_bases(self, k):
        if self.quantization:
            return [tuple(_dequantized(t) for t in self._quantized(m, k)) for m in range(len(self.modules))]
        return [(self._read("bases", f"{s.name}::U", k), self._read("bases", f"{s.name}::Vt", k)) for s in self.modules]

    def read_cores(self, i):
        return [self._read("cores", f"{s.name}::sigma", i) for s in self.modules]

    def read_module_bases(self, m):
        if self.quantization:
            U, Vt = self._quantized(m, None)
            return _dequantized(U), _dequantized(Vt)
        name = self.modules[m].name
        return self._read("bases", f"{name}::U"), self._read("bases", f"{name}::Vt")

    def read_module_bases_quantized(self, m):
        if not self.quantization:
            raise StoreError(f"{self.path}: the bases are not quantized")
        return self._quantized(m, None)

    def read_module_cores(self, m):
        return self._read("cores", f"{self.modules[m].name}::sigma")

    def read_own_factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The factors ``{module: (A [k, d_in], B [d_out, k])}`` the store keeps for adapter ``name`` (outside
        the joint tables, or its residual), checked like :meth:`individual_adapters`; ``KeyError`` when it
        has none."""
        from safetensors import safe_open

        entries = self.manifest.get("individual") or []
        j = next((j for j, e in enumerate(entries) if e["name"] == name), None)
        if j is None:
            raise KeyError(f"adapter {name!r} has no factors of its own in {self.path}")
        self._verify("individual")
        f = os.path.join(self.path, str(self.manifest["files"]["individual"]))
        try:
            with safe_open(f, framework="pt") as fh:
                return {mod: (fh.get_tensor(f"{j}::{mod}::A"), fh.get_tensor(f"{j}::{mod}::B"))
                        for mod in entries[j]["modules"]}
        except Exception as exc:
            raise StoreError(f"{f}: cannot read the factors of adapter {name!r} ({exc})") from exc

    def individual_adapters(self):
        entries = self.manifest.get("individual") or []
        if not entries:
            return []
        from safetensors import safe_open

        fname = str((self.manifest.get("files") or {}).get("individual"))
        f = os.path.join(self.path, fname)
        if not os.path.isfile(f):
            raise StoreError(f"{self.path}: missing tensor file {fname!r} of the individually stored adapters")
        self._verify("individual")
        out = []
        try:
            fh = safe_open(f, framework="pt")
            for j, e in enumerate(entries):
                factors = {mod: (fh.get_tensor(f"{j}::{mod}::A"), fh.get_tensor(f"{j}::{mod}::B"))
                           for mod in e["modules"]}
                out.append((str(e["name"]), factors, e.get("peft_config")))
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"{f}: cannot read the individually stored adapters ({exc})") from exc
        return out
