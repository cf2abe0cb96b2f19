"""Clustered JD-Full finds the planted partition: every case of the family is recovered exactly.

Every case of :func:`planted_cases.planted_cases` (62 cases: d in {64, 384, 4096},
K from 2 to 25, equal and unequal cluster sizes with singletons and a dominant
cluster, adapter ranks below and equal to the cluster rank, magnitudes spread
100x, 1 to 96 modules) goes through the Python API; every eighth one also goes
through ``jdlora compress`` and ``jdlora export`` and is compared with the
original updates read back from the exported PEFT directories.
"""

from __future__ import annotations

import os

import pytest
import torch

from jdlora_ops.cli import main
from jdlora_ops.compress import ModuleSpec, compress, compress_none
from jdlora_ops.compress.clustering import _fit_rounds
from jdlora_ops.compress.partition_search import search_partition
from jdlora_ops.peft_io import PeftCollection, export_peft_adapter
from jdlora_ops.synthetic import planted_partition
from planted_cases import planted_cases

F64 = torch.float64
CASES = planted_cases()
CLI_CASES = [c for c in CASES if c.index % 8 == 0]

pytestmark = pytest.mark.usefixtures("one_thread")


def make(case):
    return planted_partition(case.modules, case.sizes, rank=case.rank, adapter_ranks=case.adapter_ranks,
                             scale_range=100.0, seed=case.index)


def max_rel_error(original, name_to_dense) -> float:
    worst = 0.0
    for spec in original.modules:
        f = original.load_module(spec, dtype=F64)
        for i, name in enumerate(original.adapter_names):
            W = f.dense(i)
            worst = max(worst, float((name_to_dense(name, spec.name) - W).square().sum() / W.square().sum()))
    return worst


def test_family_is_large_and_varied():
    assert len(CASES) >= 60
    assert {c.d for c in CASES} == {64, 384, 4096}
    Ks = {len(c.sizes) for c in CASES}
    assert min(Ks) == 2 and max(Ks) == 25
    assert any(1 in c.sizes for c in CASES) and any(max(c.sizes) >= 3 * min(c.sizes) + 3 for c in CASES)
    assert any(min(c.adapter_ranks) < c.rank for c in CASES) and any(c.adapter_ranks == (c.rank,) for c in CASES)
    nmods = {len(c.modules) for c in CASES}
    assert min(nmods) <= 2 and max(nmods) == 96


@pytest.mark.parametrize("case", CASES, ids=str)
def test_planted_partition_is_recovered(case):
    col, labels = make(case)
    res = compress(col, case.rank, num_clusters=len(case.sizes), dtype=F64, tol=1e-12, max_iter=200)
    assert float(res.rel_errors().max()) < 1e-8, (case, torch.bincount(res.assignment).tolist())
    # Independent check against the dense updates.
    assert max_rel_error(col, lambda a, m: res.reconstruct(a, m).to(F64)) < 1e-8
    objectives = [h["objective"] for h in res.history]
    assert all(b <= a + 1e-12 * max(1.0, abs(a)) for a, b in zip(objectives, objectives[1:])), objectives
    steps = res.metadata.get("cluster_search", {}).get("steps", [])
    kept = [s["objective"] for s in steps if s.get("kept")]
    assert all(b < a for a, b in zip(kept, kept[1:])), steps


