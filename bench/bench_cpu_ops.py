"""CPU micro-benchmarks of every op and of the plain-PyTorch composition.

Run with bench/run_cpu.sh (which stores JSON and a markdown table under
bench/results/). Threads are set explicitly per case (1 and 2).
"""

from __future__ import annotations

import pytest

import jdlora_ops
from jdlora_ops.torch_baseline import jd_fused_torch, lora_torch


def _bench(benchmark, tables, threads, group, fn):
    shape, _ = tables
    benchmark.group = f"{shape}-{group}-threads{threads}"
    benchmark.extra_info.update(shape=shape, threads=threads)
    rounds = 3 if shape == "prefill" else 15
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("op", ["jd_fused", "jd_fused_column_major_U", "jd_staged", "torch_gather_bmm"])
def test_jd_layer(benchmark, tables, threads, op):
    _, t = tables
    y = t.y.clone()
    U_cm = t.U.transpose(1, 2).contiguous().transpose(1, 2)  # the CPU layout the vLLM plugin keeps
    fns = {
        "jd_fused": lambda: jdlora_ops.jd_fused(t.x, t.V, t.S, t.U, t.meta, y),
        "jd_fused_column_major_U": lambda: jdlora_ops.jd_fused(t.x, t.V, t.S, U_cm, t.meta, y),
        "jd_staged": lambda: jdlora_ops.jd_expand(
            jdlora_ops.jd_core(jdlora_ops.jd_shrink(t.x, t.V, t.meta, out=t.h), t.S, t.meta, out=t.g),
            t.U, t.meta, y),
        "torch_gather_bmm": lambda: jd_fused_torch(t.x, [t.V], [t.S], [t.U], [0], t.mapping, t.adapter_cluster, y),
    }
    _bench(benchmark, tables, threads, "jd_layer", fns[op])


@pytest.mark.parametrize("op", ["jd_shrink", "jd_core", "jd_expand", "lora_shrink", "lora_expand",
                                "build_batch_meta"])
def test_single_op(benchmark, tables, threads, op):
    _, t = tables
    y = t.y.clone()
    fns = {
        "jd_shrink": lambda: jdlora_ops.jd_shrink(t.x, t.V, t.meta, out=t.h),
        "jd_core": lambda: jdlora_ops.jd_core(t.h, t.S, t.meta, out=t.g),
        "jd_expand": lambda: jdlora_ops.jd_expand(t.g, t.U, t.meta, y),
        "lora_shrink": lambda: jdlora_ops.lora_shrink(t.x, t.A, t.scales, t.meta, out=t.h),
        "lora_expand": lambda: jdlora_ops.lora_expand(t.h, t.B, t.meta, y),
        "build_batch_meta": lambda: t.meta.build(t.mapping, t.adapter_cluster),
    }
    _bench(benchmark, tables, threads, op, fns[op])


@pytest.mark.parametrize("op", ["lora_shrink_expand", "torch_gather_bmm"])
def test_lora_layer(benchmark, tables, threads, op):
    _, t = tables
    y = t.y.clone()
    fns = {
        "lora_shrink_expand": lambda: jdlora_ops.lora_expand(
            jdlora_ops.lora_shrink(t.x, t.A, t.scales, t.meta, out=t.h), t.B, t.meta, y),
        "torch_gather_bmm": lambda: lora_torch(t.x, [t.A], [t.B], t.scales, [0], t.mapping, y),
    }
    _bench(benchmark, tables, threads, "lora_layer", fns[op])
