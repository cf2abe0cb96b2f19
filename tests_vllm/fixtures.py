"""Offline fixtures for the vLLM tests and benchmark: a tiny random Llama, its
tokenizer and a collection of PEFT adapters in planted clusters.

Nothing is downloaded: the tokenizer is a word-level one built from a fixed
word list, the model has random weights (seeded), the adapters are random
factors whose column/row spaces are shared within a cluster.
"""

from __future__ import annotations

import json
import os

import torch

WORDS = ("the a of to and in is it that was for on are with as his they be at one have this from or had by hot "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three "
         "want air well also play small end put home read hand port large spell add even land here must big high "
         "such follow act why ask men change went light kind off need house picture try us again animal point "
         "mother world near build self earth father").split()

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_model(out: str, *, hidden: int = 128, layers: int = 2, heads: int = 2, kv_heads: int = 1,
               intermediate: int = 256, seed: int = 0) -> str:
    """A random-weight Llama and a word-level tokenizer in ``out`` (float32, safetensors)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(out, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


def config_only_model(out, *, layers: int = 1, hidden: int = 16, intermediate: int = 24) -> str:
    """A folder with only a Llama-like ``config.json``: enough for :func:`make_adapters` (no weights)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump({"hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "num_hidden_layers": layers}, fh)
    return str(out)


def module_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    """Projection name -> (d_out, d_in) of the fixture model."""
    with open(os.path.join(model_dir, "config.json")) as fh:
        c = json.load(fh)
    h, m = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}


def make_adapters(model_dir: str, out: str, *, n: int, clusters: int, rank: int = 4, alpha: int = 8,
                  targets=PROJ, seed: int = 0, scale: float = 0.6, dtype: torch.dtype = torch.float32) -> list[str]:
    """``n`` PEFT LoRA adapters (``adapter_<i>``) in ``clusters`` planted clusters; returns their folders.

    Adapter ``i`` of cluster ``k`` has ``B = P_k X_i``, ``A = Y_i Q_k^T`` with
    cluster bases ``P_k``, ``Q_k`` of width ``rank + 2``, so a cluster's updates
    share subspaces but are not identical. ``dtype`` is the dtype of the
    written factors (adapters are often shipped in half precision).
    """
    from jdlora_ops.peft_io import write_peft_adapter

    with open(os.path.join(model_dir, "config.json")) as fh:
        layers = json.load(fh)["num_hidden_layers"]
    shapes = module_shapes(model_dir)
    g = torch.Generator().manual_seed(seed)
    w = rank + 2
    bases = {(k, l, p): (torch.linalg.qr(torch.randn(shapes[p][0], w, generator=g))[0],
                         torch.linalg.qr(torch.randn(shapes[p][1], w, generator=g))[0])
             for k in range(clusters) for l in range(layers) for p in targets}
    paths = []
    for i in range(n):
        k = i % clusters
        factors = {}
        for l in range(layers):
            for p in targets:
                P, Q = bases[(k, l, p)]
                B = P @ torch.randn(w, rank, generator=g) * scale
                A = torch.randn(rank, w, generator=g) @ Q.T * scale
                sub = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                factors[f"model.layers.{l}.{sub}.{p}"] = (B.to(dtype).contiguous(), A.to(dtype).contiguous())
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
                  "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
                  "base_model_name_or_path": os.path.abspath(model_dir), "fan_in_fan_out": False,
                  "use_rslora": False, "modules_to_save": None}
        paths.append(write_peft_adapter(os.path.join(out, f"adapter_{i}"), factors, config))
    return paths
