"""The disk and host tiers of a compressed collection.

Two readers give the same view of a compressed collection (see
:mod:`jdlora_ops.compress.result`): :class:`MemoryReader` over a
:class:`~jdlora_ops.compress.result.CompressedCollection` already in memory,
and :class:`~jdlora_ops.store.StoreReader` over a store directory, read
through memory-mapped safetensors so that only the clusters and adapters
asked for are read from disk.

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

from collections import OrderedDict
from dataclasses import dataclass, field


import torch

from ..compress.collection import ModuleSpec
from ..compress.result import CompressedCollection, sigma_is_diagonal
from ..store import CollectionReader, StoreReader, tensor_bytes as _nbytes

# The readers' interface and the store reader live with the store format (jdlora_ops.store).
__all__ = ["CollectionReader", "MemoryReader", "StoreReader", "HostTier", "UncompressedAdapter"]

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
