"""Synthetic LoRA collections that look like real ones, generated module by module.

Real collections of LoRA fine-tunes of one base model share structure that
joint compression exploits; the generator reproduces the parts that matter:

* **Shared initial A per seed.** PEFT initialises ``A`` with Kaiming-uniform
  noise (bound ``1/sqrt(d_in)``) and ``B`` with zeros; fine-tunes started from
  the same seed share ``A_0`` and training moves ``A`` only a little
  (``a_drift``).
* **Families of related tasks.** Adapters of one family put most of their
  update (``shared``) into family-wide output directions ``P_f`` (and drift
  ``A`` towards family input directions ``Q_f``); the rest is their own.
* **Decaying spectra.** Column ``j`` of ``B`` is scaled by ``decay**j``.
* **Mixed ranks and magnitudes.** Ranks are drawn from ``ranks``; each adapter
  gets a log-normal overall magnitude (``norm_spread``) and PEFT scaling
  ``lora_alpha / r``.

``kind="random"`` gives unstructured adapters instead (i.i.d. Gaussian ``A``
and ``B``), the worst case for joint compression.

Every (module, adapter) pair has its own random stream, so a module can be
generated for any subset of adapters, in any order, and comes out the same
(bit for bit for the same subset; up to float rounding of the shared terms
otherwise): :class:`SyntheticCollection` never holds more than one module, and
:func:`write_peft_adapters` writes PEFT adapter directories a few adapters at a
time.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .compress.collection import AdapterCollection, ModuleFactors, ModuleSpec, RankGroup, column_layout, empty_factors

__all__ = ["SyntheticSpec", "SyntheticCollection", "llama_like_modules", "write_peft_adapters", "planted_collection"]

_MIX = 0x9E3779B97F4A7C15


def _seed(*parts: int) -> int:
    # A cheap, order-sensitive integer hash so every stream has its own seed.
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _MIX) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def llama_like_modules(
    num_layers: int = 32,
    hidden: int = 4096,
    kv_dim: int = 1024,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj"),
    prefix: str = "model.layers",
) -> list[ModuleSpec]:
    """Attention projections of a Llama-style model: ``q_proj``/``o_proj``
    ``hidden -> hidden``, ``k_proj``/``v_proj`` ``hidden -> kv_dim`` (GQA)."""
    shapes = {"q_proj": (hidden, hidden), "o_proj": (hidden, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden)}
    out = []
    for layer in range(num_layers):
        for t in targets:
            if t not in shapes:
                raise ValueError(f"unknown target {t!r}; known: {sorted(shapes)}")
            d_out, d_in = shapes[t]
            out.append(ModuleSpec(f"{prefix}.{layer}.self_attn.{t}", d_out, d_in))
    return out


@dataclass
class SyntheticSpec:
    """Parameters of a synthetic collection (see the module docstring)."""

    num_adapters: int
    modules: list[ModuleSpec]
    kind: str = "realistic"
    ranks: Sequence[int] = (16,)
    num_families: int = 8
    num_seeds: int = 4
    family_dim: int = 24
    shared: float = 0.8
    decay: float = 0.9
    a_drift: float = 0.3
    norm_spread: float = 0.5
    lora_alpha: float | None = None
    seed: int = 0
    base_model: str = "synthetic/llama-like"
    name_prefix: str = "adapter"

    def __post_init__(self):
        if self.kind not in ("realistic", "random"):
            raise ValueError(f"kind must be 'realistic' or 'random', got {self.kind!r}")
        if self.num_adapters < 0 or not self.ranks or min(self.ranks) < 1:
            raise ValueError("num_adapters must be >= 0 and ranks positive")


@dataclass
class _Adapter:
    name: str
    rank: int
    family: int
    init_seed: int
    magnitude: float
    alpha: float


class SyntheticCollection(AdapterCollection):
    """A lazily generated collection; see the module docstring.

    ``load_module(spec, adapters=...)`` may restrict generation to a subset of
    adapter positions. ``metadata`` carries ``base_model``, per-adapter PEFT
    ``configs``, and the ground truth ``families`` / ``init_seeds``.
    """

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        gen = torch.Generator().manual_seed(_seed(spec.seed, 1))
        n = spec.num_adapters
        ranks = torch.tensor(list(spec.ranks))
        pick = torch.randint(len(ranks), (n,), generator=gen)
        fam = torch.randint(max(1, spec.num_families), (n,), generator=gen)
        init = torch.randint(max(1, spec.num_seeds), (n,), generator=gen)
        mag = torch.exp(spec.norm_spread * torch.randn(n, generator=gen, dtype=torch.float64))
        self._adapters = []
        for i in range(n):
            r = int(ranks[pick[i]])
            alpha = float(spec.lora_alpha) if spec.lora_alpha is not None else float(2 * r)
            self._adapters.append(
                _Adapter(f"{spec.name_prefix}_{i:04d}", r, int(fam[i]), int(init[i]), float(mag[i]), alpha)
            )
        self.metadata = {
            "base_model": spec.base_model,
            "configs": {a.name: self.peft_config(i) for i, a in enumerate(self._adapters)},
            "families": [a.family for a in self._adapters],
            "init_seeds": [a.init_seed for a in self._adapters],
        }

    # ----------------------------------------------------------- interface
    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self._adapters]

    @property
    def modules(self) -> list[ModuleSpec]:
        return list(self.spec.modules)

    @property
    def families(self) -> torch.Tensor:
        return torch.tensor([a.family for a in self._adapters])

    def rank_of(self, i: int) -> int:
        return self._adapters[i].rank

    def module_ranks(self, module: ModuleSpec) -> torch.Tensor:
        return torch.tensor([a.rank for a in self._adapters], dtype=torch.long)  # every adapter has every module

    def scale_of(self, i: int) -> float:
        a = self._adapters[i]
        return a.alpha / a.rank

    def peft_config(self, i: int) -> dict:
        """The ``adapter_config.json`` content of adapter ``i``."""
        a = self._adapters[i]
        kinds = sorted({m.kind for m in self.spec.modules})
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.spec.base_model,
            "r": a.rank,
            "lora_alpha": a.alpha,
            "lora_dropout": 0.0,
            "target_modules": kinds,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
        }

    def require_finite(self, modules=None) -> None:
        """Nothing to check: the factors are drawn here from seeded Gaussians with finite scales, so
        a check would only add a generation pass to every compression of a synthetic collection."""

    def load_module(
        self,
        module,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        adapters: Sequence[int] | None = None,
        scaled: bool = True,
    ) -> ModuleFactors:
        """Generate one module. ``adapters``: positions to generate (default all;
        the result then holds ``len(adapters)`` adapters in that order).
        ``scaled=False`` leaves the PEFT scaling out of ``B`` (as stored in files)."""
        spec = module if isinstance(module, ModuleSpec) else self.module(module)
        mi = self.spec.modules.index(spec)
        pos = list(range(len(self._adapters))) if adapters is None else [int(i) for i in adapters]
        shared = _SharedModule(self.spec, mi, spec, torch.float32)
        by_rank: dict[int, list[int]] = {}
        for j, i in enumerate(pos):
            by_rank.setdefault(self._adapters[i].rank, []).append(j)
        groups = []
        for rho, js in sorted(by_rank.items()):
            # Order the group by (family, seed) so that shared terms are added to contiguous slices.
            js = sorted(js, key=lambda j: (self._adapters[pos[j]].family, self._adapters[pos[j]].init_seed, j))
            # Generated in float32 whatever is asked for, so the data do not depend on the dtype.
            A, Bt = self._generate(shared, mi, [pos[j] for j in js], rho, spec, torch.float32, scaled)
            if dtype != torch.float32 or torch.device(device).type != "cpu":
                A, Bt = column_layout(A.to(device=device, dtype=dtype)), column_layout(Bt.to(device=device, dtype=dtype))
            groups.append(RankGroup(torch.tensor(js, dtype=torch.long, device=device), A, Bt))
        return ModuleFactors(spec, len(pos), groups)

    # ---------------------------------------------------------- generation
    def _generate(self, shared: "_SharedModule", mi: int, ids: list[int], rho: int, spec: ModuleSpec,
                  dtype: torch.dtype, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``A [g, rho, d_in]``, ``B^T [g, rho, d_out]`` of adapters ``ids`` (all of rank ``rho``).

        Each adapter draws its noise from its own stream (so any subset comes out
        the same); the shared terms are added per contiguous (family, seed) slice.
        """
        s = self.spec
        g = len(ids)
        d_out, d_in = spec.d_out, spec.d_in
        A = empty_factors(g, rho, d_in, dtype=dtype, device="cpu")
        Bt = empty_factors(g, rho, d_out, dtype=dtype, device="cpu")
        fd = getattr(shared, "family_dim", 1)
        G = torch.empty(g, rho, fd, dtype=dtype)
        H = torch.empty(g, rho, fd, dtype=dtype)
        for t, i in enumerate(ids):
            gen = torch.Generator().manual_seed(_seed(s.seed, 2, mi, i))
            # Drawn contiguous, then copied: the values must not depend on the group's layout.
            Bt[t].copy_(torch.randn(rho, d_out, generator=gen, dtype=dtype))
            A[t].copy_(torch.randn(rho, d_in, generator=gen, dtype=dtype))
            if s.kind == "realistic":
                G[t].normal_(generator=gen)
                H[t].normal_(generator=gen)
        ads = [self._adapters[i] for i in ids]
        scale = torch.tensor([(a.alpha / rho if scaled else 1.0) * a.magnitude for a in ads], dtype=dtype)
        if s.kind == "random":
            A.mul_(1.0 / math.sqrt(d_in))
            Bt.mul_((scale / math.sqrt(d_out))[:, None, None])
            return A, Bt
        # B^T = magnitude * scale * decay^j * (sqrt(shared) G^T P_f^T + sqrt(1 - shared) N^T)
        Bt.mul_(math.sqrt(1.0 - s.shared) / math.sqrt(d_out))
        A.mul_(math.sqrt(1.0 - s.shared) / math.sqrt(d_in))
        fam = [a.family for a in ads]
        a_sh = math.sqrt(s.shared) / math.sqrt(fd)
        lo = 0
        while lo < g:
            hi = lo
            while hi < g and fam[hi] == fam[lo]:
                hi += 1
            f = fam[lo]
            Bt[lo:hi].view(-1, d_out).addmm_(G[lo:hi].view(-1, fd), shared.P[f].t(), alpha=a_sh)
            A[lo:hi].view(-1, d_in).addmm_(H[lo:hi].view(-1, fd), shared.Q[f].t(), alpha=a_sh)
            lo = hi
        col = (s.decay ** torch.arange(rho, dtype=dtype))[None, :] * scale[:, None]
        Bt.mul_(col[:, :, None])
        # A = A0[seed] + drift (towards the family's input directions, plus noise)
        A.mul_(s.a_drift / math.sqrt(3.0))
        seeds = [a.init_seed for a in ads]
        lo = 0
        while lo < g:
            hi = lo
            while hi < g and seeds[hi] == seeds[lo] and fam[hi] == fam[lo]:
                hi += 1
            A[lo:hi].add_(shared.A0[seeds[lo]][:rho])
            lo = hi
        return A, Bt


