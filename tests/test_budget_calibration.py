"""A byte budget with calibration: the allocation weighs activation-weighted errors, and the store it writes
serves exactly the errors it predicted, in that metric."""

from __future__ import annotations

import json

import pytest
import torch

from budget_data import near_collection
from jdlora_ops.compress import InMemoryCollection, compress_to_store
from jdlora_ops.compress.calibration import CalibrationStats, save_stats, whitening
from jdlora_ops.store import load_store, read_manifest
from serving_data import MODULES

F64 = torch.float64
DAMPING = 0.05


@pytest.fixture(scope="module")
def col():
    return near_collection()


@pytest.fixture(scope="module")
def stats():
    """Anisotropic input moments: a few directions carry most of the energy, so the weighted and the plain
    metric disagree about what matters."""
    gen = torch.Generator().manual_seed(3)
    moments = {}
    for spec in MODULES:
        X = torch.randn(400, spec.d_in, generator=gen, dtype=F64) * torch.logspace(0, -2, spec.d_in, dtype=F64)
        moments[spec.name] = X.T @ X / X.shape[0]
    return CalibrationStats("test/base", moments, 400)


def _dense(col, name: str, module: str) -> torch.Tensor:
    A, B, s = col._adapters[name][module]
    return s * B.double() @ A.double()


def _weighted(col, stats, store, name: str, module: str) -> float:
    S, _ = whitening(stats.second_moments[module], DAMPING)
    dW = _dense(col, name, module)
    return float(((dW - store.reconstruct(name, module).double()) @ S).square().sum() / (dW @ S).square().sum())


def _budget_store(col, stats, out, ratio, **kw):
    return compress_to_store(col, 4, out, num_clusters=3, target_ratio=ratio, calibration=stats, damping=DAMPING,
                             dtype=F64, store_dtype=F64, seed=0, **kw)


def test_the_store_serves_the_activation_weighted_errors_the_allocation_predicted(col, stats, tmp_path):
    out = str(tmp_path / "store")
    _budget_store(col, stats, out, 0.4)
    md = read_manifest(out)["metadata"]
    bb = md["byte_budget"]
    assert bb["metric"] == "activation-weighted" and md["calibration"]["damping"] == DAMPING
    store = load_store(out)
    paths = {x: store.path_of(x) for x in col.adapter_names}
    assert any(p.startswith("jd+res-") for p in paths.values()), paths
    served = torch.tensor([[_weighted(col, stats, store, x, s.name) for s in MODULES] for x in col.adapter_names])
    assert float(served.mean(1).mean()) == pytest.approx(bb["predicted_mean_rel_error"], rel=1e-7, abs=1e-12)
    # Own factors keep the errors of the metric they were chosen in; the joint tables' are the plain ones.
    for x in col.adapter_names:
        if x in store.individual:
            for j, s in enumerate(MODULES):
                assert store.individual[x].rel_errors[s.name] == pytest.approx(float(served[col.adapter_names.index(x), j]),
                                                                               rel=1e-7, abs=1e-12)
    for s in MODULES:
        cm = store.modules[s.name]
        for i, x in enumerate(store.adapter_names):
            if x in store.individual:
                continue
            dW = _dense(col, x, s.name)
            plain = float((dW - store.reconstruct(x, s.name).double()).square().sum() / dW.square().sum())
            assert float(cm.rel_errors[i]) == pytest.approx(plain, rel=1e-7, abs=1e-12)


def test_the_calibrated_budget_beats_the_plain_one_in_the_metric_it_weighs(col, stats, tmp_path):
    """At the same bytes, choosing in the activation-weighted metric serves lower weighted errors than
    choosing in the plain one (what calibration is for)."""
    _budget_store(col, stats, str(tmp_path / "aware"), 0.3)
    compress_to_store(col, 4, str(tmp_path / "plain"), num_clusters=3, target_ratio=0.3, dtype=F64, store_dtype=F64,
                      seed=0)
    errors = {}
    for kind in ("aware", "plain"):
        store = load_store(str(tmp_path / kind))
        errors[kind] = sum(_weighted(col, stats, store, x, s.name) for x in col.adapter_names for s in MODULES)
        assert read_manifest(str(tmp_path / kind))["metadata"]["byte_budget"]["predicted_table_bytes"] <= \
            0.3 * read_manifest(str(tmp_path / kind))["metadata"]["byte_budget"]["original_bytes"]
    assert errors["aware"] < errors["plain"], errors


