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
    model = fixtures.config_only_model(root / "model", layers=1)
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
    model = fixtures.config_only_model(tmp_path / "model", layers=2)
    paths = fixtures.make_adapters(str(model), str(tmp_path / "ads"), n=2, clusters=1, rank=2)  # 14 modules
    assert cli(["compress", *paths, "--rank", "2", "--out", str(tmp_path / "s"), "-q"]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path / "s")]) == 0
    assert "(14 modules: pass --modules for the per-module table)" in capsys.readouterr().out


def test_export_all_in_the_adapters_dtype_and_rank(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    model = fixtures.config_only_model(tmp_path / "model", layers=1)
    paths = fixtures.make_adapters(str(model), str(tmp_path / "ads"), n=3, clusters=3, rank=2,
                                   targets=("q_proj", "v_proj"))
    for p in paths:  # the adapters as users often have them: fp16
        f = os.path.join(p, "adapter_model.safetensors")
        save_file({k: v.half() for k, v in load_file(f).items()}, f)
    store = tmp_path / "store"
    assert cli(["compress", *paths, "--rank", "4", "--clusters", "3", "--out", str(store), "-q"]) == 0
    out = capsys.readouterr().out
    assert "written in float16" in out
    assert json.load(open(store / "manifest.json"))["dtype"] == "float16"
    assert cli(["export", str(store), "--all", "--out-dir", str(tmp_path / "exp")]) == 0
    assert capsys.readouterr().out.count("exported ") == 3
    for i, p in enumerate(paths):
        got = load_file(str(tmp_path / "exp" / f"adapter_{i}" / "adapter_model.safetensors"))
        orig = load_file(os.path.join(p, "adapter_model.safetensors"))
        assert all(v.dtype == torch.float16 for v in got.values())
        assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in orig.items()}  # rank 2
        assert os.path.getsize(tmp_path / "exp" / f"adapter_{i}" / "adapter_model.safetensors") <= \
            os.path.getsize(os.path.join(p, "adapter_model.safetensors")) + 256
    assert cli(["export", str(store), "adapter_0", "adapter_1", "--out-dir", str(tmp_path / "two")]) == 0
    assert sorted(os.listdir(tmp_path / "two")) == ["adapter_0", "adapter_1"]
    capsys.readouterr()
    assert cli(["export", str(store), "adapter_0", "adapter_1", "--out", str(tmp_path / "x")]) == 2
    assert "--out takes one adapter, 2 given" in capsys.readouterr().err
    assert cli(["export", str(store), "adapter_0", "--all", "--out-dir", str(tmp_path / "x")]) == 2
    assert "name the adapters or pass --all" in capsys.readouterr().err
    assert cli(["export", str(store), "adapter_9", "--out-dir", str(tmp_path / "x")]) == 2
    assert "no adapter named 'adapter_9'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
