"""The disk and host tiers of a compressed collection.

Two readers give the same view of a compressed collection (see
:mod:`jdlora_ops.compress.result`): :class:`MemoryReader` over a
:class:`~jdlora_ops.compress.result.CompressedCollection` already in memory,
and :class:`StoreReader` over a store directory written by
:func:`jdlora_ops.store.save_store`, read through memory-mapped safetensors so
that only the clusters and adapters asked for are read from disk.

:class:`HostTier` keeps what the device tier copies from: per cluster, the
bases ``(U_k [d_out, r], Vt_k [r, d_in])`` of every module; per adapter, its
cores ``Sigma_i`` (``[r, r]`` or ``[r]``) of every module, in the serving dtype,
pinned when the device is a CUDA device (so that host-to-device copies are
asynchronous). Eagerly it reads everything once; lazily it reads entries on
first use and keeps them under a byte budget, least recently used first out.
It also holds what has no disk copy: adapters projected into the collection
after it was written (:meth:`HostTier.append_adapter`) and uncompressed
adapters (:class:`UncompressedAdapter`).

Nothing here is thread-safe; :class:`~jdlora_ops.serving.adapter_cache.AdapterCache`
calls it under its lock.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..compress.collection import ModuleSpec
from ..compress.result import CompressedCollection, sigma_is_diagonal
from ..store import StoreError, read_manifest, verify_file

__all__ = ["CollectionReader", "MemoryReader", "StoreReader", "HostTier", "UncompressedAdapter"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
}


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
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
    stored).
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

    def individual_adapters(self) -> list[tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]], dict | None]]:
        """Adapters stored outside the joint tables (error budget): ``(name, {module: (A, B)},
        config)``, with the scaling folded into ``B``. None by default."""
        return []


class MemoryReader(CollectionReader):
    """A :class:`CompressedCollection` held in memory (its tensors are shared, not copied)."""

    def __init__(self, collection: CompressedCollection):
        c = collection
        self.collection = c
        self.method = c.method
        self.rank = int(c.rank)
        self.diagonal = sigma_is_diagonal(c.method)
        self.modules = [cm.spec for cm in c.modules.values()]
        self._mods = list(c.modules.values())
        self.adapter_names = list(c.adapter_names)
        self.assignment = c.assignment.detach().to("cpu", torch.int64).clone()
        self.num_clusters = int(c.num_clusters)
        self.weights = c.weights
        self.base_model = (c.metadata or {}).get("base_model")
        self.configs = dict((c.metadata or {}).get("configs") or {})
        self.path = None
        self.nbytes = sum(_nbytes([cm.U, cm.Vt, cm.sigma]) for cm in self._mods)
        for cm in self._mods:
            r = cm.U.shape[2]
            if r != self.rank or cm.Vt.shape[1] != r or cm.U.shape[0] != self.num_clusters:
                raise ValueError(
                    f"module {cm.spec.name}: U {tuple(cm.U.shape)} / Vt {tuple(cm.Vt.shape)} do not match rank "
                    f"{self.rank} and {self.num_clusters} clusters"
                )

    def read_bases(self, k):
        return [(cm.U[k], cm.Vt[k]) for cm in self._mods]

    def read_cores(self, i):
        return [cm.sigma[i] for cm in self._mods]

    def read_module_bases(self, m):
        return self._mods[m].U, self._mods[m].Vt

    def read_module_cores(self, m):
        return self._mods[m].sigma

    def individual_adapters(self):
        return [(ind.name, dict(ind.factors), self.configs.get(ind.name)) for ind in self.collection.individual.values()]


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
        nbytes = 0
        for spec in self.modules:
            for kind, key, shape in (
                ("bases", f"{spec.name}::U", (K, spec.d_out, r)),
                ("bases", f"{spec.name}::Vt", (K, r, spec.d_in)),
                ("cores", f"{spec.name}::sigma", core_shape),
            ):
                got, dt = self._header(kind, key)
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
        # at open); a damaged file is then an error, never wrong output.
        if kind not in self._verified:
            verify_file(self.path, self.manifest, str(self.manifest["files"][kind]))
            self._verified.add(kind)

    def _read(self, kind: str, key: str, index: int | None = None) -> torch.Tensor:
        self._verify(kind)
        try:
            sl = self._files[kind].get_slice(key)
            t = sl[:] if index is None else sl[index : index + 1][0]
        except Exception as exc:
            raise StoreError(f"{self.path}: cannot read {key} from {self.manifest['files'][kind]} ({exc})") from exc
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise StoreError(f"{self.path}: {key} holds NaN or infinite values (the file is corrupt)")
        return t

    def read_bases(self, k):
        return [(self._read("bases", f"{s.name}::U", k), self._read("bases", f"{s.name}::Vt", k)) for s in self.modules]

    def read_cores(self, i):
        return [self._read("cores", f"{s.name}::sigma", i) for s in self.modules]

    def read_module_bases(self, m):
        name = self.modules[m].name
        return self._read("bases", f"{name}::U"), self._read("bases", f"{name}::Vt")

    def read_module_cores(self, m):
        return self._read("cores", f"{self.modules[m].name}::sigma")

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


@dataclass
class UncompressedAdapter:
    """An adapter served by the uncompressed baseline ops.

    ``factors``: module index -> ``(A [r_m, d_in], B [d_out, r_m])`` with the
    PEFT scaling of that module folded into ``B``; modules it lacks are zero
    updates. Tensors are in the serving dtype (pinned on CUDA hosts).
    ``config``: its PEFT config, when known.
    """

    name: str
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    config: dict | None = None

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.factors.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(ab) for ab in self.factors.values())


@dataclass
class _Entry:
    tensors: list
    nbytes: int


@dataclass
class HostTier:
    """Host copies of bases, cores and uncompressed adapters (see the module docstring).

    ``lazy``: read entries on first use (else everything is read by
    :meth:`load_all`); ``capacity_bytes``: budget of the lazily read entries
    (``None``: unlimited), evicted least recently used first, bases and cores
    alike; ``pin``: pin host tensors (CUDA hosts only).
    """

    reader: CollectionReader | None
    dtype: torch.dtype
    pin: bool = False
    lazy: bool = False
    capacity_bytes: int | None = None
    # ("bases", cluster) or ("cores", adapter index) -> entry, least recently used first
    _entries: "OrderedDict[tuple[str, int], _Entry]" = field(default_factory=OrderedDict)
    _extra_cores: dict = field(default_factory=dict)  # adapter index -> per-module cores (no disk copy)
    uncompressed: dict = field(default_factory=dict)  # name -> UncompressedAdapter
    cached_bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0

    def __post_init__(self):
        r = self.reader
        self.names: list[str] = list(r.adapter_names) if r else []
        self.assignment: list[int] = r.assignment.tolist() if r else []
        self.num_stored = len(self.names)

    # ----------------------------------------------------------- helpers
    def _host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy in the serving dtype (pinned when asked), never a view of the reader's buffers."""
        if self.pin:
            out = torch.empty(t.shape, dtype=self.dtype, pin_memory=True)
            return out.copy_(t.detach())
        return t.detach().to("cpu", self.dtype, copy=True).contiguous()

    def load_all(self) -> None:
        """Read every cluster and every stored adapter (eager mode): one read per
        module, then the per-entry lists are views of the stacked copies."""
        r = self.reader
        if r is None:
            return
        Us, Vts, Ss = [], [], []
        for m in range(len(r.modules)):
            U, Vt = r.read_module_bases(m)
            S = r.read_module_cores(m)
            for t, what in ((U, "U"), (Vt, "Vt"), (S, "sigma")):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"module {r.modules[m].name}: {what} holds NaN or infinite values")
            Us.append(self._host(U))
            Vts.append(self._host(Vt))
            Ss.append(self._host(S))
            self.bytes_read += _nbytes([U, Vt, S])
        for k in range(r.num_clusters):
            ts = [(U[k], Vt[k]) for U, Vt in zip(Us, Vts)]
            self._entries[("bases", k)] = _Entry(ts, sum(_nbytes(p) for p in ts))
        for i in range(self.num_stored):
            ts = [S[i] for S in Ss]
            self._entries[("cores", i)] = _Entry(ts, _nbytes(ts))
        self.cached_bytes = sum(e.nbytes for e in self._entries.values())

    def _get(self, key: tuple[str, int], read) -> list:
        e = self._entries.get(key)
        if e is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return e.tensors
        self.misses += 1
        raw = read(key[1])  # may raise: nothing has been changed yet
        self.bytes_read += _nbytes([t for x in raw for t in (x if isinstance(x, tuple) else (x,))])
        conv = [tuple(self._host(t) for t in x) if isinstance(x, tuple) else self._host(x) for x in raw]
        nb = _nbytes([t for x in conv for t in (x if isinstance(x, tuple) else (x,))])
        self._entries[key] = _Entry(conv, nb)
        self.cached_bytes += nb
        self._shrink(keep=key)
        return conv

    def _shrink(self, keep: tuple[str, int]) -> None:
        """Drop least recently used entries beyond the byte budget (never the one just read;
        a caller still holding dropped tensors keeps them alive)."""
        if self.capacity_bytes is None:
            return
        while self.cached_bytes > self.capacity_bytes:
            victim = next((k for k in self._entries if k != keep), None)
            if victim is None:
                return
            self.cached_bytes -= self._entries.pop(victim).nbytes
            self.evictions += 1

    # ----------------------------------------------------------- queries
    @property
    def modules(self) -> list[ModuleSpec]:
        return list(self.reader.modules) if self.reader else []

    def bases(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Host bases of cluster ``k`` (read from disk on a host miss)."""
        return self._get(("bases", k), self.reader.read_bases)

    def cores(self, i: int) -> list[torch.Tensor]:
        """Host cores of adapter ``i`` (read from disk on a host miss)."""
        if i in self._extra_cores:
            self.hits += 1
            return self._extra_cores[i]
        return self._get(("cores", i), self.reader.read_cores)

    def has_bases(self, k: int) -> bool:
        return ("bases", k) in self._entries

    def has_cores(self, i: int) -> bool:
        return ("cores", i) in self._entries or i in self._extra_cores

    def resident_clusters(self) -> list[int]:
        return sorted(k for kind, k in self._entries if kind == "bases")

    def resident_adapters(self) -> list[int]:
        return sorted({i for kind, i in self._entries if kind == "cores"} | set(self._extra_cores))

    # ----------------------------------------------------------- changes
    def append_adapter(self, name: str, cluster: int, cores: list[torch.Tensor]) -> int:
        """Add a projected adapter (cores per module) to ``cluster``; returns its index."""
        i = len(self.names)
        self._extra_cores[i] = [self._host(c) for c in cores]
        self.names.append(name)
        self.assignment.append(int(cluster))
        return i

    def add_uncompressed(self, adapter: UncompressedAdapter) -> None:
        adapter.factors = {m: (self._host(a), self._host(b)) for m, (a, b) in adapter.factors.items()}
        self.uncompressed[adapter.name] = adapter
