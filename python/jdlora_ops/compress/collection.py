"""Adapter collections as the compressor sees them: one module at a time.

A LoRA adapter ``i`` contributes, on a module of width ``d_out x d_in``, the
update ``dW_i = s_i * B_i @ A_i`` with ``B_i: [d_out, r_i]``, ``A_i: [r_i, d_in]``
and the PEFT scaling ``s_i``. The compressor never forms ``dW_i``; it works on
the factors of one module of every adapter at once (:class:`ModuleFactors`),
produced on demand by an :class:`AdapterCollection` so that a collection larger
than memory can be streamed module by module.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .._finite import all_finite, require_finite

__all__ = [
    "ModuleSpec",
    "RankGroup",
    "ModuleFactors",
    "AdapterCollection",
    "InMemoryCollection",
    "CallableCollection",
    "parse_module_name",
    "resolve_weights",
]

_INT = re.compile(r"^\d+$")


def parse_module_name(name: str) -> tuple[int | None, str]:
    """``(layer, kind)`` of a dotted module path.

    ``layer`` is the first purely numeric path component (``None`` when there
    is none), ``kind`` the last component: ``"model.layers.7.self_attn.q_proj"``
    gives ``(7, "q_proj")`` and ``"transformer.h.3.attn.c_attn"`` gives
    ``(3, "c_attn")``.
    """
    parts = name.split(".")
    layer = next((int(p) for p in parts if _INT.match(p)), None)
    return layer, parts[-1]


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted linear module of the base model.

    ``name`` is its dotted path inside the base model (PEFT's module key without
    the ``base_model.model.`` prefix), ``d_out x d_in`` the shape of its weight
    in the ``y = W x`` convention.
    """

    name: str
    d_out: int
    d_in: int

    @property
    def layer(self) -> int | None:
        return parse_module_name(self.name)[0]

    @property
    def kind(self) -> str:
        return parse_module_name(self.name)[1]


