"""torch.library.opcheck on every op and torch.compile(fullgraph=True) over a chain of them."""

from __future__ import annotations

import pytest
import torch

import jdlora_ops
from jdlora_ops import reference as R

from conftest import assert_close, cuda_only, make_batch, randn

DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


def op_cases(device: str):
    d, r, T = 40, 8, 19
    b = make_batch("zipf", T, seed=3, device=device)
    g = torch.Generator().manual_seed(0)
    x = randn(b.T, d, gen=g, device=device)
    V = [randn(b.C, r, d, gen=g, device=device) for _ in range(2)]
    S = [randn(b.A, r, r, gen=g, device=device), randn(b.A, r, gen=g, device=device)]
    U = [randn(b.C, d, r, gen=g, device=device), randn(b.C, 10, r, gen=g, device=device)]
    A = [randn(b.A, r, d, gen=g, device=device) for _ in range(2)]
    B = [randn(b.A, d, r, gen=g, device=device), randn(b.A, 10, r, gen=g, device=device)]
    scales = torch.rand(2, b.A, generator=g).to(device)
    h = randn(2, b.T, r, gen=g, device=device)
    y = randn(b.T, d + 10, gen=g, device=device)
    m = b.meta
    seg_c = (m.sorted_indices(), m.active_cluster_ids, m.cluster_token_start)
    seg_l = (m.sorted_indices(), m.active_lora_ids, m.lora_token_start_loc)
    fresh = jdlora_ops.BatchMeta.allocate(b.T, b.A, b.C, device)
    return {
        "build_batch_meta": (b.mapping, b.adapter_cluster, fresh.token_indices_sorted, fresh.active_cluster_ids,
                             fresh.num_tokens_per_cluster, fresh.cluster_token_start, fresh.active_lora_ids,
                             fresh.num_tokens_per_lora, fresh.lora_token_start_loc, fresh.no_lora_flag),
        "jd_shrink": (x, V, *seg_c, torch.empty_like(h)),
        "jd_core": (h, S, m.mapping(), torch.empty_like(h)),
        "jd_expand": (h, U, [0, d], *seg_c, y.clone()),
        "jd_fused": (x, V, S, U, [0, d], m.mapping(), *seg_c, y.clone()),
        "lora_shrink": (x, A, scales, *seg_l, torch.empty_like(h)),
        "lora_expand": (h, B, [0, d], *seg_l, y.clone()),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["build_batch_meta", "jd_shrink", "jd_core", "jd_expand", "jd_fused",
                                  "lora_shrink", "lora_expand"])
def test_opcheck(name, device):
    args = op_cases(device)[name]
    torch.library.opcheck(getattr(torch.ops.jdlora_ops, name).default, args)


@pytest.mark.parametrize("name", ["jd_expand", "jd_fused", "lora_expand"])
def test_opcheck_column_major_expand_stacks_on_cpu(name):
    """The CPU takes U and B column-major in place (see ops.py); the fakes and schemas hold for that layout too."""
    args = list(op_cases("cpu")[name])
    i = 3 if name == "jd_fused" else 1
    args[i] = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in args[i]]
    assert all(w.stride(1) == 1 for w in args[i])
    torch.library.opcheck(getattr(torch.ops.jdlora_ops, name).default, tuple(args))


def serve_layer(x, y, mapping, adapter_cluster, meta, V, S, U, A, B, scales):
    """One layer's adapter work, staged and fused, plus the baseline."""
    meta.build(mapping, adapter_cluster)
    h = jdlora_ops.jd_shrink(x, V, meta)
    g = jdlora_ops.jd_core(h, S, meta)
    y1 = jdlora_ops.jd_expand(g, U, meta, y.clone())
    y2 = jdlora_ops.jd_fused(x, V, S, U, meta, y.clone())
    hl = jdlora_ops.lora_shrink(x, A, scales, meta)
    y3 = jdlora_ops.lora_expand(hl, B, meta, y.clone())
    return y1, y2, y3


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    d, r = 48, 8
    b = make_batch("uniform", 13, seed=4, device=device)
    g = torch.Generator().manual_seed(1)
    x = randn(b.T, d, gen=g, device=device)
    y = randn(b.T, d, gen=g, device=device)
    V = randn(b.C, r, d, gen=g, device=device)
    S = randn(b.A, r, r, gen=g, device=device)
    U = randn(b.C, d, r, gen=g, device=device)
    A = randn(b.A, r, d, gen=g, device=device)
    B = randn(b.A, d, r, gen=g, device=device)
    scales = torch.rand(b.A, generator=g).to(device)
    compiled = torch.compile(serve_layer, fullgraph=True, backend="inductor" if device == "cpu" else "inductor")
    meta = jdlora_ops.BatchMeta.allocate(b.T, b.A, b.C, device)
    y1, y2, y3 = compiled(x, y, b.mapping, b.adapter_cluster, meta, V, S, U, A, B, scales)
    ref = R.jd_fused(x, [V], [S], [U], [0], b.mapping, b.adapter_cluster, y)
    assert_close(y1, ref, torch.float32, "staged")
    assert_close(y2, ref, torch.float32, "fused")
    ones = scales
    h = R.lora_shrink(x, [A], ones, b.mapping)
    assert_close(y3, R.lora_expand(h, [B], [0], b.mapping, y), torch.float32, "baseline")
