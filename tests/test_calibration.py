"""Calibration statistics (jdlora calibrate, jdlora_ops.compress.calibration)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from jdlora_ops.cli import main as cli
from jdlora_ops.compress.calibration import CalibrationError, load_stats, save_stats, whitening

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests_vllm"))
import fixtures  # noqa: E402

PARAGRAPHS = ["the man said to his mother that water is good", "one day the boy will go home",
              "each year the people find a new way to live and work in the world",
              "my father made a house", "there was a little animal near the water",
              "what did the old man say about the land here"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    model = fixtures.make_model(str(root / "model"), hidden=64, intermediate=96, heads=2, kv_heads=1)
    adapters = fixtures.make_adapters(model, str(root / "adapters"), n=2, clusters=1, targets=("q_proj", "v_proj"))
    text = root / "calib.txt"
    text.write_text("\n\n".join(PARAGRAPHS) + "\n")
    return {"root": root, "model": model, "adapters": adapters, "text": str(text)}


def _oracle_q_input_moment(model_dir: str, layer: int) -> tuple[torch.Tensor, int]:
    """E[x x^T] of layer ``layer``'s q_proj input, one text at a time (no padding), float64."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    total = torch.zeros(64, 64, dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for p in PARAGRAPHS:
            enc = tok([p], return_tensors="pt")
            hs = model(**enc, output_hidden_states=True).hidden_states[layer]
            x = model.model.layers[layer].input_layernorm(hs)[0].double()
            total += x.T @ x
            n += x.shape[0]
    return total / n, n


def test_cli_calibrate_matches_the_direct_computation(world, one_thread):
    out = str(world["root"] / "stats")
    assert cli(["calibrate", world["model"], "--text", world["text"], "--adapters", *world["adapters"],
                "--out", out, "--batch-size", "4", "-q"]) == 0
    stats = load_stats(out)
    assert sorted(stats.second_moments) == sorted(
        f"model.layers.{l}.self_attn.{p}" for l in range(2) for p in ("q_proj", "v_proj"))
    for layer in range(2):
        want, n = _oracle_q_input_moment(world["model"], layer)
        got = stats.second_moments[f"model.layers.{layer}.self_attn.q_proj"]
        assert stats.token_count == n  # padding of the batches of 4 is not counted
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
        # q_proj and v_proj read the same input
        torch.testing.assert_close(got, stats.second_moments[f"model.layers.{layer}.self_attn.v_proj"])
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert manifest["format"] == "jdlora-calibration" and manifest["token_count"] == stats.token_count


