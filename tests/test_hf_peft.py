"""Hugging Face integration against PEFT's own mixed-batch inference (PEFT is the oracle).

A small Llama-architecture model with random weights (built from a config;
nothing is downloaded) gets several LoRA adapters through PEFT. The adapters
are saved as PEFT directories, read back with :mod:`jdlora_ops.peft_io`,
compressed, and served by :func:`jdlora_ops.serving.wrap_model` on a copy of
the base model, every sequence of a batch with its own adapter (or none), and
compared with ``peft_model(input_ids, adapter_names=[...])``.
"""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jdlora_ops.compress import compress  # noqa: E402
from jdlora_ops.peft_io import PeftCollection  # noqa: E402
from jdlora_ops.serving import AdapterCache, wrap_model  # noqa: E402
from serving_data import one_thread  # noqa: E402,F401  (autouse fixture)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
NAMES = [f"task{i}" for i in range(6)]
RANKS = [2, 4, 2, 4, 2, 4]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base model copy, PEFT model with 6 adapters + 'fresh', adapter directory root)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    base = transformers.LlamaForCausalLM(cfg).eval()
    base.config.name_or_path = "tiny/llama"
    ours = copy.deepcopy(base)
    pm = None
    for n, r in zip(NAMES + ["fresh"], RANKS + [3]):
        targets = TARGETS if n != "fresh" else ["q_proj", "v_proj"]
        # init_lora_weights=False: random A and B, so every adapter changes the output.
        lc = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets, init_lora_weights=False)
        if pm is None:
            pm = peft.get_peft_model(base, lc, adapter_name=n)
        else:
            pm.add_adapter(n, lc)
    pm.eval()
    root = tmp_path_factory.mktemp("adapters")
    pm.save_pretrained(str(root), selected_adapters=NAMES + ["fresh"], save_embedding_layers=False)
    return ours, pm, root


def peft_logits(pm, ids, adapters, **kw):
    with torch.no_grad():
        return pm(input_ids=ids, adapter_names=[a or "__base__" for a in adapters], **kw)


def served_cache(root, rank, clusters=2):
    col = PeftCollection([os.path.join(root, n) for n in NAMES])
    c = compress(col, rank, num_clusters=clusters, dtype=torch.float64)
    cache = AdapterCache(c, dtype=torch.float32, device="cpu", max_uncompressed=2, uncompressed_rank=4)
    cache.register_peft(os.path.join(root, "fresh"))
    return c, cache


def test_lossless_matches_peft_mixed_batch(setup):
    ours, pm, root = setup
    c, cache = served_cache(root, rank=sum(RANKS))  # every cluster's span fits: lossless
    assert c.summary()["max_rel_error"] < 1e-10
    served = wrap_model(ours, cache)
    try:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 97, (6, 9), generator=gen)
        adapters = ["task0", "task3", None, "fresh", "task5", "task0"]
        got = served(ids, adapters).logits
        ref = peft_logits(pm, ids, adapters).logits
        with torch.no_grad(), pm.disable_adapter():
            base = pm(input_ids=ids).logits
        effect = (ref - base).abs().amax(dim=(1, 2))
        assert float(effect[2]) == 0.0 and float(effect.min()) == 0.0
        assert float(effect[[0, 1, 3, 4, 5]].min()) > 1e-2  # each adapter really changes its row
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
        # The same adapters in another order and batch composition.
        adapters2 = ["fresh", "task1", "task2", "task4", "task4", None]
        torch.testing.assert_close(served(ids, adapters2).logits, peft_logits(pm, ids, adapters2).logits,
                                   atol=2e-5, rtol=2e-5)
    finally:
        served.unwrap()


def test_cores_with_full_residuals_match_peft(setup):
    """A rank-2 joint fit misses most of these adapters; residuals wide enough to hold what it misses make
    the sum of both paths, on the same tokens, the adapters themselves."""
    from jdlora_ops.compress.residual import residual_adapters

    ours, pm, root = setup
    col = PeftCollection([os.path.join(root, n) for n in NAMES])
    c = compress(col, 2, num_clusters=2, dtype=torch.float64)
    assert c.summary()["max_rel_error"] > 0.1
    c.individual.update(residual_adapters(c, col, NAMES, torch.full((len(NAMES),), 6), dtype=torch.float64))
    assert c.summary()["max_rel_error"] < 1e-10
    cache = AdapterCache(c, dtype=torch.float32, device="cpu", max_uncompressed=len(NAMES) + 1, uncompressed_rank=6)
    cache.register_peft(os.path.join(root, "fresh"))
    served = wrap_model(ours, cache)
    try:
        ids = torch.randint(0, 97, (6, 9), generator=torch.Generator().manual_seed(3))
        adapters = ["task1", "fresh", None, "task1", "task4", "task2"]
        torch.testing.assert_close(served(ids, adapters).logits, peft_logits(pm, ids, adapters).logits,
                                   atol=2e-5, rtol=2e-5)
    finally:
        served.unwrap()


