"""The plugin's per-process state: the open store, every layer's tables, vLLM's slots.

One vLLM worker process serves one model, so the state is a module-level
singleton (:data:`STATE`), filled when vLLM creates its LoRA layers
(:func:`on_modules_created`) and read by the punica wrapper on every step.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from . import _vllm_private as vp
from .tables import LayerTables, StoreMismatchError

log = logging.getLogger("vllm.jdlora_ops")

__all__ = ["STATE", "store_path", "store_only", "on_layer_created", "on_modules_created", "load_store_adapter",
           "engine_step",
           "check_peft_adapter", "peft_finite_problem", "validate_request", "ENV_STORE", "CONFIG_KEY",
           "ENV_STORE_ONLY", "CONFIG_STORE_ONLY", "ENV_PEFT_OPS", "CONFIG_PEFT_OPS", "peft_ops",
           "plugin_configured"]

#: Environment variable naming the store directory (``vllm serve ... `` with it set).
ENV_STORE = "JDLORA_STORE"
#: Key in ``--additional-config`` naming the store directory (takes precedence over the environment).
CONFIG_KEY = "jdlora_store"
#: Store-only serving (no PEFT adapters, no dense LoRA stacks): ``JDLORA_STORE_ONLY=1`` or
#: ``--additional-config '{"jdlora_store_only": true}'``.
ENV_STORE_ONLY = "JDLORA_STORE_ONLY"
CONFIG_STORE_ONLY = "jdlora_store_only"
#: Without a store, serve vLLM's ordinary PEFT adapters through jdlora's baseline ops
#: (``lora_shrink`` / ``lora_expand``) instead of vLLM's own LoRA ops: ``JDLORA_PEFT_OPS=1`` or
#: ``--additional-config '{"jdlora_peft_ops": true}'``.
ENV_PEFT_OPS = "JDLORA_PEFT_OPS"
CONFIG_PEFT_OPS = "jdlora_peft_ops"

#: Default packing of the model's projections into vLLM's merged layers.
DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

#: What a vLLM slot holds: nothing, a store adapter's core (in the plugin's tables), dense factors (vLLM's
#: per-slot stacks: a PEFT adapter, or a store adapter kept outside the joint tables), or both (a store
#: adapter's core and its residual, summed on the same tokens).
SLOT_EMPTY, SLOT_JD, SLOT_PEFT, SLOT_BOTH = 0, 1, 2, 3


def store_path(extra: dict | None = None) -> str | None:
    """The configured store directory (absolute), or ``None`` when the plugin is idle."""
    extra = vp.additional_config() if extra is None else extra
    p = extra.get(CONFIG_KEY) or os.environ.get(ENV_STORE)
    return os.path.abspath(os.fspath(p)) if p else None


def _flag(extra: dict | None, key: str, env: str) -> bool:
    extra = vp.additional_config() if extra is None else extra
    if key in extra:
        return bool(extra[key])
    return os.environ.get(env, "0").strip().lower() in ("1", "true", "yes", "on")


def store_only(extra: dict | None = None) -> bool:
    """Whether the configured store is served alone (PEFT requests refused, dense stacks dropped)."""
    return _flag(extra, CONFIG_STORE_ONLY, ENV_STORE_ONLY)


def peft_ops(extra: dict | None = None) -> bool:
    """Whether PEFT adapters go through jdlora's baseline ops with no store configured."""
    return _flag(extra, CONFIG_PEFT_OPS, ENV_PEFT_OPS)


def plugin_configured(extra: dict | None = None) -> bool:
    """Whether the plugin serves anything: a store, or PEFT adapters through its ops."""
    return store_path(extra) is not None or peft_ops(extra)


_FINITE_CACHE: dict[tuple, str | None] = {}  # (weights file, size, mtime) -> why refused, or None


def validate_request(lora_request, extra: dict, max_lora_rank: int | None = None) -> None:
    """Front-end check of a request naming a store adapter, or (with a store configured, or PEFT adapters
    served through the plugin's ops) a local PEFT adapter whose factors must be finite (``ValueError`` when
    it cannot be served). ``max_lora_rank``: the rank of vLLM's dense per-slot stacks, where a store
    adapter's own factors go (none in store-only mode)."""
    from .live import store_view

    path = store_path(extra)
    dense = 0 if store_only(extra) else max_lora_rank
    problem = store_request_problem(lora_request, path, lambda name: store_view(path).problem(name, dense))
    if problem is None and path is not None and store_only(extra) and not _is_store(lora_request):
        problem = (f"this server serves the jdlora store {path} only ({ENV_STORE_ONLY} / {CONFIG_STORE_ONLY!r}); "
                   "PEFT adapters are not accepted")
    if problem is None and plugin_configured(extra) and not _is_store(lora_request):
        problem = peft_finite_problem(lora_request, _FINITE_CACHE)
    if problem:
        absent = path is not None and _is_store(lora_request) and store_view(path).lacks(lora_request.lora_name)
        raise RequestRefused(f"LoRA adapter {lora_request.lora_name!r} at {lora_request.lora_path!r}: {problem}",
                             not_found=absent)


