"""Shared bases on a quantized grid (compress/quantized_bases.py): the refitted cores are the least-squares
cores under the quantized bases, and the recorded errors are those of what is served."""

from __future__ import annotations

import pytest
import torch

from jdlora_ops.compress import ModuleSpec, compress
from jdlora_ops.compress.quantized_bases import quantize_bases
from jdlora_ops.synthetic import planted_partition

F64 = torch.float64
# Output widths that are no power of two; input widths every 4-bit group divides (a 128 group is capped at 64).
MODULES = [ModuleSpec("model.layers.0.self_attn.q_proj", 48, 64),
           ModuleSpec("model.layers.0.self_attn.v_proj", 24, 128)]


@pytest.fixture(scope="module")
def col():
    return planted_partition(MODULES, [5, 4, 3], rank=8, adapter_ranks=(4, 3), scale_range=10.0, seed=3)[0]


def _dense(col, name, module):
    f = col.load_module(next(s for s in MODULES if s.name == module), dtype=F64)
    i = list(col.adapter_names).index(name)
    for g in f.groups:
        hit = (g.index == i).nonzero()
        if hit.numel():
            t = int(hit[0, 0])
            return g.Bt[t].T @ g.A[t]
    return torch.zeros(f.spec.d_out, f.spec.d_in, dtype=F64)


@pytest.mark.parametrize("method", ["full", "diag"])
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_refitted_cores_are_the_least_squares_cores_under_the_quantized_bases(col, method, fmt, group):
    res = compress(col, 6, num_clusters=3, method=method, dtype=F64, seed=0)
    float_err = res.rel_errors().clone()
    tables = quantize_bases(res, col, fmt, group)
    for spec in MODULES:
        cm = res.modules[spec.name]
        Uq, Vq = tables[spec.name]
        assert torch.equal(cm.U, Uq.dequantize(F64)) and torch.equal(cm.Vt, Vq.dequantize(F64))
        for i, name in enumerate(res.adapter_names):
            k = int(res.assignment[i])
            U, Vt, dW = cm.U[k], cm.Vt[k], _dense(col, name, spec.name)
            if method == "full":
                want = torch.linalg.pinv(U) @ dW @ torch.linalg.pinv(Vt)
            else:  # least squares over diagonal cores: columns vec(u_j v_j^T)
                basis = torch.stack([torch.outer(U[:, j], Vt[j]).flatten() for j in range(U.shape[1])], 1)
                want = torch.linalg.lstsq(basis, dW.flatten()[:, None]).solution[:, 0]
            torch.testing.assert_close(cm.sigma[i], want, rtol=1e-7, atol=1e-9)
            recon = U @ (torch.diag(cm.sigma[i]) if method == "diag" else cm.sigma[i]) @ Vt
            err = float((dW - recon).square().sum() / dW.square().sum())
            assert float(cm.rel_errors[i]) == pytest.approx(err, rel=1e-7, abs=1e-12)
    # Quantization costs little here (the fit's error dominates), and never less than nothing by much.
    q_err = res.rel_errors()
    assert float(q_err.mean()) <= float(float_err.mean()) * (1.5 if fmt == "int4" else 1.05) + 1e-6
    assert res.metadata["quantized_bases"] == {"format": fmt, "group_size": group}


def test_refitting_beats_keeping_the_float_cores(col):
    res = compress(col, 6, num_clusters=3, method="full", dtype=F64, seed=0)
    kept = {m: cm.sigma.clone() for m, cm in res.modules.items()}
    quantize_bases(res, col, "int4", 64)
    for spec in MODULES:
        cm = res.modules[spec.name]
        for i, name in enumerate(res.adapter_names):
            k = int(res.assignment[i])
            dW = _dense(col, name, spec.name)
            stale = float((dW - cm.U[k] @ kept[spec.name][i] @ cm.Vt[k]).square().sum())
            refit = float((dW - cm.U[k] @ cm.sigma[i] @ cm.Vt[k]).square().sum())
            assert refit <= stale * (1 + 1e-12)


def test_quantize_bases_refuses_what_it_cannot_do_and_changes_nothing(col):
    svd = compress(col, 3, method="svd", dtype=F64)
    with pytest.raises(ValueError, match="JD-Full or JD-Diag are quantized, got method 'svd'"):
        quantize_bases(svd, col, "int8")
    res = compress(col, 5, num_clusters=3, dtype=F64, seed=0)  # rank 5: rows of U are odd
    before = {m: (cm.U.clone(), cm.Vt.clone(), cm.sigma.clone()) for m, cm in res.modules.items()}
    with pytest.raises(ValueError, match="the reduction dimension must be even, got 5"):
        quantize_bases(res, col, "int4", 32)
    with pytest.raises(ValueError, match="must be one of 32, 64, 128, got 16"):
        quantize_bases(res, col, "int4", 16)
    for m, cm in res.modules.items():
        assert all(torch.equal(a, b) for a, b in zip(before[m], (cm.U, cm.Vt, cm.sigma)))
    assert "quantized_bases" not in res.metadata
