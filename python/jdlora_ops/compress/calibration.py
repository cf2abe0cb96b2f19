"""Calibration statistics: the input second moment of each adapted module of the base model.

All adapters of a collection share one base model, so each module ``m`` has one
input distribution, and what an adapter does there is ``dW x`` for those
inputs. ``C_m = E[x x^T]`` (``d_in x d_in``, from the base model run on
calibration text) is what activation-aware compression weights the error
with: ``||(dW - recon) C^(1/2)||_F^2 = E ||(dW - recon) x||^2``.

:func:`calibrate` runs a transformers model (loaded from a local folder,
nothing downloaded) over text in batches and accumulates ``sum x x^T`` in
float64 per module through forward hooks on the modules' inputs, counting
only real tokens (padding is masked out). Memory: one ``d_in x d_in`` matrix
per module; activations are never stored.

A stats file is ``STATS/`` with ``second_moments.safetensors`` (one float64
``[d_in, d_in]`` tensor per module) and ``manifest.json`` (format
``jdlora-calibration``: model, modules with ``d_in``, token count, texts),
written atomically (assembled in a temporary sibling, renamed into place).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

__all__ = ["CalibrationStats", "CalibrationError", "calibrate", "save_stats", "load_stats", "adapter_modules",
           "read_texts", "FORMAT"]

FORMAT = "jdlora-calibration"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "second_moments.safetensors"


class CalibrationError(ValueError):
    """Calibration input or stats that cannot be used (message names the path or argument and the problem)."""


@dataclass
class CalibrationStats:
    """``second_moments[m]``: float64 ``E[x x^T]`` ``[d_in, d_in]`` of module ``m``'s inputs."""

    model: str
    second_moments: dict[str, torch.Tensor]
    token_count: int
    metadata: dict = field(default_factory=dict)

    def check_modules(self, shapes: dict[str, int], *, where: str = "calibration stats") -> None:
        """Raise :class:`CalibrationError` unless every module of ``shapes`` (name -> d_in) has stats of that width."""
        missing = [m for m in shapes if m not in self.second_moments]
        if missing:
            raise CalibrationError(
                f"{where}: no second moment for {len(missing)} module(s), e.g. {missing[:3]} (stats for another "
                f"model, or calibrated on other modules; stats hold {sorted(self.second_moments)[:3]}...)"
            )
        for m, d in shapes.items():
            got = tuple(self.second_moments[m].shape)
            if got != (d, d):
                raise CalibrationError(f"{where}: module {m} has d_in = {d} but its second moment is {list(got)} "
                                       f"(stats for another base model?)")


def adapter_modules(adapter_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Every module any of these PEFT adapters targets (sorted in model order)."""
    from ..peft_io import read_peft_adapter
    from .collection import module_sort_key

    names: set[str] = set()
    for d in adapter_dirs:
        names.update(read_peft_adapter(d).modules)
    return sorted(names, key=module_sort_key)


def read_texts(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Non-empty paragraphs (blank-line separated) of the given UTF-8 text files."""
    out: list[str] = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"--text {p}: cannot read it as UTF-8 text ({exc})") from exc
        out.extend(par.strip() for par in text.split("\n\n") if par.strip())
    if not out:
        raise CalibrationError(f"--text: no text in {[os.fspath(p) for p in paths]}")
    return out


def _load_model(model_dir: str, dtype: torch.dtype, device: str):
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a test dependency
        raise CalibrationError("calibration needs transformers (pip install transformers)") from exc
    if not os.path.isdir(model_dir):
        raise CalibrationError(f"MODEL_DIR {model_dir}: not a directory")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
        model = cls.from_pretrained(model_dir, local_files_only=True, torch_dtype=dtype)
    except Exception as exc:  # transformers raises many types for a folder it cannot load
        raise CalibrationError(f"MODEL_DIR {model_dir}: the model does not load with transformers "
                               f"({type(exc).__name__}: {exc})") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model.to(device).eval(), tok


