"""Clustered JD over whole collections, streaming, and projection of new adapters."""

from __future__ import annotations

import itertools

import pytest
import torch

from jdlora_ops.compress import (
    CallableCollection,
    InMemoryCollection,
    ModuleFactors,
    ModuleSpec,
    compress,
    evaluate_clusters,
    kmeans,
    project_adapters,
)
from jdlora_ops.compress.partition_search import fill_empty as _fill_empty
from jdlora_ops.synthetic import SyntheticCollection, SyntheticSpec, llama_like_modules, planted_collection

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")

MODS = [ModuleSpec("layers.0.q", 24, 20), ModuleSpec("layers.0.v", 12, 20), ModuleSpec("layers.1.q", 24, 20)]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to renaming the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("method", ["full", "diag"])
def test_planted_clustering_is_recovered(method):
    col, labels = planted_collection(MODS, clusters=3, per_cluster=5, rank=3, adapter_ranks=(3, 5), seed=1,
                                     diagonal=method == "diag")
    res = compress(col, 3, num_clusters=3, method=method, dtype=F64, tol=1e-13, max_iter=400)
    assert res.num_clusters == 3
    assert same_partition(res.assignment, labels)
    assert float(res.rel_errors().max()) < 1e-9
    assert res.history[-1]["moved"] == 0


def test_planted_clustering_recovered_from_a_bad_start():
    col, labels = planted_collection(MODS, clusters=3, per_cluster=4, rank=2, adapter_ranks=(2, 4), seed=3)
    bad = labels.clone()
    bad[0], bad[5], bad[10] = 1, 2, 0  # one adapter of each cluster starts in the wrong one
    res = compress(col, 2, num_clusters=3, dtype=F64, tol=1e-12, max_iter=200, init_assignment=bad)
    assert same_partition(res.assignment, labels)
    assert float(res.rel_errors().max()) < 1e-9
    assert len(res.history) >= 2 and res.history[0]["moved"] > 0
    # k-means-like: the fitted objective falls from round to round
    objs = [h["objective"] for h in res.history]
    assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in zip(objs, objs[1:])), objs


def test_noisy_planted_clusters_beat_one_cluster():
    col, labels = planted_collection(MODS, clusters=3, per_cluster=5, rank=3, adapter_ranks=(4,), noise=0.05, seed=4)
    one = compress(col, 3, num_clusters=1, dtype=F64)
    three = compress(col, 3, num_clusters=3, dtype=F64)
    assert same_partition(three.assignment, labels)
    assert three.summary()["mean_rel_error"] < 0.05 < one.summary()["mean_rel_error"]


def test_k_equal_to_n_and_single_adapter():
    col, _ = planted_collection(MODS[:1], clusters=2, per_cluster=2, rank=2, adapter_ranks=(3,), seed=5)
    res = compress(col, 3, num_clusters=4, dtype=F64)
    assert res.num_clusters == 4 and sorted(res.assignment.tolist()) == [0, 1, 2, 3]
    assert float(res.rel_errors().max()) < 1e-10  # own bases of rank 3 >= the adapters' rank
    names = col.adapter_names[:1]
    one = InMemoryCollection({names[0]: {MODS[0].name: col._adapters[names[0]][MODS[0].name]}})
    res1 = compress(one, 2, num_clusters=1, dtype=F64)
    assert res1.num_clusters == 1 and res1.assignment.tolist() == [0]


def test_zero_and_missing_adapters():
    col, _ = planted_collection(MODS, clusters=2, per_cluster=3, rank=2, adapter_ranks=(2,), seed=6)
    adapters = {k: dict(v) for k, v in col._adapters.items()}
    adapters["partial"] = {MODS[1].name: adapters["p004"][MODS[1].name]}
    col2 = InMemoryCollection(adapters, modules=MODS)
    for method in ("full", "diag"):
        res = compress(col2, 2, num_clusters=2, method=method, dtype=F64, tol=1e-12, max_iter=300)
        i_part = res.index("partial")
        assert float(res.rel_errors()[i_part, 0]) == 0.0
        assert torch.isfinite(res.rel_errors()).all()
        assert res.metadata["ranks"][MODS[0].name][i_part] == 0
        assert res.metadata["ranks"][MODS[1].name][i_part] == 2


