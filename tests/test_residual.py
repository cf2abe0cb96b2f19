"""The residual representation (compress/residual.py): a core in the joint tables plus a private rank-k
correction, chosen by the byte budget, stored, served on the same token as the core, exported as one
adapter; and refused by the vLLM plug-in, which serves the joint tables only."""

from __future__ import annotations

import json

import pytest
import torch

from budget_data import near_collection
from jdlora_ops.cli import main
from jdlora_ops.compress import compress
from jdlora_ops.compress.allocation import compress_for_budget
from jdlora_ops.compress import compress_to_store
from jdlora_ops.compress.residual import residual_adapters, residual_spectra
from jdlora_ops.store import FORMAT_VERSION, StoreError, load_store, read_manifest
from serving_data import MODULES

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
NEAR = [f"near{j}" for j in range(4)]


@pytest.fixture(scope="module")
def col():
    return near_collection()


@pytest.fixture(scope="module")
def fit(col):
    return compress(col, 4, num_clusters=3, dtype=F64, seed=0)


def _dense(col, name: str, module: str) -> torch.Tensor:
    spec = next(s for s in col.modules if s.name == module)
    f = col.load_module(spec, dtype=F64)
    i = list(col.adapter_names).index(name)
    for g in f.groups:
        if i in g.index.tolist():
            t = g.index.tolist().index(i)
            return g.Bt[t].t() @ g.A[t]
    return torch.zeros(spec.d_out, spec.d_in, dtype=F64)


def _core(fit, name: str, module: str) -> torch.Tensor:
    i, cm = fit.index(name), fit.modules[module]
    k = int(fit.assignment[i])
    return cm.U[k] @ cm.core(i) @ cm.Vt[k]