class _SharedModule:
    """Per-module quantities shared by adapters: family subspaces and seed inits."""

    def __init__(self, s: SyntheticSpec, mi: int, spec: ModuleSpec, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(_seed(s.seed, 3, mi))
        self.family_dim = max(1, min(s.family_dim, spec.d_out, spec.d_in))
        F = max(1, s.num_families)
        if s.kind == "realistic":
            # Unit-norm columns (Gaussian / sqrt(d)), nearly orthogonal for large d.
            self.P = torch.randn(F, spec.d_out, self.family_dim, generator=gen, dtype=dtype) / math.sqrt(spec.d_out)
            self.Q = torch.randn(F, spec.d_in, self.family_dim, generator=gen, dtype=dtype) / math.sqrt(spec.d_in)
            r_max = max(s.ranks)
            bound = 1.0 / math.sqrt(spec.d_in)
            self.A0 = (torch.rand(max(1, s.num_seeds), r_max, spec.d_in, generator=gen, dtype=dtype) * 2 - 1) * bound


def write_peft_adapters(
    collection: SyntheticCollection,
    root: str | os.PathLike,
    *,
    adapters: Sequence[int] | None = None,
    chunk: int = 16,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> list[str]:
    """Write adapters as PEFT adapter directories ``root/<name>/``.

    Each directory holds ``adapter_config.json`` and
    ``adapter_model.safetensors`` with PEFT's key names
    (``base_model.model.<module>.lora_A.weight`` ``[r, d_in]`` and
    ``...lora_B.weight`` ``[d_out, r]``, unscaled). Adapters are generated
    ``chunk`` at a time, module by module. Returns the directory paths.
    """
    from safetensors.torch import save_file

    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    pos = list(range(len(collection))) if adapters is None else [int(i) for i in adapters]
    names = collection.adapter_names
    paths = []
    chunks = [pos[k : k + chunk] for k in range(0, len(pos), chunk)]
    it = chunks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chunks, desc="write adapters", unit="chunk")
    for part in it:
        tensors: list[dict[str, torch.Tensor]] = [{} for _ in part]
        for spec in collection.modules:
            f = collection.load_module(spec, dtype=dtype, adapters=part, scaled=False)
            for g in f.groups:
                for t, j in enumerate(g.index.tolist()):
                    key = f"base_model.model.{spec.name}"
                    tensors[j][f"{key}.lora_A.weight"] = g.A[t].contiguous().clone()
                    tensors[j][f"{key}.lora_B.weight"] = g.Bt[t].t().contiguous()
        for j, i in enumerate(part):
            d = os.path.join(root, names[i])
            os.makedirs(d, exist_ok=True)
            save_file(tensors[j], os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(d, "adapter_config.json"), "w") as fh:
                json.dump(collection.peft_config(i), fh, indent=2, sort_keys=True)
            paths.append(d)
    return paths


def spec_to_dict(spec: SyntheticSpec) -> dict:
    """JSON-friendly form of a :class:`SyntheticSpec` (modules summarised)."""
    d = asdict(spec)
    d["modules"] = [[m.name, m.d_out, m.d_in] for m in spec.modules]
    d["ranks"] = list(spec.ranks)
    return d



def planted_collection(
    modules: Sequence[ModuleSpec],
    *,
    clusters: int = 3,
    per_cluster: int = 5,
    rank: int = 4,
    adapter_ranks: Sequence[int] = (4, 6),
    noise: float = 0.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    diagonal: bool = False,
):
    """A small in-memory collection with exactly known structure (for tests and demos).

    Adapter ``i`` belongs to cluster ``i // per_cluster``; on every module its
    update is ``U_k S_i V_k^T`` with cluster bases of rank ``rank`` (diagonal
    ``S_i`` if ``diagonal``), written as LoRA factors of rank ``adapter_ranks[i %
    len]`` (>= ``rank``), plus ``noise`` times a random rank-1 update and a
    PEFT-like scale. Returns ``(InMemoryCollection, labels [n])``.
    """
    from .compress.collection import InMemoryCollection

    gen = torch.Generator().manual_seed(seed)
    n = clusters * per_cluster
    labels = torch.arange(n) // per_cluster
    adapters: dict[str, dict] = {f"p{i:03d}": {} for i in range(n)}
    for spec in modules:
        Us = [torch.linalg.qr(torch.randn(spec.d_out, rank, generator=gen, dtype=dtype))[0] for _ in range(clusters)]
        Vs = [torch.linalg.qr(torch.randn(spec.d_in, rank, generator=gen, dtype=dtype))[0] for _ in range(clusters)]
        for i in range(n):
            k = int(labels[i])
            rho = int(adapter_ranks[i % len(adapter_ranks)])
            if rho < rank:
                raise ValueError("adapter ranks must be >= rank")
            S = torch.randn(rank, rank, generator=gen, dtype=dtype)
            if diagonal:
                S = torch.diag(torch.diagonal(S))
            mix = torch.linalg.qr(torch.randn(rho, rank, generator=gen, dtype=dtype))[0]  # [rho, rank], orthonormal
            B = Us[k] @ S @ mix.t()  # [d_out, rho]
            A = mix @ Vs[k].t()  # [rho, d_in]; B A = U S V^T
            if noise:
                u = torch.randn(spec.d_out, 1, generator=gen, dtype=dtype)
                v = torch.randn(1, spec.d_in, generator=gen, dtype=dtype)
                scale_n = noise * float(S.norm()) / float(u.norm() * v.norm())
                B = torch.cat([B, scale_n * u], dim=1)
                A = torch.cat([A, v], dim=0)
            scale = 2.0 / (i % 3 + 1)
            adapters[f"p{i:03d}"][spec.name] = (A, B / scale, scale)
    return InMemoryCollection(adapters, modules=list(modules)), labels


def planted_partition(
    modules: Sequence[ModuleSpec],
    sizes: Sequence[int],
    *,
    rank: int,
    adapter_ranks: Sequence[int] = (0,),
    scale_range: float = 1.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
):
    """A collection whose best ``len(sizes)``-cluster JD-Full at rank ``rank`` is exact.

    Cluster ``k`` has ``sizes[k]`` adapters and, per module, its own random
    ``rank``-dimensional column and row subspaces ``U_k``, ``V_k``; every update
    is ``U_k X_i Y_i V_k^T`` with Gaussian ``X_i: [rank, rho_i]``,
    ``Y_i: [rho_i, rank]`` and ``rho_i = adapter_ranks[i % len]`` (0 or larger
    than ``rank`` mean ``rank``), so it lies inside its cluster's subspaces
    whatever its rank. Adapter magnitudes are spread log-uniformly over
    ``scale_range`` (the largest over the smallest). Adapters are interleaved
    across clusters (adapter ``i`` is not in cluster ``i // size``) so that no
    method can profit from the order. Returns ``(InMemoryCollection, labels [n])``.
    """
    from .compress.collection import InMemoryCollection

    gen = torch.Generator().manual_seed(int(seed))
    labels = torch.cat([torch.full((int(s),), k, dtype=torch.long) for k, s in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    n = labels.numel()
    magnitudes = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * math.log(max(scale_range, 1.0)))
    ranks = [int(adapter_ranks[i % len(adapter_ranks)]) for i in range(n)]
    ranks = [rank if rho <= 0 or rho > rank else rho for rho in ranks]
    adapters: dict[str, dict] = {f"a{i:03d}": {} for i in range(n)}
    for spec in modules:
        Us = [torch.linalg.qr(torch.randn(spec.d_out, rank, generator=gen, dtype=dtype))[0] for _ in sizes]
        Vs = [torch.linalg.qr(torch.randn(spec.d_in, rank, generator=gen, dtype=dtype))[0] for _ in sizes]
        for i in range(n):
            k, rho = int(labels[i]), ranks[i]
            X = torch.randn(rank, rho, generator=gen, dtype=dtype)
            Y = torch.randn(rho, rank, generator=gen, dtype=dtype)
            B = Us[k] @ X * float(magnitudes[i])
            A = Y @ Vs[k].t()
            adapters[f"a{i:03d}"][spec.name] = (A, B / 2.0, 2.0)
    return InMemoryCollection(adapters, modules=list(modules)), labels