def test_empty_cluster_is_refilled():
    labels = torch.tensor([0, 0, 0, 2, 2])
    cost = torch.tensor([1.0, 5.0, 2.0, 3.0, 0.5])
    out = _fill_empty(labels, cost, 3)
    assert sorted(set(out.tolist())) == [0, 1, 2]
    assert out.tolist()[1] == 1  # the costliest point of a cluster with >= 2 members moves
    col, labels = planted_collection(MODS, clusters=2, per_cluster=3, rank=2, adapter_ranks=(2,), seed=7)
    init = torch.zeros(6, dtype=torch.long)  # clusters 1 and 2 start empty
    res = compress(col, 2, num_clusters=3, dtype=F64, init_assignment=init, max_iter=100)
    assert res.num_clusters <= 3 and torch.bincount(res.assignment).min() >= 1
    assert float(res.rel_errors().max()) < 1e-9


def test_kmeans_separates_points_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = torch.cat([c + 0.1 * torch.randn(7, 2, generator=g) for c in centers])
    lab = kmeans(X, 3, seed=1)
    assert same_partition(lab, torch.arange(21) // 7)
    assert torch.equal(lab, kmeans(X, 3, seed=1))
    assert kmeans(X[:2], 5).tolist() == [0, 1]


def test_streaming_reads_one_module_at_a_time():
    import gc
    import weakref

    col, labels = planted_collection(MODS, clusters=2, per_cluster=3, rank=2, adapter_ranks=(2, 3), seed=8)
    calls, refs, peak = [], [], [0]

    def load(spec, dtype, device):
        gc.collect()
        alive = sum(r() is not None for r in refs)
        peak[0] = max(peak[0], alive)
        calls.append(spec.name)
        f = col.load_module(spec, dtype=dtype, device=device)
        refs.append(weakref.ref(f))
        return f

    stream = CallableCollection(col.adapter_names, col.modules, load)
    res = compress(stream, 2, num_clusters=2, dtype=F64, signature_modules=1, warmup_rounds=0, max_iter=100)
    assert same_partition(res.assignment, labels)
    rounds = len(res.history)
    head = len(calls) - rounds * len(MODS)
    assert calls[head:] == [m.name for m in MODS] * rounds  # each round reads every module once
    assert head >= 1 and set(calls[:head]) == {MODS[0].name}  # the partition search reads only its module
    assert peak[0] == 0  # a module's factors are released before the next module is read


def test_objective_summed_over_modules_decides_assignment():
    # Adapter "x" matches cluster A on two modules and cluster B on one: it must join A.
    g = torch.Generator().manual_seed(9)
    bases = {}
    for m in MODS:
        for c in "AB":
            bases[(m.name, c)] = (torch.linalg.qr(torch.randn(m.d_out, 2, generator=g, dtype=F64))[0],
                                  torch.linalg.qr(torch.randn(m.d_in, 2, generator=g, dtype=F64))[0])

    def adapter(choice):
        out = {}
        for m, c in zip(MODS, choice):
            U, V = bases[(m.name, c)]
            S = torch.randn(2, 2, generator=g, dtype=F64)
            out[m.name] = (V.t().clone(), U @ S, 1.0)
        return out

    adapters = {f"a{i}": adapter("AAA") for i in range(4)}
    adapters.update({f"b{i}": adapter("BBB") for i in range(4)})
    adapters["x"] = adapter("AAB")
    col = InMemoryCollection(adapters, modules=MODS)
    init = torch.tensor([0] * 4 + [1] * 4 + [1])
    res = compress(col, 2, num_clusters=2, dtype=F64, init_assignment=init, max_iter=200, tol=1e-12)
    assert int(res.assignment[res.index("x")]) == int(res.assignment[0]) != int(res.assignment[4])


def test_validation_errors():
    col, _ = planted_collection(MODS, clusters=1, per_cluster=2, rank=2, adapter_ranks=(2,))
    with pytest.raises(ValueError, match="larger than"):
        compress(col, 13, dtype=F64)
    with pytest.raises(ValueError, match=r"num_clusters \(--clusters\) must be an integer from 1 to the number of adapters \(2\), got 0"):
        compress(col, 2, num_clusters=0)
    with pytest.raises(ValueError, match=r"number of adapters \(2\), got 3"):
        compress(col, 2, num_clusters=3)
    with pytest.raises(ValueError, match="method"):
        compress(col, 2, method="tucker")
    with pytest.raises(ValueError, match="no adapters"):
        compress(InMemoryCollection({}, modules=MODS), 2)


def test_duplicate_names_and_zero_updates_are_refused():
    col, _ = planted_collection(MODS, clusters=2, per_cluster=2, rank=2, adapter_ranks=(2,), seed=2)
    twice = CallableCollection(["a", "b", "a", "c"], MODS, lambda spec, dt, dev: col.load_module(spec, dtype=dt, device=dev))
    for method in ("full", "svd"):
        with pytest.raises(ValueError, match="adapter names must be unique; repeated: 'a'"):
            compress(twice, 2, num_clusters=2, method=method)
    adapters = {k: dict(v) for k, v in col._adapters.items()}
    adapters["zero"] = {m.name: (adapters["p000"][m.name][0], torch.zeros_like(adapters["p000"][m.name][1]), 1.0)
                        for m in MODS}
    with pytest.raises(ValueError, match="non-zero update on at least one module; zero update: zero"):
        compress(InMemoryCollection(adapters, modules=MODS), 2, num_clusters=2, dtype=F64)


# ------------------------------------------------------------- projection
@pytest.mark.parametrize("method", ["full", "diag"])
def test_projecting_a_member_reproduces_its_sigma(method):
    col, labels = planted_collection(MODS, clusters=2, per_cluster=4, rank=3, adapter_ranks=(4,), noise=0.1, seed=10)
    res = compress(col, 3, num_clusters=2, method=method, dtype=F64, tol=1e-12, max_iter=300)
    name = col.adapter_names[5]
    i = res.index(name)
    again = InMemoryCollection({"copy": col._adapters[name]}, modules=MODS)
    report = project_adapters(res, again)
    j = res.index("copy")
    assert int(report.clusters[0]) == int(res.assignment[i]) == int(res.assignment[j])
    for m in MODS:
        cm = res.modules[m.name]
        assert torch.allclose(cm.sigma[j], cm.sigma[i], atol=1e-10)
        assert abs(float(cm.rel_errors[j] - cm.rel_errors[i])) < 1e-10
    assert torch.allclose(report.rel_errors[0], res.rel_errors()[i], atol=1e-10)


def test_projection_picks_the_best_cluster_and_reports_errors():
    col, labels = planted_collection(MODS, clusters=3, per_cluster=4, rank=2, adapter_ranks=(2, 3), seed=11)
    # Fit on all but the last adapter of each cluster, then project those three.
    held = [col.adapter_names[k * 4 + 3] for k in range(3)]
    train = InMemoryCollection({k: v for k, v in col._adapters.items() if k not in held}, modules=MODS)
    res = compress(train, 2, num_clusters=3, dtype=F64, tol=1e-12, max_iter=200)
    new = InMemoryCollection({k: col._adapters[k] for k in held}, modules=MODS)
    report = project_adapters(res, new)
    for k, name in enumerate(held):
        peers = [res.index(col.adapter_names[k * 4 + j]) for j in range(3)]
        assert int(report.clusters[k]) == int(res.assignment[peers[0]])
    assert float(report.rel_errors.max()) < 1e-10
    assert report.cost.shape == (3, 3)
    assert res.num_adapters == 12 and res.modules[MODS[0].name].sigma.shape[0] == 12
    # An unrelated adapter is added too, with a large reported error.
    g = torch.Generator().manual_seed(0)
    odd = {m.name: (torch.randn(3, m.d_in, generator=g, dtype=F64), torch.randn(m.d_out, 3, generator=g, dtype=F64), 1.0)
           for m in MODS}
    rep2 = project_adapters(res, InMemoryCollection({"odd": odd}, modules=MODS))
    assert float(rep2.rel_errors.min()) > 0.3
    with pytest.raises(ValueError, match="already"):
        project_adapters(res, InMemoryCollection({"odd": odd}, modules=MODS))
    bad = InMemoryCollection({"bad": {"layers.9.q": odd[MODS[0].name]}})
    with pytest.raises(ValueError, match="not in the compressed"):
        project_adapters(res, bad)


def test_projection_into_forced_cluster_and_baselines():
    col, _ = planted_collection(MODS, clusters=2, per_cluster=2, rank=2, adapter_ranks=(2,), seed=12)
    res = compress(col, 2, num_clusters=2, dtype=F64)
    name = col.adapter_names[0]
    other = 1 - int(res.assignment[0])
    rep = project_adapters(res, InMemoryCollection({"c": col._adapters[name]}, modules=MODS), cluster=other)
    assert int(rep.clusters[0]) == other and float(rep.rel_errors.min()) > 1e-3
    for method in ("svd", "none"):
        base = compress(col, 2, method=method, dtype=F64)
        rep = project_adapters(base, InMemoryCollection({"c": col._adapters[name]}, modules=MODS))
        assert base.num_clusters == 5 and int(rep.clusters[0]) == 4
        for m in MODS:
            assert torch.allclose(base.reconstruct("c", m.name), base.reconstruct(name, m.name), atol=1e-10)


def test_evaluate_clusters_matches_dense():
    col, _ = planted_collection(MODS[:1], clusters=2, per_cluster=3, rank=2, adapter_ranks=(3,), noise=0.3, seed=13)
    f = col.load_module(MODS[0], dtype=F64)
    g = torch.Generator().manual_seed(2)
    U = torch.stack([torch.linalg.qr(torch.randn(24, 2, generator=g, dtype=F64))[0] for _ in range(3)])
    V = torch.stack([torch.linalg.qr(torch.randn(20, 2, generator=g, dtype=F64))[0] for _ in range(3)])
    ev = evaluate_clusters(f, U, V, "full", all_sigma=True)
    evd = evaluate_clusters(f, U, V, "diag", all_sigma=True)
    for i, k in itertools.product(range(6), range(3)):
        W = f.dense(i)
        S = U[k].t() @ W @ V[k]
        assert torch.allclose(ev.sigma[i, k], S, atol=1e-12)
        assert abs(float(ev.errors[i, k] - (W - U[k] @ S @ V[k].t()).square().sum())) < 1e-9
        s = torch.linalg.solve((U[k].t() @ U[k]) * (V[k].t() @ V[k]), torch.diagonal(S))
        assert torch.allclose(evd.sigma[i, k], s, atol=1e-10)
        assert abs(float(evd.errors[i, k] - (W - U[k] @ torch.diag(s) @ V[k].t()).square().sum())) < 1e-9


def test_realistic_synthetic_families_help():
    mods = llama_like_modules(2, 64, 32)
    col = SyntheticCollection(SyntheticSpec(40, mods, num_families=4, num_seeds=2, ranks=(4, 8), family_dim=6,
                                            shared=0.9, seed=3))
    f = col.load_module(mods[0])
    assert f.num_adapters == 40 and sorted(g.rank for g in f.groups) == [4, 8]
    again = col.load_module(mods[0], adapters=[5, 1])
    assert torch.allclose(again.dense(0), f.dense(5), rtol=1e-5, atol=1e-7)
    assert torch.allclose(again.dense(1), f.dense(1), rtol=1e-5, atol=1e-7)
    one = compress(col, 8, num_clusters=1)
    four = compress(col, 8, num_clusters=4)
    assert four.summary()["mean_rel_error"] < one.summary()["mean_rel_error"]
    rnd = SyntheticCollection(SyntheticSpec(40, mods, kind="random", ranks=(4,), seed=3))
    assert compress(rnd, 8).summary()["mean_rel_error"] > one.summary()["mean_rel_error"]


def test_module_factors_partition_and_select():
    col, _ = planted_collection(MODS[:1], clusters=2, per_cluster=3, rank=2, adapter_ranks=(2, 3), seed=14)
    f = col.load_module(MODS[0], dtype=F64)
    assign = torch.tensor([1, 0, 1, 2, 0, 1])
    parts = f.partition(assign, 3)
    for k, part in enumerate(parts):
        members = (assign == k).nonzero().flatten().tolist()
        assert part.num_adapters == len(members)
        for local, i in enumerate(members):
            assert torch.equal(part.dense(local), f.dense(i))
    sub = f.select([4, 0])
    assert torch.equal(sub.dense(0), f.dense(4)) and torch.equal(sub.dense(1), f.dense(0))
    assert isinstance(sub, ModuleFactors)