def test_whitening_factors(world):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 12, generator=g, dtype=torch.float64)
    X[:, 5:] = 0  # inputs confined to a subspace: C is singular, the damping makes S invertible
    C = X.T @ X / 50
    S, S_inv = whitening(C, damping=1e-2)
    lam = 1e-2 * float(torch.trace(C)) / 12
    torch.testing.assert_close(S @ S, C + lam * torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(S @ S_inv, torch.eye(12, dtype=torch.float64))
    with pytest.raises(CalibrationError, match="damping must be > 0"):
        whitening(C, damping=0)


def test_bad_inputs_are_clear_errors_and_write_nothing(world, tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    out = tmp_path / "stats"
    assert cli(["calibrate", str(empty), "--text", world["text"], "--modules", "model.layers.0.self_attn.q_proj",
                "--out", str(out), "-q"]) == 2
    assert "the model does not load with transformers" in capsys.readouterr().err
    assert not out.exists()
    assert cli(["calibrate", world["model"], "--text", str(tmp_path / "missing.txt"), "--modules",
                "model.layers.0.self_attn.q_proj", "--out", str(out), "-q"]) == 2
    assert "cannot read it as UTF-8 text" in capsys.readouterr().err
    assert cli(["calibrate", world["model"], "--text", world["text"], "--modules", "model.layers.0.mlp.nope",
                "--out", str(out), "-q"]) == 2
    assert "the model has no module 'model.layers.0.mlp.nope'" in capsys.readouterr().err
    assert not out.exists()


def test_stats_checks(world, tmp_path):
    from jdlora_ops.compress.calibration import CalibrationStats

    good = CalibrationStats("m", {"a": torch.eye(3, dtype=torch.float64)}, 10)
    path = save_stats(good, tmp_path / "s")
    with pytest.raises(CalibrationError, match=r"module a has d_in = 4 but its second moment is \[3, 3\]"):
        load_stats(path).check_modules({"a": 4})
    with pytest.raises(CalibrationError, match="no second moment for 1 module"):
        load_stats(path).check_modules({"b": 3})
    asym = torch.eye(3, dtype=torch.float64)
    asym[0, 1] = 1.0
    with pytest.raises(CalibrationError, match="is not symmetric"):
        save_stats(CalibrationStats("m", {"a": asym}, 10), tmp_path / "t")
    assert not (tmp_path / "t").exists()
    nan = torch.eye(3, dtype=torch.float64)
    nan[1, 1] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        save_stats(CalibrationStats("m", {"a": nan}, 10), tmp_path / "u")
    # a file tampered with after writing is refused on load
    from safetensors.torch import save_file

    save_file({"a": asym}, os.path.join(path, "second_moments.safetensors"))
    with pytest.raises(CalibrationError, match="is not symmetric"):
        load_stats(path)


def test_cli_activation_aware_compress_inspect_export(world, tmp_path, capsys, one_thread):
    from jdlora_ops.peft_io import read_peft_adapter
    from jdlora_ops.store import load_store

    stats = str(tmp_path / "stats")
    assert cli(["calibrate", world["model"], "--text", world["text"], "--adapters", *world["adapters"],
                "--out", stats, "-q"]) == 0
    store = str(tmp_path / "store")
    assert cli(["compress", *world["adapters"], "--rank", "2", "--calibration", stats, "--out", store, "-q",
                "--compute-dtype", "float64", "--store-dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "activation-weighted relative squared error mean" in out
    assert cli(["inspect", store]) == 0
    out = capsys.readouterr().out
    assert "activation-weighted mean" in out and "act. err" in out
    assert cli(["inspect", store, "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["calibration"]["stats"] == stats and all("activation_weighted_mean_error" in a for a in js["adapters"])
    # the exported PEFT adapter is the store's (un-whitened) reconstruction
    c = load_store(store)
    exp = str(tmp_path / "exp")
    assert cli(["export", store, "adapter_1", "--out", exp, "--dtype", "float64"]) == 0
    peft = read_peft_adapter(exp)
    i = c.adapter_names.index("adapter_1")
    for name, cm in c.modules.items():
        A, B, scale = peft.load(name)
        k = int(c.assignment[i])
        want = cm.U[k].double() @ cm.core(i).double() @ cm.Vt[k].double()
        torch.testing.assert_close(scale * B.double() @ A.double(), want, rtol=1e-9, atol=1e-12)


def test_cli_calibration_bad_inputs(world, tmp_path, capsys):
    stats = str(tmp_path / "stats_q")
    assert cli(["calibrate", world["model"], "--text", world["text"], "--modules",
                "model.layers.0.self_attn.q_proj", "--out", stats, "-q"]) == 0
    store = tmp_path / "store"
    assert cli(["compress", *world["adapters"], "--rank", "2", "--calibration", stats, "--out", str(store), "-q"]) == 2
    assert "no second moment for 3 module(s)" in capsys.readouterr().err
    assert cli(["compress", *world["adapters"], "--rank", "2", "--damping", "0.1", "--out", str(store), "-q"]) == 2
    assert "--damping needs --calibration" in capsys.readouterr().err
    assert not store.exists()


def test_cli_add_projects_in_the_activation_weighted_metric(world, tmp_path, capsys, one_thread):
    from jdlora_ops.peft_io import read_peft_adapter
    from jdlora_ops.store import load_store

    stats = str(tmp_path / "stats")
    assert cli(["calibrate", world["model"], "--text", world["text"], "--adapters", *world["adapters"],
                "--out", stats, "-q"]) == 0
    store = str(tmp_path / "store")
    assert cli(["compress", world["adapters"][0], "--rank", "3", "--calibration", stats, "--out", store, "-q",
                "--compute-dtype", "float64", "--store-dtype", "float64", "--damping", "0.05"]) == 0
    capsys.readouterr()
    assert cli(["add", store, world["adapters"][1], "-q"]) == 0  # stats found through the store's metadata
    assert "added adapter_1: cluster 0" in capsys.readouterr().out
    c = load_store(store)
    i = c.adapter_names.index("adapter_1")
    from jdlora_ops.compress.calibration import load_stats, whitening

    st = load_stats(stats)
    peft = read_peft_adapter(world["adapters"][1])
    for name, cm in c.modules.items():
        A, B, scale = peft.load(name)
        dW = scale * B.double() @ A.double()
        S, _ = whitening(st.second_moments[name], 0.05)
        want = cm.U[0].double().T @ dW @ (S @ S) @ cm.Vt[0].double().T  # Sigma = U^T dW S V_w, V_w^T = V^T S
        torch.testing.assert_close(cm.core(i).double(), want, rtol=1e-8, atol=1e-10)
    aw = c.metadata["activation_weighted_rel_errors"]
    assert all(len(v) == 2 for v in aw.values())
    assert cli(["add", store, world["adapters"][1], "--calibration", str(tmp_path / "nope"), "-q"]) == 2


def test_cli_calibrate_bert_encoder_with_peft_adapter(tmp_path, one_thread):
    """An encoder (BertModel, PEFT module names ``encoder.layer.L.attention.self.query``): the moments are the
    inputs of each layer's query/key/value (the previous layer's output), padding excluded."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel, BertTokenizerFast

    model_dir, adapter_dir = str(tmp_path / "bert"), str(tmp_path / "adapter")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(" ".join(PARAGRAPHS).split()))]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab.read_text().split()), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(model_dir, safe_serialization=True)
    peft_model = get_peft_model(BertModel.from_pretrained(model_dir),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key", "value"]))
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(PARAGRAPHS) + "\n")
    out = str(tmp_path / "stats")
    assert cli(["calibrate", model_dir, "--text", str(text), "--adapters", adapter_dir, "--out", out,
                "--batch-size", "4", "-q"]) == 0
    stats = load_stats(out)
    names = [f"encoder.layer.{l}.attention.self.{p}" for l in range(2) for p in ("query", "key", "value")]
    assert sorted(stats.second_moments) == sorted(names)
    tok, model = BertTokenizerFast.from_pretrained(model_dir), BertModel.from_pretrained(model_dir).eval()
    for layer in range(2):
        total, n = torch.zeros(32, 32, dtype=torch.float64), 0
        with torch.no_grad():
            for p in PARAGRAPHS:  # one text at a time: no padding
                x = model(**tok([p], return_tensors="pt"), output_hidden_states=True).hidden_states[layer][0].double()
                total += x.T @ x
                n += x.shape[0]
        assert stats.token_count == n
        for p in ("query", "key", "value"):
            got = stats.second_moments[f"encoder.layer.{layer}.attention.self.{p}"]
            assert float((got - total / n).abs().max()) < 1e-5 * float(total.abs().max() / n)
