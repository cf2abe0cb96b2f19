"""The compressed collection: per module, cluster bases and per-adapter cores."""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from ._linalg import F64
from .collection import AdapterCollection, ModuleSpec

__all__ = ["METHODS", "CompressedModule", "CompressedCollection", "IndividualAdapter", "ProjectionReport"]

#: Compression methods. ``full``/``diag``: joint diagonalisation with full or
#: diagonal cores; ``svd``: per-adapter truncated SVD (one "cluster" per
#: adapter); ``none``: the original factors (one "cluster" per adapter).
METHODS = ("full", "diag", "svd", "none")


def sigma_is_diagonal(method: str) -> bool:
    return method in ("diag", "svd", "none")


@dataclass
class CompressedModule:
    """One module of a compressed collection of ``n`` adapters in ``K`` clusters.

    * ``U``: ``[K, d_out, r]``, ``Vt``: ``[K, r, d_in]`` (the serving layouts of
      the expand and shrink stacks).
    * ``sigma``: ``[n, r, r]`` (full cores) or ``[n, r]`` (diagonal cores).
    * ``norms_sq``: ``[n]`` ``||dW_i||_F^2``; ``errors``: ``[n]``
      ``||dW_i - recon_i||_F^2``; ``rel_errors``: ``errors / norms_sq`` (0 for
      a zero update).

    Adapter ``i`` in cluster ``k`` is reconstructed as
    ``U[k] @ Sigma_i @ Vt[k]`` with the PEFT scaling already inside.

    ``quantized``: ``(U, Vt)`` as :class:`~jdlora_ops.quant.QuantizedTable` when
    the bases are stored quantized (:mod:`.quantized_bases`); ``U`` and ``Vt``
    then hold their dequantised values, which every float path reads.
    """

    spec: ModuleSpec
    U: torch.Tensor
    Vt: torch.Tensor
    sigma: torch.Tensor
    norms_sq: torch.Tensor
    errors: torch.Tensor
    rel_errors: torch.Tensor
    quantized: tuple | None = None

    @property
    def rank(self) -> int:
        return int(self.U.shape[2])

    @property
    def num_clusters(self) -> int:
        return int(self.U.shape[0])

    def core(self, i: int) -> torch.Tensor:
        """``Sigma_i`` as an ``[r, r]`` matrix."""
        s = self.sigma[i]
        return s if s.dim() == 2 else torch.diag(s)


@dataclass
class IndividualAdapter:
    """An adapter's own factors: all of it (kept outside the joint tables), or its residual.

    * ``path``: ``"svd"`` (per-adapter truncated SVD at rank ``rank``),
      ``"full"`` (its own factors, uncompressed: the SVD would need full rank),
      or ``"residual"``: the adapter stays in the joint tables and these
      factors are the rank-``rank`` truncated SVD of what its core misses
      (see :mod:`.residual`); the served update is the core's plus ``B @ A``.
    * ``factors``: module name -> ``(A [k, d_in], B [d_out, k])`` with the PEFT
      scaling folded into ``B``; modules without factors are absent (for a
      residual: modules its core already serves exactly).
    * ``rel_errors``: module name -> relative squared error of the served
      update (0 for ``"full"``); ``jd_rel_errors``: the same under the joint
      tables alone, when known; ``ranks``: module name -> the adapter's
      original rank.
    """

    name: str
    path: str
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rel_errors: dict[str, float]
    ranks: dict[str, int]
    jd_rel_errors: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.path == "residual":
            return f"jd+res-{self.rank}"
        return f"svd-{self.rank}" if self.path == "svd" else self.path

    @property
    def is_residual(self) -> bool:
        return self.path == "residual"

    def params(self) -> int:
        return sum(A.numel() + B.numel() for A, B in self.factors.values())


