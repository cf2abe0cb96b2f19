"""The ``jdlora`` command line: the happy path and every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from jdlora_ops.cli import main
from jdlora_ops.store import load_store, read_manifest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from test_peft_io import make_adapter, peft_deltas  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = [make_adapter(root / f"task{i}", seed=i, r=[4, 8, 4, 6, 4][i], lora_alpha=8) for i in range(5)]
    return root, dirs


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("jdlora: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_compress_inspect_add_export(tmp_path, capsys, adapters):
    root, dirs = adapters
    store = tmp_path / "store"
    rc, out, err = run(capsys, "compress", *dirs[:4], "--rank", 8, "--clusters", 2, "--method", "full",
                       "--out", store, "--quiet", "--compute-dtype", "float64")
    assert rc == 0, err
    assert "compressed 4 adapters x 6 modules" in out
    m = read_manifest(store)
    assert m["num_adapters"] == 4 and m["rank"] == 8 and m["method"] == "full"

    rc, out, err = run(capsys, "inspect", store)
    assert rc == 0, err
    assert "task0" in out and "mean err" in out and "model.layers.1.self_attn.v_proj" in out
    assert "memory" in out and "bf16" in out
    rc, out, _ = run(capsys, "inspect", store, "--json")
    summary = json.loads(out)
    assert summary["num_adapters"] == 4 and len(summary["adapters"]) == 4

    rc, out, err = run(capsys, "add", store, dirs[4], "--quiet")
    assert rc == 0, err
    assert "added task4: cluster" in out and "ms" in out
    back = load_store(store)
    assert back.adapter_names[-1] == "task4"

    rc, out, err = run(capsys, "export", store, "task1", "--out", tmp_path / "task1_jd")
    assert rc == 0, err
    deltas = peft_deltas(str(tmp_path / "task1_jd"))
    for mod, delta in deltas.items():
        assert torch.allclose(delta, back.reconstruct("task1", mod).double(), atol=1e-5)


def test_compress_diag_with_progress(tmp_path, capsys, adapters):
    _, dirs = adapters
    rc, out, err = run(capsys, "compress", *dirs[:3], "-r", 4, "-k", 1, "--method", "diag", "-o", tmp_path / "d",
                       "--max-iter", 5, "--threads", 1)
    assert rc == 0, err
    assert "round 1" in err or "%" in err  # a progress bar was drawn on stderr
    assert read_manifest(tmp_path / "d")["modules"][0]["sigma"] == "diag"


@pytest.mark.parametrize("case", ["missing_dir", "corrupt_weights", "pickle_only", "other_base_model",
                                  "other_shapes", "rank_too_large", "k_zero", "rank_zero", "existing_store",
                                  "bad_dtype"])
def test_compress_bad_input(tmp_path, capsys, adapters, case):
    root, dirs = adapters
    args = ["compress", dirs[0], dirs[1], "--rank", 4, "--out", tmp_path / "out", "--quiet"]
    needles = []
    if case == "missing_dir":
        args[2] = tmp_path / "nope"
        needles = ["nope", "no such adapter directory"]
    elif case == "corrupt_weights":
        bad = tmp_path / "bad"
        shutil.copytree(dirs[1], bad)
        (bad / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
        args[2] = bad
        needles = ["safetensors"]
    elif case == "pickle_only":
        bad = tmp_path / "pk"
        bad.mkdir()
        shutil.copy(os.path.join(dirs[1], "adapter_config.json"), bad)
        (bad / "adapter_model.bin").write_bytes(b"\x80\x04")
        args[2] = bad
        needles = ["pickle"]
    elif case == "other_base_model":
        args[2] = make_adapter(tmp_path / "other", seed=9, base_name="someone/else")
        needles = ["different base models", "someone/else"]
    elif case == "other_shapes":
        from safetensors.torch import load_file, save_file

        bad = tmp_path / "shape"
        shutil.copytree(dirs[1], bad)
        t = load_file(str(bad / "adapter_model.safetensors"))
        for k in list(t):
            if "q_proj.lora_A" in k:
                t[k] = torch.randn(t[k].shape[0], 70)
        save_file(t, str(bad / "adapter_model.safetensors"))
        args[2] = bad
        needles = ["64 x 70"]
    elif case == "rank_too_large":
        args[4] = 40
        needles = ["rank 40", "at most 32"]
    elif case == "k_zero":
        args += ["--clusters", 0]
        needles = ["--clusters"]
    elif case == "rank_zero":
        args[4] = 0
        needles = ["--rank"]
    elif case == "existing_store":
        assert run(capsys, *args)[0] == 0
        needles = ["already exists", "--overwrite"]
    elif case == "bad_dtype":
        args += ["--compute-dtype", "int8"]
        needles = ["dtype"]
    rc, out, err = run(capsys, *args)
    assert_one_line_error(rc, err, *needles)
    if case != "existing_store":
        assert not os.path.exists(tmp_path / "out")


def test_add_export_inspect_bad_input(tmp_path, capsys, adapters):
    root, dirs = adapters
    store = tmp_path / "s"
    assert run(capsys, "compress", dirs[0], dirs[1], "-r", 4, "-o", store, "-q")[0] == 0
    manifest = (store / "manifest.json").read_bytes()
    rc, _, err = run(capsys, "add", store, dirs[0], "-q")
    assert_one_line_error(rc, err, "already")
    other = make_adapter(tmp_path / "o", seed=7, base_name="someone/else")
    rc, _, err = run(capsys, "add", store, other, "-q")
    assert_one_line_error(rc, err, "different base models")
    gpt = make_adapter(tmp_path / "g", model="gpt2", base_name="tiny/llama")
    rc, _, err = run(capsys, "add", store, gpt, "-q")
    assert_one_line_error(rc, err, "not in the store")
    rc, _, err = run(capsys, "add", store, dirs[2], "--cluster", 5, "-q")
    assert_one_line_error(rc, err, "--cluster 5")
    assert (store / "manifest.json").read_bytes() == manifest  # nothing changed
    rc, _, err = run(capsys, "add", tmp_path / "nostore", dirs[2])
    assert_one_line_error(rc, err, "no such store")
    rc, _, err = run(capsys, "inspect", tmp_path)
    assert_one_line_error(rc, err, "not a jdlora store")
    rc, _, err = run(capsys, "export", store, "nobody", "--out", tmp_path / "e")
    assert_one_line_error(rc, err, "nobody")
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "x").write_text("x")
    rc, _, err = run(capsys, "export", store, "task0", "--out", tmp_path / "full")
    assert_one_line_error(rc, err, "not empty")
    (store / "manifest.json").write_text("{broken")
    rc, _, err = run(capsys, "inspect", store)
    assert_one_line_error(rc, err, "not readable as JSON for a store manifest")


def test_interrupted_compress_keeps_the_old_store(tmp_path, capsys, adapters, monkeypatch):
    _, dirs = adapters
    store = tmp_path / "s"
    assert run(capsys, "compress", dirs[0], dirs[1], "-r", 4, "-o", store, "-q")[0] == 0
    before = {f: (store / f).read_bytes() for f in os.listdir(store)}

    import jdlora_ops.compress.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compress", interrupted)
    rc, _, err = run(capsys, "compress", dirs[2], dirs[3], "-r", 4, "-o", store, "-q", "--overwrite")
    assert rc == 130 and "interrupted" in err
    assert {f: (store / f).read_bytes() for f in os.listdir(store)} == before


def test_overwrite_replaces_a_store(tmp_path, capsys, adapters):
    _, dirs = adapters
    store = tmp_path / "s"
    assert run(capsys, "compress", dirs[0], dirs[1], "-r", 4, "-o", store, "-q")[0] == 0
    rc, _, err = run(capsys, "compress", dirs[2], dirs[3], dirs[4], "-r", 4, "-o", store, "-q", "--overwrite",
                     "--method", "svd")
    assert rc == 0, err
    m = read_manifest(store)
    assert [a["name"] for a in m["adapters"]] == ["task2", "task3", "task4"] and m["method"] == "svd"
    assert len(os.listdir(store)) == 3


def test_demo_subcommand_forwards_arguments(monkeypatch):
    import sys
    import types

    seen = {}
    fake = types.ModuleType("jdlora_ops.demo")
    fake.main = lambda rest: seen.setdefault("rest", rest) and 0
    monkeypatch.setitem(sys.modules, "jdlora_ops.demo", fake)
    assert main(["demo", "--adapters", "3", "--help"]) == 0
    assert seen["rest"] == ["--adapters", "3", "--help"]


def test_inspect_into_a_closed_pipe_stops_quietly(tmp_path, adapters):
    """``jdlora inspect STORE | head``: the reader goes away; no traceback or error line, SIGPIPE's status."""
    import subprocess
    import sys

    _, dirs = adapters
    store = tmp_path / "store"
    assert main(["compress", *map(str, dirs[:2]), "-r", "4", "-k", "1", "-o", str(store), "--quiet"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "jdlora_ops.cli", "inspect", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the command writes: its first write meets a broken pipe
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert err.decode() == ""
