"""The byte budget (compress/allocation.py): spectra, the allocation, the store it writes, bad budgets."""

from __future__ import annotations

import pytest
import torch

from budget_data import budget_collection
from jdlora_ops.cli import main
from jdlora_ops.compress import compress, compress_svd
from jdlora_ops.compress.allocation import (allocate, check_target, joint_option, original_bytes,
                                            spectrum_options)
from jdlora_ops.compress import compress_to_store
from jdlora_ops.store import load_store, read_manifest

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def col():
    return budget_collection()


@pytest.fixture(scope="module")
def opts(col):
    return spectrum_options(col, dtype=F64)


def test_spectrum_errors_are_those_of_the_truncated_svd(col, opts):
    for k in (1, 2, 3):
        direct = compress_svd(col, k, dtype=F64).rel_errors().mean(1)
        torch.testing.assert_close(opts.svd_error[:, k], direct, rtol=1e-9, atol=1e-12)
    assert opts.full_rank[opts.names.index("steep")] == 8 and opts.full_rank[opts.names.index("flat")] == 4
    torch.testing.assert_close(opts.svd_error[:, 0], torch.ones(len(opts.names), dtype=F64))
    assert (opts.svd_error[:, 1:].diff(dim=1) <= 1e-12).all()  # more rank, less error


def _table_bytes(store: str) -> int:
    s = load_store(store)
    total = 0
    for m, cm in s.modules.items():
        total += (cm.U.numel() + cm.Vt.numel() + cm.sigma.numel()) * cm.U.element_size()
    for ind in s.individual.values():
        total += sum((A.numel() + B.numel()) * A.element_size() for A, B in ind.factors.values())
    return total


@pytest.mark.parametrize("ratio", [0.35, 0.45, 0.6, 0.8])
def test_allocation_fits_and_beats_every_uniform_store(col, opts, ratio):
    fit = compress(col, 4, num_clusters=3, dtype=F64, seed=0)
    jd = joint_option(fit, 2)
    orig = original_bytes(opts, 2)
    budget = ratio * orig
    a = allocate(opts, budget, jd=jd, itemsize=2)
    assert a is not None and a.table_bytes <= budget
    n = len(opts.names)
    if jd.bases + n * jd.cores_values * 2 <= budget:  # every adapter in the joint tables
        assert a.mean_error <= float(jd.mean.mean()) + 1e-12
    for k in range(1, opts.svd_error.shape[1]):  # every adapter its own SVD at one rank
        if int(opts.svd_values[:, k].sum()) * 2 <= budget:
            assert a.mean_error <= float(opts.svd_error[:, k].mean()) + 1e-12
    bigger = allocate(opts, budget * 1.5, jd=jd, itemsize=2)
    assert bigger.mean_error <= a.mean_error + 1e-12


def test_planted_adapters_stay_joint_and_the_outliers_leave(col, opts):
    fit = compress(col, 4, num_clusters=3, dtype=F64, seed=0)
    jd = joint_option(fit, 2)
    a = allocate(opts, 0.6 * original_bytes(opts, 2), jd=jd, itemsize=2)
    labels = {name: a.label(i) for i, name in enumerate(opts.names)}
    exact = [x for i, x in enumerate(opts.names) if float(jd.mean[i]) < 1e-9]
    assert exact and all(labels[x] == "jd" for x in exact), labels  # no error at the fewest bytes
    assert labels["flat"] == "full" and labels["steep"] != "jd", labels


def test_floor_removes_options_over_it(col, opts):
    fit = compress(col, 4, num_clusters=3, dtype=F64, seed=0)
    jd = joint_option(fit, 2)
    a = allocate(opts, original_bytes(opts, 2) + jd.bases, jd=jd, itemsize=2, floor=1e-6)
    assert allocate(opts, 0.6 * original_bytes(opts, 2), jd=jd, itemsize=2, floor=1e-9) is None
    for i, name in enumerate(opts.names):
        if a.label(i) == "jd":
            assert float(jd.max[i]) <= 1e-6
        elif a.label(i).startswith("svd-"):
            assert float(opts.svd_max[i, int(a.choice[i])]) <= 1e-6


def test_store_written_for_a_ratio_keeps_the_budget_and_the_predicted_error(tmp_path, col, opts):
    out = str(tmp_path / "store")
    curve = []
    result = compress_to_store(col, None, out, target_ratio=0.3, dtype=F64, store_dtype=torch.float32, seed=0,
                               log_curve=curve.extend)
    md = read_manifest(out)["metadata"]["byte_budget"]
    budget = 0.3 * original_bytes(opts, 4)
    assert md["budget"] == int(budget) and _table_bytes(out) <= budget
    assert md["predicted_table_bytes"] == _table_bytes(out)
    # The proxy is the error of what is stored: every adapter here has every module.
    assert result.summary()["mean_rel_error"] == pytest.approx(md["predicted_mean_rel_error"], rel=1e-6, abs=1e-9)
    assert md["chosen"] in md["candidates"] and "per-adapter" in md["candidates"]
    assert any("target" in line for line in curve) and any("*" in line for line in curve)
    store = load_store(out)
    for name in col.adapter_names:  # what is served reconstructs within the recorded error
        for spec in col.modules:
            f = col.load_module(spec, dtype=F64)
            i = list(col.adapter_names).index(name)
            g = next(g for g in f.groups if i in g.index.tolist())
            t = g.index.tolist().index(i)
            dW = g.Bt[t].t() @ g.A[t]
            err = float((store.reconstruct(name, spec.name).double() - dW).square().sum() / dW.square().sum())
            recorded = (store.individual[name].rel_errors.get(spec.name, 0.0) if name in store.individual
                        else float(store.rel_errors()[store.adapter_names.index(name), list(store.modules).index(spec.name)]))
            assert err == pytest.approx(recorded, rel=1e-4, abs=1e-6)