def test_spectra_are_those_of_the_dense_residual(col, fit):
    kmax = 5
    opts = residual_spectra(fit, col, kmax, dtype=F64)
    mean, mx, values = opts.mean, opts.max, opts.values
    torch.testing.assert_close(mean[:, 0], fit.rel_errors().mean(1), rtol=1e-9, atol=1e-12)
    for i, name in enumerate(col.adapter_names):
        per = []
        for spec in MODULES:
            dW = _dense(col, name, spec.name)
            s2 = torch.linalg.svdvals(dW - _core(fit, name, spec.name)).square()
            norm = float(dW.square().sum())
            per.append([float(s2[k:].sum()) / norm for k in range(kmax + 1)])
        per = torch.tensor(per, dtype=F64)
        torch.testing.assert_close(mean[i], per.mean(0), rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(mx[i], per.max(0).values, rtol=1e-7, atol=1e-12)
    # A near adapter's residual is mostly its private direction (the bases lean a little towards it).
    j = list(col.adapter_names).index("near0")
    width = sum(s.d_in + s.d_out for s in MODULES)
    assert values[j, :2].tolist() == [0, width] and (values[j].diff() >= 0).all()
    assert float(mean[j, 0]) > 0.1 and float(mean[j, 1]) < 0.05 * float(mean[j, 0])


def test_the_spectra_pass_reads_the_residuals_too(col, fit):
    """With the joint fit, one pass gives the same spectra and residual options as two passes."""
    from jdlora_ops.compress.allocation import nominal_ranks, spectrum_options

    values, kmax = nominal_ranks(col)
    alone = spectrum_options(col, dtype=F64)
    both = spectrum_options(col, dtype=F64, joint=fit, kmax=kmax)
    assert kmax == alone.kmax and values == int(alone.full_values.sum())
    for a, b in ((alone.svd_error, both.svd_error), (alone.svd_values, both.svd_values),
                 (alone.full_values, both.full_values)):
        assert torch.equal(a, b)
    alone_res = residual_spectra(fit, col, kmax, dtype=F64)
    for field in ("mean", "max", "values"):
        assert torch.equal(getattr(alone_res, field), getattr(both.residual, field))
    assert alone_res.ranks.keys() == both.residual.ranks.keys()
    assert all(torch.equal(alone_res.ranks[m], both.residual.ranks[m]) for m in alone_res.ranks)


def test_the_joint_fit_reads_the_spectra_and_its_residuals_as_a_pass_of_their_own_does(col):
    """FitSpectra, riding on the fit's reads of each module (the last round's), gives what separate passes
    over the fitted tables give: the same ranks and sizes, errors to round-off."""
    from jdlora_ops.compress.allocation import FitSpectra, nominal_ranks, spectrum_options

    _, kmax = nominal_ranks(col)
    hook = FitSpectra(col, kmax)
    # A poor start, so that adapters move and the hook sees more than one round: the last one counts.
    start = torch.arange(len(col.adapter_names)) % 3
    fitted = compress(col, 4, num_clusters=3, dtype=F64, seed=0, max_rounds=3, init_assignment=start,
                      module_hook=hook)
    assert len(fitted.history) >= 2
    got, want = hook.options(), spectrum_options(col, dtype=F64)
    for field in ("svd_values", "full_values", "full_rank"):
        assert torch.equal(getattr(got, field), getattr(want, field))
    torch.testing.assert_close(got.svd_error, want.svd_error, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got.svd_max, want.svd_max, rtol=1e-10, atol=1e-14)
    got_r, want_r = hook.residual_options(), residual_spectra(fitted, col, kmax, dtype=F64)
    assert torch.equal(got_r.values, want_r.values)
    assert all(torch.equal(got_r.ranks[m], want_r.ranks[m]) for m in want_r.ranks)
    torch.testing.assert_close(got_r.mean, want_r.mean, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(got_r.max, want_r.max, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_residual_factors_are_the_truncated_svd_of_what_the_core_misses(col, fit, k):
    names = ["near1", "a000", "a005"]
    res = residual_adapters(fit, col, names, torch.full((3,), k), dtype=F64)
    for name in names:
        ind = res[name]
        assert ind.path == "residual" and ind.label == f"jd+res-{k}" and ind.rank == k
        for spec in MODULES:
            dW = _dense(col, name, spec.name)
            R = dW - _core(fit, name, spec.name)
            P, S, Qh = torch.linalg.svd(R)
            A, B = ind.factors[spec.name]
            kk = A.shape[0]
            assert kk <= k and B.shape == (spec.d_out, kk)
            best = (P[:, :kk] * S[:kk]) @ Qh[:kk]
            torch.testing.assert_close(B @ A, best, rtol=1e-6, atol=1e-9 * float(dW.norm()))
            served = float((dW - _core(fit, name, spec.name) - B @ A).square().sum() / dW.square().sum())
            assert ind.rel_errors[spec.name] == pytest.approx(served, rel=1e-6, abs=1e-13)
            assert ind.jd_rel_errors[spec.name] == pytest.approx(
                float(fit.modules[spec.name].rel_errors[fit.index(name)]), rel=1e-12)


def test_the_budget_gives_the_near_adapters_a_residual_and_that_lowers_the_error(col):
    def fit_at(r, k, hook=None):
        return compress(col, r, num_clusters=k, dtype=F64, seed=0, module_hook=hook)

    common = dict(rank=4, clusters=3, itemsize=8, floor=None, fit=fit_at, dtype=F64, per_adapter=False)
    with_res = compress_for_budget(col, None, 0.4, residual=True, **common)
    without = compress_for_budget(col, None, 0.4, residual=False, **common)
    a, b = with_res[1], without[1]
    labels = {name: a.label(i) for i, name in enumerate(col.adapter_names)}
    assert all(labels[x].startswith("jd+res-") for x in NEAR), labels
    assert a.table_bytes <= with_res[2].budget and a.mean_error < 0.2 * b.mean_error
    assert a.counts()["jd+res"] >= 4


@pytest.fixture(scope="module")
def store(col, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("residual") / "store")
    result = compress_to_store(col, 4, out, num_clusters=3, target_ratio=0.4, dtype=F64,
                               store_dtype=torch.float32, seed=0)
    return out, result


def test_store_round_trip(col, store):
    out, result = store
    m = read_manifest(out)
    assert m["format_version"] == 3 < FORMAT_VERSION  # version-3 readers still read it
    entries = {a["name"]: a for a in m["adapters"]}
    res_entries = {e["name"]: e for e in m["individual"] if e["path"] == "residual"}
    assert set(NEAR) <= set(res_entries)
    for x in NEAR:
        assert entries[x]["path"] == result.path_of(x) == f"jd+res-{res_entries[x]['rank']}"
        assert entries[x]["mean_error"] < 0.1 * sum(entries[x]["jd_errors"]) / len(MODULES)
    back = load_store(out)
    assert back.all_names == result.all_names and len(set(back.all_names)) == len(back.all_names)
    for x in NEAR + ["a001"]:
        assert back.path_of(x) == result.path_of(x)
        for spec in MODULES:  # what is stored reconstructs the adapter within the recorded error
            dW = _dense(col, x, spec.name)
            err = float((back.reconstruct(x, spec.name).double() - dW).square().sum() / dW.square().sum())
            recorded = entries[x]["errors"][[s.name for s in MODULES].index(spec.name)]
            assert err == pytest.approx(recorded, rel=1e-3, abs=1e-6)
    mem = back.memory(4)
    assert mem["params_before"] == result.memory(4)["params_before"]  # a residual's adapter counted once


def test_a_reader_of_version_2_refuses_a_store_with_residuals(store, tmp_path, monkeypatch):
    import jdlora_ops.store as st

    monkeypatch.setattr(st, "FORMAT_VERSION", 2)
    with pytest.raises(StoreError, match="format version 3 is newer than this library reads"):
        st.read_manifest(store[0])


def test_a_store_without_residuals_is_still_version_2(col, tmp_path):
    out = str(tmp_path / "plain")
    compress_to_store(col, 4, out, num_clusters=3, dtype=F64, seed=0)
    assert read_manifest(out)["format_version"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_served_on_the_same_token_as_the_core(col, store, dtype):
    """Cores, cores with residuals, own factors and no adapter in one batch, per module and fused."""
    from jdlora_ops.serving import AdapterCache, BatchPlanner
    from serving_data import reference_output

    out, result = store
    cache = AdapterCache(out, device="cpu", dtype=dtype)
    assert cache.path_of("near0") == "compressed+residual" and cache.path_of("a001") == "compressed"
    assert sorted(cache.adapter_names) == sorted(result.all_names)
    planner = BatchPlanner(cache, 64)
    adapters = ["near0", None, "a001", "near2", "near0", "a003", "near3"]
    counts = [3, 2, 1, 4, 1, 2, 5]
    gen = torch.Generator().manual_seed(0)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    with planner.prepare(adapters, counts) as plan:
        assert cache.where("near0") == "device"
        for spec in MODULES:
            x = torch.randn(plan.num_tokens, spec.d_in, generator=gen)
            y0 = torch.randn(plan.num_tokens, spec.d_out, generator=gen)
            y = y0.clone()
            plan.apply(spec.name, x, y)
            ref = reference_output(result, {}, adapters, counts, spec.name, x, y0)
            torch.testing.assert_close(y.double(), ref, **tol)
            # the core alone would be wrong: the residual is there
            assert float((ref - y0.double()).abs().max()) > 0
        q, v = MODULES[0], MODULES[1]  # q and v share the input: one call, two slices
        x = torch.randn(plan.num_tokens, q.d_in, generator=gen)
        y0 = torch.randn(plan.num_tokens, q.d_out + v.d_out, generator=gen)
        y = y0.clone()
        plan.apply([q.name, v.name], x, y)
        ref = torch.cat([reference_output(result, {}, adapters, counts, m.name, x, y0[:, a:b]) for m, a, b in
                         ((q, 0, q.d_out), (v, q.d_out, q.d_out + v.d_out))], dim=1)
        torch.testing.assert_close(y.double(), ref, **tol)
    assert cache.evict("near0") and cache.where("near0") == "host"


def test_a_residual_needs_an_uncompressed_slot(store):
    from jdlora_ops.serving import AdapterCache, CapacityError

    cache = AdapterCache(store[0], device="cpu", max_uncompressed=2)
    with pytest.raises(CapacityError, match="3 distinct uncompressed adapters but the device tables hold 2"):
        cache.acquire(["near0", "near1", "near2"])
    lease = cache.acquire(["near0", "near1"])
    assert set(lease.adapter_slots) == set(lease.uncompressed_slots) == {"near0", "near1"}
    cache.release(lease)


def test_export_writes_the_sum_as_one_adapter(col, store, tmp_path, capsys):
    from jdlora_ops.peft_io import read_peft_adapter

    out, result = store
    target = tmp_path / "near1"
    assert main(["export", out, "near1", "--out", str(target)]) == 0
    capsys.readouterr()
    cfg = json.loads((target / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + result.individual["near1"].rank  # the core's rank and the residual's
    factors = read_peft_adapter(str(target))
    for spec in MODULES:
        A, B, s = factors.load(spec.name)
        torch.testing.assert_close((s * B.double() @ A.double()), result.reconstruct("near1", spec.name).double(),
                                   rtol=1e-5, atol=1e-6)


def test_inspect_and_remove(store, tmp_path, capsys):
    import shutil

    out = str(tmp_path / "copy")
    shutil.copytree(store[0], out)
    assert main(["inspect", out, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    by_name = {a["name"]: a for a in shown["adapters"]}
    assert len(by_name) == len(shown["adapters"])  # one row per adapter
    assert by_name["near0"]["path"] == store[1].path_of("near0") and by_name["near0"]["path"].startswith("jd+res-")
    m = read_manifest(out)
    bases = sum(m["num_clusters"] * md["rank"] * (md["d_in"] + md["d_out"]) for md in m["modules"]) * 4
    assert bases + sum(a["bytes"] for a in shown["adapters"]) == m["metadata"]["byte_budget"]["predicted_table_bytes"]
    assert main(["remove", out, "near0"]) == 0
    capsys.readouterr()
    back = load_store(out)
    assert "near0" not in back.all_names and "near0" not in back.individual and "near1" in back.residuals


def test_the_vllm_front_end_admits_own_factors_where_dense_slots_hold_them(store):
    """The plug-in serves a residual (and factors kept outside the joint tables) in vLLM's dense per-slot
    stacks: refused in store-only mode (no stacks) and above max_lora_rank, with the reason."""
    from jdlora_ops.integrations.vllm import live

    out, result = store
    view = live.store_view(out)
    rank = result.individual["near0"].rank
    assert view.problem("a001") is None and view.problem("a001", 0) is None
    assert view.problem("near0") is None and view.problem("near0", rank) is None
    label = result.path_of("near0")
    why = view.problem("near0", 0)
    assert f"stored as {label}, with factors of its own of rank {rank}" in why and "store-only mode" in why
    if rank > 1:
        assert f"start it with max_lora_rank >= {rank}" in view.problem("near0", rank - 1)
    assert not view.lacks("near0") and view.lacks("no-such-adapter")


def test_no_residual_leaves_the_representation_out(col, tmp_path, capsys):
    out = str(tmp_path / "plain")
    result = compress_to_store(col, 4, out, num_clusters=3, target_ratio=0.4, dtype=F64, seed=0, residual=False)
    assert not result.residuals and read_manifest(out)["format_version"] == 2
    assert "jd+res" not in read_manifest(out)["metadata"]["byte_budget"]["representations"]
    rc = main(["compress", str(tmp_path), "--out", str(tmp_path / "x"), "--rank", "4", "--no-residual"])
    err = capsys.readouterr().err
    assert rc == 2 and "--no-residual needs a byte budget (--target-bytes/--target-ratio)" in err, err
    assert not (tmp_path / "x").exists()


def test_add_follows_the_store_s_byte_budget_rule(col, tmp_path):
    """Adapters added to a budget store get the representation of least error + the store's price of a byte:
    a near adapter (its core misses one direction) a residual, a copy of a planted adapter its core alone."""
    from jdlora_ops.compress import InMemoryCollection
    from jdlora_ops.serving import AdapterCache, BatchPlanner
    from jdlora_ops.store_update import add_to_store
    from serving_data import serve_and_check

    ads = col._adapters
    first = InMemoryCollection({x: ads[x] for x in col.adapter_names if x not in ("near2", "near3")},
                               modules=MODULES, metadata={"base_model": "test/base"})
    out = str(tmp_path / "store")
    compress_to_store(first, 4, out, num_clusters=3, target_ratio=0.4, dtype=F64, seed=0)
    bb = read_manifest(out)["metadata"]["byte_budget"]
    assert bb["multiplier"] > 0 and bb["itemsize"] == 4 and bb["residual"] is True
    new = InMemoryCollection({"near2": ads["near2"], "near3": ads["near3"], "copy": ads["a001"]}, modules=MODULES,
                             metadata={"base_model": "test/base"})
    res = add_to_store(out, new)
    paths = dict(zip(res.report.names, res.paths))
    assert paths["copy"] == "jd" and paths["near2"].startswith("jd+res-") and paths["near3"].startswith("jd+res-")
    back = load_store(out)
    for x in ("near2", "near3"):
        assert back.path_of(x) == paths[x]
        for spec in MODULES:
            dW = _dense(col, x, spec.name)
            err = float((back.reconstruct(x, spec.name).double() - dW).square().sum() / dW.square().sum())
            assert err == pytest.approx(back.individual[x].rel_errors[spec.name], rel=1e-3, abs=1e-6)
            assert err < 0.1 * back.individual[x].jd_rel_errors[spec.name]
    planner = BatchPlanner(AdapterCache(out, device="cpu"), 32)
    serve_and_check(planner, back, {}, ["near2", "copy", None, "near3", "near0"], [2, 3, 1, 4, 2])