def empty_factors(g: int, rho: int, d: int, *, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised ``[g, rho, d]`` tensor in the column layout.

    The column layout stores the ``[d, g rho]`` matrix ``X.reshape(g rho, d).T``
    contiguously. Both thin products the compressor needs, ``X @ V`` and
    ``X^T C``, are then plain GEMMs on one contiguous matrix, which on CPUs is
    up to 1.6x faster for the second than the row-major layout.
    """
    return torch.empty(d, g * rho, dtype=dtype, device=device).t().view(g, rho, d)


def is_column_layout(x: torch.Tensor) -> bool:
    """Whether ``x`` (``[g, rho, d]``) is stored as a contiguous ``[d, g rho]`` matrix."""
    g, rho, d = x.shape
    want = (rho, 1, g * rho)
    # Strides of size-1 dimensions are arbitrary.
    return all(n == 1 or s == w for n, s, w in zip(x.shape, x.stride(), want))


def column_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``[g, rho, d]``) in the column layout (no copy if it already is)."""
    if is_column_layout(x):
        return x
    out = empty_factors(*x.shape, dtype=x.dtype, device=x.device)
    out.copy_(x)
    return out


def _select_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` for a column-layout ``[g, rho, d]`` tensor, kept in the column layout."""
    g, rho, d = x.shape
    cols = (idx[:, None] * rho + torch.arange(rho, device=idx.device)).reshape(-1)
    mat = x.reshape(g * rho, d).t()  # [d, g rho]; a view for the column layout and its slices
    return mat.index_select(1, cols).t().view(idx.numel(), rho, d)


@dataclass
class RankGroup:
    """The adapters of one module that share the rank ``rho``.

    ``index``: int64 ``[g]``, positions of these adapters in the collection;
    ``A``: ``[g, rho, d_in]`` (``A_i``); ``Bt``: ``[g, rho, d_out]`` (``(s_i B_i)^T``,
    the scaling folded in). The library creates both in the column layout
    (:func:`empty_factors`), so that ``A.reshape(g * rho, d_in)`` is one matrix
    (a transposed view of contiguous memory) and a product with it is a single
    GEMM; any other layout works too, more slowly.
    """

    index: torch.Tensor
    A: torch.Tensor
    Bt: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def count(self) -> int:
        return self.A.shape[0]


class ModuleFactors:
    """Factors of one module for ``num_adapters`` adapters, grouped by rank.

    Adapters that have no update on this module (missing, or rank 0) belong to
    no group and count as ``dW_i = 0``. All groups share one dtype and device.
    """

    def __init__(self, spec: ModuleSpec, num_adapters: int, groups: Sequence[RankGroup]):
        self.spec = spec
        self.num_adapters = int(num_adapters)
        self.groups = [g for g in groups if g.count > 0 and g.rank > 0]
        for g in self.groups:
            if g.A.shape[2] != spec.d_in or g.Bt.shape[2] != spec.d_out:
                raise ValueError(
                    f"module {spec.name}: factors of shape A {tuple(g.A.shape[1:])}, "
                    f"B^T {tuple(g.Bt.shape[1:])} do not fit d_out={spec.d_out}, d_in={spec.d_in}"
                )

    # ------------------------------------------------------------------ build
    @classmethod
    def from_factors(
        cls,
        spec: ModuleSpec,
        A: Sequence[torch.Tensor | None],
        B: Sequence[torch.Tensor | None],
        scales: Sequence[float] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "ModuleFactors":
        """Build from per-adapter ``A_i: [r_i, d_in]``, ``B_i: [d_out, r_i]``.

        ``scales[i]`` (default 1) multiplies ``B_i``. ``None`` entries are
        adapters without this module.
        """
        n = len(A)
        if len(B) != n or (scales is not None and len(scales) != n):
            raise ValueError("A, B and scales must have one entry per adapter")
        by_rank: dict[int, list[int]] = {}
        for i, (a, b) in enumerate(zip(A, B)):
            if a is None or b is None:
                continue
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"module {spec.name}, adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                    "are not LoRA factors (expected A [r, d_in], B [d_out, r])"
                )
            if a.shape[1] != spec.d_in or b.shape[0] != spec.d_out:
                raise ValueError(
                    f"module {spec.name}, adapter {i}: dW is {b.shape[0]} x {a.shape[1]}, "
                    f"expected {spec.d_out} x {spec.d_in}"
                )
            if a.shape[0] > 0:
                by_rank.setdefault(a.shape[0], []).append(i)
        groups = []
        for rho in sorted(by_rank):
            idx = by_rank[rho]
            At = empty_factors(len(idx), rho, spec.d_in, dtype=dtype, device=device)
            Bt = empty_factors(len(idx), rho, spec.d_out, dtype=dtype, device=device)
            for t, i in enumerate(idx):
                At[t].copy_(A[i])
                Bt[t].copy_(B[i].t())
                if scales is not None and float(scales[i]) != 1.0:
                    Bt[t].mul_(float(scales[i]))
            groups.append(RankGroup(torch.tensor(idx, dtype=torch.long, device=device), At, Bt))
        return cls(spec, n, groups)

    # --------------------------------------------------------------- queries
    @property
    def dtype(self) -> torch.dtype:
        return self.groups[0].A.dtype if self.groups else torch.float32

    @property
    def device(self) -> torch.device:
        return self.groups[0].A.device if self.groups else torch.device("cpu")

    def ranks(self) -> torch.Tensor:
        """int64 ``[n]``: rank of each adapter on this module (0 when absent)."""
        out = torch.zeros(self.num_adapters, dtype=torch.long)
        for g in self.groups:
            out[g.index.cpu()] = g.rank
        return out

    def nbytes(self) -> int:
        return sum(g.A.numel() * g.A.element_size() + g.Bt.numel() * g.Bt.element_size() for g in self.groups)

    def grams(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group ``(A_i A_i^T, (s_i B_i)^T (s_i B_i))``, each ``[g, rho, rho]``."""
        return [(torch.bmm(g.A, g.A.transpose(1, 2)), torch.bmm(g.Bt, g.Bt.transpose(1, 2))) for g in self.groups]

    def norms_sq(self, grams: list | None = None) -> torch.Tensor:
        """``||dW_i||_F^2`` for every adapter, ``[n]`` in the factors' dtype.

        Computed as ``tr((B^T B)(A A^T))`` (both Gram matrices are symmetric, so
        the trace is the sum of their elementwise product).
        """
        grams = self.grams() if grams is None else grams
        out = torch.zeros(self.num_adapters, dtype=self.dtype, device=self.device)
        for g, (ga, gb) in zip(self.groups, grams):
            out[g.index] = (ga * gb).sum(dim=(1, 2)).clamp_min(0)
        return out

    def dense(self, i: int) -> torch.Tensor:
        """``dW_i`` as a dense ``[d_out, d_in]`` matrix (for tests and small checks only)."""
        for g in self.groups:
            hit = (g.index == i).nonzero()
            if hit.numel():
                j = int(hit[0, 0])
                return g.Bt[j].t() @ g.A[j]
        return torch.zeros(self.spec.d_out, self.spec.d_in, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------ transform
    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "ModuleFactors":
        groups = [
            RankGroup(
                g.index.to(device or g.index.device),
                column_layout(g.A.to(device=device, dtype=dtype)),
                column_layout(g.Bt.to(device=device, dtype=dtype)),
            )
            for g in self.groups
        ]
        return ModuleFactors(self.spec, self.num_adapters, groups)

    def select(self, indices: torch.Tensor | Sequence[int]) -> "ModuleFactors":
        """The sub-collection of adapters ``indices`` (renumbered ``0..len-1`` in that order); ``self``, not a
        copy, when that is every adapter in order."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.numel() == self.num_adapters and torch.equal(indices.cpu(), torch.arange(indices.numel())):
            return self
        pos = torch.full((self.num_adapters,), -1, dtype=torch.long)
        pos[indices] = torch.arange(indices.numel())
        groups = []
        for g in self.groups:
            new = pos[g.index.cpu()]
            keep = (new >= 0).nonzero().flatten()
            if keep.numel() == 0:
                continue
            kd = keep.to(g.A.device)
            groups.append(RankGroup(new[keep].to(g.index.device), _select_rows(g.A, kd), _select_rows(g.Bt, kd)))
        return ModuleFactors(self.spec, int(indices.numel()), groups)

    def partition(self, assignment: torch.Tensor, num_parts: int) -> list["ModuleFactors"]:
        """Split by ``assignment`` (int64 ``[n]`` in ``[0, num_parts)``).

        Part ``k`` holds the adapters of ``assignment == k`` in increasing
        order. Each group is reordered once so that the parts are views into
        the reordered tensors; drop ``self`` afterwards to free its memory.
        """
        assignment = torch.as_tensor(assignment, dtype=torch.long).cpu()
        local = torch.zeros_like(assignment)
        counts = torch.bincount(assignment, minlength=num_parts)
        for k in range(num_parts):
            members = (assignment == k).nonzero().flatten()
            local[members] = torch.arange(members.numel())
        parts: list[list[RankGroup]] = [[] for _ in range(num_parts)]
        for g in self.groups:
            gi = g.index.cpu()
            cl = assignment[gi]
            order = torch.sort(cl * (self.num_adapters + 1) + gi, stable=True).indices
            od = order.to(g.A.device)
            A, Bt = _select_rows(g.A, od), _select_rows(g.Bt, od)
            cl_sorted = cl[order]
            bounds = torch.searchsorted(cl_sorted, torch.arange(num_parts + 1))
            for k in range(num_parts):
                lo, hi = int(bounds[k]), int(bounds[k + 1])
                if hi > lo:
                    idx = local[gi[order[lo:hi]]].to(g.index.device)
                    parts[k].append(RankGroup(idx, A[lo:hi], Bt[lo:hi]))
        return [ModuleFactors(self.spec, int(counts[k]), parts[k]) for k in range(num_parts)]


def resolve_weights(weights: str | torch.Tensor, norms_sq: torch.Tensor) -> torch.Tensor:
    """Per-adapter weights ``w_i`` of the objective ``sum_i w_i ||dW_i - recon_i||^2``.

    ``"uniform"``: 1. ``"relative"``: ``1 / ||dW_i||^2`` (0 for a zero update,
    which is reconstructed exactly by any basis). A tensor is used as given
    (``[n]``, non-negative).
    """
    if isinstance(weights, torch.Tensor):
        w = weights.to(device=norms_sq.device, dtype=norms_sq.dtype)
        if w.shape != norms_sq.shape or bool((w < 0).any()):
            raise ValueError(f"weights must be a non-negative tensor of shape {tuple(norms_sq.shape)}")
        return w
    if weights == "uniform":
        return torch.ones_like(norms_sq)
    if weights == "relative":
        tiny = torch.finfo(norms_sq.dtype).tiny
        return torch.where(norms_sq > tiny, 1.0 / norms_sq.clamp_min(tiny), torch.zeros_like(norms_sq))
    raise ValueError(f"weights must be 'uniform', 'relative' or a tensor, got {weights!r}")


class AdapterCollection(abc.ABC):
    """A set of LoRA adapters of one base model, readable one module at a time.

    Subclasses provide :attr:`adapter_names`, :attr:`modules` and
    :meth:`load_module`; nothing requires the whole collection in memory.
    ``metadata`` holds optional per-collection information (``base_model``,
    per-adapter ``configs``) that stores and exports carry along.
    """

    metadata: dict

    @property
    @abc.abstractmethod
    def adapter_names(self) -> list[str]: ...

    @property
    @abc.abstractmethod
    def modules(self) -> list[ModuleSpec]: ...

    @abc.abstractmethod
    def load_module(
        self, module: str | ModuleSpec, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> ModuleFactors:
        """The factors of every adapter on ``module`` (scaling folded in)."""

    def module_ranks(self, module: ModuleSpec) -> torch.Tensor | None:
        """int64 ``[n]`` every adapter's rank on ``module`` (0 where it has none) when known without reading
        the factors (file headers, shapes in memory), else ``None``: the byte budget then needs a pass."""
        return None

    def __len__(self) -> int:
        return len(self.adapter_names)

    def module(self, name: str) -> ModuleSpec:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"no module {name!r} in this collection")

    def iter_modules(
        self, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Iterator[ModuleFactors]:
        for m in self.modules:
            yield self.load_module(m, dtype=dtype, device=device)

    def require_finite(self, modules: Sequence[ModuleSpec | str] | None = None) -> None:
        """Raise :class:`~jdlora_ops.NonFiniteError` naming the adapter, module and factor when
        some factor on ``modules`` (default: all) holds NaN or an infinity.

        This default reads each module once through :meth:`load_module`, in
        float32 as the compressor does (so it needs no more memory than one of
        its passes); collections that hold the factors themselves check them
        in place.
        """
        names = self.adapter_names
        for m in self.modules if modules is None else modules:
            f = self.load_module(m, dtype=torch.float32)
            for g in f.groups:
                if all_finite(g.A) and all_finite(g.Bt):
                    continue
                for t, i in enumerate(g.index.tolist()):
                    who = dict(adapter=names[i], module=f.spec.name)
                    require_finite(g.A[t], **who, tensor_name="lora_A")
                    # Bt holds (s B)^T: report indices of B itself
                    require_finite(g.Bt[t].t(), **who, tensor_name="lora_B (scaled)")


class InMemoryCollection(AdapterCollection):
    """Adapters held as tensors: ``adapters[name][module] = (A, B, scale)``.

    ``A: [r, d_in]``, ``B: [d_out, r]``, ``scale`` a float multiplying ``B A``.
    Modules missing from an adapter count as zero updates. Module shapes are
    taken from the factors and must agree between adapters.
    """

    def __init__(
        self,
        adapters: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]],
        *,
        modules: Sequence[ModuleSpec] | None = None,
        metadata: dict | None = None,
    ):
        self._adapters = {k: dict(v) for k, v in adapters.items()}
        self.metadata = dict(metadata or {})
        if modules is None:
            shapes: dict[str, tuple[int, int]] = {}
            for name, mods in self._adapters.items():
                for mod, (a, b, _s) in mods.items():
                    shape = (int(b.shape[0]), int(a.shape[1]))
                    if shapes.setdefault(mod, shape) != shape:
                        raise ValueError(
                            f"adapter {name}: module {mod} is {shape[0]} x {shape[1]}, other adapters have "
                            f"{shapes[mod][0]} x {shapes[mod][1]}"
                        )
            modules = [ModuleSpec(m, *shapes[m]) for m in sorted(shapes, key=module_sort_key)]
        self._modules = list(modules)

    @property
    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    @property
    def modules(self) -> list[ModuleSpec]:
        return list(self._modules)

    def require_finite(self, modules: Sequence[ModuleSpec | str] | None = None) -> None:
        wanted = None if modules is None else {m.name if isinstance(m, ModuleSpec) else m for m in modules}
        for name, mods in self._adapters.items():
            for mod, (a, b, s) in mods.items():
                if wanted is not None and mod not in wanted:
                    continue
                require_finite(torch.as_tensor(a), adapter=name, module=mod, tensor_name="lora_A")
                require_finite(torch.as_tensor(b), adapter=name, module=mod, tensor_name="lora_B")
                require_finite(torch.as_tensor(float(s), dtype=torch.float64), adapter=name, module=mod,
                               tensor_name="scale")

    def module_ranks(self, module: ModuleSpec) -> torch.Tensor:
        return torch.tensor([int(m[module.name][0].shape[0]) if module.name in m else 0
                             for m in self._adapters.values()], dtype=torch.long)

    def load_module(self, module, *, dtype=torch.float32, device="cpu") -> ModuleFactors:
        spec = module if isinstance(module, ModuleSpec) else self.module(module)
        A, B, S = [], [], []
        for mods in self._adapters.values():
            f = mods.get(spec.name)
            A.append(None if f is None else f[0])
            B.append(None if f is None else f[1])
            S.append(1.0 if f is None else float(f[2]))
        return ModuleFactors.from_factors(spec, A, B, S, dtype=dtype, device=device)


class CallableCollection(AdapterCollection):
    """A collection whose modules are produced by ``load(spec, dtype, device)``.

    ``load`` must return a :class:`ModuleFactors` with ``len(adapter_names)``
    adapters, and return the same data every time it is called for a module
    (the compressor reads each module several times).
    """

    def __init__(
        self,
        adapter_names: Sequence[str],
        modules: Sequence[ModuleSpec],
        load: Callable[[ModuleSpec, torch.dtype, torch.device | str], ModuleFactors],
        *,
        metadata: dict | None = None,
    ):
        self._names = list(adapter_names)
        self._modules = list(modules)
        self._load = load
        self.metadata = dict(metadata or {})

    @property
    def adapter_names(self) -> list[str]:
        return list(self._names)

    @property
    def modules(self) -> list[ModuleSpec]:
        return list(self._modules)

    def load_module(self, module, *, dtype=torch.float32, device="cpu") -> ModuleFactors:
        spec = module if isinstance(module, ModuleSpec) else self.module(module)
        out = self._load(spec, dtype, device)
        if out.num_adapters != len(self._names):
            raise ValueError(f"module {spec.name}: loader returned {out.num_adapters} adapters, expected {len(self._names)}")
        return out


def module_sort_key(name: str):
    # Natural order (layer 2 before layer 10) so stores list modules as the model does.
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]