def test_kv_cache_decode_matches_peft(setup):
    ours, pm, root = setup
    _, cache = served_cache(root, rank=sum(RANKS))
    served = wrap_model(ours, cache)
    try:
        gen = torch.Generator().manual_seed(2)
        prompt = torch.randint(0, 97, (4, 5), generator=gen)
        steps = torch.randint(0, 97, (4, 3), generator=gen)
        adapters = ["task1", "fresh", None, "task4"]
        # Newer transformers name the KV cache argument and output field "cache".
        kv_name = "cache" if "cache" in inspect.signature(ours.forward).parameters else "past_key_values"
        out = served(prompt, adapters, use_cache=True)
        ref = peft_logits(pm, prompt, adapters, use_cache=True)
        kv, kv_ref = getattr(out, kv_name), getattr(ref, kv_name)
        for j in range(steps.shape[1]):
            out = served(steps[:, j : j + 1], adapters, use_cache=True, **{kv_name: kv})
            ref = peft_logits(pm, steps[:, j : j + 1], adapters, use_cache=True, **{kv_name: kv_ref})
            kv, kv_ref = getattr(out, kv_name), getattr(ref, kv_name)
            torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=2e-5)
    finally:
        served.unwrap()


def test_lossy_output_error_next_to_reconstruction_error(setup, record_property):
    """Lossy compression: output error (adapter effect on the logits) against the reconstruction error."""
    ours, pm, root = setup
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (6, 8), generator=gen)
    adapters = NAMES
    ref = peft_logits(pm, ids, adapters).logits.double()
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids).logits.double()
    report = []
    for rank in (2, 6):
        c, cache = served_cache(root, rank=rank)
        served = wrap_model(ours, cache)
        try:
            got = served(ids, adapters).logits.double()
        finally:
            served.unwrap()
        out_err = float((got - ref).norm() / (ref - base).norm())
        report.append((rank, c.summary()["mean_rel_error"], out_err))
    record_property("lossy_report", report)
    print("\nrank, mean reconstruction error (rel. squared), output error (rel. to the adapters' effect):")
    for row in report:
        print("  %d  %.4f  %.4f" % row)
    (r2, rec2, out2), (r6, rec6, out6) = report
    assert 0.05 < rec2 < 1 and 0 < rec6 < rec2, report
    assert 0.01 < out2 < 2 and out6 < out2, report


# --------------------------------------------------------------- autocast and mixed dtypes
def _build(kind: str, tmp_path_factory):
    """(our copy of the base model, PEFT model with 3 adapters, adapter root, target modules) for a model kind."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        base, targets = transformers.LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "o_proj"]
    elif kind == "bert":  # an encoder with query/key/value
        cfg = transformers.BertConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
        base, targets = transformers.BertModel(cfg), ["query", "key", "value"]
    else:  # fused q/k/v in one Linear
        cfg = transformers.Phi3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0)
        base, targets = transformers.Phi3ForCausalLM(cfg), ["qkv_proj", "o_proj", "gate_up_proj"]
    base = base.eval()
    ours = copy.deepcopy(base)
    pm = None
    for n, r in zip(NAMES[:3], (2, 4, 3)):
        lc = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets, init_lora_weights=False)
        pm = peft.get_peft_model(base, lc, adapter_name=n) if pm is None else (pm.add_adapter(n, lc) or pm)
    pm.eval()
    root = tmp_path_factory.mktemp(f"adapters_{kind}")
    pm.save_pretrained(str(root), selected_adapters=NAMES[:3], save_embedding_layers=False)
    return ours, pm, root


def _output(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "bert", "phi3"])
@pytest.mark.parametrize("mode", ["autocast_bf16", "bf16_tables"])
def test_mixed_dtypes_match_peft(kind, mode, tmp_path_factory):
    """Under CPU bf16 autocast (base layers in bf16, hidden states in fp32), and with bf16 tables serving an
    fp32 model, the served outputs match PEFT's under the same conditions to within bf16 rounding of the
    adapters' effect."""
    ours, pm, root = _build(kind, tmp_path_factory)
    col = PeftCollection([os.path.join(root, n) for n in NAMES[:3]])
    c = compress(col, 9, num_clusters=1, dtype=torch.float64)  # lossless: ranks 2 + 4 + 3
    assert c.summary()["max_rel_error"] < 1e-10
    tables = torch.bfloat16 if mode == "bf16_tables" else torch.float32
    cache = AdapterCache(c, dtype=tables, device="cpu")
    served = wrap_model(ours, cache)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 97, (3, 7), generator=gen)
    adapters = ["task1", None, "task2"]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast_bf16" else torch.autocast("cpu",
                                                                                                     enabled=False)
    try:
        with ctx:
            got = _output(served(ids, adapters)).float()
            ref = _output(peft_logits(pm, ids, adapters)).float()
            with torch.no_grad(), pm.disable_adapter():
                base = _output(pm(input_ids=ids)).float()
    finally:
        served.unwrap()
    effect = (ref - base).norm(dim=(1, 2))
    assert float(effect[1]) == 0.0 and float(effect[[0, 2]].min()) > 0
    # rows with an adapter: error small next to the adapter's effect; the base row is PEFT's base row
    err = (got - ref).norm(dim=(1, 2))
    assert float((err[[0, 2]] / effect[[0, 2]]).max()) < 0.05, (err, effect)
    assert float(err[1]) <= 0.05 * float(ref[1].norm())
