"""PEFT adapter directories: reading (any model family, per-module rank and alpha), refusing
pickles and bad input, and the PEFT -> store -> PEFT round trip checked by PEFT itself."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from jdlora_ops.compress import compress
from jdlora_ops.peft_io import AdapterFormatError, PeftCollection, export_peft_adapter, peft_scaling, read_peft_adapter
from jdlora_ops.store import load_store, save_store

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def make_adapter(path, *, model="llama", seed=0, base_name="tiny/llama", **lora_kwargs):
    """Save a PEFT adapter with random non-zero weights; returns its directory."""
    base = tiny_llama() if model == "llama" else tiny_gpt2()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
    if model == "gpt2":
        kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    kwargs.update(lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(path)
    cfg_path = os.path.join(path, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["base_model_name_or_path"] = base_name
    json.dump(cfg, open(cfg_path, "w"))
    return str(path)


def peft_deltas(path, model="llama"):
    """module path -> PEFT's own delta weight, in the [d_out, d_in] convention."""
    base = tiny_llama() if model == "llama" else tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, path)
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            key = name.replace("base_model.model.", "", 1)
            delta = mod.get_delta_weight("default").detach().to(F64)
            out[key] = delta.t() if mod.fan_in_fan_out else delta
    return out


def make_collection(tmp_path, n=4):
    dirs = []
    for i in range(n):
        kw = dict(r=[4, 6, 8, 6][i % 4], lora_alpha=[8, 16, 4, 12][i % 4])
        if i % 4 == 1:
            kw.update(rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3})
        if i % 4 == 2:
            kw.update(use_rslora=True)
        dirs.append(make_adapter(tmp_path / f"ad{i}", seed=i, **kw))
    return dirs


def test_reads_llama_adapters_with_patterns_and_rslora(tmp_path):
    dirs = make_collection(tmp_path)
    col = PeftCollection(dirs)
    assert col.adapter_names == ["ad0", "ad1", "ad2", "ad3"]
    names = [m.name for m in col.modules]
    assert names[:3] == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj",
                         "model.layers.0.self_attn.v_proj"]
    assert len(names) == 6 and names[-1] == "model.layers.1.self_attn.v_proj"
    k = col.module("model.layers.1.self_attn.k_proj")
    assert (k.d_out, k.d_in, k.layer, k.kind) == (32, 64, 1, "k_proj")
    ad1 = col.adapters[1].modules
    assert ad1["model.layers.0.self_attn.k_proj"].rank == 2
    assert ad1["model.layers.0.self_attn.k_proj"].scale == pytest.approx(16 / 2)
    assert ad1["model.layers.0.self_attn.v_proj"].scale == pytest.approx(3 / 6)
    assert col.adapters[2].modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(4 / 8**0.5)
    # Every module's dW = s * B @ A equals PEFT's own delta weight.
    for i, d in enumerate(dirs):
        deltas = peft_deltas(d)
        for spec in col.modules:
            f = col.load_module(spec, dtype=F64)
            assert torch.allclose(f.dense(i), deltas[spec.name], atol=1e-6), (d, spec.name)
    assert col.metadata["base_model"] == "tiny/llama"
    assert col.metadata["configs"]["ad1"]["rank_pattern"] == {"k_proj": 2}


def test_reads_another_model_family(tmp_path):
    d = make_adapter(tmp_path / "g", model="gpt2", base_name="tiny/gpt2")
    col = PeftCollection([d])
    assert [m.name for m in col.modules] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    m = col.modules[0]
    assert (m.d_out, m.d_in, m.layer, m.kind) == (96, 32, 0, "c_attn")
    deltas = peft_deltas(d, model="gpt2")
    assert torch.allclose(col.load_module(m, dtype=F64).dense(0), deltas[m.name], atol=1e-6)


