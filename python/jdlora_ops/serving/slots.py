"""Fixed-capacity slot pools with least-recently-used eviction and pinning.

A pool maps keys (cluster ids, adapter names) to the integer slots of a
resident table. Slots are reused, never reallocated, so the tables keep their
shapes for the life of the server. A slot is *pinned* while a batch that reads
it is in flight; a pinned slot is never chosen for eviction.

Pools are not thread-safe by themselves: :class:`~jdlora_ops.serving.adapter_cache.AdapterCache`
calls them under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable

__all__ = ["SlotPool"]


class SlotPool:
    """``capacity`` slots, each free or holding one key.

    * :meth:`lookup` finds a key's slot without touching the LRU order;
      :meth:`touch` marks it most recently used.
    * :meth:`assign` puts a key into a free slot, or else into the slot of the
      least recently used unpinned key (which is evicted and returned).
    * :meth:`pin` / :meth:`unpin` count the batches in flight that read a slot.
    """

    def __init__(self, capacity: int, what: str):
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"{what} capacity must be an integer >= 0, got {capacity!r}")
        self.capacity = capacity
        self.what = what
        self._slot_of: "OrderedDict[Hashable, int]" = OrderedDict()  # LRU order: oldest first
        self._key_of: list[Hashable | None] = [None] * capacity
        self._pins = [0] * capacity
        # Free slots are handed out lowest first so that a fresh table fills from slot 0.
        self._free = list(range(capacity - 1, -1, -1))

    # ------------------------------------------------------------ queries
    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def lookup(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def key_at(self, slot: int) -> Hashable | None:
        return self._key_of[slot]

    def keys(self) -> list[Hashable]:
        """Resident keys, least recently used first."""
        return list(self._slot_of)

    def items(self) -> list[tuple[Hashable, int]]:
        return list(self._slot_of.items())

    def pinned(self, slot: int) -> bool:
        return self._pins[slot] > 0

    def pin_count(self, slot: int) -> int:
        return self._pins[slot]

    def num_free(self) -> int:
        return len(self._free)

    def num_pinned(self) -> int:
        return sum(1 for p in self._pins if p > 0)

    def available_for(self, keys: Iterable[Hashable]) -> int:
        """How many slots could hold new keys without evicting any of ``keys``
        or any pinned key: free slots plus unpinned slots of other keys."""
        keep = set(keys)
        n = len(self._free)
        for k, s in self._slot_of.items():
            if self._pins[s] == 0 and k not in keep:
                n += 1
        return n

    # ------------------------------------------------------------ changes
    def touch(self, key: Hashable) -> None:
        self._slot_of.move_to_end(key)

    def victim(self, protect: Iterable[Hashable] = ()) -> tuple[Hashable, int] | None:
        """The key a new assignment would evict (``None`` when a slot is free).

        Raises ``RuntimeError`` when every slot is pinned or protected.
        """
        if self._free:
            return None
        keep = set(protect)
        for k, s in self._slot_of.items():
            if self._pins[s] == 0 and k not in keep:
                return k, s
        raise RuntimeError(f"all {self.capacity} {self.what} slots are in use by batches in flight")

    def assign(self, key: Hashable, protect: Iterable[Hashable] = ()) -> tuple[int, Hashable | None]:
        """Give ``key`` a slot; returns ``(slot, evicted key or None)``.

        The caller must have checked that ``key`` is not resident.
        """
        if key in self._slot_of:
            raise KeyError(f"{self.what} {key!r} already holds slot {self._slot_of[key]}")
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted, slot = self.victim(protect)
            del self._slot_of[evicted]
        self._slot_of[key] = slot
        self._key_of[slot] = key
        return slot, evicted

    def remove(self, key: Hashable) -> int:
        """Free ``key``'s slot (it must not be pinned); returns the slot."""
        slot = self._slot_of[key]
        if self._pins[slot]:
            raise RuntimeError(f"{self.what} {key!r} (slot {slot}) is in use by a batch in flight")
        del self._slot_of[key]
        self._key_of[slot] = None
        self._free.append(slot)
        self._free.sort(reverse=True)
        return slot

    def pin(self, slot: int) -> None:
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        if self._pins[slot] <= 0:
            raise RuntimeError(f"{self.what} slot {slot} is not pinned")
        self._pins[slot] -= 1
