"""Per-adapter error budget: adapters over budget are kept as their own truncated SVD or factors."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from budget_data import budget_collection, outlier
from jdlora_ops.cli import main
from jdlora_ops.compress import InMemoryCollection, compress, compress_none
from jdlora_ops.compress.error_budget import apply_error_budget, check_budget
from jdlora_ops.peft_io import PeftCollection, export_peft_adapter
from jdlora_ops.serving import AdapterCache, BatchPlanner
from jdlora_ops.store import load_store, read_manifest, save_store
from serving_data import MODULES, one_thread, reference_output, serve_and_check  # noqa: F401

F64 = torch.float64
BUDGET = 0.05


def dense(col, name, module):
    f = col.load_module(module, dtype=F64)
    return f.dense(col.adapter_names.index(name))


def rel(a, b) -> float:
    return float((a - b).square().sum() / b.square().sum())


@pytest.fixture(scope="module")
def fitted():
    col = budget_collection()
    res = compress(col, 4, num_clusters=3, dtype=F64, tol=1e-12, max_iter=200)
    jd = res.rel_errors().max(dim=1).values
    over = [n for n, e in zip(res.adapter_names, jd.tolist()) if e > BUDGET]
    moved = apply_error_budget(res, col, BUDGET, dtype=F64)
    return col, res, over, moved


def test_adapters_over_budget_leave_the_joint_tables(fitted):
    col, res, over, moved = fitted
    assert moved == over and {"flat", "steep"} <= set(moved)
    assert set(res.individual) == set(moved) and not set(moved) & set(res.adapter_names)
    assert res.metadata["max_rel_error"] == BUDGET
    assert float(res.rel_errors().max()) <= BUDGET
    assert res.assignment.shape == (len(res.adapter_names),) and int(res.assignment.max()) < res.num_clusters
    for cm in res.modules.values():
        assert cm.sigma.shape[0] == len(res.adapter_names) and cm.U.shape[0] == res.num_clusters
    assert res.individual["flat"].label == "full" and res.individual["steep"].label == "svd-2"
    assert sorted(res.all_names) == sorted(col.adapter_names)


def test_individual_adapters_meet_the_budget_at_the_smallest_rank(fitted):
    col, res, _, moved = fitted
    for name in moved:
        ind = res.individual[name]
        needed = 0
        full_rank = 0
        for spec in MODULES:
            W = dense(col, name, spec.name)
            R = res.reconstruct(name, spec.name).to(F64)
            e = rel(R, W)
            assert e <= BUDGET * (1 + 1e-9) and abs(e - ind.rel_errors[spec.name]) < 1e-9
            s2 = torch.linalg.svdvals(W).square()
            tail = s2.flip(0).cumsum(0).flip(0).tolist() + [0.0]
            needed = max(needed, next(k for k, t in enumerate(tail) if t <= BUDGET * float(s2.sum()) * (1 + 1e-9)))
            full_rank = max(full_rank, ind.ranks[spec.name])
        if ind.path == "svd":
            assert ind.rank == needed < full_rank
        else:
            assert needed >= full_rank and ind.rank == full_rank
            for spec in MODULES:  # the original factors: exact
                assert rel(res.reconstruct(name, spec.name).to(F64), dense(col, name, spec.name)) < 1e-20


def test_store_round_trip_and_memory(tmp_path, fitted):
    _, res, _, moved = fitted
    save_store(tmp_path / "s", res)
    back = load_store(tmp_path / "s")
    assert list(back.individual) == list(res.individual)
    for name in moved:
        a, b = back.individual[name], res.individual[name]
        assert (a.path, a.rank, a.ranks) == (b.path, b.rank, b.ranks)
        for m in a.factors:
            assert torch.equal(a.factors[m][0], b.factors[m][0]) and torch.equal(a.factors[m][1], b.factors[m][1])
    mem = res.memory(2)
    assert mem["params_after"] == back.memory(2)["params_after"]
    assert mem["params_after"] > sum(ind.params() for ind in res.individual.values())
    m = read_manifest(tmp_path / "s")
    assert [e["name"] for e in m["individual"]] == moved and m["files"]["individual"].startswith("individual-")


def test_cache_serves_every_path_in_one_batch(tmp_path, fitted):
    _, res, _, moved = fitted
    save_store(tmp_path / "s", res)
    for source in (res, str(tmp_path / "s")):
        cache = AdapterCache(source, device="cpu", dtype=torch.float32)
        assert set(moved) <= set(cache.adapter_names)
        planner = BatchPlanner(cache, 64)
        adapters = [res.adapter_names[0], "flat", None, "steep", res.adapter_names[-1], moved[0]]
        serve_and_check(planner, res, {}, adapters, [3, 2, 1, 4, 1, 2])


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "x"])
def test_budget_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match=r"max_rel_error \(--max-rel-error\) must be a number in \(0, 1\], got"):
        check_budget(bad)


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget_adapters")
    col = budget_collection()
    dirs = {}
    for name in col.adapter_names:
        # One adapter at a time, so that each keeps its own rank (a joint "none" pads to the largest).
        one = InMemoryCollection({name: col._adapters[name]}, modules=MODULES)
        dirs[name] = export_peft_adapter(compress_none(one, dtype=F64), name, root / name, dtype=F64)
    return col, dirs


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_compress_inspect_export_add(tmp_path, capsys, peft_dirs):
    col, dirs = peft_dirs
    names = list(col.adapter_names)
    store = tmp_path / "store"
    rc, out, err = run(capsys, "compress", *[dirs[n] for n in names if n != "steep"], "--rank", 4, "--clusters", 3,
                       "--compute-dtype", "float64", "--tol", "1e-12", "--max-iter", 200, "--max-rel-error", BUDGET,
                       "--out", store, "--quiet")
    assert rc == 0, err
    assert f"error budget {BUDGET:g}:" in out and "full x" in out
    back = load_store(store)
    assert "flat" in back.individual and back.individual["flat"].path == "full"

    rc, out, err = run(capsys, "inspect", store)
    assert rc == 0, err
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()}
    assert lines["flat"][1] == "full"
    for name in back.adapter_names:
        assert lines[name][1] == "jd" and float(lines[name][-2]) <= BUDGET  # max err, before the worst module
    for name, ind in back.individual.items():
        assert lines[name][1] == ind.label and float(lines[name][-2]) <= BUDGET + 1e-4
    assert "on disk" in out and "of original adapters" in out
    summary = json.loads(run(capsys, "inspect", store, "--json")[1])
    on_disk = sum(os.path.getsize(store / f) for f in os.listdir(store))
    assert summary["store_bytes"] == on_disk and summary["max_rel_error"] == BUDGET
    assert {a["name"]: a["path"] for a in summary["adapters"]}["flat"] == "full"

    for name in [back.adapter_names[0], *back.individual]:
        rc, _, err = run(capsys, "export", store, name, "--out", tmp_path / "x" / name, "--dtype", "float64")
        assert rc == 0, err
        exported = PeftCollection([os.fspath(tmp_path / "x" / name)])
        for spec in exported.modules:
            e = rel(exported.load_module(spec, dtype=F64).dense(0), dense(col, name, spec.name))
            assert e <= BUDGET * (1 + 1e-6)

    # add: the store's budget applies. A copy of an adapter in the tables projects to its error
    # (within budget) and joins them; the steep outlier is kept as its rank-2 SVD.
    shutil.copytree(dirs[back.adapter_names[0]], tmp_path / "twin")
    rc, out, err = run(capsys, "add", store, tmp_path / "twin", dirs["steep"], "--quiet")
    assert rc == 0, err
    assert "added steep: svd-2" in out and "added twin: cluster" in out
    back = load_store(store)
    assert "twin" in back.adapter_names and back.individual["steep"].rank == 2
    assert read_manifest(store)["num_adapters"] == len(back.adapter_names)
    for spec in MODULES:
        assert rel(back.reconstruct("steep", spec.name).to(F64), dense(col, "steep", spec.name)) <= BUDGET


def test_cli_bad_budget_and_inputs_write_nothing(tmp_path, capsys, peft_dirs):
    col, dirs = peft_dirs
    some = [dirs[n] for n in col.adapter_names[:4]]
    for bad in ("0", "1.5", "-1", "nan"):
        rc, out, err = run(capsys, "compress", *some, "-r", 4, "-k", 2, "--max-rel-error", bad, "--out",
                           tmp_path / "s", "--quiet")
        assert rc == 2 and "--max-rel-error" in err and bad in err, err
        assert not os.path.exists(tmp_path / "s")
    rc, _, err = run(capsys, "compress", *some, "-r", 4, "-k", 5, "--out", tmp_path / "s", "--quiet")
    assert rc == 2 and "--clusters" in err and "(4), got 5" in err, err
    assert not os.path.exists(tmp_path / "s")

    rc, _, err = run(capsys, "compress", *some, "-r", 4, "-k", 2, "--out", tmp_path / "s", "--quiet")
    assert rc == 0, err
    before = {f: (tmp_path / "s" / f).read_bytes() for f in os.listdir(tmp_path / "s")}
    rc, _, err = run(capsys, "add", tmp_path / "s", dirs["flat"], "--max-rel-error", "2")
    assert rc == 2 and "--max-rel-error" in err
    # a zero update is refused too
    zdir = shutil.copytree(dirs["flat"], tmp_path / "zero")
    weights = os.path.join(zdir, "adapter_model.safetensors")
    tensors = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    rc, _, err = run(capsys, "add", tmp_path / "s", zdir, "--quiet")
    assert rc == 2 and "zero update: zero" in err, err
    rc, _, err = run(capsys, "compress", *some, zdir, "-r", 4, "-k", 2, "--out", tmp_path / "t", "--quiet")
    assert rc == 2 and "zero update: zero" in err, err
    assert not os.path.exists(tmp_path / "t")
    assert {f: (tmp_path / "s" / f).read_bytes() for f in os.listdir(tmp_path / "s")} == before


def test_outlier_helper_has_the_requested_spectrum():
    f = InMemoryCollection({"o": outlier(3, [3.0, 2.0, 1.0], seed=0)}, modules=MODULES).load_module(MODULES[0], dtype=F64)
    s = torch.linalg.svdvals(f.dense(0))[:4]
    assert torch.allclose(s, torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=F64), atol=1e-12) and math.isfinite(float(s[0]))
