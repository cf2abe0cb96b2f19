"""Shapes and tables for the CPU micro-benchmarks (bench_cpu_ops.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import jdlora_ops

SHAPES = {
    # name: (tokens, d_in = d_out, r, adapter slots, clusters)
    "decode": (64, 4096, 16, 1000, 25),
    "prefill": (2048, 4096, 16, 1000, 25),
}


@dataclass
class Tables:
    x: torch.Tensor
    y: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    U: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scales: torch.Tensor
    h: torch.Tensor
    g: torch.Tensor
    mapping: torch.Tensor
    adapter_cluster: torch.Tensor
    meta: jdlora_ops.BatchMeta


def make_tables(shape: str, seed: int = 0) -> Tables:
    T, d, r, A, C = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    mapping = torch.randint(A, (T,), generator=gen, dtype=torch.int32)  # uniform popularity
    adapter_cluster = torch.randint(C, (A,), generator=gen, dtype=torch.int32)
    meta = jdlora_ops.BatchMeta.allocate(T, A, C).build(mapping, adapter_cluster)

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=gen) * scale

    return Tables(
        x=rnd(T, d), y=rnd(T, d), V=rnd(C, r, d, scale=d**-0.5), S=rnd(A, r, r, scale=r**-0.5),
        U=rnd(C, d, r, scale=r**-0.5), A=rnd(A, r, d, scale=d**-0.5), B=rnd(A, d, r, scale=r**-0.5),
        scales=torch.rand(A, generator=gen) + 0.5, h=rnd(1, T, r), g=rnd(1, T, r),
        mapping=mapping, adapter_cluster=adapter_cluster, meta=meta,
    )


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture(params=list(SHAPES), scope="module")
def tables(request):
    return request.param, make_tables(request.param)
