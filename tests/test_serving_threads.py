"""Concurrency contract of AdapterCache: loads and evictions on one thread while others serve.

A loader thread churns adapters and clusters through small tables (load,
evict, evict_cluster, add) while serving threads prepare batches and check
every module's output against the dense reference, sleeping between modules
so that the loader runs in the middle of each batch. The last test breaks
the contract on purpose (pins ignored) and checks that the same harness then
sees wrong outputs, i.e. that it would catch a broken implementation.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from jdlora_ops.serving import AdapterCache, BatchPlanner, CapacityError
from jdlora_ops.serving import slots as slots_mod
from serving_data import MODULES, by_cluster, one_thread, random_collection, random_lora, reference_output  # noqa: F401


@pytest.fixture(scope="module")
def coll():
    return random_collection(n=16, K=5, r=6, seed=21)


def make_cache(coll):
    cache = AdapterCache(coll, max_clusters=3, max_adapters=4, max_uncompressed=2, uncompressed_rank=5, device="cpu")
    unc = {f"u{i}": random_lora(seed=30 + i, rank=3 + i % 3) for i in range(4)}
    for k, v in unc.items():
        cache.register_uncompressed(k, v)
    return cache, unc


def loader(cache, coll, stop: threading.Event, failures: list, seed: int):
    """Churn: prefetch, evict adapters and clusters, add adapters; capacity refusals are expected."""
    g = random.Random(seed)
    names = list(coll.adapter_names) + [f"u{i}" for i in range(4)]
    added = 0
    try:
        while not stop.is_set():
            op = g.random()
            try:
                if op < 0.45:
                    cache.load(g.sample(names, g.randint(1, 2)))
                elif op < 0.7:
                    cache.evict(g.choice(names))
                elif op < 0.9:
                    cache.evict_cluster(g.randrange(coll.num_clusters))
                elif added < 5:  # grow the collection while serving (projected into a cluster)
                    k = g.randrange(coll.num_clusters)
                    f = {s.name: (coll.modules[s.name].Vt[k].clone(), coll.modules[s.name].U[k].clone(), 1.0)
                         for s in MODULES}
                    cache.add(f"late{seed}_{added}", f, max_rel_error=0.1)
                    added += 1
                else:
                    cache.state()
            except CapacityError:
                pass
    except BaseException as e:  # reported by the serving side
        failures.append(repr(e))


def serve(cache, coll, unc, iterations: int, seed: int, mismatches: list, failures: list):
    g = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    planner = BatchPlanner(cache, 64)
    by_k = {k: by_cluster(coll, k) for k in range(coll.num_clusters)}
    try:
        for it in range(iterations):
            k = g.randrange(coll.num_clusters)
            comp = g.sample(by_k[k], min(2, len(by_k[k])))
            adapters = comp + [g.choice(list(unc)), None]
            g.shuffle(adapters)
            counts = [g.randint(1, 6) for _ in adapters]
            while True:
                try:
                    plan = planner.prepare(adapters, counts)
                    break
                except CapacityError:  # slots pinned by the other serving thread: retry
                    time.sleep(0.0002)
            with plan:
                for spec in MODULES:
                    x = torch.randn(plan.num_tokens, spec.d_in, generator=gen)
                    y0 = torch.randn(plan.num_tokens, spec.d_out, generator=gen)
                    y = y0.clone()
                    time.sleep(0.0003)  # let the loader run in the middle of the batch
                    plan.apply(spec.name, x, y)
                    ref = reference_output(coll, unc, adapters, counts, spec.name, x, y0)
                    err = float((y.double() - ref).abs().max())
                    if err > 1e-4:
                        mismatches.append((it, spec.name, err))
    except BaseException as e:
        failures.append(repr(e))


def run_harness(coll, *, serving_threads: int, iterations: int, seed: int):
    cache, unc = make_cache(coll)
    stop = threading.Event()
    mismatches: list = []
    failures: list = []
    lt = threading.Thread(target=loader, args=(cache, coll, stop, failures, seed), daemon=True)
    lt.start()
    servers = [
        threading.Thread(target=serve, args=(cache, coll, unc, iterations, seed + 1 + i, mismatches, failures))
        for i in range(serving_threads)
    ]
    for t in servers:
        t.start()
    for t in servers:
        t.join(timeout=120)
    stop.set()
    lt.join(timeout=30)
    return cache, mismatches, failures


def test_loader_churn_while_serving(coll):
    cache, mismatches, failures = run_harness(coll, serving_threads=1, iterations=120, seed=1)
    assert not failures, failures
    assert not mismatches, mismatches[:5]
    st = cache.state()
    # The churn really happened: many evictions and reloads, and nothing left pinned.
    assert st["stats"]["adapter_evictions"] > 50 and st["stats"]["cluster_evictions"] > 20
    assert st["stats"]["uncompressed_evictions"] > 10
    assert st["device"]["pinned"] == {"clusters": 0, "adapters": 0, "uncompressed": 0}


def test_two_serving_threads_and_a_loader(coll):
    cache, mismatches, failures = run_harness(coll, serving_threads=2, iterations=60, seed=7)
    assert not failures, failures
    assert not mismatches, mismatches[:5]
    assert cache.state()["device"]["pinned"] == {"clusters": 0, "adapters": 0, "uncompressed": 0}


def test_harness_detects_a_broken_contract(coll, monkeypatch):
    """With pins ignored, the loader overwrites slots of the batch in flight: the harness must see it."""
    monkeypatch.setattr(slots_mod.SlotPool, "pin", lambda self, slot: None)
    monkeypatch.setattr(slots_mod.SlotPool, "unpin", lambda self, slot: None)
    _, mismatches, failures = run_harness(coll, serving_threads=1, iterations=60, seed=3)
    assert mismatches or failures