class RequestRefused(ValueError):
    """A request the plugin refuses; ``not_found``: it names a store adapter the store does not hold (now)."""

    def __init__(self, message: str, *, not_found: bool = False):
        super().__init__(message)
        self.not_found = not_found


def peft_finite_problem(lora_request, cache: dict) -> str | None:
    """Why a local PEFT adapter cannot be served because a factor holds NaN or an infinity, or ``None``.

    In the front end, so that such an adapter fails its request only: refused
    in a worker (:func:`check_peft_adapter`), it would stop the engine. Read
    once per version of the weights file (path, size, modification time).
    Adapters this reader cannot open (not local, pickle files, layouts it does
    not support) are left to vLLM and to the worker's check.
    """
    from ..._finite import NonFiniteError
    from ...peft_io import ADAPTER_WEIGHTS, AdapterFormatError, read_peft_adapter

    folder = getattr(lora_request, "lora_path", None)
    weights = os.path.join(folder, ADAPTER_WEIGHTS) if folder else None
    if not weights or not os.path.isfile(weights):
        return None
    st = os.stat(weights)
    key = (os.path.abspath(weights), st.st_size, st.st_mtime_ns)
    if key not in cache:
        try:
            read_peft_adapter(folder, getattr(lora_request, "lora_name", None)).require_finite()
            cache[key] = None
        except NonFiniteError as exc:
            cache[key] = str(exc)
        except AdapterFormatError:
            cache[key] = None
    return cache[key]


def _is_store(lora_request) -> bool:
    from ...store import is_store

    p = getattr(lora_request, "lora_path", None)
    return bool(p) and is_store(p)


def store_request_problem(lora_request, configured: str | None, adapter_problem) -> str | None:
    """Why a request for a store adapter cannot be served, or ``None`` (also for non-store requests).

    ``adapter_problem(name)``: why the configured store cannot serve adapter ``name`` now, or ``None``.
    """
    from ...store import is_store

    req_path = getattr(lora_request, "lora_path", None)
    if not req_path or not is_store(req_path):
        return None
    if configured is None:
        return (f"the request names a jdlora store but the server was started without one "
                f"(set {ENV_STORE} or additional_config {CONFIG_KEY!r})")
    if os.path.abspath(req_path) != configured:
        return f"this server serves the jdlora store {configured}"
    return adapter_problem(lora_request.lora_name)


class PluginState:
    def __init__(self) -> None:
        self.first = None  # the store's generation the tables were built from (live.Generation)
        self.path: str | None = None
        self.module_index: dict[str, int] = {}
        self.live = None  # WorkerGenerations, once the tables exist
        self.layers: dict[int, LayerTables] = {}  # id(layer.lora_a_stacked) -> tables
        self.num_slots = 0
        self.adapter_cluster: torch.Tensor | None = None
        self.slot_kind: torch.Tensor | None = None  # int32 [slots + 1]; the last entry stands for slot -1
        self.slot_owner: list[int | None] = []
        self.store_models: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
        self.store_only = False
        self.layers_seen: set[int] = set()  # id() of the LoRA linear layers the from_layer hook saw
        self.dense_bytes_dropped = 0
        self.table_bytes = 0
        self.peft_ops = False  # no store; PEFT adapters through the baseline ops

    @property
    def active(self) -> bool:
        return self.first is not None or self.peft_ops

    def set_up_slots(self, slots: int, device) -> None:
        self.num_slots = slots
        self.adapter_cluster = torch.zeros(slots, dtype=torch.int32, device=device)
        self.slot_kind = torch.zeros(slots + 1, dtype=torch.int32, device=device)
        self.slot_owner = [None] * slots

    @property
    def table_clusters(self) -> int:
        """Cluster slots of the layers' tables (the store's clusters at start-up, more as it grows)."""
        return self.live.capacity if self.live is not None else 0

    def open(self, path: str):
        from .live import open_generation

        if self.first is None or self.path != path:
            self.first = open_generation(path)
            self.path = path
            self.module_index = {s.name: j for j, s in enumerate(self.first.reader.modules)}
        return self.first.reader

    def follow(self) -> None:
        """From now on, follow the store's generations (the layers' tables exist)."""
        from .live import WorkerGenerations

        self.live = WorkerGenerations(self.path, self.first, lambda: self.layers.values(),
                                      lambda: list(self.store_models.values()))

    def assign_slot(self, slot: int, lora_id: int | None) -> None:
        """Make our tables agree with vLLM's slot ``slot`` now holding ``lora_id``."""
        model = self.store_models.get(lora_id) if lora_id is not None else None
        if model is not None:
            for t in self.layers.values():
                t.set_slot(slot, model.jdlora_cores)
            self.adapter_cluster[slot] = int(model.jdlora_cluster)
            self.slot_kind[slot] = SLOT_BOTH if model.jdlora_residual else SLOT_JD
        else:
            for t in self.layers.values():
                t.clear_slot(slot)
            self.slot_kind[slot] = SLOT_EMPTY if lora_id is None else SLOT_PEFT
        self.slot_owner[slot] = lora_id


