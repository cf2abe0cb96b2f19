"""Test data of the serving tests: small random compressed collections and dense oracles.

A collection built here has orthonormal bases per (cluster, module), random
non-zero cores and a known assignment, so the serving layer can be checked
against the dense update ``U_k Sigma_i Vt_k`` without running the compressor.
"""

from __future__ import annotations

import pytest
import torch

from jdlora_ops.compress import CompressedCollection, CompressedModule, ModuleSpec

F64 = torch.float64

#: Two layers of q/v projections with GQA-like widths (odd sizes on purpose).
MODULES = [
    ModuleSpec("model.layers.0.self_attn.q_proj", 40, 36),
    ModuleSpec("model.layers.0.self_attn.v_proj", 20, 36),
    ModuleSpec("model.layers.1.self_attn.q_proj", 40, 36),
    ModuleSpec("model.layers.1.self_attn.v_proj", 20, 36),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run with one torch thread (the machine is shared); the setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def by_cluster(collection: CompressedCollection, k: int) -> list[str]:
    """Names of the adapters of cluster ``k``."""
    return [n for n, c in zip(collection.adapter_names, collection.assignment.tolist()) if c == k]


def orthonormal(d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=F64))
    return q


def random_collection(
    n: int = 12, K: int = 4, r: int = 6, *, modules=MODULES, diagonal: bool = False, seed: int = 0,
    base_model: str = "test/base",
) -> CompressedCollection:
    """``n`` adapters over ``K`` clusters (every cluster non-empty), rank ``r``, float32."""
    gen = torch.Generator().manual_seed(seed)
    assignment = torch.arange(n) % K
    assignment = assignment[torch.randperm(n, generator=gen)]
    mods = {}
    for spec in modules:
        U = torch.stack([orthonormal(spec.d_out, r, gen) for _ in range(K)]).float()
        Vt = torch.stack([orthonormal(spec.d_in, r, gen).T for _ in range(K)]).float().contiguous()
        sigma = torch.randn(n, r, generator=gen) if diagonal else torch.randn(n, r, r, generator=gen)
        sigma = sigma.float()
        z = torch.zeros(n)
        mods[spec.name] = CompressedModule(spec, U, Vt, sigma, z + 1, z.clone(), z.clone())
    names = [f"adapter_{i:02d}" for i in range(n)]
    return CompressedCollection(
        "diag" if diagonal else "full", r, names, assignment, K, mods, metadata={"base_model": base_model}
    )


def random_lora(modules=MODULES, rank: int = 5, seed: int = 0, scale: float = 0.5, skip=()) -> dict:
    """Factors of one uncompressed adapter: module -> (A [rank, d_in], B [d_out, rank], scale)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for spec in modules:
        if spec.name in skip:
            continue
        out[spec.name] = (
            torch.randn(rank, spec.d_in, generator=gen) / spec.d_in**0.5,
            torch.randn(spec.d_out, rank, generator=gen),
            scale,
        )
    return out


def dense_update(collection: CompressedCollection, uncompressed: dict, name: str | None, module: str) -> torch.Tensor:
    """``dW`` (float64 ``[d_out, d_in]``) that adapter ``name`` adds on ``module`` (zeros for ``None``)."""
    spec = collection.modules[module].spec
    if name is None:
        return torch.zeros(spec.d_out, spec.d_in, dtype=F64)
    if name in uncompressed:
        f = uncompressed[name].get(module)
        if f is None:
            return torch.zeros(spec.d_out, spec.d_in, dtype=F64)
        A, B, s = f
        return s * B.double() @ A.double()
    return collection.reconstruct(name, module).double()


def reference_output(collection, uncompressed, adapters, counts, module, x, y0) -> torch.Tensor:
    """``y0 + dW_{a(t)} x_t`` per token, tokens laid out request after request (float64)."""
    out = y0.double().clone()
    t = 0
    for a, c in zip(adapters, counts):
        if c:
            dW = dense_update(collection, uncompressed, a, module)
            out[t : t + c] += x[t : t + c].double() @ dW.T
        t += c
    return out


def snapshot(cache) -> tuple:
    """Everything a failed call must leave unchanged: residency, pins, counters, table contents."""
    st = cache.state()
    tabs = [t.clone() for m in cache.tables.modules.values() for t in m.tensors()]
    tabs.append(cache.tables.adapter_cluster.clone())
    return st, tabs


def assert_unchanged(cache, snap, host_counters: bool = True) -> None:
    """``host_counters=False``: host-tier counters may differ (a failed disk read is still a host miss)."""
    st, tabs = snap
    now_st, now_tabs = snapshot(cache)
    if not host_counters:
        for s in (st, now_st):
            s = s["stats"]
            for k in ("host_hits", "host_misses", "host_evictions", "bytes_disk_to_host"):
                s.pop(k)
    assert now_st == st
    for a, b in zip(tabs, now_tabs):
        assert torch.equal(a, b)


def serve_and_check(planner, coll, unc, adapters, counts, seed=0):
    """Serve one batch through every module and compare with the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    with planner.prepare(adapters, counts) as plan:
        for spec in MODULES:
            x = torch.randn(plan.num_tokens, spec.d_in, generator=gen)
            y0 = torch.randn(plan.num_tokens, spec.d_out, generator=gen)
            y = y0.clone()
            plan.apply(spec.name, x, y)
            ref = reference_output(coll, unc, adapters, counts, spec.name, x, y0)
            torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)
