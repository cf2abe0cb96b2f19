"""AdapterCache: tiers, slots, least-recently-used eviction, pinning, counters, lazy stores, add()."""

from __future__ import annotations

import pytest
import torch

from jdlora_ops.serving import AdapterCache, BatchPlanner, CapacityError, StoreReader
from jdlora_ops.store import save_store
from serving_data import (  # noqa: F401
    MODULES, by_cluster, one_thread, random_collection, random_lora, reference_output, serve_and_check,
)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def coll():
    return random_collection(n=12, K=4, r=6, seed=3)


def test_tables_have_fixed_shapes_and_fill_on_demand(coll):
    cache = AdapterCache(coll, max_clusters=2, max_adapters=3, device="cpu")
    t = cache.tables[MODULES[0].name]
    shapes = [tuple(x.shape) for x in t.tensors()]
    ptrs = [x.data_ptr() for x in t.tensors()]
    assert shapes == [(2, 6, 36), (2, 40, 6), (3, 6, 6)]
    assert cache.state()["device"]["adapters"] == []
    a = by_cluster(coll, 0)[:2]
    lease = cache.acquire(a + [None])
    k0 = cache.cluster_of(a[0])
    cs = lease.cluster_slots[k0]
    for spec in MODULES:
        cm, tab = coll.modules[spec.name], cache.tables[spec.name]
        assert torch.equal(tab.U[cs], cm.U[k0]) and torch.equal(tab.V[cs], cm.Vt[k0])
        for name in a:
            assert torch.equal(tab.S[lease.adapter_slots[name]], cm.sigma[coll.index(name)])
    assert int(cache.tables.adapter_cluster[lease.adapter_slots[a[1]]]) == cs
    cache.release(lease)
    assert [tuple(x.shape) for x in t.tensors()] == shapes
    assert [x.data_ptr() for x in t.tensors()] == ptrs
    st = cache.state()["stats"]
    assert (st["cluster_misses"], st["adapter_misses"], st["batches"]) == (1, 2, 1)
    assert st["bytes_host_to_device"] == 4 * sum(6 * (s.d_in + s.d_out) + 2 * 36 for s in MODULES)


def test_lru_eviction_order_and_stats(coll):
    cache = AdapterCache(coll, max_clusters=2, max_adapters=3, device="cpu")
    c0, c1, c2 = by_cluster(coll, 0), by_cluster(coll, 1), by_cluster(coll, 2)
    cache.load([c0[0]])
    cache.load([c1[0]])
    cache.load([c0[1]])  # cluster 0 is now more recently used than cluster 1
    assert cache.where(c1[0]) == "device"
    cache.load([c2[0]])  # evicts cluster 1 (least recently used) and with it c1[0]
    st = cache.state()
    assert st["device"]["clusters"] == [0, 2]
    assert c1[0] not in st["device"]["adapters"] and cache.where(c1[0]) == "host"
    assert set(st["device"]["adapters"]) == {c0[0], c0[1], c2[0]}
    cache.load([c0[2]])  # adapter slots full: evicts the least recently used adapter, c0[0]
    assert set(cache.state()["device"]["adapters"]) == {c0[1], c2[0], c0[2]}
    s = cache.state()["stats"]
    assert s["cluster_evictions"] == 1 and s["adapter_evictions"] == 2
    assert s["cluster_misses"] == 3 and s["adapter_misses"] == 5
    cache.load([c0[1]])
    assert cache.state()["stats"]["adapter_hits"] == 1


def test_pinned_slots_are_never_evicted(coll):
    cache = AdapterCache(coll, max_clusters=2, max_adapters=2, device="cpu")
    c0, c1, c2 = by_cluster(coll, 0), by_cluster(coll, 1), by_cluster(coll, 2)
    lease = cache.acquire([c0[0]])
    cache.load([c1[0]])
    # Both cluster slots are taken, one pinned: the next cluster must evict cluster 1, not 0.
    cache.load([c2[0]])
    assert cache.state()["device"]["clusters"] == [0, 2]
    assert cache.evict(c0[0]) is False and cache.evict_cluster(0) is False
    # Adapter slots: c0[0] pinned, c2[0] evictable -> one more fits, two more do not.
    with pytest.raises(CapacityError, match="pinned"):
        cache.acquire([c2[1], c0[1]])
    cache.release(lease)
    with pytest.raises(RuntimeError, match="already released"):
        cache.release(lease)
    assert cache.evict(c0[0]) is True and cache.where(c0[0]) == "host"
    assert cache.evict_cluster(2) is True
    assert cache.state()["device"]["adapters"] == []