STATE = PluginState()


def _slice_modules(name: str, n_slices: int, packed: dict) -> list[str]:
    prefix, _, last = name.rpartition(".")
    parts = packed.get(last) or DEFAULT_PACKED.get(last) or [last]
    if len(parts) != n_slices:
        parts = [last] if n_slices == 1 else parts
    if len(parts) != n_slices:
        raise StoreMismatchError(f"jdlora: cannot tell the {n_slices} projections packed in vLLM layer {name} "
                                 f"(packed modules known: {parts})")
    return [f"{prefix}.{p}" if prefix else p for p in parts]


def on_layer_created(layer) -> None:
    """Store-only mode: drop a new LoRA linear layer's dense stacks before the next layer allocates its own."""
    if store_path() is None or not store_only() or vp.layer_kind(layer) is None:
        return
    STATE.store_only = True
    STATE.layers_seen.add(id(layer))
    STATE.dense_bytes_dropped += vp.drop_dense_stacks(layer)


def _check_hooks_fired(name: str, layer) -> None:
    """Raise when a hook the store depends on did not reach this layer (vLLM changed how it builds layers)."""
    from .punica import JDLoRAPunicaWrapper

    wrapper = vp.layer_punica_wrapper(layer)
    if not isinstance(wrapper, JDLoRAPunicaWrapper):
        raise vp.PluginUnavailable(
            f"jdlora: vLLM {vp.vllm_version()} layer {name} calls {type(wrapper).__name__}, not the jdlora punica "
            "wrapper (the get_punica_wrapper hook did not take effect), so store adapters would get base-model "
            f"outputs; supported vLLM: {vp.supported_versions()}")
    if store_only() and id(layer) not in STATE.layers_seen:
        raise vp.PluginUnavailable(
            f"jdlora: vLLM {vp.vllm_version()} created layer {name} without the from_layer hook, so store-only mode "
            f"could not drop its dense LoRA stacks; supported vLLM: {vp.supported_versions()}")


def _serve_peft_through_ops(manager, modules: dict) -> None:
    """No store: every LoRA linear layer's PEFT slots go through lora_shrink / lora_expand."""
    vp.check_version()
    device = torch.device("cpu")
    layers = 0
    for name, layer in modules.items():
        if vp.layer_kind(layer) is None:
            continue
        geo = vp.layer_geometry(layer)
        if geo["fully_sharded"]:
            raise ValueError(f"jdlora: {ENV_PEFT_OPS} does not support fully_sharded_loras")
        _check_hooks_fired(name, layer)
        device = geo["lora_a_stacked"][0].device
        layers += 1
    STATE.peft_ops = True
    STATE.set_up_slots(int(manager.lora_slots), device)
    log.info("jdlora: serving PEFT adapters through lora_shrink / lora_expand on %d layers, %d slots (%s)", layers,
             STATE.num_slots, ENV_PEFT_OPS)


