"""Store integrity: per-file SHA-256 in the manifest, checked before use; `jdlora verify`."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jdlora_ops.cli import main as cli
from jdlora_ops.compress import InMemoryCollection, ModuleSpec, compress
from jdlora_ops.compress.error_budget import apply_error_budget
from jdlora_ops.store import StoreReader
from jdlora_ops.store import StoreError, load_store, save_store, verify_store


@pytest.fixture
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    mods = [ModuleSpec("model.layers.0.self_attn.q_proj", 12, 10)]
    ads = {f"a{i}": {mods[0].name: (torch.randn(r, 10, generator=g), torch.randn(12, r, generator=g), 1.0)}
           for i, r in enumerate([1, 1, 1, 1, 3])}
    coll = InMemoryCollection(ads, modules=mods)
    res = compress(coll, 2, num_clusters=2)
    apply_error_budget(res, coll, 0.2)  # the rank-3 adapter does not fit a rank-2 cluster: kept on its own
    assert list(res.individual) == ["a4"] and res.num_adapters == 4
    path = tmp_path / "store"
    save_store(path, res)
    return str(path)


def _files(path):
    return json.load(open(os.path.join(path, "manifest.json")))["files"]


def test_checksums_recorded_and_verified(store, capsys):
    m = json.load(open(os.path.join(store, "manifest.json")))
    assert set(m["sha256"]) == set(m["files"].values())
    assert set(verify_store(store).values()) == {"ok"}
    assert cli(["verify", store]) == 0
    assert "3 of 3 files match their checksums" in capsys.readouterr().out


@pytest.mark.parametrize("edit", ["cluster", "adapter", "swap"])
def test_digests_that_do_not_describe_the_tables_fail_verify(store, edit, capsys):
    """A live server keeps resident tables by their digests: a manifest whose digests lie must not verify."""
    path = os.path.join(store, "manifest.json")
    m = json.load(open(path))
    if edit == "cluster":
        m["cluster_digests"][1] = "0" * 64
        want = "cluster 1's digest"
    elif edit == "adapter":
        m["adapters"][2]["digest"] = "f" * 64
        want = "adapter 'a2''s digest"
    else:  # two adapters' digests exchanged: each still a valid digest, of the other one's tables
        m["adapters"][0]["digest"], m["adapters"][1]["digest"] = m["adapters"][1]["digest"], m["adapters"][0]["digest"]
        want = "adapter 'a0''s digest"
    json.dump(m, open(path, "w"))
    with pytest.raises(StoreError, match=want):
        verify_store(store)
    assert cli(["verify", store]) == 2
    assert "the manifest does not describe" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["bases", "cores", "individual"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_file_is_an_error_naming_it(store, kind, damage, capsys):
    name = _files(store)[kind]
    f = os.path.join(store, name)
    data = bytearray(open(f, "rb").read())
    if damage == "flip":
        data[-5] ^= 0x10  # inside the tensor data: the header still parses
    else:
        data = data[: len(data) - 7]
    open(f, "wb").write(bytes(data))
    with pytest.raises(StoreError, match=f"{name}: checksum mismatch"):
        verify_store(store)
    with pytest.raises(StoreError, match=f"{name}: checksum mismatch|{name}: damaged"):
        load_store(store)
    assert cli(["verify", store]) == 2
    assert name in capsys.readouterr().err
    # the memory-mapped reader checks a file before its data is first used
    try:
        reader = StoreReader(store)
    except StoreError as exc:  # a truncated file may already fail its header checks
        assert name in str(exc)
        return
    with pytest.raises(StoreError, match=name):
        if kind == "bases":
            reader.read_bases(0)
        elif kind == "cores":
            reader.read_cores(0)
        else:
            reader.individual_adapters()


def test_update_keeps_checksums_right(store):
    from jdlora_ops.compress import project_adapters

    c = load_store(store)
    g = torch.Generator().manual_seed(1)
    spec = c.module_specs[0]
    new = InMemoryCollection({"b0": {spec.name: (torch.randn(2, 10, generator=g), torch.randn(12, 2, generator=g), 1.0)}},
                             modules=[spec])
    project_adapters(c, new)
    save_store(store, c, update=True, reuse_bases=True)
    assert set(verify_store(store).values()) == {"ok"}


def test_adding_to_a_store_without_joint_tables_is_a_clear_error(tmp_path):
    from jdlora_ops.compress import project_adapters

    g = torch.Generator().manual_seed(2)
    spec = ModuleSpec("model.layers.0.self_attn.q_proj", 12, 10)
    coll = InMemoryCollection({f"a{i}": {spec.name: (torch.randn(3, 10, generator=g), torch.randn(12, 3, generator=g),
                                                      1.0)} for i in range(2)}, modules=[spec])
    res = compress(coll, 1, num_clusters=1)
    apply_error_budget(res, coll, 0.01)
    assert res.num_adapters == 0 and len(res.individual) == 2
    new = InMemoryCollection({"b": {spec.name: (torch.randn(1, 10, generator=g), torch.randn(12, 1, generator=g), 1.0)}},
                             modules=[spec])
    with pytest.raises(ValueError, match="joint tables are empty"):
        project_adapters(res, new)