@pytest.mark.parametrize("case", CLI_CASES, ids=str)
def test_planted_partition_through_cli_and_export(case, tmp_path, capsys):
    col, _ = make(case)
    # The adapters as PEFT directories: the uncompressed "none" collection exports them exactly.
    plain = compress_none(col, dtype=F64)
    dirs = [export_peft_adapter(plain, name, tmp_path / "in" / name, dtype=F64) for name in col.adapter_names]
    store = tmp_path / "store"
    rc = main(["compress", *map(str, dirs), "--rank", str(case.rank), "--clusters", str(len(case.sizes)),
               "--compute-dtype", "float64", "--tol", "1e-12", "--max-iter", "200", "--out", str(store), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    exported = {}
    for name in col.adapter_names:
        rc = main(["export", str(store), name, "--out", str(tmp_path / "out" / name), "--dtype", "float64"])
        assert rc == 0, capsys.readouterr().err
        back = PeftCollection([os.fspath(tmp_path / "out" / name)])
        exported[name] = {spec.name: back.load_module(spec, dtype=F64).dense(0) for spec in back.modules}
    assert max_rel_error(col, lambda a, m: exported[a][m]) < 1e-8


def _search(col, K, rank, affinities, **kw):
    opts = dict(rank=rank, method="full", weights="relative", max_iter=200, tol=1e-12, seed=0, dtype=F64,
                device=torch.device("cpu"))
    specs = col.modules
    return search_partition(affinities, K, lambda a, rounds, warm: _fit_rounds(col, specs, a, K, rounds, warm, **opts)[0],
                            **kw)


@pytest.mark.parametrize("sizes,rank,ranks,seed", [([6, 6, 6], 6, (4,), 0), ([6, 6, 6], 6, (4,), 1),
                                                   ([3] * 8, 4, (2,), 0), ([1, 9, 2, 5, 1], 4, (0, 2, 1), 2)])
def test_moves_leave_local_minima_from_an_uninformed_start(sizes, rank, ranks, seed):
    # Random affinities: the spectral candidates are arbitrary partitions, fit/reassign rounds
    # stall in a local minimum, and only the moves reach the planted optimum.
    mods = [ModuleSpec(f"layers.{i}.{k}", d, 64) for i in range(2) for k, d in (("q_proj", 64), ("v_proj", 32))]
    col, labels = planted_partition(mods, sizes, rank=rank, adapter_ranks=ranks, scale_range=100.0, seed=seed)
    n = labels.numel()
    noise = {"random": torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)}
    res = _search(col, len(sizes), rank, noise, max_moves=60, move_rounds=2)
    kept = [s for s in res.steps if s.get("kept")]
    assert any(s["step"] == "move" for s in kept), res.steps
    assert res.best.objective < 1e-9 * res.best.total, res.steps
    objectives = [res.steps[1]["objective"]] + [s["objective"] for s in kept]
    assert all(b < a for a, b in zip(objectives, objectives[1:])), objectives
    again = _search(col, len(sizes), rank, noise, max_moves=60, move_rounds=2)
    assert torch.equal(again.best.assignment, res.best.assignment)


def test_reported_example_is_recovered_deterministically():
    # The reported example (the earlier k-means++ start ended at sizes [1, 5, 12] here): 18 adapters in 3 planted clusters of 6 on 2 layers x {q_proj, v_proj}.
    mods = [ModuleSpec(f"model.layers.{i}.self_attn.{k}", d, 64) for i in range(2) for k, d in (("q_proj", 64),
                                                                                                  ("v_proj", 32))]
    col, labels = planted_partition(mods, [6, 6, 6], rank=6, adapter_ranks=(4,), scale_range=100.0, seed=5)
    a = compress(col, 6, num_clusters=3, dtype=F64, tol=1e-12, max_iter=200, seed=0)
    b = compress(col, 6, num_clusters=3, dtype=F64, tol=1e-12, max_iter=200, seed=0)
    assert torch.equal(a.assignment, b.assignment)
    untimed = lambda res: [{k: v for k, v in s.items() if k != "seconds"} for s in res.metadata["cluster_search"]["steps"]]  # noqa: E731
    assert untimed(a) == untimed(b)
    assert float(a.rel_errors().max()) < 1e-8


def _reported_example():
    mods = [ModuleSpec(f"model.layers.{i}.self_attn.{k}", d, 64) for i in range(2) for k, d in (("q_proj", 64),
                                                                                                  ("v_proj", 32))]
    return planted_partition(mods, [6, 6, 6], rank=6, adapter_ranks=(4,), scale_range=100.0, seed=0)


def test_auto_cluster_count_follows_the_tradeoff():
    col, labels = _reported_example()
    res = compress(col, 6, num_clusters="auto", cluster_range=(1, 8), tradeoff=0.5, dtype=F64, tol=1e-12, max_iter=200)
    count = res.metadata["cluster_count"]
    curve = {p["clusters"]: p for p in count["curve"]}
    assert sorted(curve) == [1, 2, 3, 5, 8]
    assert count["chosen"] == min(curve, key=lambda k: curve[k]["score"]) == res.num_clusters == 3
    assert curve[1]["mean_rel_error"] > 0.1 and curve[3]["mean_rel_error"] < 1e-9
    assert all(curve[a]["bytes_ratio"] < curve[b]["bytes_ratio"] for a, b in zip([1, 2, 3, 5], [2, 3, 5, 8]))
    assert float(res.rel_errors().max()) < 1e-8
    cheap = compress(col, 6, num_clusters="auto", cluster_range=(1, 8), tradeoff=100.0, dtype=F64, max_iter=50)
    assert cheap.num_clusters == 1
    with pytest.raises(ValueError, match=r"--clusters-range\) must lie in \[1, 18\]"):
        compress(col, 6, num_clusters="auto", cluster_range=(2, 40))
    with pytest.raises(ValueError, match=r"--tradeoff\) must be a number >= 0, got -1"):
        compress(col, 6, num_clusters="auto", cluster_range=(1, 4), tradeoff=-1.0)


def test_auto_cluster_count_through_cli(tmp_path, capsys):
    col, _ = _reported_example()
    plain = compress_none(col, dtype=F64)
    dirs = [str(export_peft_adapter(plain, name, tmp_path / "in" / name, dtype=F64)) for name in col.adapter_names]
    store = tmp_path / "store"
    rc = main(["compress", *dirs, "--rank", "6", "--clusters", "auto", "--clusters-range", "1:8", "--tradeoff", "0.5",
               "--compute-dtype", "float64", "--tol", "1e-12", "--max-iter", "200", "--out", str(store), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "clusters auto (tradeoff 0.5): K=1 error" in out and "chose K=3" in out
    for bad, needle in (("0:3", "--clusters-range"), ("2:40", "--clusters-range"), ("x", "--clusters-range")):
        rc = main(["compress", *dirs, "--rank", "6", "--clusters", "auto", "--clusters-range", bad,
                   "--out", str(tmp_path / "bad"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, err
        assert not os.path.exists(tmp_path / "bad")