@dataclass
class CompressedCollection:
    """A compressed collection of adapters of one base model.

    * ``method``: one of :data:`METHODS`; ``rank``: the requested rank ``r``.
    * ``adapter_names``: ``n`` names; ``assignment``: int64 ``[n]`` cluster of
      each adapter, shared by all modules; ``num_clusters``: ``K``.
    * ``modules``: module name -> :class:`CompressedModule`, in model order.
    * ``weights``: ``"relative"`` or ``"uniform"`` (the objective's weights).
    * ``metadata``: ``base_model``, per-adapter PEFT ``configs`` and whatever
      else a store should carry (JSON-serialisable).
    * ``history``: one dict per round of the clustered fit (objective, number
      of reassigned adapters, seconds).
    * ``individual``: name -> :class:`IndividualAdapter`: adapters served
      outside the joint tables (an error or byte budget; not among
      ``adapter_names``), and the residuals of adapters inside them (path
      ``"residual"``; among ``adapter_names``).
    """

    method: str
    rank: int
    adapter_names: list[str]
    assignment: torch.Tensor
    num_clusters: int
    modules: dict[str, CompressedModule]
    weights: str = "relative"
    metadata: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    individual: dict[str, IndividualAdapter] = field(default_factory=dict)

    # ------------------------------------------------------------- queries
    @property
    def num_adapters(self) -> int:
        return len(self.adapter_names)

    @property
    def module_specs(self) -> list[ModuleSpec]:
        return [m.spec for m in self.modules.values()]

    def index(self, name: str) -> int:
        try:
            return self.adapter_names.index(name)
        except ValueError:
            raise KeyError(f"no adapter named {name!r} (have {len(self.adapter_names)} adapters)") from None

    def rel_errors(self) -> torch.Tensor:
        """``[n, M]`` relative squared error per adapter and module (float64) of the joint tables alone
        (an adapter with a residual has less: :meth:`served_rel_errors`)."""
        if not self.modules:
            return torch.zeros(self.num_adapters, 0, dtype=torch.float64)
        return torch.stack([m.rel_errors.double().cpu() for m in self.modules.values()], dim=1)

    def served_rel_errors(self) -> torch.Tensor:
        """:meth:`rel_errors` with the rows of adapters that have a residual replaced by their served error."""
        rel = self.rel_errors()
        for name, ind in self.individual.items():
            if ind.is_residual:
                rel[self.index(name)] = torch.tensor([float(ind.rel_errors.get(m, 0.0)) for m in self.modules],
                                                     dtype=torch.float64)
        return rel

    @property
    def residuals(self) -> dict[str, "IndividualAdapter"]:
        """The residuals of adapters in the joint tables, by name."""
        return {x: ind for x, ind in self.individual.items() if ind.is_residual}

    @property
    def all_names(self) -> list[str]:
        """Every adapter once: those in the joint tables, then those outside them."""
        return list(self.adapter_names) + [x for x, ind in self.individual.items() if not ind.is_residual]

    def path_of(self, name: str) -> str:
        """``"jd"``, ``"jd+res-k"``, ``"svd-k"`` or ``"full"``: how adapter ``name`` is stored."""
        if name in self.individual:
            return self.individual[name].label
        self.index(name)
        return "jd"

    def reconstruct(self, adapter: str | int, module: str) -> torch.Tensor:
        """Dense ``[d_out, d_in]`` reconstruction of one adapter on one module (what serving computes)."""
        name = adapter if isinstance(adapter, str) else self.adapter_names[adapter]
        ind = self.individual.get(name)
        own = None
        if ind is not None and module in ind.factors:
            A, B = ind.factors[module]
            own = B @ A
        if ind is not None and not ind.is_residual:
            if own is None:
                spec = self.modules[module].spec
                return torch.zeros(spec.d_out, spec.d_in, dtype=torch.float64)
            return own
        i = adapter if isinstance(adapter, int) else self.index(adapter)
        cm = self.modules[module]
        k = int(self.assignment[i])
        core = cm.U[k] @ cm.core(i) @ cm.Vt[k]
        return core if own is None else core + own.to(core.dtype)

    def lora_factors(self, adapter: str | int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-``r`` LoRA factors ``(B [d_out, r], A [r, d_in])`` with ``B @ A`` equal
        to the reconstruction (scaling 1); for an adapter outside the joint
        tables its own factors (``None`` when it lacks the module); for one
        with a residual, the core's factors and the residual's side by side
        (rank ``r + k``), so that ``B @ A`` is the served sum.

        The core is split by its SVD, ``Sigma = P S Q^T``: ``B = U P S^(1/2)``,
        ``A = S^(1/2) Q^T Vt``, so both factors have comparable magnitudes.
        """
        name = adapter if isinstance(adapter, str) else self.adapter_names[adapter]
        ind = self.individual.get(name)
        own = None if ind is None or module not in ind.factors else ind.factors[module]
        own = None if own is None else (own[1].to(torch.float64), own[0].to(torch.float64))
        if ind is not None and not ind.is_residual:
            return own
        i = adapter if isinstance(adapter, int) else self.index(adapter)
        cm = self.modules[module]
        k = int(self.assignment[i])
        core = cm.core(i).to(torch.float64)
        P, S, Qh = torch.linalg.svd(core)
        root = S.sqrt()
        B = cm.U[k].to(torch.float64) @ (P * root)
        A = (root[:, None] * Qh) @ cm.Vt[k].to(torch.float64)
        if own is not None:
            B, A = torch.cat([B, own[0]], dim=1), torch.cat([A, own[1]], dim=0)
        return B, A

    def memory(self, bytes_per_value: int = 2) -> dict:
        """Parameter counts and bytes before and after compression.

        ``before``: the adapters' own factors, ``sum_i sum_m r_i (d_out + d_in)``
        (from ``metadata["ranks"]`` when present, else the stored rank).
        ``after``: the bases of the non-empty clusters plus every adapter's core,
        plus the factors of the individual adapters.
        """
        ranks = self.metadata.get("ranks", {})
        before = 0
        after = 0
        used = torch.unique(self.assignment).numel() if self.num_adapters else 0
        for name, cm in self.modules.items():
            width = cm.spec.d_out + cm.spec.d_in
            per = ranks.get(name)
            if per is None:
                before += self.num_adapters * cm.rank * width
            else:
                before += int(sum(per)) * width
            if self.method in ("svd", "none"):
                after += self.num_adapters * cm.rank * width + cm.sigma.numel()
            else:
                after += used * cm.rank * width + cm.sigma.numel()
        for ind in self.individual.values():
            if not ind.is_residual:  # a residual's adapter is counted among the joint tables' already
                for name, r in ind.ranks.items():
                    cm = self.modules.get(name)
                    if cm is not None:
                        before += int(r) * (cm.spec.d_out + cm.spec.d_in)
            after += ind.params()
        return {
            "params_before": before,
            "params_after": after,
            "bytes_before": before * bytes_per_value,
            "bytes_after": after * bytes_per_value,
            "ratio": (before / after) if after else float("inf"),
        }

    def summary(self) -> dict:
        """Mean and max relative error over all (adapter, module) pairs, individual adapters included."""
        e = self.served_rel_errors().flatten()
        outside = [ind for ind in self.individual.values() if not ind.is_residual]
        if outside:
            extra = [float(ind.rel_errors.get(m, 0.0)) for ind in outside for m in self.modules]
            e = torch.cat([e, torch.tensor(extra, dtype=torch.float64)])
        if e.numel() == 0:
            return {"mean_rel_error": 0.0, "max_rel_error": 0.0}
        return {"mean_rel_error": float(e.mean()), "max_rel_error": float(e.max())}

    def cluster_members(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(self.num_clusters)]
        for name, k in zip(self.adapter_names, self.assignment.tolist()):
            out[k].append(name)
        return out


def relative(errors: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(F64).tiny
    n = norms.to(F64)
    rel = errors / n.clamp_min(tiny).unsqueeze(-1) if errors.dim() == 2 else errors / n.clamp_min(tiny)
    zero = (n <= tiny).unsqueeze(-1) if errors.dim() == 2 else n <= tiny
    return torch.where(zero & torch.isfinite(rel), torch.zeros_like(rel), rel)


@dataclass
class ProjectionReport:
    """Outcome of :func:`project_adapters`.

    ``names``: the added adapters; ``clusters``: int64 ``[m]`` chosen cluster
    of each; ``rel_errors``: float64 ``[m, M]`` per module (modules in the
    store's order); ``cost``: float64 ``[m, K]`` summed cost per cluster
    (relative or absolute errors, following the store's weights); ``seconds``.
    """

    names: list[str]
    clusters: torch.Tensor
    rel_errors: torch.Tensor
    cost: torch.Tensor
    seconds: float


def check_nonzero(names: list[str], norms: torch.Tensor) -> None:
    """``ValueError`` naming the adapters whose summed ``||dW||^2`` over all modules is zero."""
    zero = [names[i] for i in (norms <= 0).nonzero().flatten().tolist()]
    if zero:
        raise ValueError(
            f"adapters must have a non-zero update on at least one module; zero update: {', '.join(zero[:5])}"
            + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
        )


def merge_metadata(compressed: CompressedCollection, new: AdapterCollection, new_ranks: dict[str, list[int]]) -> None:
    """Carry the new adapters' PEFT configs and per-module ranks into ``compressed.metadata``."""
    md = compressed.metadata
    new_md = getattr(new, "metadata", {}) or {}
    md.setdefault("configs", {}).update(new_md.get("configs", {}))
    ranks = md.setdefault("ranks", {})
    for mod in compressed.modules:
        extra = new_ranks.get(mod, [0] * len(new.adapter_names))
        ranks.setdefault(mod, [0] * (compressed.num_adapters - len(new.adapter_names))).extend(int(x) for x in extra)
