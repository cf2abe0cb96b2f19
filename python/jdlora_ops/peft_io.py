"""Reading and writing PEFT LoRA adapter directories, for any base model.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors``. Tensor keys look like
``base_model.model.<module path>.lora_A.weight`` (``[r, d_in]``) and
``...lora_B.weight`` (``[d_out, r]``); the module path is whatever the base
model calls the adapted linear layer (``model.layers.7.self_attn.q_proj``,
``transformer.h.3.attn.c_attn``, ...). Nothing here knows a model family: the
module path is the key, and layer index and module kind are parsed from it
only for display.

Scaling follows PEFT: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), with ``r`` and ``lora_alpha`` taken per module from
``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module path
(PEFT's rule: pattern ``p`` matches path ``k`` when ``k`` is ``p`` or ends in
``.p``, ``p`` read as a regular expression).

Only safetensors files are read; pickle-based ``adapter_model.bin`` files are
refused (unpickling an untrusted file can run arbitrary code). Tensors are read
lazily, one module at a time.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ._files import atomic_directory, read_json_object, write_json
from ._finite import require_finite
from .compress.collection import AdapterCollection, ModuleFactors, ModuleSpec, module_sort_key
from .compress.result import CompressedCollection

__all__ = [
    "AdapterFormatError",
    "find_adapter_dirs",
    "PeftAdapter",
    "PeftCollection",
    "read_peft_adapter",
    "export_peft_adapter",
    "write_peft_adapter",
    "peft_scaling",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSUPPORTED = (
    ("lora_embedding_A", "LoRA on embedding layers"),
    ("lora_embedding_B", "LoRA on embedding layers"),
    ("lora_magnitude_vector", "DoRA magnitude vectors"),
    (".lora_B.bias", "LoRA biases (lora_bias=True)"),
)


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be read (message names the path and the problem)."""


def _match_pattern(patterns: dict, key: str):
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return patterns[p]
    return None


def peft_scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of ``module``: ``alpha / r`` or ``alpha / sqrt(r)`` (rsLoRA)."""
    alpha = _match_pattern(config.get("alpha_pattern") or {}, module)
    if alpha is None:
        alpha = config.get("lora_alpha", 8)
    if config.get("use_rslora", False):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


@dataclass
class _Entry:
    a_key: str
    b_key: str
    rank: int
    d_out: int
    d_in: int
    scale: float
    dtype: str = "F32"  # safetensors dtype name of the factors


@dataclass
class PeftAdapter:
    """Header-level view of one PEFT adapter directory (no tensor data loaded).

    ``modules``: module path -> key names, rank, shape and PEFT scaling.
    """

    path: str
    name: str
    config: dict
    modules: dict[str, _Entry]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def load(self, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A [r, d_in], B [d_out, r], scale)`` of one module, read from disk."""
        from safetensors import safe_open

        e = self.modules[module]
        path = os.path.join(self.path, ADAPTER_WEIGHTS)
        try:
            with safe_open(path, framework="pt") as fh:
                return fh.get_tensor(e.a_key), fh.get_tensor(e.b_key), e.scale
        except Exception as exc:  # safetensors raises several types for damaged files
            raise AdapterFormatError(f"{path}: cannot read {module}: {exc}") from exc

    def require_finite(self, modules: Sequence[str] | None = None) -> None:
        """Raise :class:`~jdlora_ops.NonFiniteError` when ``lora_A`` or ``lora_B`` of one of
        ``modules`` (default: all) holds NaN or an infinity; each tensor is read once."""
        wanted = list(self.modules) if modules is None else [m for m in modules if m in self.modules]
        for mod in wanted:
            A, B, scale = self.load(mod)
            require_finite(A, adapter=self.name, module=mod, tensor_name="lora_A", source=self.path)
            require_finite(B, adapter=self.name, module=mod, tensor_name="lora_B", source=self.path)
            # JSON as Python reads it allows NaN and Infinity for lora_alpha
            require_finite(torch.tensor(scale, dtype=torch.float64), adapter=self.name, module=mod,
                           tensor_name="scaling (lora_alpha / r)", source=self.path)


