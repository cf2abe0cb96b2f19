"""JD-Full, JD-Diag and the baselines on one module, against dense float64 computations."""

from __future__ import annotations

import pytest
import torch

from jdlora_ops.compress import (
    InMemoryCollection,
    ModuleFactors,
    ModuleSpec,
    compress_none,
    compress_svd,
    full_sigma,
    jd_diag,
    jd_full,
    resolve_weights,
    truncated_svd,
)
from jdlora_ops.compress.jd import check_rank

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def random_factors(n, d_out, d_in, ranks=(3, 5, 8), seed=0, dtype=F64, scales=None, zero=()):
    g = torch.Generator().manual_seed(seed)
    A, B, S = [], [], []
    for i in range(n):
        r = ranks[i % len(ranks)]
        a = torch.randn(r, d_in, generator=g, dtype=F64)
        b = torch.randn(d_out, r, generator=g, dtype=F64) * (0.5 + i % 4)
        if i in zero:
            b = torch.zeros_like(b)
        A.append(a.to(dtype))
        B.append(b.to(dtype))
        S.append(1.0 if scales is None else scales[i])
    spec = ModuleSpec("model.layers.0.self_attn.q_proj", d_out, d_in)
    return spec, A, B, S


def dense_list(A, B, S):
    return [s * b.to(F64) @ a.to(F64) for a, b, s in zip(A, B, S)]


