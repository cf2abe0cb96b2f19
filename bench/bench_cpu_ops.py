"""CPU micro-benchmarks of every op and of the plain-PyTorch composition.

Run with bench/run_cpu.sh (which stores JSON and a markdown table under
bench/results/). Threads are set explicitly per case (1 and 2).
"""

from __future__ import annotations

import pytest
import torch

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


# Quantized tables against float ones: "<model dtype>/<table format>" per layer. The int8 and 4-bit
# tables carry their scales in the model dtype; 4-bit groups are 64 along d_in (V, A) and the whole
# rank along r (U, B).
QUANT_TABLES = ["float32/float32", "float32/float32_column_major_U", "float32/int8", "float32/int8_column_major_U",
                "float32/int4", "float32/int4_column_major_U", "bfloat16/bfloat16", "bfloat16/bfloat16_column_major_U",
                "bfloat16/int8", "bfloat16/int8_column_major_U", "bfloat16/int4", "bfloat16/int4_column_major_U"]
_quant_cache: dict = {}


def _quant_tables(shape: str, t, spec: str):
    key = (shape, spec)
    if key not in _quant_cache:
        from jdlora_ops.quant import QuantizedTable, quantize

        model, fmt = spec.split("/")
        fmt, column_major = fmt.removesuffix("_column_major_U"), fmt.endswith("_column_major_U")
        dt = getattr(torch, model)
        cast = {k: getattr(t, k).to(dt) for k in ("x", "y", "V", "S", "U", "A", "B")}
        if fmt.startswith("int"):
            for k in ("V", "U", "A", "B"):
                cast[k] = quantize(cast[k], fmt, 64 if fmt == "int4" else None)
        if column_major:  # the CPU's faster layout of expand stacks (ops.py), float or quantized
            U = cast["U"]
            cm = lambda w: w.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
            cast["U"] = (QuantizedTable(cm(U.data), U.scales, U.fmt, U.group_size, U.length)
                         if isinstance(U, QuantizedTable) else cm(U))
        _quant_cache.clear()  # one table set in memory at a time
        _quant_cache[key] = cast
    return _quant_cache[key]


@pytest.mark.parametrize("op", [f"{layer}:{spec}" for layer in ("jd_fused", "lora_shrink_expand")
                                for spec in QUANT_TABLES if not (layer == "lora_shrink_expand" and "column" in spec)])
def test_quantized_tables(benchmark, tables, threads, op):
    shape, t = tables
    layer, spec = op.split(":")
    c = _quant_tables(shape, t, spec)
    y = c["y"].clone()
    fns = {
        "jd_fused": lambda: jdlora_ops.jd_fused(c["x"], c["V"], c["S"], c["U"], t.meta, y),
        "lora_shrink_expand": lambda: jdlora_ops.lora_expand(
            jdlora_ops.lora_shrink(c["x"], c["A"], t.scales, t.meta, out=t.h), c["B"], t.meta, y),
    }
    _bench(benchmark, tables, threads, "quantized_tables", fns[layer])