def read_peft_adapter(path: str | os.PathLike, name: str | None = None) -> PeftAdapter:
    """Read and validate an adapter directory's config and safetensors header.

    Raises :class:`AdapterFormatError` for a missing directory or file, a
    pickle-only adapter, invalid JSON, a non-LoRA or DoRA adapter, unsupported
    tensors (embedding LoRA, biases), missing or mismatched A/B pairs, and
    ranks that disagree with the config.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    name = name or os.path.basename(os.path.normpath(path))
    if not os.path.isdir(path):
        raise AdapterFormatError(f"{path}: not an adapter directory (does not exist or is not a directory)")
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        pickled = [p for p in _PICKLED if os.path.isfile(os.path.join(path, p))]
        if pickled:
            raise AdapterFormatError(
                f"{path}: only {pickled[0]} (a pickle file) is present; pickle files are refused because loading "
                f"them can run arbitrary code. Convert the adapter to {ADAPTER_WEIGHTS} in a trusted environment"
            )
        raise AdapterFormatError(f"{path}: missing {ADAPTER_WEIGHTS}")
    if not os.path.isfile(cfg_path):
        raise AdapterFormatError(f"{path}: missing {ADAPTER_CONFIG}")
    config = read_json_object(cfg_path, AdapterFormatError, "an adapter config")
    ptype = str(config.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise AdapterFormatError(f"{path}: peft_type is {ptype}, only LORA adapters can be compressed")
    if config.get("use_dora"):
        raise AdapterFormatError(f"{path}: DoRA adapters (use_dora=true) cannot be compressed")
    try:
        with safe_open(weights, framework="pt") as fh:
            keys = list(fh.keys())
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: fh.get_slice(k).get_dtype() for k in keys}
    except Exception as exc:
        raise AdapterFormatError(f"{weights}: not a readable safetensors file ({exc})") from exc
    pairs: dict[str, dict[str, str]] = {}
    for k in keys:
        for marker, what in _UNSUPPORTED:
            if marker in k:
                raise AdapterFormatError(f"{path}: holds {what} ({k}); only plain LoRA A/B weights are supported")
        m = _KEY.match(k)
        if not m:
            raise AdapterFormatError(f"{path}: unexpected tensor {k!r}; only LoRA A/B weights are supported")
        side = pairs.setdefault(m.group("module"), {})
        if m.group("side") in side:
            raise AdapterFormatError(f"{path}: two lora_{m.group('side')} tensors for {m.group('module')}")
        side[m.group("side")] = k
    if not pairs:
        raise AdapterFormatError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    modules = {}
    for mod in sorted(pairs, key=module_sort_key):
        ab = pairs[mod]
        if "A" not in ab or "B" not in ab:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterFormatError(f"{path}: module {mod} has no {missing} weight")
        sa, sb = shapes[ab["A"]], shapes[ab["B"]]
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise AdapterFormatError(
                f"{path}: module {mod}: lora_A {list(sa)} and lora_B {list(sb)} are not [r, d_in] and [d_out, r]"
            )
        r = int(sa[0])
        r_cfg = _match_pattern(config.get("rank_pattern") or {}, mod)
        r_cfg = config.get("r") if r_cfg is None else r_cfg
        if r_cfg is not None and int(r_cfg) != r:
            raise AdapterFormatError(f"{path}: module {mod} has rank {r} but the config says {r_cfg}")
        modules[mod] = _Entry(ab["A"], ab["B"], r, int(sb[0]), int(sa[1]), peft_scaling(config, mod, r),
                              dtypes[ab["B"]])
    return PeftAdapter(path, name, config, modules)


def _is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def find_adapter_dirs(args: Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """Adapter directories named by command-line arguments; returns ``(paths, notes)``.

    Each argument is an adapter directory, a folder whose sub-folders are
    adapters (taken in sorted order), a glob pattern, or a text file listing
    one adapter directory per line (relative to the file; ``#`` comments).
    ``notes`` says what each non-adapter argument expanded to.
    """
    import glob

    paths: list[str] = []
    notes: list[str] = []
    for arg in map(os.fspath, args):
        if _is_adapter_dir(arg):
            paths.append(arg)
        elif os.path.isdir(arg):
            subs = sorted(os.path.join(arg, d) for d in os.listdir(arg) if _is_adapter_dir(os.path.join(arg, d)))
            if not subs:
                raise AdapterFormatError(f"{arg}: neither an adapter directory nor a folder of adapter directories "
                                         f"(no {ADAPTER_CONFIG} in it or in its sub-folders)")
            paths += subs
            notes.append(f"{arg}: {len(subs)} adapter folders")
        elif os.path.isfile(arg):
            base = os.path.dirname(os.path.abspath(arg))
            try:
                with open(arg, encoding="utf-8") as fh:
                    lines = [ln.strip() for ln in fh]
            except (OSError, UnicodeDecodeError) as exc:
                raise AdapterFormatError(f"{arg}: cannot read it as a list of adapter directories ({exc})") from exc
            listed = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines if ln and not ln.startswith("#")]
            if not listed:
                raise AdapterFormatError(f"{arg}: lists no adapter directory")
            paths += listed
            notes.append(f"{arg}: {len(listed)} adapter folders listed")
        elif any(ch in arg for ch in "*?["):
            hits = sorted(p for p in glob.glob(arg) if _is_adapter_dir(p))
            if not hits:
                raise AdapterFormatError(f"{arg}: the pattern matches no adapter directory")
            paths += hits
            notes.append(f"{arg}: {len(hits)} adapter folders matched")
        else:
            raise AdapterFormatError(f"{arg}: no such adapter directory, folder, list file or pattern")
    return paths, notes


class PeftCollection(AdapterCollection):
    """PEFT adapter directories as a lazily read :class:`AdapterCollection`.

    All adapters must name the same base model (when they name one) and agree
    on the shape of every module they share; a module missing from an adapter
    is a zero update. ``names`` defaults to the directory names, which must be
    unique. ``expect_base_model`` / ``expect_modules`` (a store's) add checks.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        names: Sequence[str] | None = None,
        expect_base_model: str | None = None,
        expect_modules: Sequence[ModuleSpec] | None = None,
    ):
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise AdapterFormatError("no adapter directories given")
        names = list(names) if names is not None else [os.path.basename(os.path.normpath(p)) for p in paths]
        if len(names) != len(paths):
            raise ValueError("names must have one entry per path")
        seen: dict[str, str] = {}
        for nm, p in zip(names, paths):
            if nm in seen:
                raise AdapterFormatError(f"two adapters are named {nm!r} ({seen[nm]} and {p}); names must be unique")
            seen[nm] = p
        self.adapters = [read_peft_adapter(p, nm) for p, nm in zip(paths, names)]
        bases = {a.base_model for a in self.adapters if a.base_model}
        if expect_base_model:
            bases.add(expect_base_model)
        if len(bases) > 1:
            who = {}
            for a in self.adapters:
                who.setdefault(a.base_model, a.path)
            detail = ", ".join(f"{b!r} ({who.get(b, 'the store')})" for b in sorted(bases))
            raise AdapterFormatError(f"adapters of different base models: {detail}")
        shapes: dict[str, tuple[int, int, str]] = {}
        if expect_modules is not None:
            for m in expect_modules:
                shapes[m.name] = (m.d_out, m.d_in, "the store")
        for a in self.adapters:
            for mod, e in a.modules.items():
                prev = shapes.setdefault(mod, (e.d_out, e.d_in, a.path))
                if prev[:2] != (e.d_out, e.d_in):
                    raise AdapterFormatError(
                        f"{a.path}: module {mod} is {e.d_out} x {e.d_in} but {prev[2]} has {prev[0]} x {prev[1]}"
                    )
        if expect_modules is not None:
            known = {m.name for m in expect_modules}
            extra = sorted({mod for a in self.adapters for mod in a.modules} - known, key=module_sort_key)
            if extra:
                raise AdapterFormatError(f"module {extra[0]} is not in the store (adapters target other modules)")
            mods = list(expect_modules)
        else:
            mods = [ModuleSpec(m, shapes[m][0], shapes[m][1]) for m in sorted(shapes, key=module_sort_key)]
        self._modules = mods
        base = next(iter(bases)) if bases else None
        self.metadata = {"base_model": base, "configs": {a.name: dict(a.config) for a in self.adapters}}


    @property
    def dtype(self) -> torch.dtype | None:
        """The factors' dtype when every adapter stores the same one (``None`` otherwise)."""
        names = {e.dtype for a in self.adapters for e in a.modules.values()}
        table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        return table.get(names.pop()) if len(names) == 1 else None
    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def modules(self) -> list[ModuleSpec]:
        return list(self._modules)

    def require_finite(self, modules: Sequence[ModuleSpec | str] | None = None) -> None:
        """Every adapter's factors on ``modules`` (default: all), read from disk once and refused when
        they hold NaN or an infinity (:class:`~jdlora_ops.NonFiniteError`)."""
        names = None if modules is None else [m.name if isinstance(m, ModuleSpec) else m for m in modules]
        for a in self.adapters:
            a.require_finite(names)

    def module_ranks(self, module: ModuleSpec) -> torch.Tensor:
        return torch.tensor([a.modules[module.name].rank if module.name in a.modules else 0
                             for a in self.adapters], dtype=torch.long)

    def load_module(self, module, *, dtype=torch.float32, device="cpu") -> ModuleFactors:
        spec = module if isinstance(module, ModuleSpec) else self.module(module)
        A, B, S = [], [], []
        for a in self.adapters:
            if spec.name in a.modules:
                ai, bi, s = a.load(spec.name)
                A.append(ai)
                B.append(bi)
                S.append(s)
            else:
                A.append(None)
                B.append(None)
                S.append(1.0)
        return ModuleFactors.from_factors(spec, A, B, S, dtype=dtype, device=device)


# ------------------------------------------------------------------ writing
def write_peft_adapter(
    out_dir: str | os.PathLike,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: dict,
    *,
    overwrite: bool = False,
) -> str:
    """Write a PEFT adapter directory atomically.

    ``factors``: module path -> ``(B [d_out, r], A [r, d_in])``; ``config``:
    the ``adapter_config.json`` content. The directory is assembled next to
    ``out_dir`` and renamed into place, so a reader never sees half of it.
    """
    from safetensors.torch import save_file

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir}: exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir}: exists and is not empty (pass overwrite to replace it)")
    with atomic_directory(out_dir) as tmp:
        tensors = {}
        for mod, (B, A) in factors.items():
            tensors[f"base_model.model.{mod}.lora_A.weight"] = A.detach().contiguous().cpu()
            tensors[f"base_model.model.{mod}.lora_B.weight"] = B.detach().contiguous().cpu()
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(os.path.join(tmp, ADAPTER_CONFIG), config, indent=2, sort_keys=True)
    return out_dir


