"""Serving a store that changes: ``jdlora add`` / ``jdlora remove`` while vLLM serves it.

A store update writes its tensor files first and switches ``manifest.json``
last, atomically (:mod:`jdlora_ops.store`); each manifest is a generation, and
the files it names are complete before it appears, so following the manifest
never reads a half-written store. The plugin follows generations in two
places, each at the cost of one ``os.stat`` of the manifest while nothing
changes:

* the front end (:class:`StoreView`, once per request naming a store
  adapter, and for the resolver): a request may name the adapters of the
  newest generation that passed its checks. A removed adapter is refused with
  an error saying so, as is a name that was removed and added again with other
  weights after this process served it: vLLM keys its adapter cache and its
  prefix cache by name, so the new weights need a new name (or a restart).
* the worker (:class:`WorkerGenerations`, once per engine step, before vLLM
  loads the step's adapters): a new generation is opened and its clusters are
  matched to the resident ones by content digest. Bases already resident stay
  where they are; only clusters with new content are read and written into
  free cluster slots of every layer's tables (or slots added for them), so the
  slots of other clusters are not touched. Adapters' cores are read when vLLM
  loads them, as before. Generations replaced since are kept open for a while
  (:attr:`WorkerGenerations.KEEP`): a request accepted before its adapter was
  removed loads it from there (its files stay readable while open).

A generation passes its checks when its manifest and tensor headers agree,
the files that changed since the previous generation match their SHA-256 and
hold no NaN or infinity, and its modules, rank and kind of core are the ones
served (the engine's tables were sized for them at start-up). Otherwise the
previous generation stays served and the reason is logged once.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import threading
from typing import Callable, Iterable

import torch

from ...store import MANIFEST, StoreError

log = logging.getLogger("vllm.jdlora_ops")

__all__ = ["lora_id", "ID_BASE", "manifest_stamp", "Generation", "GenerationRefused", "open_generation",
           "StoreView", "store_view", "WorkerGenerations", "engine_step", "in_engine_step"]

#: Store adapter ids lie in [ID_BASE, 2**53): far above the ids a server counts up for its own adapters, and
#: exact in any JSON number.
ID_BASE = 1 << 24


def lora_id(name: str) -> int:
    """The LoRA id of the store adapter ``name``: the same in every process and every generation.

    Derived from the name rather than the adapter's place in the manifest, which
    moves when an earlier adapter is removed (vLLM would serve the cached
    adapter of the old holder of an id).
    """
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")
    return ID_BASE + h % ((1 << 53) - ID_BASE)


def manifest_stamp(path: str) -> tuple | None:
    """What changes when the manifest is switched (a new file under the same name), or ``None`` without one."""
    try:
        st = os.stat(os.path.join(path, MANIFEST))
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class GenerationRefused(StoreError):
    """A generation of the store that this server cannot serve (the message says why)."""


class Generation:
    """One manifest of the store, opened (``reader``) and checked."""

    def __init__(self, reader, stamp):
        self.reader = reader
        self.stamp = stamp
        self.number = int(reader.generation)
        self.index = {n: i for i, n in enumerate(reader.adapter_names)}
        # Adapters with factors of their own: kept outside the joint tables (served in vLLM's dense per-slot
        # stacks, like a PEFT adapter), or a residual beside a core (both, on the same tokens).
        self.own_factors = {str(e["name"]): OwnFactors(e) for e in reader.manifest.get("individual") or []}
        self.digests = list(reader.adapter_digests)
        self.rank, self.diagonal = int(reader.rank), bool(reader.diagonal)
        self.modules = tuple((s.name, int(s.d_out), int(s.d_in)) for s in reader.modules)
        files = reader.manifest["files"]
        self.bases_file = str(files["bases"])
        self.bases_sha = (reader.manifest.get("sha256") or {}).get(self.bases_file)
        # A store written before digests: a cluster is known by its place in one bases file.
        self.cluster_keys = list(reader.cluster_digests or [f"{self.bases_file}:{self.bases_sha}:{k}"
                                                            for k in range(int(reader.num_clusters))])
        self.table_slot: list[int] = []  # worker: the table cluster slot of each of the store's clusters

    def digest(self, name: str) -> str | None:
        i = self.index.get(name)
        return None if i is None else self.digests[i]

    def release(self) -> None:
        """Close the tensor files (a file removed by a later update is freed once no one holds it)."""
        self.reader = None


class OwnFactors:
    """What a generation's manifest says of an adapter's own factors: ``label`` (``jd+res-k``, ``svd-k``,
    ``full``), ``residual`` (beside a core) and ``rank`` (the widest module's, what a dense slot needs)."""

    def __init__(self, entry: dict):
        path, k = str(entry["path"]), int(entry.get("rank", 0))
        self.residual = path == "residual"
        self.label = f"jd+res-{k}" if self.residual else f"svd-{k}" if path == "svd" else path
        widths = entry.get("factor_ranks") or ([k] if path != "full" else entry.get("ranks") or [k])
        self.rank = max([0] + [int(x) for x in widths])


def _incompatibility(gen: Generation, served: Generation) -> str | None:
    if gen.rank != served.rank:
        return f"its rank is {gen.rank}, the served tables have rank {served.rank}"
    if gen.diagonal != served.diagonal:
        kinds = {True: "diagonal", False: "full r x r"}
        return f"its cores are {kinds[gen.diagonal]}, the served ones are {kinds[served.diagonal]}"
    if gen.modules != served.modules:
        have, want = dict((m, s) for m, *s in gen.modules), dict((m, s) for m, *s in served.modules)
        extra = [m for m in have if m not in want]
        if extra:
            return f"it has {len(extra)} module(s) the server does not serve, e.g. {extra[:3]}"
        lacking = [m for m in want if m not in have]
        if lacking:
            return f"it lacks {len(lacking)} served module(s), e.g. {lacking[:3]}"
        m = next(m for m in want if have[m] != want[m])
        return f"module {m} is {have[m][0]} x {have[m][1]}, served as {want[m][0]} x {want[m][1]}"
    return None


def open_generation(path: str, served: Generation | None = None, previous: Generation | None = None) -> Generation:
    """Open the store's current generation and check it (see the module docstring).

    ``served``: the generation the engine's tables were built from (``None``:
    this is it); ``previous``: the last generation opened, whose files need no
    second check when the new one keeps them. Raises :class:`StoreError`
    (:class:`GenerationRefused` for a store the tables cannot serve).
    """
    from ...store import StoreReader

    for attempt in range(3):
        stamp = manifest_stamp(path)
        try:
            gen = Generation(StoreReader(path), stamp)
            problem = _incompatibility(gen, served) if served is not None else None
            if problem:
                raise GenerationRefused(f"jdlora store {path}, generation {gen.number}: {problem}; restart the server "
                                        "to serve it")
            kept = previous is not None and (gen.bases_file, gen.bases_sha) == (previous.bases_file,
                                                                                 previous.bases_sha)
            gen.reader.verify(("cores",) if kept else ("bases", "cores"))
            return gen
        except GenerationRefused:
            raise
        except StoreError:
            # A generation that landed while this one was read removes the files it no longer names: read again.
            if attempt == 2 or manifest_stamp(path) == stamp:
                raise
    raise AssertionError("unreachable")


class StoreView:
    """The front end's view of the served store: which adapters a request may name (thread-safe)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self.current: Generation | None = None
        self._served: Generation | None = None
        self._refused: tuple | None = None  # (stamp, reason) of the newest generation when it was refused
        self._first: dict[str, str | None] = {}  # name -> digest of the version this process accepted first
        self._named: set[str] = set()  # names of every generation this process followed

    def refresh(self) -> Generation | None:
        stamp = manifest_stamp(self.path)
        with self._lock:
            cur = self.current
            if (cur is not None and stamp == cur.stamp) or (self._refused is not None and self._refused[0] == stamp):
                return cur
            try:
                gen = open_generation(self.path, self._served, cur)
            except StoreError as exc:
                self._refused = (stamp, str(exc))
                log.warning("jdlora: store %s: a new generation cannot be served (%s); %s", self.path, exc,
                            f"generation {cur.number} stays served" if cur else "no generation is served")
                return cur
            gen.release()  # the front end needs the names and digests only
            if self._served is None:
                self._served = gen
            elif cur is not None:
                log.info("jdlora: store %s: generation %d (%d adapters) follows generation %d", self.path,
                         gen.number, len(gen.index), cur.number)
            self.current, self._refused = gen, None
            self._named.update(gen.index)
            self._named.update(gen.own_factors)
            return gen

    def lacks(self, name: str) -> bool:
        """Whether the served generation holds no adapter ``name``."""
        return self.current is None or (name not in self.current.index and name not in self.current.own_factors)

    def problem(self, name: str, dense_rank: int | None = None) -> str | None:
        """Why a request naming adapter ``name`` cannot be served now, or ``None``.

        ``dense_rank``: the rank of vLLM's dense per-slot stacks (``max_lora_rank``; 0 in store-only mode,
        which drops them), where the factors an adapter has of its own are served; ``None``: not checked.
        """
        gen = self.refresh()
        with self._lock:
            if gen is None:
                return f"the store cannot be served ({self._refused[1] if self._refused else 'not read yet'})"
            refused = (f"; the store's newest generation cannot be served ({self._refused[1]}), generation "
                       f"{gen.number} is served") if self._refused else ""
            own = gen.own_factors.get(name)
            if own is not None and dense_rank is not None and own.rank > dense_rank:
                where = ("this server runs in store-only mode, without vLLM's dense per-slot stacks they need"
                         if dense_rank == 0 else f"vLLM's dense per-slot stacks hold rank {dense_rank} "
                         f"(max_lora_rank); start it with max_lora_rank >= {own.rank}")
                return (f"adapter {name!r} is stored as {own.label}, with factors of its own of rank {own.rank}; "
                        f"{where}")
            if name not in gen.index and own is None:
                if name in self._named:
                    return f"adapter {name!r} was removed from the store (generation {gen.number}){refused}"
                return f"the store holds no adapter named {name!r}{refused}"
            digest = gen.digest(name)
            first = self._first.get(name)
            if first and digest and first != digest:
                return (f"adapter {name!r} was replaced in the store (generation {gen.number} holds other weights "
                        "under that name) after this server served it: vLLM keys its adapter and prefix caches by "
                        "name, so add the new weights under a new name, or restart the server")
            if first is None:
                self._first[name] = digest
            return None


_VIEWS: dict[str, StoreView] = {}
_VIEWS_LOCK = threading.Lock()


def store_view(path: str) -> StoreView:
    """The process's :class:`StoreView` of the store at ``path``."""
    with _VIEWS_LOCK:
        view = _VIEWS.get(path)
        if view is None:
            view = _VIEWS[path] = StoreView(path)
        return view