def test_given_rank_and_clusters_are_kept(tmp_path, col):
    out = str(tmp_path / "store")
    compress_to_store(col, 4, out, num_clusters=3, target_ratio=0.5, dtype=F64, seed=0)
    m = read_manifest(out)
    assert m["metadata"]["byte_budget"]["candidates"].keys() == {"r=4 K=3"}  # no store without these tables


def test_budget_below_the_bases_is_refused_and_nothing_is_written(tmp_path, col):
    out = tmp_path / "store"
    with pytest.raises(ValueError, match=r"target_bytes, --target-bytes\) allows 1,000 table bytes; the bases of "
                                         r"rank 16 and 3 clusters \(--rank, --clusters\) alone take 50,688"):
        compress_to_store(col, 16, str(out), num_clusters=3, target_bytes=1000, dtype=F64)
    with pytest.raises(ValueError, match=r"the byte budget \(target_ratio\) allows 50 table bytes; the smallest "):
        compress_to_store(col, 16, str(out), target_ratio=0.001, dtype=F64)
    assert not out.exists()


@pytest.mark.parametrize("kwargs, needle", [
    ({"target_ratio": 0.0}, "target_ratio (--target-ratio) must be a number in (0, 1], got 0.0"),
    ({"target_ratio": 1.5}, "got 1.5"),
    ({"target_bytes": -5}, "target_bytes (--target-bytes) must be a positive number of bytes, got -5"),
    ({"target_bytes": 10, "target_ratio": 0.5}, "are exclusive"),
])
def test_bad_budgets_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError) as exc:
        check_target(**kwargs)
    assert needle in str(exc.value)


@pytest.mark.parametrize("argv, needle", [
    (["--target-ratio", "1.5"], "must be a number in (0, 1], got 1.5"),
    (["--target-ratio", "0.3", "--method", "svd"], "--method must be full or diag, got svd"),
    (["--target-bytes", "12X"], "--target-bytes must be a number of bytes such as 500000 or 64M, got '12X'"),
    ([], "--rank is required (or give --target-bytes/--target-ratio to choose it)"),
])
def test_cli_refuses_bad_budgets_before_any_work(tmp_path, capsys, argv, needle):
    out = tmp_path / "store"
    rc = main(["compress", str(tmp_path), "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not out.exists()


def test_inspect_shows_each_adapter_s_representation_and_bytes(tmp_path, capsys, col):
    import json

    out = str(tmp_path / "store")
    compress_to_store(col, 4, out, num_clusters=3, target_ratio=0.6, dtype=F64, store_dtype=torch.float32, seed=0)
    assert main(["inspect", out, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    m = read_manifest(out)
    bases = sum(m["num_clusters"] * md["rank"] * (md["d_in"] + md["d_out"]) for md in m["modules"]) * 4
    assert bases + sum(a["bytes"] for a in shown["adapters"]) == m["metadata"]["byte_budget"]["predicted_table_bytes"]
    assert {a["path"] for a in shown["adapters"]} >= {"jd", "full"}
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "budget " in text and "chose r=4 K=3" in text and " bytes " in text


@pytest.mark.parametrize("ratio, rank, clusters", [(0.6, 4, 3), (0.3, None, None)])
def test_budget_stores_are_served_every_representation_in_one_batch(tmp_path, col, ratio, rank, clusters):
    """Joint cores, own SVDs and original factors side by side; with no joint tables at all too."""
    from jdlora_ops.serving import AdapterCache, BatchPlanner
    from serving_data import serve_and_check

    out = str(tmp_path / "store")
    res = compress_to_store(col, rank, out, num_clusters=clusters, target_ratio=ratio, dtype=F64, seed=0)
    paths = {e["name"]: e.get("path", "jd") for e in read_manifest(out)["adapters"] + read_manifest(out)["individual"]}
    assert len(set(paths.values())) >= 2 or ratio == 0.3
    names = list(paths)
    cache = AdapterCache(out, device="cpu", dtype=torch.float32)
    planner = BatchPlanner(cache, 64)
    adapters = [names[0], None, names[-1], "flat", "steep", names[len(names) // 2]]
    serve_and_check(planner, res, {}, adapters, [3, 2, 1, 4, 1, 2])


def test_singular_values_are_those_of_the_dense_updates(col):
    from jdlora_ops.compress.baselines import squared_singular_values

    for spec in col.modules:
        f = col.load_module(spec, dtype=F64)
        s2 = squared_singular_values(f)
        for i in range(f.num_adapters):
            dense = torch.linalg.svdvals(f.dense(i))[:s2.shape[1]].square()
            torch.testing.assert_close(s2[i], dense, rtol=1e-9, atol=1e-12 * float(dense[0]))
