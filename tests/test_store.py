"""The store directory format: round trip, manifest contents, atomic writes, damaged stores."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jdlora_ops import store as store_mod
from jdlora_ops.compress import InMemoryCollection, ModuleSpec, compress, project_adapters
from jdlora_ops.store import FORMAT, FORMAT_VERSION, StoreError, is_store, load_store, read_manifest, save_store
from jdlora_ops.synthetic import planted_collection

F64 = torch.float64
MODS = [ModuleSpec("model.layers.0.self_attn.q_proj", 24, 20), ModuleSpec("model.layers.0.self_attn.v_proj", 12, 20)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    col, labels = planted_collection(MODS, clusters=2, per_cluster=3, rank=3, adapter_ranks=(3, 4), noise=0.1, seed=2)
    col.metadata["base_model"] = "tiny/base"
    col.metadata["configs"] = {n: {"r": 4, "lora_alpha": 8} for n in col.adapter_names}
    return col, compress(col, 3, num_clusters=2, dtype=F64)


def test_round_trip_and_manifest(tmp_path, fitted):
    col, res = fitted
    path = tmp_path / "s"
    manifest = save_store(path, res)
    assert is_store(path)
    m = read_manifest(path)
    assert m == json.loads((path / "manifest.json").read_text())
    # Version 3 only for stores with residuals: older readers keep reading every other store.
    assert m["format"] == FORMAT and m["format_version"] == 2 < FORMAT_VERSION
    assert m["base_model"] == "tiny/base" and m["method"] == "full" and m["rank"] == 3
    assert m["scaling"]["folded"] is True and "lora_alpha / r" in m["scaling"]["rule"]
    assert [d["name"] for d in m["modules"]] == [s.name for s in MODS]
    assert m["modules"][0] == {"name": MODS[0].name, "layer": 0, "kind": "q_proj", "d_out": 24, "d_in": 20,
                               "rank": 3, "sigma": "full"}
    assert m["num_clusters"] == 2 and sorted(m["cluster_sizes"]) == [3, 3]
    a = m["adapters"][4]
    assert a["name"] == res.adapter_names[4] and a["cluster"] == int(res.assignment[4])
    assert a["errors"] == pytest.approx(res.rel_errors()[4].tolist())
    assert a["peft_config"] == {"r": 4, "lora_alpha": 8}
    assert a["ranks"] == [4, 4] or a["ranks"] == [5, 5]
    assert m["memory_bf16"]["params_after"] < m["memory_bf16"]["params_before"]
    assert sorted(os.listdir(path)) == sorted(["manifest.json", manifest["files"]["bases"], manifest["files"]["cores"]])
    back = load_store(path)
    assert back.adapter_names == res.adapter_names and torch.equal(back.assignment, res.assignment)
    assert back.metadata["ranks"] == res.metadata["ranks"]
    for name, cm in res.modules.items():
        bm = back.modules[name]
        for attr in ("U", "Vt", "sigma", "norms_sq", "errors", "rel_errors"):
            assert torch.equal(getattr(bm, attr), getattr(cm, attr).to(getattr(bm, attr).dtype)), attr
        assert torch.allclose(back.reconstruct(3, name), res.reconstruct(3, name))


def test_store_dtype_and_diag(tmp_path, fitted):
    col, _ = fitted
    res = compress(col, 3, num_clusters=2, method="diag", dtype=F64, max_iter=50)
    save_store(tmp_path / "d", res, dtype=torch.bfloat16)
    back = load_store(tmp_path / "d")
    cm = next(iter(back.modules.values()))
    assert cm.U.dtype == torch.bfloat16 and cm.sigma.shape == (6, 3) and cm.errors.dtype == F64
    assert read_manifest(tmp_path / "d")["dtype"] == "bfloat16"


def test_refuses_to_clobber(tmp_path, fitted):
    _, res = fitted
    save_store(tmp_path / "s", res)
    with pytest.raises(StoreError, match="already exists"):
        save_store(tmp_path / "s", res)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a jdlora store"):
        save_store(tmp_path / "other", res)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    save_store(tmp_path / "empty", res)  # an empty directory is fine
    assert is_store(tmp_path / "empty")
    save_store(tmp_path / "s", res, overwrite=True)
    assert len(os.listdir(tmp_path / "s")) == 3  # old tensor files were removed


def _add_one_adapter(path):
    """The store at ``path`` with one random adapter "new" projected onto its bases and written as an update."""
    grown = load_store(path)
    g = torch.Generator().manual_seed(0)
    new = InMemoryCollection({"new": {m.name: (torch.randn(2, m.d_in, generator=g, dtype=F64),
                                               torch.randn(m.d_out, 2, generator=g, dtype=F64), 1.0) for m in MODS}})
    project_adapters(grown, new)
    return grown, save_store(path, grown, update=True, reuse_bases=True)


def test_update_keeps_bases_and_adds_cores(tmp_path, fitted):
    col, res = fitted
    path = tmp_path / "s"
    first = save_store(path, res)
    grown, second = _add_one_adapter(path)
    assert second["files"]["bases"] == first["files"]["bases"]
    assert second["files"]["cores"] != first["files"]["cores"]
    assert not os.path.exists(path / first["files"]["cores"])
    back = load_store(path)
    assert back.adapter_names[-1] == "new" and back.num_adapters == 7
    assert read_manifest(path)["adapters"][-1]["name"] == "new"


def test_generations_and_content_digests(tmp_path, fitted):
    """Every write is one generation more; digests follow content, not positions (a removal that empties a
    cluster renumbers the others without changing their digests)."""
    from jdlora_ops.compress.projection import remove_adapters

    col, res = fitted
    path = tmp_path / "s"
    first = save_store(path, res)
    assert first["generation"] == 1 and len(first["cluster_digests"]) == 2
    assert len({a["digest"] for a in first["adapters"]}) == 6
    grown, second = _add_one_adapter(path)
    assert second["generation"] == 2 and second["cluster_digests"] == first["cluster_digests"]
    assert [a["digest"] for a in second["adapters"][:6]] == [a["digest"] for a in first["adapters"]]
    # the same digests when the bases are written again rather than kept
    again = save_store(path, load_store(path), update=True)
    assert again["generation"] == 3 and again["files"]["bases"] != second["files"]["bases"]
    assert again["cluster_digests"] == second["cluster_digests"]
    assert [a["digest"] for a in again["adapters"]] == [a["digest"] for a in second["adapters"]]
    shrunk = load_store(path)
    k0 = [n for n, c in zip(shrunk.adapter_names, shrunk.assignment.tolist()) if c == 0]
    assert remove_adapters(shrunk, k0) == 1
    third = save_store(path, shrunk, update=True)
    assert third["generation"] == 4 and third["cluster_digests"] == second["cluster_digests"][1:]
    by_name = {a["name"]: a["digest"] for a in second["adapters"]}
    assert all(a["digest"] == by_name[a["name"]] for a in third["adapters"])
    reader = store_mod.StoreReader(path)
    assert reader.generation == 4 and reader.cluster_digests == third["cluster_digests"]
    assert reader.adapter_digests == [a["digest"] for a in third["adapters"]]


def test_interrupted_update_leaves_old_store_intact(tmp_path, fitted, monkeypatch):
    _, res = fitted
    path = tmp_path / "s"
    save_store(path, res)
    before = (path / "manifest.json").read_bytes()
    files_before = sorted(os.listdir(path))
    grown = load_store(path)
    grown.adapter_names[0] = "renamed"

    real = store_mod._write_json

    def crash(p, obj):
        if os.path.basename(p).startswith(".manifest"):
            with open(p, "w") as fh:
                fh.write('{"half": ')  # a torn write of the new manifest
            raise KeyboardInterrupt
        return real(p, obj)

    monkeypatch.setattr(store_mod, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_store(path, grown, update=True)
    monkeypatch.setattr(store_mod, "_write_json", real)
    assert (path / "manifest.json").read_bytes() == before
    assert sorted(os.listdir(path)) == files_before
    back = load_store(path)
    assert back.adapter_names == res.adapter_names

    # A crash after the tensor files were written (before the commit) leaves strays; the next
    # successful write removes them.
    def crash_late(p, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_write_json", crash_late)
    with pytest.raises(KeyboardInterrupt):
        save_store(path, grown, update=True)
    monkeypatch.setattr(store_mod, "_write_json", real)
    assert load_store(path).adapter_names == res.adapter_names
    save_store(path, grown, update=True)
    assert len(os.listdir(path)) == 3 and load_store(path).adapter_names[0] == "renamed"


def test_interrupted_new_store_leaves_nothing(tmp_path, fitted, monkeypatch):
    _, res = fitted

    def crash(p, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_store(tmp_path / "new", res)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["no_manifest", "bad_json", "wrong_format", "newer_version", "missing_file",
                                    "corrupt_file", "shape_mismatch", "not_a_dir"])
def test_damaged_stores_raise_store_error(tmp_path, fitted, damage):
    _, res = fitted
    path = tmp_path / "s"
    m = save_store(path, res)
    mpath = path / "manifest.json"
    if damage == "no_manifest":
        mpath.unlink()
    elif damage == "bad_json":
        mpath.write_text("{")
    elif damage == "wrong_format":
        mpath.write_text(json.dumps({**m, "format": "something-else"}))
    elif damage == "newer_version":
        mpath.write_text(json.dumps({**m, "format_version": FORMAT_VERSION + 1}))
    elif damage == "missing_file":
        (path / m["files"]["cores"]).unlink()
    elif damage == "corrupt_file":
        (path / m["files"]["bases"]).write_bytes(b"\x00" * 20)
    elif damage == "shape_mismatch":
        mm = dict(m)
        mm["modules"] = [dict(mm["modules"][0], rank=2)] + mm["modules"][1:]
        mpath.write_text(json.dumps(mm))
    elif damage == "not_a_dir":
        path = tmp_path / "missing"
    with pytest.raises(StoreError):
        load_store(path)