_STEP = threading.local()


@contextlib.contextmanager
def engine_step():
    """Marks an engine step: adapters loaded inside were admitted by the front end, perhaps generations ago."""
    _STEP.depth = getattr(_STEP, "depth", 0) + 1
    try:
        yield
    finally:
        _STEP.depth -= 1


def in_engine_step() -> bool:
    return getattr(_STEP, "depth", 0) > 0


class WorkerGenerations:
    """The worker's generations of the store and its tables' cluster slots (see the module docstring).

    ``layers()``: every layer's :class:`~.tables.LayerTables`; ``live_models()``:
    the store adapters vLLM holds (each ``jdlora_cluster`` is the table slot of
    its cluster, pinned while the model lives).
    """

    #: Generations kept open after a newer one: a request admitted before its adapter's removal is loaded from
    #: them when it is scheduled.
    KEEP = 4

    def __init__(self, path: str, first: Generation, layers: Callable[[], Iterable], live_models: Callable[[], Iterable]):
        self.path = path
        self.served = first
        self._layers, self._live_models = layers, live_models
        first.table_slot = list(range(len(first.cluster_keys)))
        self.slot_key: list[str | None] = list(first.cluster_keys)
        self.key_slot = {key: j for j, key in enumerate(first.cluster_keys)}
        self.kept: collections.deque[Generation] = collections.deque([first])  # newest first
        self._refused_stamp = None

    @property
    def current(self) -> Generation:
        return self.kept[0]

    @property
    def capacity(self) -> int:
        return len(self.slot_key)

    def poll(self) -> None:
        """Serve the store's newest generation if it is new and passes its checks (at a step boundary)."""
        stamp = manifest_stamp(self.path)
        if stamp == self.current.stamp or stamp == self._refused_stamp:
            return
        try:
            gen = open_generation(self.path, self.served, self.current)
        except StoreError as exc:
            self._refused_stamp = stamp
            log.warning("jdlora: store %s: a new generation cannot be served (%s); generation %d stays served",
                        self.path, exc, self.current.number)
            return
        self._adopt(gen)

    def _adopt(self, gen: Generation) -> None:
        prev = self.current
        self.kept.appendleft(gen)
        while len(self.kept) > self.KEEP + 1:
            self.kept.pop().release()
        new_keys = [key for key in dict.fromkeys(gen.cluster_keys) if key not in self.key_slot]
        if new_keys:
            pinned = {j for g in list(self.kept)[1:] for j in g.table_slot}
            pinned |= {int(m.jdlora_cluster) for m in self._live_models()}
            pinned |= {self.key_slot[key] for key in gen.cluster_keys if key in self.key_slot}
            free = [j for j in range(self.capacity) if j not in pinned]
            if len(free) < len(new_keys):
                size = self.capacity + len(new_keys) - len(free)
                for t in self._layers():
                    t.grow(size)
                free += list(range(self.capacity, size))
                self.slot_key += [None] * (size - self.capacity)
            where = {key: k for k, key in reversed(list(enumerate(gen.cluster_keys)))}
            modules = [s.name for s in gen.reader.modules]
            for key, j in zip(new_keys, free):
                if self.slot_key[j] is not None:
                    del self.key_slot[self.slot_key[j]]
                bases = dict(zip(modules, gen.reader.read_bases(where[key])))
                for t in self._layers():
                    t.load_cluster(j, bases)
                self.slot_key[j], self.key_slot[key] = key, j
        gen.table_slot = [self.key_slot[key] for key in gen.cluster_keys]
        added = [n for n in gen.index if n not in prev.index]
        removed = [n for n in prev.index if n not in gen.index]
        log.info("jdlora: store %s: serving generation %d (%d adapters, %d added, %d removed; %d clusters, %d loaded "
                 "into the tables, which hold %d cluster slots)", self.path, gen.number, len(gen.index), len(added),
                 len(removed), len(gen.cluster_keys), len(new_keys), self.capacity)

    def find(self, name: str) -> tuple[Generation, int] | None:
        """The newest generation holding adapter ``name``, and its index there.

        Within an engine step the request was admitted by the front end, perhaps
        before a removal, so generations since replaced are searched too;
        outside one (``/v1/load_lora_adapter``, the resolver) only the newest.
        """
        for gen in self.kept if in_engine_step() else [self.current]:
            i = gen.index.get(name)
            if i is not None:
                return gen, i
        return None

    def absent(self, name: str) -> str:
        """Why adapter ``name`` is in no generation :meth:`find` searched."""
        gen = self.current
        if any(name in g.index for g in self.kept):
            return f"adapter {name!r} was removed from the store (generation {gen.number})"
        return f"the store holds no adapter named {name!r} (generation {gen.number})"

    def own_factors(self, name: str) -> tuple[OwnFactors, dict] | None:
        """The factors adapter ``name`` has of its own in the newest generation :meth:`find` would search
        that has any (``(what, {module: (A, B)})``), or ``None``."""
        for gen in self.kept if in_engine_step() else [self.current]:
            own = gen.own_factors.get(name)
            if own is not None:
                return own, gen.reader.read_own_factors(name)
            if name in gen.index:
                return None
        return None

    def load(self, name: str) -> tuple[dict, int]:
        """Adapter ``name``'s cores (store module name -> core) and its cluster's table slot.

        Raises ``LookupError`` (the reason) outside an engine step when no
        generation searched holds it. Within a step the front end admitted the
        request, and raising would stop the engine for every request; an adapter
        found nowhere then (added and removed again before this worker saw a
        generation holding it) gets zero cores, and the error is logged.
        """
        if not in_engine_step():
            self.poll()  # /v1/load_lora_adapter or the resolver, between steps: a name added a moment ago
        found = self.find(name)
        if found is None:
            if not in_engine_step():
                raise LookupError(self.absent(name))
            log.error("jdlora: store adapter %r of an admitted request cannot be loaded (%s); that request is served "
                      "without it", name, self.absent(name))
            slot = self.current.table_slot[0] if self.current.table_slot else 0
            return {s.name: torch.zeros(()) for s in self.current.reader.modules}, slot
        gen, i = found
        if gen is not self.current:
            log.info("jdlora: adapter %r of a request admitted before its removal is served from generation %d",
                     name, gen.number)
        reader = gen.reader
        cores = {s.name: core for s, core in zip(reader.modules, reader.read_cores(i))}
        return cores, gen.table_slot[int(reader.assignment[i])]
