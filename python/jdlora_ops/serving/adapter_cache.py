"""The adapter cache: disk -> host -> device tiers of a compressed LoRA collection.

:class:`AdapterCache` opens a compressed collection (a store directory written
by :func:`jdlora_ops.store.save_store`, or a
:class:`~jdlora_ops.compress.result.CompressedCollection` in memory), keeps it
in host memory (:class:`~jdlora_ops.serving.host_tier.HostTier`; lazily, from
memory-mapped files, when it is larger than host memory) and fills
fixed-capacity device tables (:class:`~jdlora_ops.serving.resident_tables.ResidentTables`)
on demand:

* a *cluster* occupies one cluster slot in every module's ``V``/``U`` tables;
* a compressed *adapter* occupies one adapter slot in every module's ``S``
  table and needs its cluster resident (evicting a cluster evicts its
  resident adapters);
* an *uncompressed* adapter (registered with :meth:`AdapterCache.register_uncompressed`,
  or by :meth:`AdapterCache.add` when projection loses too much) occupies one
  slot of the ``lora_A``/``lora_B`` tables.

Slots are handed out least-recently-used first. :meth:`AdapterCache.acquire`
makes a batch's adapters resident and *pins* them until
:meth:`AdapterCache.release`; pinned slots are never evicted or overwritten.

Concurrency contract
--------------------
* Every public method may be called from any thread. One re-entrant lock
  guards the slot maps, the host tier and every write to the tables; reads of
  the tables by the ops happen outside the lock.
* A slot is written only while it is unpinned, under the lock. A batch reads
  only the slots of its lease, which stay pinned (hence unwritten) from
  :meth:`~AdapterCache.acquire` to :meth:`~AdapterCache.release`. So a batch
  never sees a slot change under it, and never sees a half-written slot: the
  lease is handed out only after every copy into its slots has been issued
  (CPU: completed; CUDA: see below).
* A failed call (unknown adapter, too many adapters or clusters for the
  capacity, unreadable store data, shape or base-model mismatch) raises
  before any slot or table is changed.
* CUDA: copies into the tables go on a side stream. Each slot remembers the
  event of the copy that filled it; a batch waits for the events of its slots
  on its own stream before its first op (:meth:`Lease.wait`, done by the
  batch planner). :meth:`~AdapterCache.release` records an event on the
  releasing stream, and the next copy into any of the released slots waits for
  it, so a slot is not overwritten while a kernel launched before the release
  may still read it. Host sources of pending copies are kept alive until the
  copy has finished.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from .._finite import NonFiniteError, require_finite
from ..compress.collection import ModuleFactors, ModuleSpec
from ..compress.result import CompressedCollection
from .host_tier import CollectionReader, HostTier, MemoryReader, StoreReader, UncompressedAdapter
from .resident_tables import ResidentTables
from .slots import SlotPool

__all__ = [
    "AdapterCache",
    "AddReport",
    "CacheStats",
    "CapacityError",
    "Lease",
    "AdapterMismatchError",
    "UnknownAdapterError",
]

Factors = Mapping[str, tuple]  # module name -> (A [r, d_in], B [d_out, r], scale)


class UnknownAdapterError(KeyError):
    """A batch or call names an adapter the cache does not hold."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


class CapacityError(ValueError):
    """A batch needs more distinct adapters or clusters than the device tables can hold at once."""


class AdapterMismatchError(ValueError):
    """An adapter made for another base model, other module shapes, or a rank the tables cannot hold."""


class _NonFiniteFactorsError(AdapterMismatchError, NonFiniteError):
    """Factors holding NaN or an infinity (an :class:`AdapterMismatchError`, as such factors always were)."""


@dataclass
class CacheStats:
    """Counters since the cache was opened (or :meth:`AdapterCache.reset_stats`).

    Device counters are per distinct cluster / adapter per request
    (:meth:`AdapterCache.acquire` or :meth:`AdapterCache.load`): a *hit* was
    resident, a *miss* was copied in, an *eviction* made room for a miss.
    Host counters are per entry read from the host tier (a miss read it from
    disk). Bytes are as copied (host -> device) and as read (disk -> host).
    """

    batches: int = 0
    cluster_hits: int = 0
    cluster_misses: int = 0
    cluster_evictions: int = 0
    adapter_hits: int = 0
    adapter_misses: int = 0
    adapter_evictions: int = 0
    uncompressed_hits: int = 0
    uncompressed_misses: int = 0
    uncompressed_evictions: int = 0
    host_hits: int = 0
    host_misses: int = 0
    host_evictions: int = 0
    bytes_host_to_device: int = 0
    bytes_disk_to_host: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Lease:
    """The resident slots of one batch, pinned until :meth:`AdapterCache.release`.

    * ``adapter_slots``: compressed adapter name -> adapter slot;
    * ``cluster_slots``: cluster id -> cluster slot (the clusters of those adapters);
    * ``adapter_cluster``: adapter slot -> cluster slot;
    * ``uncompressed_slots``: uncompressed adapter name -> slot;
    * ``ready``: CUDA events of the copies that filled these slots (empty on the CPU).
    """

    adapter_slots: dict[str, int]
    cluster_slots: dict[int, int]
    adapter_cluster: dict[int, int]
    uncompressed_slots: dict[str, int]
    ready: list = field(default_factory=list)
    released: bool = False

    def wait(self, stream: "torch.cuda.Stream | None" = None) -> None:
        """Make ``stream`` (default: the current CUDA stream) wait for the copies
        into this lease's slots. A no-op on the CPU."""
        if not self.ready:
            return
        s = stream or torch.cuda.current_stream()
        for ev in self.ready:
            s.wait_event(ev)