def test_scaling_rules():
    cfg = {"lora_alpha": 16, "alpha_pattern": {"layers.1.self_attn.q_proj": 4}, "use_rslora": False}
    assert peft_scaling(cfg, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert peft_scaling(cfg, "model.layers.1.self_attn.q_proj", 8) == 0.5
    assert peft_scaling({"lora_alpha": 16, "use_rslora": True}, "x", 4) == 8.0


def test_refuses_pickle_without_unpickling(tmp_path, monkeypatch):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")

    def boom(*a, **k):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(AdapterFormatError, match="pickle"):
        read_peft_adapter(d)


@pytest.mark.parametrize("problem", ["missing_dir", "no_weights", "no_config", "bad_json", "corrupt_weights",
                                     "dora", "not_lora", "rank_mismatch", "half_pair", "embedding"])
def test_bad_adapter_directories(tmp_path, problem):
    from safetensors.torch import save_file

    d = tmp_path / "bad"
    if problem != "missing_dir":
        d.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    tensors = {"base_model.model.m.lora_A.weight": torch.randn(2, 5), "base_model.model.m.lora_B.weight": torch.randn(3, 2)}
    if problem == "dora":
        cfg["use_dora"] = True
    if problem == "not_lora":
        cfg["peft_type"] = "IA3"
    if problem == "rank_mismatch":
        cfg["r"] = 3
    if problem == "half_pair":
        del tensors["base_model.model.m.lora_B.weight"]
    if problem == "embedding":
        tensors["base_model.model.emb.lora_embedding_A"] = torch.randn(2, 5)
    if problem != "missing_dir":
        if problem != "no_config":
            (d / "adapter_config.json").write_text("{not json" if problem == "bad_json" else json.dumps(cfg))
        if problem == "corrupt_weights":
            (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
        elif problem != "no_weights":
            save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError) as info:
        read_peft_adapter(d)
    assert str(d) in str(info.value)


def test_collection_checks_base_model_shapes_and_names(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2, base_name="other/model")
    with pytest.raises(AdapterFormatError, match="different base models"):
        PeftCollection([a, b])
    g = make_adapter(tmp_path / "g", model="gpt2", base_name="tiny/llama")
    with pytest.raises(AdapterFormatError, match="not in the store"):
        PeftCollection([g], expect_modules=PeftCollection([a]).modules)
    os.makedirs(tmp_path / "x", exist_ok=True)
    c = make_adapter(tmp_path / "x" / "a", seed=3)
    with pytest.raises(AdapterFormatError, match="named 'a'"):
        PeftCollection([a, c])
    # Same module path, other shape: rewrite one tensor of a copy.
    from safetensors.torch import load_file, save_file

    import shutil

    shutil.copytree(a, tmp_path / "s")
    t = load_file(str(tmp_path / "s" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    t[key] = torch.randn(70, 4)
    save_file(t, str(tmp_path / "s" / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="70 x 64"):
        PeftCollection([a, str(tmp_path / "s")])


@pytest.mark.parametrize("method", ["full", "diag"])
def test_peft_store_peft_round_trip(tmp_path, method):
    dirs = make_collection(tmp_path)
    col = PeftCollection(dirs)
    # One cluster per adapter and r = 8 >= every adapter's rank: the compression is exact for
    # "full", so the exported adapter must reproduce the original PEFT deltas.
    res = compress(col, 8, num_clusters=4 if method == "full" else 2, method=method, dtype=F64, tol=1e-12,
                   max_iter=300)
    store = tmp_path / "store"
    save_store(store, res, dtype=torch.float32)
    back = load_store(store)
    for name in ("ad1", "ad2"):
        out = export_peft_adapter(back, name, tmp_path / f"export_{name}")
        cfg = json.load(open(os.path.join(out, "adapter_config.json")))
        # a lossless reconstruction is exported at the adapter's own rank, not the store's
        r_orig = max(back.metadata["ranks"][m][back.index(name)] for m in back.modules)
        assert cfg["r"] <= 8 and cfg["lora_alpha"] == cfg["r"] and not cfg["use_rslora"]
        if method == "full":
            assert cfg["r"] == r_orig
        assert cfg["base_model_name_or_path"] == "tiny/llama"
        deltas = peft_deltas(out)  # PEFT itself loads the exported directory
        assert set(deltas) == {m.name for m in col.modules}
        orig = peft_deltas(dirs[int(name[-1])])
        for mod, delta in deltas.items():
            rec = back.reconstruct(name, mod).to(F64)
            assert torch.allclose(delta, rec, atol=1e-5), mod
            if method == "full":
                assert torch.allclose(delta, orig[mod], atol=1e-5), mod
    # The exported adapter runs in a forward pass, and matches the merged reconstruction.
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "export_ad1"))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        y = pm(ids).logits
        for mod in back.modules:
            lin = base.get_submodule(mod)
            lin.weight += back.reconstruct("ad1", mod).to(lin.weight.dtype)
        y_ref = base(ids).logits
    assert torch.allclose(y, y_ref, atol=1e-4)


def test_export_skips_modules_the_adapter_never_had(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2, target_modules=["q_proj"])
    res = compress(PeftCollection([a, b]), 4, dtype=F64)
    out = export_peft_adapter(res, "b", tmp_path / "eb")
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    deltas = peft_deltas(out)
    assert set(deltas) == set(cfg["target_modules"])
    with pytest.raises(FileExistsError):
        export_peft_adapter(res, "b", tmp_path / "eb")
    export_peft_adapter(res, "b", tmp_path / "eb", overwrite=True, dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as fh:
        assert all(fh.get_tensor(k).dtype == torch.bfloat16 for k in fh.keys())


def test_synthetic_collections_write_peft_adapters_that_peft_loads(tmp_path):
    from jdlora_ops.synthetic import SyntheticCollection, SyntheticSpec, llama_like_modules, write_peft_adapters

    mods = llama_like_modules(2, 64, 32)
    syn = SyntheticCollection(SyntheticSpec(5, mods, ranks=(2, 4), num_families=2, num_seeds=2, seed=4,
                                            base_model="tiny/llama"))
    paths = write_peft_adapters(syn, tmp_path / "syn", chunk=2)
    assert [os.path.basename(p) for p in paths] == syn.adapter_names
    col = PeftCollection(paths)
    assert sorted(m.name for m in col.modules) == sorted(m.name for m in mods)
    for spec in mods:
        a = col.load_module(spec, dtype=F64)
        b = syn.load_module(spec, dtype=F64)
        for i in range(5):
            assert torch.allclose(a.dense(i), b.dense(i), rtol=1e-5, atol=1e-6)
    deltas = peft_deltas(paths[3])
    for spec in mods:
        assert torch.allclose(deltas[spec.name], syn.load_module(spec, dtype=F64).dense(3), rtol=1e-4, atol=1e-6)
