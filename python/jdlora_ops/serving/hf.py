"""Hugging Face transformers integration: one forward, a different adapter per sequence.

:func:`wrap_model` replaces each adapted ``nn.Linear`` of a model (the modules
of an :class:`~jdlora_ops.serving.adapter_cache.AdapterCache`, named as in
``model.named_modules()``, e.g. ``model.layers.0.self_attn.q_proj`` of a
``LlamaForCausalLM``) by an :class:`AdapterLinear`: the original layer
followed by :meth:`BatchPlan.apply <jdlora_ops.serving.batch.BatchPlan.apply>`,
i.e. ``jd_fused`` for compressed adapters and ``lora_shrink`` + ``lora_expand``
for uncompressed ones, with the batch metadata built once per forward.

:class:`ServedModel` runs the model with one adapter name (or ``None``) per
row of ``input_ids``; :meth:`ServedModel.batch` does the same for any other
loop that calls the model (e.g. with a KV cache, or ``generate``).

Inference only: the adapter ops write the base layer's output in place and
have no backward; forwards run under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import torch
from torch import nn

from .adapter_cache import AdapterCache, AdapterMismatchError
from .batch import BatchPlan, BatchPlanner

__all__ = ["AdapterLinear", "ServedModel", "wrap_model"]


class _PlanSlot(threading.local):
    """The plan of the forward running on this thread (``None``: base model only)."""

    plan: BatchPlan | None = None


class AdapterLinear(nn.Module):
    """``base(x)`` plus the current batch's adapter updates of module ``name``.

    ``x``: ``[..., d_in]`` with the batch's ``T`` tokens in its leading
    dimensions (``[B, L, d_in]`` with ``T = B * L`` for a padded batch, or
    ``[T, d_in]``), in the order the batch was prepared.
    """

    def __init__(self, base: nn.Linear, name: str, current: _PlanSlot):
        super().__init__()
        self.base = base
        self.name = name
        self._current = current

    @property
    def weight(self) -> torch.Tensor:  # code that inspects q_proj.weight keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self._current.plan
        if plan is None or not plan.has_adapters:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])  # a fresh linear output is contiguous
        if x2.shape[0] != plan.num_tokens:
            raise ValueError(
                f"{self.name}: the input holds {x2.shape[0]} tokens but the batch was prepared for "
                f"{plan.num_tokens}; prepare the batch with the token counts of this forward"
            )
        plan.apply(self.name, x2, y2)
        return y

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class ServedModel:
    """A model whose adapted linears serve a batch of mixed adapters (see :func:`wrap_model`).

    ``model``: the wrapped model; ``cache``: its :class:`AdapterCache`;
    ``planner``: the :class:`BatchPlanner` (``max_tokens`` tokens per forward).
    """

    def __init__(self, model: nn.Module, cache: AdapterCache, planner: BatchPlanner, current: _PlanSlot,
                 originals: dict[str, nn.Linear]):
        self.model = model
        self.cache = cache
        self.planner = planner
        self._current = current
        self._originals = originals

    @contextlib.contextmanager
    def batch(self, adapters: Sequence[str | None], num_tokens: Sequence[int] | int):
        """Inside this block, forwards of the model serve request ``j`` (its
        ``num_tokens[j]`` consecutive tokens) with ``adapters[j]``. One block
        covers one forward: the token counts must match its input."""
        plan = self.planner.prepare(adapters, num_tokens)
        self._current.plan = plan
        try:
            yield plan
        finally:
            self._current.plan = None
            plan.release()

    def __call__(self, input_ids: torch.Tensor, adapters: Sequence[str | None], **kwargs):
        """``model(input_ids, **kwargs)`` with row ``b`` of ``input_ids`` ([B, L])
        served by ``adapters[b]`` (``None``: base model only)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != len(adapters):
            raise ValueError(
                f"ServedModel: input_ids must be [B, L] with one adapter per row; got {list(input_ids.shape)} "
                f"and {len(adapters)} adapters"
            )
        with torch.inference_mode(), self.batch(adapters, int(input_ids.shape[1])):
            return self.model(input_ids, **kwargs)

    def for_cache(self, cache: AdapterCache, *, max_tokens: int | None = None) -> "ServedModel":
        """The same wrapped model served from another cache (e.g. another
        collection of adapters for the same modules): the wrapped layers read
        whichever plan is current, so only a planner is added."""
        if [(m.name, m.d_out, m.d_in) for m in cache.module_specs] != [
            (m.name, m.d_out, m.d_in) for m in self.cache.module_specs
        ]:
            raise AdapterMismatchError("ServedModel.for_cache: the cache serves other modules than the wrapped ones")
        if (cache.dtype, cache.device) != (self.cache.dtype, self.cache.device):
            raise AdapterMismatchError(
                f"ServedModel.for_cache: the cache is {cache.dtype} on {cache.device}, the model "
                f"{self.cache.dtype} on {self.cache.device}"
            )
        planner = BatchPlanner(cache, max_tokens or self.planner.max_tokens)
        return ServedModel(self.model, cache, planner, self._current, self._originals)

    def unwrap(self) -> nn.Module:
        """Put the original linears back; returns the model."""
        for name, lin in self._originals.items():
            _set_submodule(self.model, name, lin)
        self._originals = {}
        return self.model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def wrap_model(model: nn.Module, cache: AdapterCache, *, max_tokens: int = 4096) -> ServedModel:
    """Wrap every module of ``cache`` in ``model``; returns the :class:`ServedModel`.

    Every module must exist in the model as an ``nn.Linear`` of the cache's
    ``d_out x d_in`` on the cache's device (its dtype may differ from the
    tables', and autocast may be on: see :meth:`BatchPlan.apply`); otherwise
    :class:`AdapterMismatchError` is raised and the model is left unchanged.
    ``max_tokens``: the most tokens one forward may hold.
    """
    found: dict[str, nn.Linear] = {}
    for spec in cache.module_specs:
        try:
            mod = model.get_submodule(spec.name)
        except AttributeError:
            raise AdapterMismatchError(
                f"wrap_model: the model has no module {spec.name!r} (adapters for another architecture?)"
            ) from None
        if isinstance(mod, AdapterLinear):
            raise ValueError(f"wrap_model: {spec.name} is already wrapped")
        if not isinstance(mod, nn.Linear):
            raise AdapterMismatchError(f"wrap_model: {spec.name} is a {type(mod).__name__}, not an nn.Linear")
        if (mod.out_features, mod.in_features) != (spec.d_out, spec.d_in):
            raise AdapterMismatchError(
                f"wrap_model: {spec.name} is {mod.out_features} x {mod.in_features} in the model but "
                f"{spec.d_out} x {spec.d_in} in the adapters (adapters for another base model?)"
            )
        if mod.weight.device != cache.device:
            raise AdapterMismatchError(
                f"wrap_model: {spec.name} is on {mod.weight.device}, the cache's tables are on {cache.device}; "
                f"open the cache on the model's device"
            )
        found[spec.name] = mod
    current = _PlanSlot()
    for name, lin in found.items():
        _set_submodule(model, name, AdapterLinear(lin, name, current))
    return ServedModel(model, cache, BatchPlanner(cache, max_tokens), current, found)