_DROP_KEYS = (
    "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules",
    "modules_to_save", "target_parameters", "trainable_token_indices",
)


def compact_factors(B: torch.Tensor, A: torch.Tensor, rank: int, tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` re-factored at ``rank`` when ``B @ A`` has (numerically) that rank, else unchanged.

    A reconstruction at the store's rank ``r`` of an adapter of rank
    ``r_i < r`` is often exactly of rank ``r_i`` (a lossless store): then the
    export has the adapter's own rank and size. Exact singular values come
    from ``B = Q_b R_b``, ``A^T = Q_a R_a`` and the SVD of ``R_b R_a^T``
    (``r x r``); the tail must hold at most ``tol`` of the energy.
    """
    Qb, Rb = torch.linalg.qr(B.to(torch.float64))
    Qa, Ra = torch.linalg.qr(A.to(torch.float64).T)
    P, S, Qh = torch.linalg.svd(Rb @ Ra.T)
    energy = float(S.square().sum())
    if energy == 0 or float(S[rank:].square().sum()) > tol * energy:
        return B, A
    root = S[:rank].sqrt()
    return Qb @ (P[:, :rank] * root), (root[:, None] * Qh[:rank]) @ Qa.T


def export_peft_adapter(
    compressed: CompressedCollection,
    name: str,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> str:
    """Write adapter ``name`` of a compressed collection as a PEFT adapter directory.

    Every module the adapter had (per the collection's recorded ranks; all
    modules when unknown) gets rank-``r`` factors whose product is the
    reconstruction ``U_k Sigma V_k^T`` (see
    :meth:`CompressedCollection.lora_factors`), plus its residual's factors
    beside them for an adapter with a residual (rank ``r + k``: the sum that
    serving computes, as one adapter). The config is the adapter's
    original one with ``r = lora_alpha = r`` (scaling 1, the original scaling
    being inside ``Sigma``), ``use_rslora`` off, no rank/alpha patterns, and
    ``target_modules`` listing the exported module paths, so PEFT loads it onto
    the same base model.
    """
    factors = {}
    rank_pattern = {}
    own = compressed.individual.get(name)
    if own is not None and not own.is_residual:
        # Kept outside the joint tables (error or byte budget): its own truncated SVD or original factors.
        for mod, (A, B) in own.factors.items():
            factors[mod] = (B.to(dtype), A.to(dtype))
            rank_pattern[mod] = int(A.shape[0])
    else:
        i = compressed.index(name)
        ranks = compressed.metadata.get("ranks") or {}
        for mod, cm in compressed.modules.items():
            per = ranks.get(mod)
            if per is not None and i < len(per) and int(per[i]) == 0:
                continue
            B, A = compressed.lora_factors(name, mod)
            with_residual = own is not None and mod in own.factors
            if per is not None and i < len(per) and 0 < int(per[i]) < cm.rank and not with_residual:
                B, A = compact_factors(B, A, int(per[i]))
            factors[mod] = (B.to(dtype), A.to(dtype))
            rank_pattern[mod] = int(A.shape[0])
    if not factors:
        raise ValueError(f"adapter {name!r} has no modules to export")
    r = max(rank_pattern.values())
    config = dict((compressed.metadata.get("configs") or {}).get(name) or {})
    for k in _DROP_KEYS:
        config.pop(k, None)
    config.update(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": r,
            "use_rslora": False,
            "use_dora": False,
            "target_modules": sorted(factors, key=module_sort_key),
            "rank_pattern": {re.escape(m): k for m, k in rank_pattern.items() if k != r},
            "alpha_pattern": {re.escape(m): k for m, k in rank_pattern.items() if k != r},
            "base_model_name_or_path": compressed.metadata.get("base_model") or config.get("base_model_name_or_path"),
            "inference_mode": True,
        }
    )
    config.setdefault("bias", "none")
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("fan_in_fan_out", False)
    config.setdefault("task_type", None)
    config.setdefault("init_lora_weights", True)
    return write_peft_adapter(out_dir, factors, config, overwrite=overwrite)