def on_modules_created(manager, modules: dict, packed: dict) -> None:
    """Build the JD tables of every LoRA linear layer the store covers (start-up)."""
    path = store_path()
    if path is None:
        if peft_ops():
            _serve_peft_through_ops(manager, modules)
        return
    vp.check_version()
    reader = STATE.open(path)
    slots = int(manager.lora_slots)
    max_rank = None
    covered: set[str] = set()
    for name, layer in modules.items():
        kind = vp.layer_kind(layer)
        if kind is None:
            continue
        geo = vp.layer_geometry(layer)
        max_rank = geo["max_lora_rank"]
        if geo["fully_sharded"]:
            raise StoreMismatchError("jdlora: fully_sharded_loras is not supported with a jdlora store")
        wanted = _slice_modules(name, geo["n_slices"], packed)
        present = [m if m in STATE.module_index else None for m in wanted]
        if not any(present):
            continue
        _check_hooks_fired(name, layer)
        STATE.layers[id(geo["lora_a_stacked"])] = LayerTables(name, kind, present, reader, STATE.module_index,
                                                              geo, slots)
        covered.update(m for m in present if m)
    missing = sorted(set(STATE.module_index) - covered)
    if missing:
        raise StoreMismatchError(
            f"jdlora store {path}: {len(missing)} of its modules are not LoRA layers of the model vLLM loaded, "
            f"e.g. {missing[:3]} (a store for another base model, or modules vLLM does not wrap?)"
        )
    if max_rank is not None and reader.rank > max_rank:
        raise ValueError(
            f"jdlora store {path}: its rank {reader.rank} is above vLLM's max_lora_rank {max_rank}; "
            f"start vLLM with max_lora_rank >= {reader.rank}"
        )
    device = next(iter(STATE.layers.values())).Vt[0].device if STATE.layers else torch.device("cpu")
    STATE.set_up_slots(slots, device)
    STATE.follow()
    STATE.table_bytes = sum(t.nbytes() for t in STATE.layers.values())
    log.info("jdlora: serving store %s (%d adapters, %d clusters, rank %d) on %d layers, %d slots, %.1f MiB of "
             "tables%s", path, len(reader.adapter_names), reader.num_clusters, reader.rank, len(STATE.layers), slots,
             STATE.table_bytes / 2**20,
             f"; store only, {STATE.dense_bytes_dropped / 2**20:.1f} MiB of dense stacks dropped"
             if STATE.store_only else "")


def engine_step(worker_manager):
    """Around each engine step's adapter loading: serve the store's newest generation first."""
    from .live import engine_step as step

    if STATE.live is not None:
        STATE.live.poll()
    return step()


def load_store_adapter(worker_manager, lora_request):
    """A vLLM ``LoRAModel`` holding a store adapter's cores, or ``None`` for other requests."""
    from ...store import is_store

    req_path = getattr(lora_request, "lora_path", None)
    if not req_path or not is_store(req_path):
        return None
    name = lora_request.lora_name
    live = STATE.live if STATE.active else None
    problem = store_request_problem(lora_request, STATE.path, lambda n: None)
    if problem is None and live is None:
        problem = "this worker has not set up the store's tables"
    own = None
    if problem is None:
        try:
            own = live.own_factors(name)
            if own is None or own[0].residual:
                cores, cluster = live.load(name)
        except LookupError as exc:
            problem = str(exc)
    if problem:
        raise vp.adapter_not_found_error(name, req_path, problem)
    lid = lora_request.lora_int_id
    if own is not None and not own[0].residual:
        return vp.lora_model(lid, own[1])  # outside the joint tables: a dense slot, like a PEFT adapter
    # A residual goes into vLLM's dense stacks of the adapter's slot, its core into the plugin's tables.
    model = vp.lora_model(lid, own[1]) if own is not None else vp.empty_lora_model(lid, STATE.first.rank)
    model.jdlora_cores, model.jdlora_cluster, model.jdlora_name = cores, cluster, name
    model.jdlora_residual = own is not None
    STATE.store_models[lid] = model
    return model


def check_peft_adapter(lora_request, model) -> None:
    """Refuse a PEFT adapter vLLM loaded whose factors hold NaN or an infinity (before it gets a slot).

    A store's tables are checked by the store reader when the plugin opens it
    (bases at start-up, cores when the store is opened), and local PEFT
    adapters in the front end (:func:`peft_finite_problem`); this is the last
    line for whatever else vLLM loads itself. Idle, like the rest of the
    plugin, until a store or the PEFT-ops mode is configured.
    """
    from ..._finite import require_finite

    if not plugin_configured():
        return
    name = str(getattr(lora_request, "lora_name", "?"))
    where = getattr(lora_request, "lora_path", None)
    for module, side, t in vp.lora_model_factors(model):
        require_finite(t, adapter=name, module=module, tensor_name=side, source=where)