@dataclass
class AddReport:
    """Outcome of :meth:`AdapterCache.add`.

    ``path``: ``"compressed"`` (projected into ``cluster``) or
    ``"uncompressed"``; ``rel_errors``: per module (cache order) relative
    squared error of the best projection (empty when none was possible);
    ``mean_rel_error`` / ``max_rel_error`` over modules; ``reason``: why the
    adapter stayed uncompressed, if it did.
    """

    name: str
    path: str
    cluster: int | None
    rel_errors: list[float]
    mean_rel_error: float
    max_rel_error: float
    reason: str = ""


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


class AdapterCache:
    """Disk -> host -> device tiers of adapters of one base model (module docstring).

    Arguments:

    * ``source``: a store directory path, a :class:`CompressedCollection`, a
      :class:`~jdlora_ops.serving.host_tier.CollectionReader`, or ``None``
      (no compressed adapters; then ``modules`` lists the adapted modules).
    * ``max_clusters``, ``max_adapters``: cluster and adapter slots of the
      compressed tables (default: every cluster; every adapter);
      ``max_uncompressed`` slots of rank ``uncompressed_rank`` (default: the
      larger of the collection's rank, or 16, and the ranks of the adapters it
      stores outside the joint tables) for uncompressed adapters (default: as
      many as those adapters, 0 when there are none). Adapters a store keeps
      outside the joint tables (its error or byte budget) are registered as
      uncompressed adapters when the cache opens; an adapter with a residual
      (``jd+res-k``) is both: its core in the compressed tables and its
      residual factors in an uncompressed slot, served on the same tokens and
      summed.
    * ``device`` (default: CUDA when available), ``dtype`` of the tables
      (default float32 on the CPU, bfloat16 on CUDA; it must be the model's).
    * ``lazy``: read the store on demand (default: when the store is larger
      than half the physical memory); ``host_capacity_bytes``: host budget of
      lazily read entries (default: unlimited).
    * ``base_model``: the base model's name (default: the collection's), to
      refuse adapters trained on another one.
    """

    def __init__(
        self,
        source: str | os.PathLike | CompressedCollection | CollectionReader | None = None,
        *,
        modules: Sequence[ModuleSpec] | None = None,
        max_clusters: int | None = None,
        max_adapters: int | None = None,
        max_uncompressed: int | None = None,
        uncompressed_rank: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        lazy: bool | None = None,
        host_capacity_bytes: int | None = None,
        base_model: str | None = None,
    ):
        if isinstance(source, CompressedCollection):
            reader: CollectionReader | None = MemoryReader(source)
        elif isinstance(source, CollectionReader):
            reader = source
        elif source is None:
            reader = None
        else:
            reader = StoreReader(source)
        if reader is None and not modules:
            raise ValueError("AdapterCache: without a compressed collection, pass the adapted modules (modules=...)")
        if reader is not None and modules is not None:
            if [(m.name, m.d_out, m.d_in) for m in modules] != [(m.name, m.d_out, m.d_in) for m in reader.modules]:
                raise AdapterMismatchError("AdapterCache: modules= differs from the collection's modules")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"AdapterCache: dtype must be float32, float16 or bfloat16, got {self.dtype}")
        self._cuda = self.device.type == "cuda"
        self.reader = reader
        self.module_specs: list[ModuleSpec] = list(reader.modules if reader is not None else modules)
        self._module_index = {m.name: j for j, m in enumerate(self.module_specs)}
        self.base_model = base_model or (reader.base_model if reader is not None else None)
        rank = reader.rank if reader is not None else 0
        K = reader.num_clusters if reader is not None else 0
        n = len(reader.adapter_names) if reader is not None else 0
        individual = reader.individual_adapters() if reader is not None else []
        if max_uncompressed is None:
            max_uncompressed = len(individual)
        C = K if max_clusters is None else int(max_clusters)
        A = n if max_adapters is None else int(max_adapters)
        if reader is None:
            C = A = 0
        for what, v in (("max_clusters", C), ("max_adapters", A), ("max_uncompressed", max_uncompressed)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"AdapterCache: {what} must be an integer >= 0, got {v!r}")
        if reader is not None and n and (C < 1 or A < 1):
            raise ValueError("AdapterCache: a compressed collection needs max_clusters >= 1 and max_adapters >= 1")
        ru = int(uncompressed_rank) if uncompressed_rank is not None else max(
            [rank or 16] + [int(A.shape[0]) for _, f, _ in individual for A, _ in f.values()])
        if lazy is None:
            lazy = reader is not None and reader.path is not None and reader.nbytes > _physical_memory() // 2
        self.lazy = bool(lazy)
        self.host = HostTier(
            reader, self.dtype, pin=self._cuda, lazy=self.lazy, capacity_bytes=host_capacity_bytes if self.lazy else None
        )
        if not self.lazy:
            self.host.load_all()
        self.tables = ResidentTables(
            self.module_specs, rank=rank, diagonal=reader.diagonal if reader is not None else False,
            max_clusters=C, max_adapters=A, max_uncompressed=int(max_uncompressed), uncompressed_rank=ru,
            dtype=self.dtype, device=self.device,
        )
        self._clusters = SlotPool(C, "cluster")
        self._adapters = SlotPool(A, "adapter")
        self._uncompressed = SlotPool(int(max_uncompressed), "uncompressed adapter")
        self._slot_cluster = [-1] * A  # adapter slot -> cluster slot (host mirror of tables.adapter_cluster)
        self._comp_index = {name: i for i, name in enumerate(self.host.names)}
        self.lock = threading.RLock()
        self.stats = CacheStats()
        self._stats_host0 = (0, 0, 0, 0)  # host counters include the eager read at start-up
        # CUDA ordering state (see the module docstring).
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        if self._cuda:  # the tables' zero fill (on the current stream) precedes any copy into them
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        self._ready: dict[tuple[str, int], object] = {}
        self._last_use: dict[tuple[str, int], dict[int, object]] = {}
        self._inflight: list[tuple[object, list]] = []
        #: Adapters of the compressed tables that also have residual factors (in ``host.uncompressed``).
        self._residual: set[str] = set()
        for name, factors, config in individual:
            residual = name in self._comp_index
            checked = self._check_factors(name, {m: (A, B, 1.0) for m, (A, B) in factors.items()}, config, None,
                                          residual=residual)
            self._register_checked(name, checked, config)
            if residual:
                self._residual.add(name)

    # ================================================================ queries
    @property
    def rank(self) -> int:
        return self.tables.rank

    @property
    def method(self) -> str | None:
        return self.reader.method if self.reader is not None else None

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.module_specs]

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter the cache can serve: compressed, then uncompressed."""
        with self.lock:
            return list(self.host.names) + [x for x in self.host.uncompressed if x not in self._residual]

    @property
    def capacity(self) -> dict:
        return {
            "clusters": self._clusters.capacity,
            "adapters": self._adapters.capacity,
            "uncompressed": self._uncompressed.capacity,
            "uncompressed_rank": self.tables.uncompressed_rank,
        }

    def __contains__(self, name: str) -> bool:
        with self.lock:
            return name in self._comp_index or name in self.host.uncompressed

    def path_of(self, name: str) -> str:
        """``"compressed"``, ``"uncompressed"`` or ``"compressed+residual"`` (both, summed): which ops
        serve ``name``."""
        with self.lock:
            if name in self._comp_index:
                return "compressed+residual" if name in self._residual else "compressed"
            if name in self.host.uncompressed:
                return "uncompressed"
            raise self._unknown(name)

    def cluster_of(self, name: str) -> int:
        """The cluster of a compressed adapter."""
        with self.lock:
            if name not in self._comp_index:
                raise self._unknown(name) if name not in self.host.uncompressed else KeyError(
                    f"adapter {name!r} is uncompressed; it has no cluster")
            return self.host.assignment[self._comp_index[name]]

    def where(self, name: str) -> str:
        """The highest tier holding all of ``name``'s weights: ``"device"``,
        ``"host"`` or ``"disk"`` (for routers that send a request where its
        adapter already is)."""
        with self.lock:
            if name in self.host.uncompressed and name not in self._residual:
                return "device" if name in self._uncompressed else "host"
            if name not in self._comp_index:
                raise self._unknown(name)
            i = self._comp_index[name]
            k = self.host.assignment[i]
            residual_resident = name not in self._residual or name in self._uncompressed
            if name in self._adapters and residual_resident:
                return "device"
            if self.host.has_cores(i) and self.host.has_bases(k):
                return "host"
            return "disk"

    def state(self) -> dict:
        """Residency and counters, JSON-serialisable, for routers and metrics."""
        with self.lock:
            self._sync_host_stats()
            names = self.host.names
            return {
                "device": {
                    "device": str(self.device),
                    "dtype": str(self.dtype).replace("torch.", ""),
                    "capacity": self.capacity,
                    "table_bytes": self.tables.nbytes(),
                    "clusters": [int(k) for k in self._clusters.keys()],
                    "adapters": [str(a) for a in self._adapters.keys()],
                    "uncompressed": [str(a) for a in self._uncompressed.keys()],
                    "pinned": {
                        "clusters": self._clusters.num_pinned(),
                        "adapters": self._adapters.num_pinned(),
                        "uncompressed": self._uncompressed.num_pinned(),
                    },
                },
                "host": {
                    "lazy": self.lazy,
                    "pinned_memory": self.host.pin,
                    "cached_bytes": self.host.cached_bytes,
                    "capacity_bytes": self.host.capacity_bytes,
                    "clusters": self.host.resident_clusters(),
                    "adapters": [names[i] for i in self.host.resident_adapters()],
                    "uncompressed": list(self.host.uncompressed),
                },
                "disk": None if self.reader is None or self.reader.path is None else {
                    "path": self.reader.path,
                    "adapters": self.host.num_stored,
                    "clusters": self.reader.num_clusters,
                },
                "stats": self.stats.as_dict(),
            }

    def reset_stats(self) -> None:
        with self.lock:
            self.stats = CacheStats()
            self._stats_host0 = (self.host.hits, self.host.misses, self.host.evictions, self.host.bytes_read)

    def _sync_host_stats(self) -> None:
        h0, m0, e0, b0 = self._stats_host0
        self.stats.host_hits = self.host.hits - h0
        self.stats.host_misses = self.host.misses - m0
        self.stats.host_evictions = self.host.evictions - e0
        self.stats.bytes_disk_to_host = self.host.bytes_read - b0

    def _unknown(self, name) -> UnknownAdapterError:
        unc = len(self.host.uncompressed) - len(self._residual)
        return UnknownAdapterError(
            f"unknown adapter {name!r}: the cache holds {len(self.host.names) + unc} adapters (compressed: "
            f"{len(self.host.names)}, uncompressed: {unc}); register or add it first"
        )

    # ============================================================ residency
    def acquire(self, names: Iterable[str | None]) -> Lease:
        """Make the adapters of one batch resident and pin them; returns their slots.

        ``names``: adapter names (repeats and ``None`` = no adapter are fine).
        Misses are copied in, evicting the least recently used unpinned
        clusters and adapters. Raises :class:`UnknownAdapterError` or
        :class:`CapacityError` (more distinct adapters or clusters than slots,
        or not enough unpinned slots while other batches are in flight), or a
        store error from reading the disk tier, with nothing changed.
        """
        with self.lock:
            lease = self._ensure(names, pin=True)
            self.stats.batches += 1
            self._sync_host_stats()
            return lease

    def release(self, lease: Lease) -> None:
        """Unpin a lease's slots (after the batch's ops have been launched).

        On CUDA an event recorded on the current stream guards the released
        slots against being overwritten before those ops have run.
        """
        with self.lock:
            if lease.released:
                raise RuntimeError("AdapterCache.release: this lease was already released")
            lease.released = True
            used = [("cluster", s) for s in lease.cluster_slots.values()]
            used += [("adapter", s) for s in lease.adapter_slots.values()]
            used += [("uncompressed", s) for s in lease.uncompressed_slots.values()]
            if self._cuda:
                stream = torch.cuda.current_stream(self.device)
                ev = torch.cuda.Event()
                ev.record(stream)
                for key in used:
                    # One event per stream that used the slot: the latest on a stream covers earlier work there.
                    self._last_use.setdefault(key, {})[stream.stream_id] = ev
            pools = {"cluster": self._clusters, "adapter": self._adapters, "uncompressed": self._uncompressed}
            for kind, s in used:
                pools[kind].unpin(s)
            for s in lease.uncompressed_slots.values():
                # An adapter switched to the compressed path while this batch ran: free its old slot.
                key = self._uncompressed.key_at(s)
                if key is not None and key not in self.host.uncompressed and not self._uncompressed.pinned(s):
                    self._uncompressed.remove(key)

    def load(self, names: Iterable[str]) -> int:
        """Bring adapters (and their clusters) into the device tables without
        pinning them (prefetch). Returns how many adapters were copied in.
        Same errors as :meth:`acquire`."""
        with self.lock:
            before = self.stats.adapter_misses + self.stats.uncompressed_misses
            self._ensure(names, pin=False)
            self._sync_host_stats()
            return self.stats.adapter_misses + self.stats.uncompressed_misses - before

    def evict(self, name: str) -> bool:
        """Free ``name``'s device slot (both, for an adapter with a residual). Returns ``False`` when it
        is not resident or is pinned by a batch in flight (then nothing changes)."""
        with self.lock:
            if name in self._residual:
                s, r = self._adapters.lookup(name), self._uncompressed.lookup(name)
                if (s is None and r is None) or (s is not None and self._adapters.pinned(s)) or (
                        r is not None and self._uncompressed.pinned(r)):
                    return False
                if r is not None:
                    self._uncompressed.remove(name)
                    self.stats.uncompressed_evictions += 1
                if s is not None:
                    self._adapters.remove(name)
                    self._slot_cluster[s] = -1
                    self.stats.adapter_evictions += 1
                return True
            if name in self.host.uncompressed:
                s = self._uncompressed.lookup(name)
                if s is None or self._uncompressed.pinned(s):
                    return False
                self._uncompressed.remove(name)
                self.stats.uncompressed_evictions += 1
                return True
            if name not in self._comp_index:
                raise self._unknown(name)
            s = self._adapters.lookup(name)
            if s is None or self._adapters.pinned(s):
                return False
            self._adapters.remove(name)
            self._slot_cluster[s] = -1
            self.stats.adapter_evictions += 1
            return True

    def evict_cluster(self, cluster: int) -> bool:
        """Free a cluster's slot and the slots of its resident adapters.
        Returns ``False`` when it is not resident or is pinned."""
        with self.lock:
            s = self._clusters.lookup(cluster)
            if s is None or self._clusters.pinned(s):
                return False
            self._drop_cluster(cluster, s)
            self._clusters.remove(cluster)
            return True

    def _drop_cluster(self, cluster: int, slot: int) -> None:
        """Evict the resident adapters of ``cluster`` (slot ``slot``); they are
        unpinned because a pinned adapter pins its cluster."""
        for name, a in self._adapters.items():
            if self._slot_cluster[a] == slot:
                self._adapters.remove(name)
                self._slot_cluster[a] = -1
                self.stats.adapter_evictions += 1
        self.stats.cluster_evictions += 1

    def _ensure(self, names: Iterable[str | None], *, pin: bool) -> Lease:
        # ---- 1. resolve and check; nothing changes if this raises
        comp: dict[str, int] = {}
        unc: list[str] = []
        for name in names:
            if name is None:
                continue
            if name not in self._comp_index and name not in self.host.uncompressed:
                raise self._unknown(name)
            if name in self._comp_index:
                comp.setdefault(name, self._comp_index[name])
            # An adapter with a residual takes both: its core's slot and its residual's.
            if name in self.host.uncompressed and name not in unc:
                unc.append(name)
        clusters = sorted({self.host.assignment[i] for i in comp.values()})
        for what, need, pool in (
            ("compressed adapters", len(comp), self._adapters),
            ("clusters", len(clusters), self._clusters),
            ("uncompressed adapters", len(unc), self._uncompressed),
        ):
            if need > pool.capacity:
                raise CapacityError(
                    f"the batch uses {need} distinct {what} but the device tables hold {pool.capacity}; "
                    f"split the batch or open the cache with a larger capacity"
                )
        new_clusters = [k for k in clusters if k not in self._clusters]
        new_adapters = [a for a in comp if a not in self._adapters]
        new_unc = [a for a in unc if a not in self._uncompressed]
        for what, new, pool, keys in (
            ("cluster", new_clusters, self._clusters, clusters),
            ("adapter", new_adapters, self._adapters, list(comp)),
            ("uncompressed adapter", new_unc, self._uncompressed, unc),
        ):
            if len(new) > pool.available_for(keys):
                raise CapacityError(
                    f"the batch needs {len(new)} more {what} slots but only {pool.available_for(keys)} of "
                    f"{pool.capacity} are free or evictable; the rest are pinned by batches in flight"
                )
        ru = self.tables.uncompressed_rank
        for a in new_unc:
            if self.host.uncompressed[a].rank > ru:  # registered before a capacity change cannot happen; defensive
                raise AdapterMismatchError(f"uncompressed adapter {a!r} has rank {self.host.uncompressed[a].rank} > {ru}")

        # ---- 2. read what is missing from the host tier (may read disk; may raise)
        bases = {k: self.host.bases(k) for k in new_clusters}
        cores = {a: self.host.cores(comp[a]) for a in new_adapters}

        # ---- 3. commit: slots, copies, pins (nothing below can fail on valid state)
        self.stats.cluster_hits += len(clusters) - len(new_clusters)
        self.stats.cluster_misses += len(new_clusters)
        self.stats.adapter_hits += len(comp) - len(new_adapters)
        self.stats.adapter_misses += len(new_adapters)
        self.stats.uncompressed_hits += len(unc) - len(new_unc)
        self.stats.uncompressed_misses += len(new_unc)
        with self._copies() as sources:
            for k in new_clusters:
                slot, evicted = self._clusters.assign(k, protect=clusters)
                if evicted is not None:
                    self._drop_cluster(evicted, slot)
                self._write_cluster(slot, bases[k], sources)
            for k in clusters:
                self._clusters.touch(k)
            for a in new_adapters:
                slot, evicted = self._adapters.assign(a, protect=comp)
                if evicted is not None:
                    self.stats.adapter_evictions += 1
                cslot = self._clusters.lookup(self.host.assignment[comp[a]])
                self._write_core(slot, cores[a], cslot, sources)
            for a in comp:
                self._adapters.touch(a)
            for a in new_unc:
                slot, evicted = self._uncompressed.assign(a, protect=unc)
                if evicted is not None:
                    self.stats.uncompressed_evictions += 1
                self._write_uncompressed(slot, self.host.uncompressed[a], sources)
            for a in unc:
                self._uncompressed.touch(a)
        lease = Lease(
            adapter_slots={a: self._adapters.lookup(a) for a in comp},
            cluster_slots={k: self._clusters.lookup(k) for k in clusters},
            adapter_cluster={},
            uncompressed_slots={a: self._uncompressed.lookup(a) for a in unc},
        )
        lease.adapter_cluster = {s: self._slot_cluster[s] for s in lease.adapter_slots.values()}
        if pin:
            for s in lease.cluster_slots.values():
                self._clusters.pin(s)
            for s in lease.adapter_slots.values():
                self._adapters.pin(s)
            for s in lease.uncompressed_slots.values():
                self._uncompressed.pin(s)
        if self._cuda:
            keys = [("cluster", s) for s in lease.cluster_slots.values()]
            keys += [("adapter", s) for s in lease.adapter_slots.values()]
            keys += [("uncompressed", s) for s in lease.uncompressed_slots.values()]
            seen = set()
            for key in keys:
                ev = self._ready.get(key)
                if ev is not None and id(ev) not in seen:
                    seen.add(id(ev))
                    lease.ready.append(ev)
        return lease

    # ============================================================== copies
    @contextlib.contextmanager
    def _copies(self):
        """Context of table writes. On CUDA they are issued on the side stream and
        every slot written inside is stamped with one completion event."""
        sources: list = []
        if not self._cuda:
            yield sources
            return
        # Drop host sources of copies that have finished.
        self._inflight = [(ev, src) for ev, src in self._inflight if not ev.query()]
        self._written: list[tuple[str, int]] = []
        with torch.cuda.stream(self._copy_stream):
            yield sources
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        for key in self._written:
            self._ready[key] = ev
        if sources:
            self._inflight.append((ev, sources))

    def _before_write(self, kind: str, slot: int) -> None:
        """On CUDA: the side stream waits until batches that read this slot before
        it was released are done."""
        if self._cuda:
            for ev in self._last_use.pop((kind, slot), {}).values():
                self._copy_stream.wait_event(ev)
            self._written.append((kind, slot))

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, sources: list) -> None:
        dst.copy_(src, non_blocking=self._cuda)
        if self._cuda:
            sources.append(src)
        self.stats.bytes_host_to_device += src.numel() * src.element_size()

    def _write_cluster(self, slot: int, bases, sources) -> None:
        self._before_write("cluster", slot)
        for t, (U, Vt) in zip(self.tables.modules.values(), bases):
            self._copy(t.U[slot], U, sources)
            self._copy(t.V[slot], Vt, sources)

    def _write_core(self, slot: int, cores, cluster_slot: int, sources) -> None:
        self._before_write("adapter", slot)
        for t, S in zip(self.tables.modules.values(), cores):
            self._copy(t.S[slot], S, sources)
        self.tables.adapter_cluster[slot].fill_(cluster_slot)
        self._slot_cluster[slot] = cluster_slot

    def _write_uncompressed(self, slot: int, adapter: UncompressedAdapter, sources) -> None:
        self._before_write("uncompressed", slot)
        for m, t in enumerate(self.tables.modules.values()):
            ab = adapter.factors.get(m)
            if ab is None:
                t.lora_A[slot].zero_()
                t.lora_B[slot].zero_()
                continue
            A, B = ab
            r = A.shape[0]
            self._copy(t.lora_A[slot, :r], A, sources)
            self._copy(t.lora_B[slot, :, :r], B, sources)
            if r < self.tables.uncompressed_rank:  # zero padding: stale rows of a previous tenant must not leak
                t.lora_A[slot, r:].zero_()
                t.lora_B[slot, :, r:].zero_()

    # ======================================================= registration
    def _check_factors(self, name: str, factors: Factors, config: dict | None, base_model: str | None, *,
                       residual: bool = False) -> dict:
        """Validate an adapter's factors (``residual``: those of an adapter of the compressed tables);
        returns module index -> (A, B, scale) as float32 CPU tensors."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if (name in self._comp_index and not residual) or name in self.host.uncompressed:
            raise ValueError(f"an adapter named {name!r} is already in the cache")
        bm = base_model or (config or {}).get("base_model_name_or_path")
        if bm and self.base_model and bm != self.base_model:
            raise AdapterMismatchError(
                f"adapter {name!r} was made for base model {bm!r}, but this cache serves {self.base_model!r}"
            )
        if not factors:
            raise AdapterMismatchError(f"adapter {name!r} has no modules")
        out = {}
        for mod, f in factors.items():
            if mod not in self._module_index:
                raise AdapterMismatchError(
                    f"adapter {name!r}: module {mod!r} is not one of the {len(self.module_specs)} modules this "
                    f"cache serves (an adapter for another base model or other target modules?)"
                )
            spec = self.module_specs[self._module_index[mod]]
            if len(f) == 2:
                A, B = f
                s = 1.0
            else:
                A, B, s = f
            A = torch.as_tensor(A).detach().to("cpu", torch.float32)
            B = torch.as_tensor(B).detach().to("cpu", torch.float32)
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise AdapterMismatchError(
                    f"adapter {name!r}, module {mod}: A {list(A.shape)} and B {list(B.shape)} are not LoRA factors "
                    f"(expected A [r, d_in], B [d_out, r])"
                )
            if (B.shape[0], A.shape[1]) != (spec.d_out, spec.d_in):
                raise AdapterMismatchError(
                    f"adapter {name!r}, module {mod}: update is {B.shape[0]} x {A.shape[1]}, the base model's "
                    f"module is {spec.d_out} x {spec.d_in} (an adapter for another base model?)"
                )
            scale = torch.tensor(float(s), dtype=torch.float64)
            for t, what in ((A, "lora_A"), (B, "lora_B"), (scale, "scale")):
                require_finite(t, adapter=name, module=mod, tensor_name=what, error=_NonFiniteFactorsError)
            out[self._module_index[mod]] = (A, B, float(s))
        return out

    def register_uncompressed(
        self, name: str, factors: Factors, *, config: dict | None = None, base_model: str | None = None
    ) -> None:
        """Serve ``name`` through the uncompressed baseline ops.

        ``factors``: module name -> ``(A [r, d_in], B [d_out, r], scale)``
        (PEFT's ``lora_A``/``lora_B`` weights and ``lora_alpha / r``); modules
        left out are zero updates. Raises :class:`AdapterMismatchError` for
        unknown modules, wrong shapes, another base model or a rank above the
        tables' ``uncompressed_rank``; ``ValueError`` for a duplicate name.
        """
        with self.lock:
            checked = self._check_factors(name, factors, config, base_model)
            self._register_checked(name, checked, config)

    def _register_checked(self, name: str, checked: dict, config: dict | None) -> None:
        if not self.tables.has_uncompressed:
            raise CapacityError(
                f"adapter {name!r} needs the uncompressed path, but the cache has no uncompressed slots "
                f"(open it with max_uncompressed > 0)"
            )
        ru = self.tables.uncompressed_rank
        for m, (A, _B, _s) in checked.items():
            if A.shape[0] > ru:
                raise AdapterMismatchError(
                    f"adapter {name!r}, module {self.module_specs[m].name}: rank {A.shape[0]} exceeds the "
                    f"uncompressed tables' rank {ru}"
                )
        adapter = UncompressedAdapter(name, {m: (A, B * s) for m, (A, B, s) in checked.items()}, config)
        self.host.add_uncompressed(adapter)

    def add(
        self, name: str, factors: Factors | None = None, *, max_rel_error: float, config: dict | None = None,
        base_model: str | None = None, persist: bool = False,
    ) -> AddReport:
        """:meth:`_add` (below); with ``persist=True`` the adapter is also written into the store the
        cache was opened from, as ``jdlora add`` would (:func:`jdlora_ops.store_update.add_to_store`: the
        store's metric and error budget, an atomic update), so that a restarted server sees it. The
        store is written after the cache took the adapter; a failed write raises and leaves the store as
        it was (the adapter stays served from memory)."""
        if persist:
            path = getattr(self.reader, "path", None)
            if path is None:
                raise ValueError("AdapterCache.add(persist=True): the cache was not opened from a store directory")
            switching = factors is None
            if switching:
                with self.lock:
                    if name not in self.host.uncompressed:
                        raise self._unknown(name)
                    factors = {self.module_specs[m].name: ab for m, ab in self.host.uncompressed[name].factors.items()}
            report = self._add(name, None if switching else factors, max_rel_error=max_rel_error, config=config,
                               base_model=base_model)
            from ..compress.collection import InMemoryCollection
            from ..store_update import add_to_store

            mods = {mod: (f[0], f[1], f[2] if len(f) > 2 else 1.0) for mod, f in factors.items()}
            add_to_store(path, InMemoryCollection({name: mods}, modules=list(self.module_specs),
                                                  metadata={"configs": {name: dict(config or {})}}))
            return report
        return self._add(name, factors, max_rel_error=max_rel_error, config=config, base_model=base_model)

    def _add(
        self, name: str, factors: Factors | None = None, *, max_rel_error: float, config: dict | None = None,
        base_model: str | None = None,
    ) -> AddReport:
        """Project an adapter into the collection; served compressed if the error is small enough.

        The adapter's cores are computed for every cluster's bases
        (:func:`jdlora_ops.compress.evaluate_clusters`) and it joins the
        cluster with the lowest summed error over modules (relative or
        absolute, as the collection was fitted). If the mean relative error
        over modules is at most ``max_rel_error`` it is served compressed from
        then on; otherwise it is served uncompressed (which needs uncompressed
        slots).

        ``factors`` as in :meth:`register_uncompressed` for a new adapter; or
        ``None`` to project an adapter already registered uncompressed (a
        fine-tune that arrived after the last compression), which then
        switches paths: batches prepared afterwards use its cores, a batch in
        flight keeps its pinned uncompressed slot, which is freed later.
        Only the cache changes; the store on disk is not modified.
        """
        from ..compress.projection import evaluate_clusters

        with self.lock:
            switching = factors is None
            if switching:
                if name not in self.host.uncompressed:
                    raise self._unknown(name) if name not in self._comp_index else ValueError(
                        f"adapter {name!r} is already compressed")
                checked = {m: (A.float(), B.float(), 1.0) for m, (A, B) in self.host.uncompressed[name].factors.items()}
            else:
                checked = self._check_factors(name, factors, config, base_model)
            r = self.reader
            if r is None or r.method not in ("full", "diag") or r.num_clusters == 0:
                why = "the cache holds no jointly compressed collection to project into"
                if not switching:
                    self._register_checked(name, checked, config)
                return AddReport(name, "uncompressed", None, [], math.nan, math.nan, why)
            K = r.num_clusters
            F64 = torch.float64
            errs = torch.zeros(len(self.module_specs), K, dtype=F64)
            norms = torch.zeros(len(self.module_specs), dtype=F64)
            sig = []
            for m, spec in enumerate(self.module_specs):
                if m in checked:
                    A, B, s = checked[m]
                    f = ModuleFactors.from_factors(spec, [A], [B], [s], dtype=torch.float32)
                else:
                    f = ModuleFactors(spec, 1, [])
                U, Vt = r.read_module_bases(m)
                U = U.detach().to("cpu", torch.float32)
                Vt = Vt.detach().to("cpu", torch.float32)
                ev = evaluate_clusters(f, U, Vt.transpose(1, 2), r.method, all_sigma=True)
                errs[m] = ev.errors[0].cpu()
                norms[m] = ev.norms_sq[0].cpu()
                sig.append(ev.sigma[0].cpu())
            tiny = torch.finfo(F64).tiny
            rel = torch.where(norms[:, None] > tiny, errs / norms.clamp_min(tiny)[:, None], torch.zeros_like(errs))
            cost = rel.sum(0) if r.weights == "relative" else errs.sum(0)
            k = int(cost.argmin())
            per = rel[:, k].tolist()
            mean, mx = sum(per) / len(per), max(per)
            if mean <= max_rel_error:
                i = self.host.append_adapter(name, k, [s_[k] for s_ in sig])
                self._comp_index[name] = i
                if switching:
                    del self.host.uncompressed[name]
                    slot = self._uncompressed.lookup(name)
                    if slot is not None and not self._uncompressed.pinned(slot):
                        self._uncompressed.remove(name)
                    # A pinned slot stays with its stale key until least-recently-used eviction reclaims it.
                return AddReport(name, "compressed", k, per, mean, mx)
            why = f"mean relative error {mean:.3g} > max_rel_error {max_rel_error:.3g}"
            if not switching:
                self._register_checked(name, checked, config)
            return AddReport(name, "uncompressed", k, per, mean, mx, why)

    def _read_peft(self, path: str | os.PathLike, name: str | None):
        from ..peft_io import read_peft_adapter

        pa = read_peft_adapter(path, name)
        factors = {mod: pa.load(mod) for mod in pa.modules if mod in self._module_index}
        unknown = [mod for mod in pa.modules if mod not in self._module_index]
        if unknown:
            raise AdapterMismatchError(
                f"{pa.path}: module {unknown[0]!r} is not one of the modules this cache serves "
                f"(an adapter for another base model or other target modules?)"
            )
        return pa, factors

    def register_peft(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Register a PEFT adapter directory as an uncompressed adapter; returns its name
        (default: the directory name)."""
        pa, factors = self._read_peft(path, name)
        self.register_uncompressed(pa.name, factors, config=pa.config)
        return pa.name

    def add_peft(self, path: str | os.PathLike, *, max_rel_error: float, name: str | None = None,
                 persist: bool = False) -> AddReport:
        """:meth:`add` for a PEFT adapter directory."""
        pa, factors = self._read_peft(path, name)
        return self.add(pa.name, factors, max_rel_error=max_rel_error, config=pa.config, persist=persist)
