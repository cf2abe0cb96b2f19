"""jdlora_ops inside vLLM: serve a compressed store next to ordinary PEFT adapters.

Installed with jdlora_ops as the ``vllm.general_plugins`` entry point
``jdlora_ops`` (``jdlora_ops_vllm.register``, which calls :func:`register`),
which vLLM loads in every process. The plugin is idle until a store is
configured, by ``--additional-config '{"jdlora_store": "STORE"}'`` or the
``JDLORA_STORE`` environment variable.
Then:

* every LoRA linear layer of the model that the store covers (q/k/v as vLLM's
  fused ``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) holds all
  clusters' bases, and one core per vLLM LoRA slot;
* a request names a store adapter with ``LoRARequest(name, id, STORE)`` (the
  path is the store directory), or in ``vllm serve`` by its ``model`` field
  (a LoRA resolver; needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``);
* PEFT adapters are served in the same batches by the baseline ops, unless
  store-only mode is on (``JDLORA_STORE_ONLY=1`` or ``"jdlora_store_only":
  true``): then vLLM's dense per-slot LoRA stacks are dropped as each layer
  is created, so a slot costs one core per module and ``max_loras`` can be
  in the thousands, and PEFT requests are refused;
* ``jdlora add`` / ``jdlora remove`` may change the store while it is
  served: :mod:`.live` follows its generations (new adapters servable,
  removed ones refused, requests in flight unaffected).

Without a store, ``JDLORA_PEFT_OPS=1`` (or ``"jdlora_peft_ops": true``)
serves vLLM's ordinary PEFT adapters through jdlora's ``lora_shrink`` /
``lora_expand`` instead of vLLM's own LoRA ops (same tokens).

Checked against vLLM 0.32.x and 0.33.x (see :mod:`._vllm_private`). Nothing here imports
vLLM until :func:`register` runs inside vLLM.
"""

from __future__ import annotations

import logging

__all__ = ["register", "store_lora_request"]

# Under vLLM's logger tree: vLLM configures handlers for "vllm" alone (in each of its processes, at times after
# the plugin loads), so a child logger prints with vLLM's format and level.
log = logging.getLogger("vllm.jdlora_ops")
_REGISTERED = False


def register() -> None:
    """The plugin entry point (idempotent): install the hooks and, with a store, its resolver.

    When the hooks cannot be installed (unsupported vLLM, or a patched name
    moved) and a store is configured, this raises: vLLM lets an entry point's
    exception stop start-up. Without a visible store it only logs, and plants a
    guard that stops the engine at LoRA set-up if a store turns up in the
    engine's ``additional_config`` (not visible here in the front end).
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from . import _vllm_private as vp
    from .state import (ENV_PEFT_OPS, ENV_STORE, check_peft_adapter, engine_step, load_store_adapter,
                        on_layer_created, on_modules_created, store_path, validate_request)

    path = store_path()
    try:
        vp.install_hooks(on_layer_created, on_modules_created, load_store_adapter, validate_request,
                         "jdlora_ops.integrations.vllm.punica.JDLoRAPunicaWrapper",
                         check_loaded_adapter=check_peft_adapter, engine_step=engine_step)
    except vp.PluginUnavailable as exc:
        if path is not None:
            raise vp.PluginUnavailable(vp.refusal(str(exc), path)) from exc
        guarded = vp.install_guard(str(exc), store_path)
        log.warning("%s; plugin not loaded%s", exc,
                    " (an engine configured with a jdlora store will refuse to start)" if guarded else "")
        return
    if path is not None:
        from vllm.lora.resolver import LoRAResolverRegistry

        from .resolver import StoreResolver

        LoRAResolverRegistry.register_resolver("jdlora", StoreResolver(path))
    _REGISTERED = True
    log.info("jdlora_ops vLLM plugin loaded (store: %s)",
             path or f"none; set {ENV_STORE} to serve one, or {ENV_PEFT_OPS}=1 for PEFT adapters through its ops")


def store_lora_request(store: str, name: str):
    """The ``LoRARequest`` naming adapter ``name`` of ``store``; its id depends on the name alone, so it stays
    the same as the store is updated."""
    import os

    from ...store import read_manifest
    from .resolver import store_lora_request as make

    store = os.path.abspath(os.fspath(store))
    names = {str(a["name"]) for a in read_manifest(store)["adapters"]}
    if name not in names:
        raise ValueError(f"store_lora_request: the store {store} holds no adapter named {name!r}")
    return make(store, name)
