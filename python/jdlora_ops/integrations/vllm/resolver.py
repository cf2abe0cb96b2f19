"""``vllm serve``: a request's ``model`` field names a store adapter.

vLLM asks its registered LoRA resolvers for names it does not know (with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``); this one answers for the adapters of
the configured store with a ``LoRARequest`` whose path is the store.
"""

from __future__ import annotations

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from ...store import read_manifest

__all__ = ["StoreResolver", "ID_BASE", "store_lora_request"]

#: Store adapter ``i`` gets LoRA id ``ID_BASE + i``, far above ids a server assigns to its own adapters.
ID_BASE = 1 << 24


def store_lora_request(store: str, name: str, index: int) -> LoRARequest:
    return LoRARequest(lora_name=name, lora_int_id=ID_BASE + int(index), lora_path=store)


class StoreResolver(LoRAResolver):
    def __init__(self, store: str):
        self.store = store
        self._index = {str(a["name"]): i for i, a in enumerate(read_manifest(store)["adapters"])}

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        i = self._index.get(lora_name)
        return None if i is None else store_lora_request(self.store, lora_name, i)
