"""Serving many adapters of one base model: resident tables, batches, model integration.

* :class:`AdapterCache` (:mod:`.adapter_cache`): disk -> host -> device tiers
  of a compressed collection plus uncompressed adapters, fixed-capacity device
  tables filled on demand with least-recently-used eviction, residency report
  and counters.
* :class:`BatchPlanner` / :class:`BatchPlan` (:mod:`.batch`): per forward,
  from adapter names and token counts to slots and batch metadata; per
  (layer, module), the adapters' contribution added to the base output.
* :func:`wrap_model` (:mod:`.hf`): Hugging Face transformers models serving a
  different adapter (or none) per sequence in one forward.
"""

from .adapter_cache import (
    AdapterCache,
    AdapterMismatchError,
    AddReport,
    CacheStats,
    CapacityError,
    Lease,
    UnknownAdapterError,
)
from .batch import BatchPlan, BatchPlanner
from .hf import AdapterLinear, ServedModel, wrap_model
from .host_tier import CollectionReader, MemoryReader, StoreReader, UncompressedAdapter
from .resident_tables import ModuleTables, ResidentTables, table_bytes

__all__ = [
    "AdapterCache",
    "AdapterLinear",
    "AdapterMismatchError",
    "AddReport",
    "BatchPlan",
    "BatchPlanner",
    "CacheStats",
    "CapacityError",
    "CollectionReader",
    "Lease",
    "MemoryReader",
    "ModuleTables",
    "ResidentTables",
    "ServedModel",
    "StoreReader",
    "UncompressedAdapter",
    "UnknownAdapterError",
    "table_bytes",
    "wrap_model",
]
