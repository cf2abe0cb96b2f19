"""Activation-aware compression (jdlora_ops.compress.activation_aware) against float64 references."""

from __future__ import annotations

import pytest
import torch

from jdlora_ops.compress import InMemoryCollection, ModuleSpec, compress
from jdlora_ops.compress.activation_aware import compress_activation_aware, reconstruction_errors, update_norms
from jdlora_ops.compress.calibration import CalibrationError, CalibrationStats

F64 = torch.float64


def _recon(cm, assignment, i):
    k = int(assignment[i])
    core = cm.sigma[i] if cm.sigma.dim() == 3 else torch.diag(cm.sigma[i])
    return cm.U[k].double() @ core.double() @ cm.Vt[k].double()


def _collection(seed, n=6, d_out=24, d_in=20, rho=3):
    g = torch.Generator().manual_seed(seed)
    mods = [ModuleSpec("model.layers.0.self_attn.q_proj", d_out, d_in), ModuleSpec("model.layers.0.mlp.down_proj", d_in, d_out)]
    ads = {}
    for i in range(n):
        ads[f"a{i}"] = {m.name: (torch.randn(rho, m.d_in, generator=g, dtype=F64),
                                 torch.randn(m.d_out, rho, generator=g, dtype=F64), 0.5 + i) for m in mods}
    return InMemoryCollection(ads, modules=mods), mods


def test_reconstruction_errors_from_factors_match_dense(one_thread):
    coll, mods = _collection(0)
    res = compress(coll, 4, num_clusters=2, dtype=F64, seed=1)
    g = torch.Generator().manual_seed(5)
    for spec in mods:
        f = coll.load_module(spec, dtype=F64)
        cm = res.modules[spec.name]
        M = torch.randn(spec.d_in, spec.d_in, generator=g, dtype=F64)
        got = reconstruction_errors(f, cm.U, cm.Vt, cm.sigma, res.assignment, M)
        want = torch.stack([((f.dense(i) - _recon(cm, res.assignment, i)) @ M).square().sum() for i in range(6)])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        want_norms = torch.stack([(f.dense(i) @ M).square().sum() for i in range(6)])
        torch.testing.assert_close(update_norms(f, M), want_norms, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method,clusters", [("full", 1), ("full", 2), ("diag", 1), ("svd", 1)])
def test_identity_statistics_give_plain_compression(method, clusters, one_thread):
    coll, mods = _collection(1)
    stats = CalibrationStats("m", {m.name: torch.eye(m.d_in, dtype=F64) for m in mods}, 100)
    plain = compress(coll, 4, method=method, num_clusters=clusters, dtype=F64, seed=3, max_iter=500, tol=1e-14)
    aware = compress_activation_aware(coll, stats, 4, method=method, num_clusters=clusters, dtype=F64, seed=3,
                                      max_iter=500, tol=1e-14)
    assert torch.equal(plain.assignment, aware.assignment)
    for spec in mods:
        p, a = plain.modules[spec.name], aware.modules[spec.name]
        torch.testing.assert_close(a.rel_errors.double(), p.rel_errors.double(), rtol=1e-6, atol=1e-9)
        for i in range(6):
            torch.testing.assert_close(_recon(a, aware.assignment, i), _recon(p, plain.assignment, i),
                                       rtol=1e-6, atol=1e-8)
        # with C = I the activation-weighted error is the plain one
        torch.testing.assert_close(torch.tensor(aware.metadata["activation_weighted_rel_errors"][spec.name], dtype=F64),
                                   a.rel_errors.double(), rtol=1e-9, atol=1e-12)


def test_inputs_in_a_subspace_are_served_exactly(one_thread):
    """dW_i = U0 X_i Y_i^T P^T + N_i with N_i P = 0: on inputs in span(P) every adapter is rank r with one
    shared basis pair, so activation-aware JD-Full at rank r is exact there, while plain JD-Full spends its
    rank on the large N_i, which the inputs never excite."""
    g = torch.Generator().manual_seed(7)
    d_out, d_in, r, n, p = 30, 40, 3, 5, 3
    P = torch.linalg.qr(torch.randn(d_in, p, generator=g, dtype=F64))[0]
    Pperp = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=F64))[0]
    Pperp = Pperp - P @ (P.T @ Pperp)
    Pperp = torch.linalg.qr(Pperp)[0][:, : d_in - p]
    U0 = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=F64))[0]
    spec = ModuleSpec("model.layers.0.self_attn.q_proj", d_out, d_in)
    ads = {}
    for i in range(n):
        Bs = torch.cat([U0 @ torch.randn(r, r, generator=g, dtype=F64), 10 * torch.randn(d_out, 2, generator=g, dtype=F64)], 1)
        As = torch.cat([(P @ torch.randn(p, r, generator=g, dtype=F64)).T, torch.randn(2, d_in - p, generator=g, dtype=F64) @ Pperp.T], 0)
        ads[f"a{i}"] = {spec.name: (As, Bs, 1.0)}
    coll = InMemoryCollection(ads, modules=[spec])
    X = torch.randn(500, p, generator=g, dtype=F64) @ P.T  # calibration inputs confined to span(P)
    C = X.T @ X / 500
    stats = CalibrationStats("m", {spec.name: C}, 500)
    aware = compress_activation_aware(coll, stats, r, dtype=F64, damping=1e-10, max_iter=500, tol=1e-15)
    plain = compress(coll, r, dtype=F64, max_iter=500, tol=1e-15)
    weighted = torch.tensor(aware.metadata["activation_weighted_rel_errors"][spec.name])
    assert float(weighted.max()) < 1e-6
    f = coll.load_module(spec, dtype=F64)
    cm = plain.modules[spec.name]
    half = torch.linalg.cholesky(C + 1e-12 * torch.eye(d_in, dtype=F64))
    plain_weighted = reconstruction_errors(f, cm.U, cm.Vt, cm.sigma, plain.assignment, half) / update_norms(f, half)
    assert float(plain_weighted.min()) > 0.05
    # and it holds on fresh inputs from the subspace, through the served factors
    xs = torch.randn(50, p, generator=g, dtype=F64) @ P.T
    for i in range(n):
        y_true = xs @ f.dense(i).T
        y_jd = xs @ _recon(aware.modules[spec.name], aware.assignment, i).T
        assert float((y_true - y_jd).norm() / y_true.norm()) < 1e-4


def test_stats_for_other_shapes_are_refused():
    coll, mods = _collection(2)
    bad = CalibrationStats("m", {mods[0].name: torch.eye(7, dtype=F64), mods[1].name: torch.eye(24, dtype=F64)}, 1)
    with pytest.raises(CalibrationError, match="has d_in = 20 but its second moment is \\[7, 7\\]"):
        compress_activation_aware(coll, bad, 4)
