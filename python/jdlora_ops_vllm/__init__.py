"""vLLM's entry point for jdlora_ops (``vllm.general_plugins``), kept outside the jdlora_ops package.

vLLM imports an entry point's module inside a ``try`` that only logs "Failed
to load plugin", then starts the engine anyway. Importing jdlora_ops loads its
native extension, which fails when the installed torch is not the one it was
built against; upgrading vLLM in place does that (vLLM 0.32 pins torch 2.13.0,
0.33 pins 2.14.0). This module imports nothing of jdlora_ops until
:func:`register` runs, and vLLM does not catch what that raises: with a store
configured, start-up stops there and says why.
"""

from __future__ import annotations

import logging
import os

__all__ = ["register"]

#: ``jdlora_ops.integrations.vllm.state.ENV_STORE``, repeated: that module is what may fail to import.
ENV_STORE = "JDLORA_STORE"


def register() -> None:
    try:
        from jdlora_ops.integrations.vllm import register as register_plugin
    except Exception as exc:
        reason = f"jdlora_ops vLLM plugin: jdlora_ops cannot be imported ({type(exc).__name__}: {exc})"
        store = os.environ.get(ENV_STORE)
        if store:
            raise RuntimeError(f"{reason}. A jdlora store is configured ({store}), so the engine does not start: "
                               "without the plugin its adapters would not be served") from exc
        logging.getLogger("vllm.jdlora_ops").warning(
            "%s; plugin not loaded (a store named in additional_config is not served: its requests fail)", reason)
        return
    register_plugin()
