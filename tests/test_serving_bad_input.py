"""Bad input to the serving layer: a clear error, and nothing changed (no slot half filled, no store modified)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from jdlora_ops.serving import (
    AdapterCache,
    AdapterMismatchError,
    BatchPlanner,
    CapacityError,
    UnknownAdapterError,
)
from jdlora_ops.store import StoreError, save_store
from serving_data import (  # noqa: F401  (one_thread: autouse fixture)
    MODULES, assert_unchanged, by_cluster, one_thread, random_collection, random_lora, snapshot,
)


@pytest.fixture(scope="module")
def coll():
    return random_collection(n=12, K=4, r=6, seed=8)


@pytest.fixture
def warm(coll):
    """A cache with some residents, a registered uncompressed adapter and a planner."""
    cache = AdapterCache(coll, max_clusters=2, max_adapters=3, max_uncompressed=1, uncompressed_rank=5, device="cpu")
    cache.register_uncompressed("u", random_lora(seed=2))
    cache.load([by_cluster(coll, 0)[0], by_cluster(coll, 1)[0], "u"])
    return cache, BatchPlanner(cache, 32)


def test_unknown_adapter(warm, coll):
    cache, planner = warm
    snap = snapshot(cache)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        planner.prepare([by_cluster(coll, 2)[0], "nope"], [1, 1])
    with pytest.raises(UnknownAdapterError, match="nope"):
        cache.where("nope")
    assert_unchanged(cache, snap)
    # The planner is still usable afterwards (no plan left active, nothing pinned).
    with planner.prepare([by_cluster(coll, 2)[0]], [2]):
        pass


@pytest.mark.parametrize("what", ["adapters", "clusters", "uncompressed"])
def test_more_distinct_than_capacity(warm, coll, what):
    cache, planner = warm
    if what == "adapters":  # 4 adapters of 2 clusters, 3 adapter slots
        names = by_cluster(coll, 0)[:2] + by_cluster(coll, 1)[:2]
        msg = "4 distinct compressed adapters but the device tables hold 3"
    elif what == "clusters":
        names = [by_cluster(coll, k)[0] for k in range(3)]
        msg = "3 distinct clusters but the device tables hold 2"
    else:
        cache.register_uncompressed("u2", random_lora(seed=3))
        names = ["u", "u2"]
        msg = "2 distinct uncompressed adapters but the device tables hold 1"
    snap = snapshot(cache)
    with pytest.raises(CapacityError, match=msg):
        planner.prepare(names, 1)
    assert_unchanged(cache, snap)


def test_slots_busy_with_other_batches(warm, coll):
    cache, planner = warm
    lease = cache.acquire([by_cluster(coll, 0)[0], by_cluster(coll, 1)[0]])
    snap = snapshot(cache)
    with pytest.raises(CapacityError, match="pinned by batches in flight"):
        cache.acquire([by_cluster(coll, 2)[0]])
    assert_unchanged(cache, snap)
    cache.release(lease)


def test_planner_arguments(warm, coll):
    cache, planner = warm
    snap = snapshot(cache)
    a = by_cluster(coll, 0)[0]
    with pytest.raises(ValueError, match="exceed this planner's max_tokens=32"):
        planner.prepare([a, a], [20, 13])
    with pytest.raises(ValueError, match="2 adapters but 1 token counts"):
        planner.prepare([a, a], [1])
    with pytest.raises(ValueError, match="integers >= 0"):
        planner.prepare([a], [-1])
    assert_unchanged(cache, snap)
    plan = planner.prepare([a], [2])
    with pytest.raises(RuntimeError, match="not released"):
        planner.prepare([a], [2])
    with pytest.raises(ValueError, match="T = 2 tokens"):
        plan.apply(MODULES[0].name, torch.zeros(3, 36), torch.zeros(3, 40))
    with pytest.raises(KeyError, match="no resident tables for module 'model.layers.9.mlp'"):
        plan.apply("model.layers.9.mlp", torch.zeros(2, 36), torch.zeros(2, 40))
    plan.release()
    with pytest.raises(RuntimeError, match="released"):
        plan.apply(MODULES[0].name, torch.zeros(2, 36), torch.zeros(2, 40))


@pytest.mark.parametrize("case", ["base_model", "config_base_model", "module", "shape", "rank", "nan", "duplicate"])
def test_adapter_that_does_not_fit(warm, case):
    cache, _ = warm
    f = random_lora(seed=4)
    kw = {}
    err, msg = AdapterMismatchError, None
    if case == "base_model":
        kw["base_model"] = "other/base"
        msg = "made for base model 'other/base', but this cache serves 'test/base'"
    elif case == "config_base_model":
        kw["config"] = {"base_model_name_or_path": "other/base"}
        msg = "other/base"
    elif case == "module":
        f["model.layers.0.mlp.up_proj"] = f.pop(MODULES[0].name)
        msg = "module 'model.layers.0.mlp.up_proj' is not one of the 4 modules"
    elif case == "shape":
        A, B, s = f[MODULES[0].name]
        f[MODULES[0].name] = (A, torch.randn(41, A.shape[0]), s)
        msg = "update is 41 x 36, the base model's module is 40 x 36"
    elif case == "rank":
        f = random_lora(rank=7, seed=4)
        msg = "rank 7 exceeds the uncompressed tables' rank 5"
    elif case == "nan":
        A, B, s = f[MODULES[1].name]
        B = B.clone()
        B[0, 0] = float("nan")
        f[MODULES[1].name] = (A, B, s)
        msg = "NaN"
    else:
        err, msg = ValueError, "an adapter named 'u' is already in the cache"
    snap = snapshot(cache)
    names = list(cache.adapter_names)
    name = "u" if case == "duplicate" else "new"
    with pytest.raises(err, match=msg):
        cache.register_uncompressed(name, f, **kw)
    with pytest.raises(err, match=msg):
        cache.add(name, f, max_rel_error=-1.0, **kw)  # -1: the projection never suffices
    assert cache.adapter_names == names
    assert_unchanged(cache, snap)


def test_no_uncompressed_slots(coll):
    cache = AdapterCache(coll, device="cpu")
    with pytest.raises(CapacityError, match="no uncompressed slots"):
        cache.register_uncompressed("u", random_lora())
    rep_err = None
    try:
        cache.add("u", random_lora(rank=6), max_rel_error=0.0)
    except CapacityError as e:
        rep_err = e
    assert rep_err is not None and "u" not in cache


def _files(path):
    return {p: open(os.path.join(path, p), "rb").read() for p in sorted(os.listdir(path))}


def _tensor_offsets(path: str, key: str) -> tuple[int, int]:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    lo, hi = header[key]["data_offsets"]
    return 8 + n + lo, 8 + n + hi


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "missing_file", "manifest", "shape"])
def test_damaged_store_does_not_open(tmp_path, coll, damage):
    path = tmp_path / "s"
    m = save_store(path, coll)
    bases = os.path.join(path, m["files"]["bases"])
    if damage == "truncated":
        data = open(bases, "rb").read()
        open(bases, "wb").write(data[: len(data) - 100])
        msg = "damaged tensor file"
    elif damage == "garbage_header":
        data = bytearray(open(bases, "rb").read())
        data[8:40] = b"\x00" * 32
        open(bases, "wb").write(bytes(data))
        msg = "damaged tensor file"
    elif damage == "missing_file":
        os.remove(bases)
        msg = "missing tensor file"
    elif damage == "manifest":
        open(os.path.join(path, "manifest.json"), "w").write("{ not json")
        msg = "not readable as JSON for a store manifest"
    else:
        man = json.load(open(os.path.join(path, "manifest.json")))
        man["modules"][1]["d_out"] = 21
        json.dump(man, open(os.path.join(path, "manifest.json"), "w"))
        msg = "the manifest implies"
    before = _files(path)
    for lazy in (True, False):
        with pytest.raises(StoreError, match=msg):
            AdapterCache(path, lazy=lazy, device="cpu")
    assert _files(path) == before


def test_corrupt_data_found_on_first_use_changes_nothing(tmp_path, coll):
    """A cluster whose stored bases are NaN (bit rot) in a store written before checksums: the whole
    bases file is scanned once, on its first use (as its checksum would be), so the first batch fails
    even if it needs another cluster, with an error naming the damaged cluster's adapters, module and
    tensor; no slot is filled, the cache keeps its state, and the file is not touched."""
    path = tmp_path / "s"
    m = save_store(path, coll)
    bases = os.path.join(path, m["files"]["bases"])
    lo, hi = _tensor_offsets(bases, f"{MODULES[2].name}::U")
    per_cluster = (hi - lo) // 4
    k_bad = 3
    with open(bases, "r+b") as fh:  # cluster 3 of one module: NaNs
        fh.seek(lo + k_bad * per_cluster)
        fh.write(struct.pack("<f", float("nan")) * (per_cluster // 4))
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as fh:
        manifest = json.load(fh)
    checked = dict(manifest)
    manifest.pop("sha256")
    with open(mpath, "w") as fh:
        json.dump(manifest, fh)
    before = _files(path)
    cache = AdapterCache(path, lazy=True, max_clusters=2, max_adapters=3, device="cpu")
    planner = BatchPlanner(cache, 16)
    good = by_cluster(coll, 0)[0]
    bad = by_cluster(coll, k_bad)[0]
    snap = snapshot(cache)
    where = f"'{bad}'.*module {MODULES[2].name}, tensor U of cluster {k_bad}: .*NaN or infinite"
    with pytest.raises(StoreError, match=where):
        planner.prepare([good], [2])
    assert_unchanged(cache, snap, host_counters=False)  # the failed read counts as a host miss
    assert cache.where(good) == "disk" and cache.where(bad) == "disk"
    with pytest.raises(StoreError, match=where):  # refused again, never half trusted
        planner.prepare([good, bad], [1, 1])
    with pytest.raises(StoreError, match=where):  # eager open reads everything and refuses
        AdapterCache(path, lazy=False, device="cpu")
    assert _files(path) == before
    # With its checksums (as written), the damaged file is refused before any of its data is used.
    with open(mpath, "w") as fh:
        json.dump(checked, fh)
    cache = AdapterCache(path, lazy=True, max_clusters=2, max_adapters=3, device="cpu")
    planner = BatchPlanner(cache, 16)
    snap = snapshot(cache)
    with pytest.raises(StoreError, match=f"{m['files']['bases']}: checksum mismatch"):
        planner.prepare([good], [2])
    assert_unchanged(cache, snap, host_counters=False)


def test_wrap_model_refuses_other_shapes(coll):
    from torch import nn

    from jdlora_ops.serving import wrap_model

    class Block(nn.Module):
        def __init__(self, d_out):
            super().__init__()
            self.q_proj = nn.Linear(36, d_out, bias=False)
            self.v_proj = nn.Linear(36, 20, bias=False)

    class Layer(nn.Module):
        def __init__(self, d_out):
            super().__init__()
            self.self_attn = Block(d_out)

    class Model(nn.Module):
        def __init__(self, d_out):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([Layer(d_out), Layer(40)])

    cache = AdapterCache(coll, device="cpu")
    bad = Model(48)
    before = [type(m).__name__ for m in bad.modules()]
    with pytest.raises(AdapterMismatchError, match="is 48 x 36 in the model but 40 x 36 in the adapters"):
        wrap_model(bad, cache)
    assert [type(m).__name__ for m in bad.modules()] == before
    with pytest.raises(AdapterMismatchError, match="no module 'model.layers.0.self_attn.q_proj'"):
        wrap_model(nn.Linear(3, 3), cache)
    # another dtype than the tables' is served (x cast to the tables' dtype, the update added in the model's)
    good = Model(40).double()
    wrap_model(good, cache).unwrap()
