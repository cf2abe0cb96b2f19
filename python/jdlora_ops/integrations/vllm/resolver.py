"""``vllm serve``: a request's ``model`` field names a store adapter.

vLLM asks its registered LoRA resolvers for names it does not know (with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``); this one answers for the adapters of
the configured store with a ``LoRARequest`` whose path is the store. It reads
the store's newest generation (:mod:`.live`), so adapters added while the
server runs are found.
"""

from __future__ import annotations

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from .live import ID_BASE, lora_id, store_view

__all__ = ["StoreResolver", "ID_BASE", "store_lora_request"]


def store_lora_request(store: str, name: str) -> LoRARequest:
    return LoRARequest(lora_name=name, lora_int_id=lora_id(name), lora_path=store)


class StoreResolver(LoRAResolver):
    def __init__(self, store: str):
        self.store = store

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if store_view(self.store).problem(lora_name) is not None:
            return None
        return store_lora_request(self.store, lora_name)