def test_mixed_prefill_decode_batch_and_reuse(coll):
    cache = AdapterCache(coll, max_clusters=3, max_adapters=5, max_uncompressed=2, uncompressed_rank=5, device="cpu")
    unc = {"u0": random_lora(seed=0), "u1": random_lora(rank=3, seed=1, skip=(MODULES[1].name,))}
    for k, v in unc.items():
        cache.register_uncompressed(k, v)
    planner = BatchPlanner(cache, 128)
    c0, c1 = by_cluster(coll, 0), by_cluster(coll, 1)
    adapters = [c0[0], None, "u0", c1[0], c0[0], "u1", c1[1], None, c0[1]]
    counts = [17, 3, 1, 1, 1, 9, 0, 1, 1]
    for rep in range(3):
        serve_and_check(planner, coll, unc, adapters, counts, seed=rep)
    s = cache.state()["stats"]
    assert s["batches"] == 3 and s["adapter_misses"] == 3 and s["adapter_hits"] == 6  # c1[1] has 0 tokens
    assert s["uncompressed_misses"] == 2 and s["uncompressed_hits"] == 4
    # A batch only of base-model requests and an empty batch.
    serve_and_check(planner, coll, unc, [None, None], [3, 2])
    serve_and_check(planner, coll, unc, [], [])


def test_multi_slice_apply_matches_per_module(coll):
    cache = AdapterCache(coll, max_clusters=4, max_adapters=6, max_uncompressed=1, uncompressed_rank=5, device="cpu")
    unc = {"u0": random_lora(seed=4)}
    cache.register_uncompressed("u0", unc["u0"])
    planner = BatchPlanner(cache, 64)
    adapters = [coll.adapter_names[0], "u0", coll.adapter_names[5], None]
    counts = [4, 2, 3, 1]
    q, v = MODULES[0], MODULES[1]
    gen = torch.Generator().manual_seed(9)
    with planner.prepare(adapters, counts) as plan:
        x = torch.randn(10, 36, generator=gen)
        y0 = torch.randn(10, 60, generator=gen)
        y = y0.clone()
        plan.apply([q.name, v.name], x, y, slice_offsets=[0, 40])
        ref_q = reference_output(coll, unc, adapters, counts, q.name, x, y0[:, :40])
        ref_v = reference_output(coll, unc, adapters, counts, v.name, x, y0[:, 40:])
        torch.testing.assert_close(y.double(), torch.cat([ref_q, ref_v], 1), atol=2e-5, rtol=2e-5)


def test_diagonal_cores():
    coll = random_collection(n=6, K=2, r=4, diagonal=True, seed=5)
    cache = AdapterCache(coll, device="cpu")
    assert cache.tables[MODULES[0].name].S.shape == (6, 4)
    serve_and_check(BatchPlanner(cache, 32), coll, {}, coll.adapter_names, [2, 1, 3, 1, 1, 2])


def test_lazy_store_tiers(tmp_path, coll):
    save_store(tmp_path / "s", coll)
    eager = AdapterCache(tmp_path / "s", max_clusters=2, max_adapters=3, device="cpu")
    assert not eager.lazy and eager.state()["host"]["clusters"] == [0, 1, 2, 3]
    # Host budget of one cluster's bases plus a few cores: entries come and go.
    one_cluster = 4 * sum(6 * (s.d_in + s.d_out) for s in MODULES)
    cache = AdapterCache(tmp_path / "s", max_clusters=2, max_adapters=3, lazy=True,
                         host_capacity_bytes=one_cluster + 4 * 4 * 36 * 4, device="cpu")
    assert isinstance(cache.reader, StoreReader)
    st = cache.state()
    assert st["host"]["clusters"] == [] and st["host"]["adapters"] == [] and st["disk"]["adapters"] == 12
    a, b = by_cluster(coll, 0)[0], by_cluster(coll, 1)[0]
    assert cache.where(a) == "disk"
    planner = BatchPlanner(cache, 32)
    serve_and_check(planner, coll, {}, [a, None], [3, 1])
    assert cache.where(a) == "device"
    s = cache.state()["stats"]
    assert s["host_misses"] == 2 and s["bytes_disk_to_host"] > 0
    serve_and_check(planner, coll, {}, [b], [2])
    serve_and_check(planner, coll, {}, [a, b], [1, 1])
    s = cache.state()
    assert s["stats"]["host_evictions"] >= 1 and s["host"]["cached_bytes"] <= s["host"]["capacity_bytes"]
    assert 0 not in s["host"]["clusters"] or 1 not in s["host"]["clusters"]
    # Evicted from the device and from the host: back to disk, and served again correctly.
    cache.evict_cluster(0)
    assert cache.where(a) in ("host", "disk")
    serve_and_check(planner, coll, {}, [a, b], [2, 2], seed=3)


