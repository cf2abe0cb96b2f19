"""Store updates survive a crash at any step; `jdlora remove`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from jdlora_ops.cli import main as cli
from jdlora_ops.store import load_store, verify_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests_vllm"))
import fixtures  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("durable")
    model = fixtures.config_only_model(root / "model", layers=1)
    paths = fixtures.make_adapters(str(model), str(root / "ads"), n=5, clusters=1, rank=2,
                                   targets=("q_proj", "v_proj"))
    other = fixtures.make_adapters(str(model), str(root / "other"), n=1, clusters=1, rank=2, seed=9,
                                   targets=("q_proj", "v_proj"))[0]
    outlier = str(root / "ads" / "outlier")
    shutil.move(other, outlier)
    store = root / "store"
    # with one rank-4 basis for all five, the worst fitted are kept on their own (3 tensor files)
    assert cli(["compress", *paths[:4], outlier, "--rank", "4", "--clusters", "1", "--max-rel-error", "0.1",
                "--out", str(store), "-q"]) == 0
    m = json.load(open(store / "manifest.json"))
    assert "individual" in m["files"] and m["adapters"]
    return root, paths, store


CRASHER = textwrap.dedent("""
    import os, sys
    import jdlora_ops.store as st
    from jdlora_ops.cli import main
    step = int(sys.argv[1])
    calls = [0]
    def crashing(fn):
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == step:
                os._exit(17)  # the writer dies here: no cleanup, no exception handlers
            return fn(*a, **k)
        return wrapped
    st.write_tensors = crashing(st.write_tensors)
    st._write_json = crashing(st._write_json)
    st.os.replace = crashing(os.replace)
    st.os.remove = crashing(os.remove)
    sys.exit(main(sys.argv[2:]))
""")


def _names(store):
    c = load_store(store)
    return set(c.all_names)


def test_add_killed_at_every_step_leaves_a_readable_store(world, tmp_path):
    _, paths, store = world
    before = _names(store)
    seen_new = seen_old = False
    for step in range(1, 40):
        s = tmp_path / f"s{step}"
        shutil.copytree(store, s)
        r = subprocess.run([sys.executable, "-c", CRASHER, str(step), "add", str(s), paths[4], "-q"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, 17), r.stderr
        assert set(verify_store(s).values()) == {"ok"}
        names = _names(s)
        assert names in (before, before | {"adapter_4"}), (step, names)
        seen_new |= names != before
        seen_old |= names == before
        # a later write succeeds and removes what the dead writer left behind
        if names == before:
            assert cli(["add", str(s), paths[4], "-q"]) == 0
        else:
            assert cli(["remove", str(s), "adapter_4"]) == 0
        m = json.load(open(s / "manifest.json"))
        assert sorted(os.listdir(s)) == sorted(["manifest.json", *m["files"].values()]), step
        if r.returncode == 0:
            break
    else:
        pytest.fail("the add never completed within 40 steps")
    assert seen_old and seen_new and step > 3


def test_remove_jd_and_individual_adapters(world, tmp_path, capsys):
    _, _, store = world
    s = tmp_path / "s"
    shutil.copytree(store, s)
    c = load_store(s)
    jd, ind = c.adapter_names[0], next(iter(c.individual))
    assert cli(["remove", str(s), jd, ind]) == 0
    assert "removed 2 adapter(s)" in capsys.readouterr().out
    after = load_store(s)
    assert set(after.all_names) == set(c.all_names) - {jd, ind}
    assert set(verify_store(s).values()) == {"ok"}
    # the remaining adapters are served exactly as before
    for name in after.adapter_names:
        for mod in after.modules:
            assert (after.reconstruct(name, mod) - c.reconstruct(name, mod)).abs().max() == 0


def test_remove_unknown_name_changes_nothing(world, tmp_path, capsys):
    _, _, store = world
    s = tmp_path / "s"
    shutil.copytree(store, s)
    before = {f: open(s / f, "rb").read() for f in os.listdir(s)}
    assert cli(["remove", str(s), "adapter_0", "nope"]) == 2
    assert "no adapter named 'nope'" in capsys.readouterr().err
    assert {f: open(s / f, "rb").read() for f in os.listdir(s)} == before


def test_adapter_cache_add_persist_writes_the_store(world, tmp_path):
    from jdlora_ops.peft_io import read_peft_adapter
    from jdlora_ops.serving import AdapterCache

    _, paths, store = world
    s = tmp_path / "s"
    shutil.copytree(store, s)
    cache = AdapterCache(str(s), device="cpu")
    report = cache.add_peft(paths[4], max_rel_error=0.5, persist=True)
    assert report.path == "compressed"
    assert "adapter_4" in cache
    # a restarted server (a new cache on the same store) sees it, with the cores jdlora add would write
    again = AdapterCache(str(s), device="cpu")
    assert "adapter_4" in again
    assert set(verify_store(s).values()) == {"ok"}
    ref = tmp_path / "ref"
    shutil.copytree(store, ref)
    assert cli(["add", str(ref), paths[4], "-q"]) == 0
    a, b = load_store(s), load_store(ref)
    for mod in a.modules:
        assert (a.reconstruct("adapter_4", mod) - b.reconstruct("adapter_4", mod)).abs().max() < 1e-6
    pa = read_peft_adapter(paths[4])
    assert a.metadata["configs"]["adapter_4"]["r"] == pa.config["r"]
    with pytest.raises(ValueError, match="already"):
        cache.add_peft(paths[4], max_rel_error=0.5, persist=True)
    assert _names(s) == _names(ref)  # the refused second add wrote nothing