def test_adapters_kept_whole_keep_their_own_factors_exactly(col, stats, tmp_path):
    """At the whole budget every adapter keeps its original factors: read back, not un-whitened."""
    out = str(tmp_path / "store")
    compress_to_store(col, None, out, target_ratio=1.0, calibration=stats, damping=DAMPING, dtype=F64,
                      store_dtype=F64, seed=0)
    store = load_store(out)
    assert {store.path_of(x) for x in col.adapter_names} == {"full"}
    for x in col.adapter_names:
        for s in MODULES:
            A, B, scale = col._adapters[x][s.name]
            got_A, got_B = store.individual[x].factors[s.name]
            assert torch.equal(got_A, A.to(F64)) and torch.equal(got_B, (B * scale).to(F64))


def test_add_to_a_calibrated_budget_store_prices_in_the_weighted_metric(col, stats, tmp_path):
    from jdlora_ops.store_update import add_to_store

    ads = col._adapters
    first = InMemoryCollection({x: ads[x] for x in col.adapter_names if x not in ("near2", "near3")},
                               modules=MODULES, metadata={"base_model": "test/base"})
    out = str(tmp_path / "store")
    path = save_stats(stats, tmp_path / "stats")
    _budget_store(first, stats, out, 0.4, calibration_path=str(path))
    new = InMemoryCollection({"near2": ads["near2"], "near3": ads["near3"], "copy": ads["a001"]}, modules=MODULES,
                             metadata={"base_model": "test/base"})
    res = add_to_store(out, new)  # the stats are found through the store's metadata
    paths = dict(zip(res.report.names, res.paths))
    assert paths["copy"] == "jd" and paths["near2"].startswith("jd+res-") and paths["near3"].startswith("jd+res-")
    back = load_store(out)
    for x in ("near2", "near3"):
        for s in MODULES:
            err = _weighted(col, stats, back, x, s.name)
            assert err == pytest.approx(back.individual[x].rel_errors[s.name], rel=1e-6, abs=1e-10)
            assert err < 0.1 * back.individual[x].jd_rel_errors[s.name]


def test_cli_compress_with_a_byte_budget_and_calibration(col, stats, tmp_path, capsys):
    from jdlora_ops.cli import main as cli
    from jdlora_ops.peft_io import write_peft_adapter

    dirs = []
    for x in col.adapter_names:
        ranks = {A.shape[0] for A, _, _ in col._adapters[x].values()}
        if len(ranks) != 1 or len(dirs) == 6:
            continue
        r = ranks.pop()
        config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "base_model_name_or_path": "test/base",
                  "target_modules": sorted({m.name.rsplit(".", 1)[1] for m in MODULES})}
        factors = {m: ((B * s).float(), A.float()) for m, (A, B, s) in col._adapters[x].items()}
        dirs.append(write_peft_adapter(tmp_path / "in" / x, factors, config))
    assert len(dirs) == 6
    path = str(save_stats(stats, tmp_path / "stats"))
    out = str(tmp_path / "store")
    assert cli(["compress", *dirs, "--target-ratio", "0.5", "--rank", "2", "--clusters", "2", "--calibration", path,
                "--out", out, "-q"]) == 0
    printed = capsys.readouterr().out
    assert "byte budget: predicted mean relative squared error per candidate" in printed
    assert cli(["inspect", out, "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["calibration"]["stats"] == path
    assert read_manifest(out)["metadata"]["byte_budget"]["metric"] == "activation-weighted"
    # The whole budget: every adapter keeps its own factors, the joint tables are empty.
    assert cli(["compress", *dirs, "--target-ratio", "1", "--calibration", path, "--out", out, "--overwrite",
                "-q"]) == 0
    capsys.readouterr()
    assert cli(["inspect", out]) == 0
    assert "full" in capsys.readouterr().out
    assert {load_store(out).path_of(x) for x in load_store(out).all_names} == {"full"}