def test_add_projects_or_falls_back(coll):
    cache = AdapterCache(coll, max_clusters=4, max_adapters=6, max_uncompressed=2, uncompressed_rank=6, device="cpu")
    gen = torch.Generator().manual_seed(11)
    # An update inside cluster 2's bases: B = U_2 S, A = Vt_2 -> lossless projection into cluster 2.
    inside = {}
    for spec in MODULES:
        cm = coll.modules[spec.name]
        S = torch.randn(6, 6, generator=gen)
        inside[spec.name] = (cm.Vt[2].clone(), cm.U[2] @ S, 0.25)
    rep = cache.add("inside", inside, max_rel_error=0.05)
    assert rep.path == "compressed" and rep.cluster == 2 and rep.max_rel_error < 1e-6
    assert cache.path_of("inside") == "compressed" and cache.cluster_of("inside") == 2
    outside = random_lora(rank=6, seed=7)
    rep2 = cache.add("outside", outside, max_rel_error=0.05)
    assert rep2.path == "uncompressed" and rep2.mean_rel_error > 0.5 and "max_rel_error" in rep2.reason
    assert cache.path_of("outside") == "uncompressed"
    unc = {"outside": outside}
    # The projected adapter reconstructs as U_2 (U_2^T dW V_2) Vt_2 = dW: check it against dW itself.
    planner = BatchPlanner(cache, 32)
    gen2 = torch.Generator().manual_seed(12)
    adapters, counts = ["inside", "outside", coll.adapter_names[0]], [3, 2, 2]
    with planner.prepare(adapters, counts) as plan:
        for spec in MODULES:
            x = torch.randn(7, spec.d_in, generator=gen2)
            y = torch.zeros(7, spec.d_out)
            plan.apply(spec.name, x, y)
            A, B, s = inside[spec.name]
            torch.testing.assert_close(y[:3].double(), x[:3].double() @ (s * B.double() @ A.double()).T,
                                       atol=2e-5, rtol=2e-5)
            A, B, s = outside[spec.name]
            torch.testing.assert_close(y[3:5].double(), x[3:5].double() @ (s * B.double() @ A.double()).T,
                                       atol=2e-5, rtol=2e-5)
            ref = reference_output(coll, unc, adapters[2:], counts[2:], spec.name, x[5:], torch.zeros(2, spec.d_out))
            torch.testing.assert_close(y[5:].double(), ref, atol=2e-5, rtol=2e-5)


def test_add_to_lazy_store_keeps_file_untouched(tmp_path, coll):
    path = tmp_path / "s"
    save_store(path, coll)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    cache = AdapterCache(path, lazy=True, max_uncompressed=1, uncompressed_rank=6, device="cpu")
    cm = coll.modules
    f = {s.name: (cm[s.name].Vt[1].clone(), cm[s.name].U[1].clone(), 1.0) for s in MODULES}
    assert cache.add("new", f, max_rel_error=0.1).path == "compressed"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_state_is_json_and_reports_residency(coll):
    import json

    cache = AdapterCache(coll, max_clusters=2, max_adapters=3, max_uncompressed=1, uncompressed_rank=5, device="cpu")
    cache.register_uncompressed("u", random_lora())
    lease = cache.acquire([coll.adapter_names[0], "u"])
    st = json.loads(json.dumps(cache.state()))
    assert st["device"]["pinned"] == {"clusters": 1, "adapters": 1, "uncompressed": 1}
    assert st["device"]["uncompressed"] == ["u"] and st["host"]["uncompressed"] == ["u"]
    assert st["device"]["capacity"] == {"clusters": 2, "adapters": 3, "uncompressed": 1, "uncompressed_rank": 5}
    assert st["device"]["table_bytes"]["total"] == cache.tables.nbytes()["total"] > 0
    cache.release(lease)
    assert cache.state()["device"]["pinned"] == {"clusters": 0, "adapters": 0, "uncompressed": 0}
    assert cache.where("u") == "device" and cache.evict("u") and cache.where("u") == "host"
    assert "u" in cache and cache.adapter_names[-1] == "u" and len(cache.adapter_names) == 13