def shared_basis_factors(n, d_out, d_in, r, ranks=(2, 3, 5, 7), seed=0, diagonal=False):
    """Adapters whose updates truly are U S_i V^T with one (U, V) of rank r (ranks may be < r)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(d_out, r, generator=g, dtype=F64)
    V = torch.randn(d_in, r, generator=g, dtype=F64)
    if not diagonal:
        U, V = torch.linalg.qr(U)[0], torch.linalg.qr(V)[0]
    A, B = [], []
    for i in range(n):
        rho = ranks[i % len(ranks)]
        if diagonal:
            S = torch.diag(torch.randn(r, generator=g, dtype=F64))
        else:
            S = torch.randn(r, r, generator=g, dtype=F64)
        k = min(rho, r)
        L = torch.randn(r, k, generator=g, dtype=F64)
        R = torch.randn(k, r, generator=g, dtype=F64)
        core = S if rho >= r else L @ R  # rank-deficient adapters use a rank-rho core
        if rho >= r:
            mix = torch.linalg.qr(torch.randn(rho, r, generator=g, dtype=F64))[0]
            B.append(U @ core @ mix.t())
            A.append(mix @ V.t())
        else:
            B.append(U @ L)
            A.append(R @ V.t())
    return ModuleSpec("m", d_out, d_in), A, B


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("weights", ["uniform", "relative"])
def test_full_exact_recovery_float64(weights):
    spec, A, B = shared_basis_factors(14, 40, 33, r=6)
    f = ModuleFactors.from_factors(spec, A, B, [0.5] * len(A), dtype=F64)
    res = jd_full(f, 6, weights=weights, dtype=F64, tol=1e-14)
    assert float(res.rel_errors.max()) < 1e-10
    for i, W in enumerate(dense_list(A, B, [0.5] * len(A))):
        rec = res.reconstruct(i)
        assert float((W - rec).square().sum() / W.square().sum()) < 1e-10


def test_full_exact_recovery_rank_larger_than_structure():
    # r = 8 > the shared rank 5: still exact, extra directions get zero cores.
    spec, A, B = shared_basis_factors(9, 30, 25, r=5, ranks=(5, 6))
    f = ModuleFactors.from_factors(spec, A, B, dtype=F64)
    res = jd_full(f, 8, dtype=F64)
    assert float(res.rel_errors.max()) < 1e-10


def test_diag_exact_recovery_float64():
    spec, A, B = shared_basis_factors(12, 30, 26, r=5, ranks=(5, 7), diagonal=True)
    f = ModuleFactors.from_factors(spec, A, B, dtype=F64)
    res = jd_diag(f, 5, dtype=F64, tol=1e-15, max_iter=500)
    assert res.sigma.shape == (12, 5)
    assert float(res.rel_errors.max()) < 1e-10


# -------------------------------------------------------------- monotonicity
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("overrelax", [1.0, 1.5])
def test_full_objective_never_increases(seed, overrelax):
    spec, A, B, S = random_factors(20, 48, 36, seed=seed)
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    res = jd_full(f, 5, dtype=F64, tol=0, max_iter=40, seed=seed, overrelax=overrelax, weights="uniform")
    h = torch.tensor(res.history, dtype=F64)
    assert len(res.history) == res.iterations + 1 >= 10
    slack = 1e-10 * float(h[0])
    assert bool((h[1:] <= h[:-1] + slack).all()), res.history
    assert float(h[-1]) < float(h[0])  # it does make progress


def test_full_objective_never_increases_float32_relative():
    spec, A, B, S = random_factors(30, 64, 40, ranks=(4, 8), seed=5)
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=torch.float32)
    res = jd_full(f, 6, dtype=torch.float32, tol=0, max_iter=30)
    h = torch.tensor(res.history, dtype=F64)
    assert bool((h[1:] <= h[:-1] + 1e-5 * float(h[0])).all()), res.history


def test_diag_objective_never_increases():
    spec, A, B, S = random_factors(15, 30, 28, seed=3)
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    res = jd_diag(f, 4, dtype=F64, tol=0, max_iter=60)
    h = torch.tensor(res.history, dtype=F64)
    assert bool((h[1:] <= h[:-1] + 1e-10 * float(h[0])).all())
    assert float(h[-1]) < float(h[0])


# ---------------------------------------------------------- dense agreement
def dense_hooi(dW, w, r, U, V, iters):
    """Exact alternating maximisation of sum_i w_i ||U^T dW_i V||^2 with dense eigensolves."""
    for _ in range(iters):
        M = sum(wi * W @ V @ V.t() @ W.t() for wi, W in zip(w, dW))
        U = torch.linalg.eigh(M)[1][:, -r:]
        M = sum(wi * W.t() @ U @ U.t() @ W for wi, W in zip(w, dW))
        V = torch.linalg.eigh(M)[1][:, -r:]
    return U, V


@pytest.mark.parametrize("weights", ["uniform", "relative"])
def test_full_agrees_with_dense_bruteforce(weights):
    spec, A, B, S = random_factors(10, 22, 18, ranks=(2, 4, 6), seed=11, scales=[0.3 * (i + 1) for i in range(10)])
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    dW = dense_list(A, B, S)
    res = jd_full(f, 4, weights=weights, dtype=F64, tol=1e-15, max_iter=3000)
    norms = torch.stack([W.square().sum() for W in dW])
    assert torch.allclose(res.norms_sq, norms, rtol=1e-12)
    w = torch.ones(10, dtype=F64) if weights == "uniform" else 1 / norms
    assert torch.allclose(res.weights, w, rtol=1e-12)
    U, V = res.U, res.V
    assert torch.allclose(U.t() @ U, torch.eye(4, dtype=F64), atol=1e-12)
    assert torch.allclose(V.t() @ V, torch.eye(4, dtype=F64), atol=1e-12)
    for i, W in enumerate(dW):
        assert torch.allclose(res.sigma[i], U.t() @ W @ V, atol=1e-11)
        err = (W - U @ res.sigma[i] @ V.t()).square().sum()
        assert float(abs(res.errors[i] - err)) < 1e-9 * float(norms[i])
    E = float((w * res.errors).sum())
    assert abs(E - res.history[-1]) < 1e-8 * float((w * norms).sum())
    # Dense alternating maximisation from several starts never finds a better point
    # than a converged JD-Full (it can find the same one).
    g = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(4):
        U0 = torch.linalg.qr(torch.randn(22, 4, generator=g, dtype=F64))[0]
        V0 = torch.linalg.qr(torch.randn(18, 4, generator=g, dtype=F64))[0]
        Ud, Vd = dense_hooi(dW, w, 4, U0, V0, 300)
        best = min(best, sum(float(wi * (W - Ud @ Ud.t() @ W @ Vd @ Vd.t()).square().sum()) for wi, W in zip(w, dW)))
    assert E <= best * (1 + 1e-3)


def test_diag_agrees_with_dense():
    spec, A, B, S = random_factors(8, 20, 16, seed=4)
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    res = jd_diag(f, 3, dtype=F64, tol=1e-13, max_iter=500)
    dW = dense_list(A, B, S)
    U, V = res.U, res.V
    assert torch.allclose(U.norm(dim=0), torch.ones(3, dtype=F64))
    G = (U.t() @ U) * (V.t() @ V)
    for i, W in enumerate(dW):
        # sigma is the least-squares solution given U, V
        d = torch.diagonal(U.t() @ W @ V)
        assert torch.allclose(res.sigma[i], torch.linalg.solve(G, d), atol=1e-9)
        err = (W - U @ torch.diag(res.sigma[i]) @ V.t()).square().sum()
        assert abs(float(res.errors[i] - err)) < 1e-9 * float(W.square().sum())


def test_full_sigma_and_norms_from_factors_match_dense():
    spec, A, B, S = random_factors(7, 19, 23, seed=8, scales=[2.0, 0.5, 1.0, 3.0, 0.25, 1.5, 1.0])
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(19, 4, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(23, 4, generator=g, dtype=F64))[0]
    sig = full_sigma(f, U, V)
    for i, W in enumerate(dense_list(A, B, S)):
        assert torch.allclose(sig[i], U.t() @ W @ V, atol=1e-12)
        assert torch.allclose(f.dense(i), W, atol=1e-12)
        assert torch.allclose(f.norms_sq()[i], W.square().sum(), rtol=1e-12)


# --------------------------------------------------------------- weights
def test_relative_weights_are_scale_invariant_uniform_are_not():
    spec, A, B, S = random_factors(12, 30, 24, ranks=(4,), seed=2)
    f1 = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    S2 = list(S)
    S2[0] = 50.0  # adapter 0 becomes much larger
    f2 = ModuleFactors.from_factors(spec, A, B, S2, dtype=F64)
    kw = dict(dtype=F64, tol=1e-14, max_iter=2000, seed=3)
    r1 = jd_full(f1, 3, weights="relative", **kw)
    r2 = jd_full(f2, 3, weights="relative", **kw)
    # Relative weights: rescaling one adapter changes nothing about the fit.
    assert torch.allclose(r1.rel_errors, r2.rel_errors, atol=1e-8)
    P1, P2 = r1.U @ r1.U.t(), r2.U @ r2.U.t()
    assert torch.allclose(P1, P2, atol=1e-6)
    u1 = jd_full(f1, 3, weights="uniform", **kw)
    u2 = jd_full(f2, 3, weights="uniform", **kw)
    # Uniform weights: the big adapter dominates and gets (much) better treatment.
    assert float(u2.rel_errors[0]) < 0.5 * float(u1.rel_errors[0])
    assert float(u2.rel_errors[1:].mean()) > float(u1.rel_errors[1:].mean())
    # Each weighting is best at its own objective.
    assert float(r2.rel_errors.sum()) <= float(u2.rel_errors.sum()) + 1e-9
    assert float(u2.errors.sum()) <= float(r2.errors.sum()) + 1e-9
    assert torch.allclose(r2.weights, 1 / r2.norms_sq)


def test_custom_weights_and_validation():
    n = torch.tensor([1.0, 4.0, 0.0], dtype=F64)
    assert torch.equal(resolve_weights("relative", n), torch.tensor([1.0, 0.25, 0.0], dtype=F64))
    assert torch.equal(resolve_weights("uniform", n), torch.ones(3, dtype=F64))
    w = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(resolve_weights(w, n), w.to(F64))
    with pytest.raises(ValueError):
        resolve_weights(torch.tensor([1.0, -1.0, 0.0]), n)
    with pytest.raises(ValueError):
        resolve_weights("squared", n)


# --------------------------------------------------------- API behaviour
def test_deterministic_for_a_seed():
    spec, A, B, S = random_factors(16, 40, 30, seed=6)
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=torch.float32)
    a = jd_full(f, 5, seed=7, max_iter=10, tol=0)
    b = jd_full(f, 5, seed=7, max_iter=10, tol=0)
    assert torch.equal(a.U, b.U) and torch.equal(a.sigma, b.sigma)
    assert a.history == b.history
    c = jd_diag(f, 5, seed=7, max_iter=10)
    d = jd_diag(f, 5, seed=7, max_iter=10)
    assert torch.equal(c.U, d.U) and torch.equal(c.sigma, d.sigma)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
def test_compute_dtype_is_independent_of_adapter_dtype(in_dtype, compute):
    spec, A, B, S = random_factors(6, 24, 20, seed=9, dtype=in_dtype)
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=in_dtype)
    assert f.dtype == in_dtype
    res = jd_full(f, 4, dtype=compute, max_iter=20)
    assert res.U.dtype == compute and res.sigma.dtype == compute
    ref = jd_full(f.to(dtype=F64), 4, dtype=F64, max_iter=20)
    assert abs(float(res.rel_errors.mean() - ref.rel_errors.mean())) < 1e-3
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        jd_full(f, 4, dtype=torch.bfloat16)


def test_rank_checks():
    spec, A, B, S = random_factors(3, 10, 6, ranks=(2,))
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    with pytest.raises(ValueError, match="larger than"):
        jd_full(f, 7)
    with pytest.raises(ValueError, match="positive"):
        jd_full(f, 0)
    with pytest.raises(ValueError, match="larger than"):
        jd_diag(f, 7)
    check_rank(6, 10, 6)


def test_zero_adapters_one_adapter_and_empty():
    spec, A, B, S = random_factors(5, 20, 16, seed=1, zero=(1, 3))
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    for fit in (jd_full, jd_diag):
        res = fit(f, 3, dtype=F64)
        assert float(res.rel_errors[1]) == 0.0 and float(res.rel_errors[3]) == 0.0
        assert float(res.weights[1]) == 0.0
        assert float(res.sigma[1].abs().max()) < 1e-12
        assert torch.isfinite(res.rel_errors).all()
    # one adapter of rank <= r: exact
    f1 = ModuleFactors.from_factors(spec, A[:1], B[:1], S[:1], dtype=F64)
    assert float(jd_full(f1, 3, dtype=F64).rel_errors[0]) < 1e-12
    # all zero / no adapters at all
    fz = ModuleFactors.from_factors(spec, [A[1]], [B[1]], dtype=F64)
    res = jd_full(fz, 3, dtype=F64)
    assert res.converged and float(res.errors.abs().max()) == 0.0
    fe = ModuleFactors(spec, 0, [])
    assert jd_full(fe, 3, dtype=F64).sigma.shape == (0, 3, 3)
    assert jd_diag(fe, 3, dtype=F64).sigma.shape == (0, 3)


def test_warm_start_resumes():
    spec, A, B, S = random_factors(18, 36, 30, seed=12)
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    long = jd_full(f, 4, dtype=F64, tol=1e-12, max_iter=500)
    warm = jd_full(f, 4, dtype=F64, tol=1e-12, max_iter=500, init=(long.U, long.V))
    assert warm.iterations <= 3
    assert abs(warm.history[0] - long.history[-1]) < 1e-9 * long.history[0]


def test_scaling_folded_into_b():
    spec, A, B, S = random_factors(3, 8, 6, ranks=(2,), scales=[0.5, 2.0, 4.0])
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    for i in range(3):
        assert torch.allclose(f.dense(i), S[i] * B[i] @ A[i])
    with pytest.raises(ValueError, match="expected 8 x 6"):
        ModuleFactors.from_factors(spec, [A[0]], [torch.zeros(9, 2, dtype=F64)], dtype=F64)


# ---------------------------------------------------------------- baselines
def test_truncated_svd_matches_dense_svd():
    spec, A, B, S = random_factors(6, 25, 21, ranks=(3, 6, 9), seed=13)
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    U, s, V, err, norms = truncated_svd(f, 4)
    for i, W in enumerate(dense_list(A, B, S)):
        sv = torch.linalg.svdvals(W)
        k = min(4, A[i].shape[0])
        assert torch.allclose(s[i, :k], sv[:k], rtol=1e-10)
        rec = U[i] @ torch.diag(s[i]) @ V[i].t()
        assert torch.allclose((W - rec).square().sum(), err[i], rtol=1e-8, atol=1e-10)
        assert torch.allclose(err[i], sv[k:].square().sum(), rtol=1e-8, atol=1e-10)


def test_baseline_collections():
    spec, A, B, S = random_factors(4, 12, 10, ranks=(2, 3))
    col = InMemoryCollection({f"a{i}": {spec.name: (A[i], B[i], S[i])} for i in range(4)})
    none = compress_none(col, dtype=F64)
    assert none.method == "none" and none.num_clusters == 4 and none.rank == 3
    svd = compress_svd(col, 2, dtype=F64)
    for i, W in enumerate(dense_list(A, B, S)):
        assert torch.allclose(none.reconstruct(i, spec.name), W, atol=1e-12)
        sv = torch.linalg.svdvals(W)
        assert abs(float(svd.modules[spec.name].rel_errors[i]) - float(sv[2:].square().sum() / sv.square().sum())) < 1e-10
        Bf, Af = svd.lora_factors(i, spec.name)
        assert torch.allclose(Bf @ Af, svd.reconstruct(i, spec.name), atol=1e-12)
    assert float(none.rel_errors().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("m", [1, 2, 5, 11, 12, 16, 17])
def test_thin_products_padding_is_exact(dtype, m):
    # project/expand pad thin blocks to a faster GEMM width on CPUs; the result must not change.
    from jdlora_ops.compress._linalg import expand, gemm_width, project
    from jdlora_ops.compress.collection import column_layout

    g = torch.Generator().manual_seed(m)
    D = [column_layout(torch.randn(7, 3, 50, generator=g, dtype=F64).to(dtype)),
         torch.randn(4, 5, 50, generator=g, dtype=F64).to(dtype)]
    X = torch.randn(50, m, generator=g, dtype=F64).to(dtype)
    C = [torch.randn(7, 3, m, generator=g, dtype=F64).to(dtype), torch.randn(4, 5, m, generator=g, dtype=F64).to(dtype)]
    assert gemm_width(m, dtype, X.device) >= m
    tol = 1e-12 if dtype == F64 else 1e-5
    for got, d in zip(project(D, X), D):
        want = d.to(F64) @ X.to(F64)
        assert got.shape == want.shape
        assert (got.to(F64) - want).abs().max() <= tol * want.abs().max()
    got = expand(D, C, 50, m, X)
    want = sum(d.to(F64).reshape(-1, 50).t() @ c.to(F64).reshape(-1, m) for d, c in zip(D, C))
    assert got.shape == (50, m) and got.dtype == dtype
    assert (got.to(F64) - want).abs().max() <= tol * want.abs().max()


def _record_block_widths(monkeypatch) -> list[int]:
    """Make every JD-Full half-step append the width of the block it returns."""
    import jdlora_ops.compress.jd as jd

    widths: list[int] = []
    real = jd._half_step

    def spy(data, X, *args):
        out = real(data, X, *args)
        widths.append(out[0].shape[1])
        return out

    monkeypatch.setattr(jd, "_half_step", spy)
    return widths


@pytest.mark.parametrize("r", [12, 3])
def test_adaptive_oversampling_grows_the_block_and_matches_fixed(monkeypatch, r):
    # The block starts narrow (r columns; for ranks below the CPU's padded GEMM width, that
    # width, since a narrower block would cost as much), grows to r + p once the error falls
    # slowly, never shrinks, and converges where the fixed block does.
    from jdlora_ops.compress._linalg import gemm_width

    spec, A, B, S = random_factors(12, 48, 44, ranks=(4, 6), seed=3)
    f = ModuleFactors.from_factors(spec, A, B, S, dtype=F64)
    widths = _record_block_widths(monkeypatch)
    p = 8
    res = jd_full(f, r, weights="uniform", max_iter=400, tol=1e-12, dtype=F64)
    start = min(r + p, max(r, gemm_width(r, F64, torch.device("cpu"))))
    assert r < 12 or start == r  # r = 12 exercises a real narrow phase
    assert widths[0] == start and widths[-1] == r + p
    assert widths == sorted(widths)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(res.history, res.history[1:]))
    monkeypatch.undo()
    fixed = jd_full(f, r, weights="uniform", max_iter=400, tol=1e-12, dtype=F64, oversample=p)
    assert res.converged and fixed.converged
    assert res.history[-1] == pytest.approx(fixed.history[-1], rel=1e-6)