def _find_module(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    # PEFT names modules relative to the model it wrapped; AutoModel may be the
    # inner model, so a leading "model." may have to go.
    for cand in (name, name.split(".", 1)[1] if "." in name else name):
        try:
            mod = model.get_submodule(cand)
        except AttributeError:
            continue
        if isinstance(mod, torch.nn.Linear):
            return mod
        raise CalibrationError(f"module {name} is a {type(mod).__name__} in the model, not a Linear")
    raise CalibrationError(f"the model has no module {name!r} (adapters for another architecture?)")


def calibrate(
    model_dir: str | os.PathLike,
    texts: Iterable[str],
    modules: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress: bool = True,
) -> CalibrationStats:
    """Accumulate ``E[x x^T]`` of each module's inputs over ``texts`` (see the module docstring)."""
    model_dir = os.path.abspath(os.fspath(model_dir))
    texts = list(texts)
    if batch_size < 1 or max_length < 1:
        raise CalibrationError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    if not modules:
        raise CalibrationError("modules: no module to calibrate")
    if not texts:
        raise CalibrationError("texts: no calibration text")
    model, tok = _load_model(model_dir, dtype, device)
    linears = {m: _find_module(model, m) for m in modules}
    sums = {m: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64, device=device)
            for m, lin in linears.items()}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, inputs):
            x = inputs[0]
            keep = mask_holder["mask"].reshape(-1).bool()
            x = x.reshape(-1, x.shape[-1])[keep].to(torch.float64)
            sums[name].addmm_(x.T, x)
        return fn

    handles = [lin.register_forward_pre_hook(hook(m)) for m, lin in linears.items()]
    tokens = 0
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="calibrate", unit="batch")
    try:
        with torch.no_grad():
            for part in it:
                enc = tok(part, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
                enc = {k: v.to(device) for k, v in enc.items()}
                mask_holder["mask"] = enc["attention_mask"]
                model(**enc)
                tokens += int(enc["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise CalibrationError("texts: tokenised to no tokens")
    moments = {}
    for m, s in sums.items():
        c = s / tokens
        moments[m] = ((c + c.T) / 2).cpu()
    return CalibrationStats(model=model_dir, second_moments=moments, token_count=tokens,
                            metadata={"texts": len(texts), "max_length": max_length, "dtype": str(dtype)})


def save_stats(stats: CalibrationStats, out: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``stats`` as a stats directory (atomically); returns its path."""
    from safetensors.torch import save_file

    from .._files import atomic_directory, write_json

    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out}: exists (pass overwrite to replace it)")
    _check_moments(stats.second_moments, out)
    with atomic_directory(out) as tmp:
        save_file({m: c.contiguous().to(torch.float64) for m, c in stats.second_moments.items()},
                  os.path.join(tmp, TENSORS), metadata={"format": FORMAT})
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": stats.model,
            "token_count": int(stats.token_count),
            "modules": [{"name": m, "d_in": int(c.shape[0])} for m, c in stats.second_moments.items()],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **{k: v for k, v in stats.metadata.items() if k not in ("format", "modules")},
        }
        write_json(os.path.join(tmp, MANIFEST), manifest, indent=2)
    return out


def _check_moments(moments: dict[str, torch.Tensor], where: str) -> None:
    for m, c in moments.items():
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise CalibrationError(f"{where}: second moment of {m} is {list(c.shape)}, not a square matrix")
        if not bool(torch.isfinite(c).all()):
            raise CalibrationError(f"{where}: second moment of {m} holds NaN or infinite values")
        c64 = c.to(torch.float64)
        asym = float((c64 - c64.T).abs().max()) if c.numel() else 0.0
        if asym > 1e-9 * max(float(c64.abs().max()), 1e-300):
            raise CalibrationError(f"{where}: second moment of {m} is not symmetric (max |C - C^T| = {asym:.3g})")


def load_stats(path: str | os.PathLike) -> CalibrationStats:
    """Read a stats directory, checking its format, shapes, finiteness and symmetry."""
    from safetensors import safe_open

    path = os.path.abspath(os.fspath(path))
    mpath = os.path.join(path, MANIFEST)
    from .._files import read_json_object

    man = read_json_object(mpath, CalibrationError, "calibration stats")
    if man.get("format") != FORMAT:
        raise CalibrationError(f"--calibration {path}: not a calibration stats directory (format {FORMAT!r} expected)")
    if int(man.get("format_version", 0)) > FORMAT_VERSION:
        raise CalibrationError(f"--calibration {path}: format version {man.get('format_version')} is newer than "
                               f"this jdlora_ops reads ({FORMAT_VERSION})")
    moments = {}
    try:
        with safe_open(os.path.join(path, TENSORS), framework="pt") as fh:
            for entry in man["modules"]:
                c = fh.get_tensor(entry["name"])
                if tuple(c.shape) != (int(entry["d_in"]),) * 2:
                    raise CalibrationError(f"--calibration {path}: {entry['name']} is {list(c.shape)}, the manifest "
                                           f"says d_in = {entry['d_in']}")
                moments[entry["name"]] = c.to(torch.float64)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"--calibration {path}: cannot read {TENSORS} ({exc})") from exc
    _check_moments(moments, f"--calibration {path}")
    meta = {k: v for k, v in man.items() if k not in ("format", "format_version", "model", "token_count", "modules")}
    return CalibrationStats(model=str(man.get("model")), second_moments=moments,
                            token_count=int(man.get("token_count", 0)), metadata=meta)


def whitening(C: torch.Tensor, damping: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S_inv)`` with ``S = (C + lambda I)^(1/2)``, ``lambda = damping * trace(C) / d`` (float64).

    The damping keeps directions the calibration text never excites from
    being ignored entirely (and ``S`` invertible): relative to the average
    input energy per dimension, ``damping`` is the weight such a direction
    still gets.
    """
    if not damping > 0:
        raise CalibrationError(f"damping must be > 0, got {damping}")
    C = C.to(torch.float64)
    d = C.shape[0]
    lam = damping * float(torch.trace(C)) / d if d else 0.0
    lam = lam if lam > 0 else damping
    w, Q = torch.linalg.eigh(C + lam * torch.eye(d, dtype=torch.float64, device=C.device))
    w = w.clamp_min(lam * 1e-3)
    return (Q * w.sqrt()) @ Q.T, (Q * w.rsqrt()) @ Q.T