@cuda_only
def test_cuda_pinned_host_side_stream_and_events(coll):
    cache = AdapterCache(coll, max_clusters=2, max_adapters=3, device="cuda", dtype=torch.float32)
    assert cache.state()["host"]["pinned_memory"]
    assert cache.host.bases(0)[0][0].is_pinned()
    planner = BatchPlanner(cache, 64)
    names = by_cluster(coll, 0)[:2] + by_cluster(coll, 1)[:1]
    gen = torch.Generator().manual_seed(0)
    for rep in range(4):
        lease_names = names if rep % 2 == 0 else by_cluster(coll, 2)[:2] + by_cluster(coll, 3)[:1]
        counts = [3, 1, 2]
        with planner.prepare(lease_names, counts) as plan:
            assert plan.lease.ready or rep > 0
            for spec in MODULES:
                x = torch.randn(6, spec.d_in, generator=gen)
                y = torch.zeros(6, spec.d_out)
                yd = y.cuda()
                plan.apply(spec.name, x.cuda(), yd)
                ref = reference_output(coll, {}, lease_names, counts, spec.name, x, y)
                torch.testing.assert_close(yd.cpu().double(), ref, atol=1e-4, rtol=1e-4)
    torch.cuda.synchronize()


def test_registered_adapter_switches_to_compressed_path(coll):
    """A late fine-tune served uncompressed, then projected (error below the threshold) and switched,
    also while a batch that uses its uncompressed slot is in flight."""
    cache = AdapterCache(coll, max_clusters=4, max_adapters=6, max_uncompressed=2, uncompressed_rank=6, device="cpu")
    cm = coll.modules
    gen = torch.Generator().manual_seed(5)
    late = {s.name: (cm[s.name].Vt[1].clone(), cm[s.name].U[1] @ torch.randn(6, 6, generator=gen), 0.5)
            for s in MODULES}
    cache.register_uncompressed("late", late)
    planner = BatchPlanner(cache, 32)
    unc = {"late": late}
    plan = planner.prepare(["late", coll.adapter_names[2]], [3, 2])
    assert plan.has_uncompressed and cache.path_of("late") == "uncompressed"
    rep = cache.add("late", max_rel_error=0.01)  # switch while the batch is in flight
    assert rep.path == "compressed" and rep.cluster == 1 and cache.path_of("late") == "compressed"
    assert cache.state()["device"]["uncompressed"] == ["late"]  # still pinned by the batch in flight
    gen2 = torch.Generator().manual_seed(6)
    for spec in MODULES:  # the batch in flight still reads the untouched uncompressed slot
        x = torch.randn(5, spec.d_in, generator=gen2)
        y = torch.zeros(5, spec.d_out)
        plan.apply(spec.name, x, y)
        ref = reference_output(coll, unc, ["late", coll.adapter_names[2]], [3, 2], spec.name, x, torch.zeros(5, spec.d_out))
        torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)
    plan.release()
    assert cache.state()["device"]["uncompressed"] == []  # the old slot was freed at release
    with planner.prepare(["late"], [4]) as plan2:
        assert plan2.has_compressed and not plan2.has_uncompressed
        for spec in MODULES:
            x = torch.randn(4, spec.d_in, generator=gen2)
            y = torch.zeros(4, spec.d_out)
            plan2.apply(spec.name, x, y)
            ref = reference_output(coll, unc, ["late"], [4], spec.name, x, torch.zeros(4, spec.d_out))
            torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)
    # A registered adapter far from every cluster stays uncompressed.
    cache.register_uncompressed("far", random_lora(rank=4, seed=9))
    rep = cache.add("far", max_rel_error=0.05)
    assert rep.path == "uncompressed" and cache.path_of("far") == "uncompressed"
    with pytest.raises(ValueError, match="already compressed"):
        cache.add("late", max_rel_error=1.0)
