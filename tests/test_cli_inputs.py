"""How the CLI finds adapters (parent folders, globs, list files) and reports what it does."""

from __future__ import annotations

import json
import os
import sys

import pytest

from jdlora_ops.cli import main as cli

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests_vllm"))
import fixtures  # noqa: E402


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_inputs")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 16, "intermediate_size": 24,
                                                   "num_attention_heads": 2, "num_key_value_heads": 1,
                                                   "num_hidden_layers": 1}))
    paths = fixtures.make_adapters(str(model), str(root / "adapters"), n=3, clusters=1, rank=2,
                                   targets=("q_proj", "v_proj"))
    return root, paths


def _names(store):
    return [a["name"] for a in json.load(open(os.path.join(store, "manifest.json")))["adapters"]]


def test_parent_folder_glob_and_list_file(adapters, tmp_path, capsys):
    root, paths = adapters
    assert cli(["compress", str(root / "adapters"), "--rank", "2", "--out", str(tmp_path / "a")]) == 0
    assert "found 3 adapters (" in capsys.readouterr().err and _names(tmp_path / "a") == [f"adapter_{i}" for i in range(3)]
    assert cli(["compress", str(root / "adapters" / "adapter_[01]"), "--rank", "2", "--out", str(tmp_path / "b"),
                "-q"]) == 0
    assert _names(tmp_path / "b") == ["adapter_0", "adapter_1"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two adapters\n{paths[2]}\n\n{os.path.relpath(paths[0], tmp_path)}\n")
    assert cli(["compress", str(listing), "--rank", "2", "--out", str(tmp_path / "c"), "-q"]) == 0
    assert _names(tmp_path / "c") == ["adapter_2", "adapter_0"]


def test_inputs_that_name_no_adapter(adapters, tmp_path, capsys):
    root, _ = adapters
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["compress", str(empty), "--rank", "2", "--out", str(tmp_path / "s"), "-q"]) == 2
    assert "neither an adapter directory nor a folder of adapter directories" in capsys.readouterr().err
    assert cli(["compress", str(root / "nope*"), "--rank", "2", "--out", str(tmp_path / "s"), "-q"]) == 2
    assert "the pattern matches no adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_svd_rank_above_the_adapters_is_capped_and_reported_per_adapter(adapters, tmp_path, capsys):
    root, paths = adapters
    assert cli(["compress", *paths, "--method", "svd", "--rank", "16", "--out", str(tmp_path / "svd")]) == 0
    cap = capsys.readouterr()
    assert "--rank 16 is above the adapters' largest rank 2; per-adapter SVD uses rank 2" in cap.err
    assert "(svd, r=2, per adapter)" in cap.out
    assert json.load(open(tmp_path / "svd" / "manifest.json"))["rank"] == 2


def test_inspect_says_when_it_hides_the_module_table(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 16, "intermediate_size": 24,
                                                   "num_attention_heads": 2, "num_key_value_heads": 1,
                                                   "num_hidden_layers": 2}))
    paths = fixtures.make_adapters(str(model), str(tmp_path / "ads"), n=2, clusters=1, rank=2)  # 14 modules
    assert cli(["compress", *paths, "--rank", "2", "--out", str(tmp_path / "s"), "-q"]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path / "s")]) == 0
    assert "(14 modules: pass --modules for the per-module table)" in capsys.readouterr().out
