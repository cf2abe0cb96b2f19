"""The shrink and expand ops on quantized tables (int8 rows, 4-bit groups) against float64.

The contract (ops.py, quant.py): the float32-accumulated result over the dequantised values
``float(q) * float(s)``, within the float tables' bound. The reference is the float64 op on
``QuantizedTable.dequantize(float64)``. Grid: every popularity pattern and batch size of
test_ops.py, every model dtype, two ranks, and three table formats (int8 on rows of odd
length, 4-bit with groups of 32 and of 128).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import jdlora_ops
from jdlora_ops import reference as R
from jdlora_ops.quant import QuantizedTable, quantize

from conftest import DTYPES, POPULARITY, assert_close, cuda_only, make_batch, randn

TOKENS = [1, 7, 133]
RANKS = [8, 64]
# (format, 4-bit group size, d): int8 takes any row length, 4-bit needs even rows split into whole groups.
FORMATS = [("int8", None, 111), ("int4", 32, 160), ("int4", 128, 4096)]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


def grid(fn):
    fn = pytest.mark.parametrize("device", DEVICES)(fn)
    fn = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])(fn)
    fn = pytest.mark.parametrize("r", RANKS)(fn)
    fn = pytest.mark.parametrize("fmt,group,d", FORMATS, ids=[f"{f}-g{g}-d{d}" for f, g, d in FORMATS])(fn)
    fn = pytest.mark.parametrize("T", TOKENS)(fn)
    return pytest.mark.parametrize("pattern", POPULARITY)(fn)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def q(w: torch.Tensor, fmt: str, group: int | None, device: str = "cpu") -> QuantizedTable:
    """``w`` quantized, its scales in ``w``'s dtype (the ops' rule), on ``device``."""
    t = quantize(w, fmt, group if fmt == "int4" else None)
    return QuantizedTable(t.data.to(device), t.scales.to(device), t.fmt, t.group_size, t.length)


def exact(t: QuantizedTable) -> torch.Tensor:
    return t.dequantize(torch.float64)


@grid
def test_jd_shrink(pattern, T, fmt, group, d, r, dtype, device):
    b = make_batch(pattern, T, seed_of("qshrink", pattern, T, fmt, d, r), device=device)
    g = torch.Generator().manual_seed(1)
    x = randn(b.T, d, dtype=dtype, gen=g, device=device)
    V = q(randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=device), fmt, group, device)
    h = torch.full((1, b.T, r), float("nan"), device=device)
    jdlora_ops.jd_shrink(x, V, b.meta, out=h)
    assert_close(h, R.jd_shrink(x, [exact(V)], b.mapping, b.adapter_cluster), dtype, "h")


@grid
def test_jd_expand(pattern, T, fmt, group, d, r, dtype, device):
    b = make_batch(pattern, T, seed_of("qexpand", pattern, T, fmt, d, r), device=device)
    g = torch.Generator().manual_seed(3)
    gin = randn(1, b.T, r, gen=g, device=device)
    U = q(randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=device), fmt, group, device)
    y = randn(b.T, d, dtype=dtype, gen=g, device=device)
    ref = R.jd_expand(gin, [exact(U)], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_expand(gin, U, b.meta, y)
    assert_close(y, ref, dtype, "y")


@grid
def test_jd_fused(pattern, T, fmt, group, d, r, dtype, device):
    b = make_batch(pattern, T, seed_of("qfused", pattern, T, fmt, d, r), device=device)
    g = torch.Generator().manual_seed(4)
    x = randn(b.T, d, dtype=dtype, gen=g, device=device)
    V = q(randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=device), fmt, group, device)
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=device)
    U = q(randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=device), fmt, group, device)
    y = randn(b.T, d, dtype=dtype, gen=g, device=device)
    ref = R.jd_fused(x, [exact(V)], [S], [exact(U)], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    assert_close(y, ref, dtype, "y")


@grid
def test_lora_shrink(pattern, T, fmt, group, d, r, dtype, device):
    b = make_batch(pattern, T, seed_of("qlshrink", pattern, T, fmt, d, r), device=device)
    g = torch.Generator().manual_seed(5)
    x = randn(b.T, d, dtype=dtype, gen=g, device=device)
    A = q(randn(b.A, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=device), fmt, group, device)
    scales = (torch.rand(b.A, generator=g) + 0.5).to(device)
    h = jdlora_ops.lora_shrink(x, A, scales, b.meta)
    assert_close(h, R.lora_shrink(x, [exact(A)], scales, b.mapping), dtype, "h")


@grid
def test_lora_expand(pattern, T, fmt, group, d, r, dtype, device):
    b = make_batch(pattern, T, seed_of("qlexpand", pattern, T, fmt, d, r), device=device)
    g = torch.Generator().manual_seed(6)
    h = randn(1, b.T, r, gen=g, device=device)
    B = q(randn(b.A, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=device), fmt, group, device)
    y = randn(b.T, d, dtype=dtype, gen=g, device=device)
    ref = R.lora_expand(h, [exact(B)], [0], b.mapping, y)
    jdlora_ops.lora_expand(h, B, b.meta, y)
    assert_close(y, ref, dtype, "y")


# --- several slices, strided tensors, exactness -------------------------------


def _strided_rows(t: QuantizedTable, pad: int = 6) -> QuantizedTable:
    """The same table with its values' and scales' rows padded apart (row strides past the row length)."""
    def pad_rows(x):
        big = torch.zeros(*x.shape[:-1], x.shape[-1] + pad, dtype=x.dtype)
        big[..., : x.shape[-1]] = x
        return big[..., : x.shape[-1]]
    return QuantizedTable(pad_rows(t.data), pad_rows(t.scales), t.fmt, t.group_size, t.length)


def _to(t: QuantizedTable, device: str) -> QuantizedTable:
    """On ``device`` with the same strides (``Tensor.to`` keeps a non-dense tensor's layout only for dense ones)."""
    def move(x):
        out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
        return out.copy_(x)
    return QuantizedTable(move(t.data), move(t.scales), t.fmt, t.group_size, t.length)


def _column_major(t: QuantizedTable) -> QuantizedTable:
    """The CPU's other layout of expand stacks: the values column-major (ops.py)."""
    return QuantizedTable(t.data.transpose(1, 2).contiguous().transpose(1, 2), t.scales, t.fmt, t.group_size,
                          t.length)


@pytest.mark.parametrize("layout,device", [("strided_rows", "cpu"), ("column_major_expand", "cpu"),
                                           pytest.param("strided_rows", "cuda", marks=cuda_only)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("pattern", ["uniform", "skewed", "distinct"])
def test_mixed_formats_strided_slices(pattern, dtype, layout, device):
    """Three slices (q/k/v widths) of int8 and 4-bit tables, with strided rows or with the expand stacks
    column-major (a CPU layout), x and y column slices of wider tensors, through the staged ops, jd_fused and
    the baseline."""
    b = make_batch(pattern, 29, seed_of("qmixed", pattern, str(dtype)), device=device)
    g = torch.Generator().manual_seed(8)
    d, r, widths = 128, 16, (96, 32, 32)
    fmts = [("int8", None), ("int4", 32), ("int4", 64)]
    xw = randn(b.T, d + 5, dtype=dtype, gen=g, device=device)
    x = xw[:, 3 : 3 + d]
    V = [_strided_rows(q(randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g), f, gs)) for f, gs in fmts]
    U = [_strided_rows(q(randn(b.C, w, r, dtype=dtype, scale=r**-0.5, gen=g), f, gs))
         for w, (f, gs) in zip(widths, fmts)]
    S = [randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g), randn(b.A, r, dtype=dtype, gen=g),
         randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g)]
    A = [_strided_rows(q(randn(b.A, r, d, dtype=dtype, scale=d**-0.5, gen=g), f, gs)) for f, gs in fmts]
    B = [_strided_rows(q(randn(b.A, w, r, dtype=dtype, scale=r**-0.5, gen=g), f, gs))
         for w, (f, gs) in zip(widths, fmts)]
    assert all(t.data.stride(1) > t.data.shape[-1] for t in V + U)
    if layout == "column_major_expand":
        U, B = [_column_major(t) for t in U], [_column_major(t) for t in B]
        assert all(t.data.stride(1) == 1 for t in U + B)
    S = [s.to(device) for s in S]
    V, U, A, B = ([_to(t, device) for t in ts] for ts in (V, U, A, B))
    offsets = [0, 100, 140]
    y0 = randn(b.T, 180, dtype=dtype, gen=g, device=device)
    ref = R.jd_fused(x, [exact(v) for v in V], S, [exact(u) for u in U], offsets, b.mapping, b.adapter_cluster, y0)

    y = y0.clone()
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y[:, :], slice_offsets=offsets)
    assert_close(y, ref, dtype, "jd_fused")
    y = y0.clone()
    h = jdlora_ops.jd_shrink(x, V, b.meta)
    jdlora_ops.jd_expand(jdlora_ops.jd_core(h, S, b.meta), U, b.meta, y, slice_offsets=offsets)
    assert_close(y, ref, dtype, "staged")

    scales = (torch.rand(3, b.A, generator=g) + 0.5).to(device)
    hl = R.lora_shrink(x, [exact(a) for a in A], scales, b.mapping)
    y = y0.clone()
    jdlora_ops.lora_expand(jdlora_ops.lora_shrink(x, A, scales, b.meta), B, b.meta, y, slice_offsets=offsets)
    assert_close(y, R.lora_expand(hl, [exact(t) for t in B], offsets, b.mapping, y0), dtype, "baseline")


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)])
def test_float32_result_is_bitwise_the_dequantised_tables(fmt, group):
    """With float32 tables and rows within one dequantisation chunk (1024 values), the kernels run the same
    sums on the same values, so a quantized table gives bit for bit what its dequantised float32 copy gives:
    quantization changes what is read, not the maths. (Longer rows add the chunks' partial sums.)"""
    b = make_batch("zipf", 61, seed_of("qbits", fmt))
    g = torch.Generator().manual_seed(9)
    d, r = 128, 16
    x = randn(b.T, d, gen=g)
    V, U = q(randn(b.C, r, d, gen=g), fmt, group), q(randn(b.C, d, r, gen=g), fmt, group)
    S = randn(b.A, r, r, gen=g)
    y0 = randn(b.T, d, gen=g)
    Vf, Uf = V.dequantize(torch.float32), U.dequantize(torch.float32)
    assert torch.equal(jdlora_ops.jd_fused(x, V, S, U, b.meta, y0.clone()),
                       jdlora_ops.jd_fused(x, Vf, S, Uf, b.meta, y0.clone()))
    assert torch.equal(jdlora_ops.jd_shrink(x, V, b.meta), jdlora_ops.jd_shrink(x, Vf, b.meta))
    gin = randn(1, b.T, r, gen=g)
    assert torch.equal(jdlora_ops.jd_expand(gin, U, b.meta, y0.clone()), jdlora_ops.jd_expand(gin, Uf, b.meta, y0.clone()))


@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch_invariant"])
def test_one_tokens_output_does_not_depend_on_the_batch(invariant):
    """A token's output is bitwise the same alone and among 300 others, on quantized tables too."""
    g = torch.Generator().manual_seed(10)
    d, r, A, C = 160, 16, 9, 3
    dtype = torch.bfloat16
    V = q(randn(C, r, d, dtype=dtype, gen=g), "int4", 32)
    U = q(randn(C, d, r, dtype=dtype, gen=g), "int8", None)
    S = randn(A, r, r, dtype=dtype, gen=g)
    ac = torch.randint(C, (A,), generator=g, dtype=torch.int32)
    probe_x, probe_y = randn(1, d, dtype=dtype, gen=g), randn(1, d, dtype=dtype, gen=g)
    outs = []
    with jdlora_ops.batch_invariant_mode(invariant):
        for T in (1, 300):
            x = torch.cat([randn(T - 1, d, dtype=dtype, gen=g), probe_x])
            y = torch.cat([randn(T - 1, d, dtype=dtype, gen=g), probe_y])
            mapping = torch.cat([torch.randint(A, (T - 1,), generator=g, dtype=torch.int32),
                                 torch.tensor([4], dtype=torch.int32)])
            meta = jdlora_ops.BatchMeta.allocate(T, A, C).build(mapping, ac)
            outs.append(jdlora_ops.jd_fused(x, V, S, U, meta, y)[-1])
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))


# --- bad input ----------------------------------------------------------------


def _bad_case():
    b = make_batch("uniform", 11, seed_of("qbad"))
    g = torch.Generator().manual_seed(11)
    d, r = 64, 8
    x = randn(b.T, d, gen=g)
    V = q(randn(b.C, r, d, gen=g), "int4", 32)
    return b, x, V


@pytest.mark.parametrize("change,match", [
    (lambda V: (V.data, V.scales.half()), r"V_quant_scales\[0\] must have the dtype of x \(Float; scales are in "
                                          r"the tables' float dtype\), got Half"),
    (lambda V: (V.data, V.scales[..., :1].contiguous().expand(-1, -1, 3).contiguous()),
     r"V_quant_scales\[0\] has 3 scales per row, which must divide the row length 64"),
    (lambda V: (V.data, V.scales[:, :-1]), r"V_quant_scales\[0\] must have shape \[6, 8, \*\]"),
    (lambda V: (V.data[..., :-1].contiguous(), V.scales),
     r"V_stacks\[0\] must have shape \[6, 8, 32\] .* with the last dimension halved .* got \[6, 8, 31\]"),
    (lambda V: (V.data.view(torch.int8), V.scales), r"V_stacks\[0\] must have shape \[6, 8, 64\] .* got \[6, 8, 32\]"),
    (lambda V: (V.data.float(), V.scales), r"V_stacks\[0\] must have dtype int8 .* or uint8 .* since V_quant_scales "
                                           r"is given, got Float"),
])
def test_bad_quantized_tables_are_refused_and_change_nothing(change, match):
    b, x, V = _bad_case()
    data, scales = change(V)
    h = torch.full((1, b.T, 8), 7.0)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.jdlora_ops.jd_shrink(x, [data], b.meta.sorted_indices(), b.meta.active_cluster_ids,
                                       b.meta.cluster_token_start, h, [scales])
    assert bool((h == 7.0).all())


def test_odd_groups_of_4bit_rows_and_missing_scales_are_refused():
    b, x, V = _bad_case()
    h = torch.full((1, b.T, 8), 7.0)
    seg = (b.meta.sorted_indices(), b.meta.active_cluster_ids, b.meta.cluster_token_start)
    whole_row = V.scales[..., :1].contiguous()
    torch.ops.jdlora_ops.jd_shrink(x, [V.data], *seg, h, [whole_row])  # one group of 64: fine
    h = torch.full((1, b.T, 8), 7.0)
    with pytest.raises(RuntimeError, match=r"V_quant_scales\[0\] gives groups of 1 values, which must be even for "
                                           r"the 4-bit V_stacks\[0\]"):
        torch.ops.jdlora_ops.jd_shrink(x, [V.data], *seg, h, [V.scales.repeat_interleave(32, dim=-1).contiguous()])
    with pytest.raises(RuntimeError, match=r"V_stacks\[0\] must have the dtype of x \(Float\), got Byte \(a "
                                           r"quantized stack needs its scales argument\)"):
        torch.ops.jdlora_ops.jd_shrink(x, [V.data], *seg, h)
    with pytest.raises(RuntimeError, match=r"V_quant_scales must hold one tensor per slice of V_stacks \(1\), got 2"):
        torch.ops.jdlora_ops.jd_shrink(x, [V.data], *seg, h, [V.scales, V.scales])
    assert bool((h == 7.0).all())


def test_mixing_quantized_and_float_slices_is_refused():
    b, x, V = _bad_case()
    with pytest.raises(ValueError, match=r"V_stacks: every slice must be quantized or none, got \['quantized', "
                                         r"'float'\]"):
        jdlora_ops.jd_shrink(x, [V, V.dequantize()], b.meta)


def test_odd_row_length_for_4bit_is_refused():
    """A 4-bit table needs an even row length; the op says so (the 4-bit U of rank 7 cannot exist)."""
    b = make_batch("uniform", 5, seed_of("qodd"))
    g = torch.Generator().manual_seed(12)
    gin = randn(1, b.T, 7, gen=g)
    y = randn(b.T, 16, gen=g)
    data = torch.zeros(b.C, 16, 4, dtype=torch.uint8)
    scales = torch.ones(b.C, 16, 1)
    with pytest.raises(RuntimeError, match=r"U_stacks\[0\] holds 4-bit values two per byte, so its row length 7 "
                                           r"must be even"):
        torch.ops.jdlora_ops.jd_expand(gin, [data], [0], b.meta.sorted_indices(), b.meta.active_cluster_ids,
                                       b.meta.cluster_token_start, y, [scales])


# --- opcheck and torch.compile ------------------------------------------------


def _op_args():
    b = make_batch("zipf", 19, seed_of("qopcheck"))
    g = torch.Generator().manual_seed(13)
    d, r = 64, 8
    x = randn(b.T, d, gen=g)
    V = [q(randn(b.C, r, d, gen=g), "int4", 32), q(randn(b.C, r, d, gen=g), "int8", None)]
    U = [q(randn(b.C, d, r, gen=g), "int8", None), q(randn(b.C, 10, r, gen=g), "int4", 32)]
    S = [randn(b.A, r, r, gen=g), randn(b.A, r, gen=g)]
    h = randn(2, b.T, r, gen=g)
    y = randn(b.T, d + 10, gen=g)
    m = b.meta
    seg_c = (m.sorted_indices(), m.active_cluster_ids, m.cluster_token_start)
    seg_l = (m.sorted_indices(), m.active_lora_ids, m.lora_token_start_loc)
    A = [q(randn(b.A, r, d, gen=g), "int8", None) for _ in range(2)]
    B = [q(randn(b.A, d, r, gen=g), "int4", 32), q(randn(b.A, 10, r, gen=g), "int8", None)]
    data, sc = (lambda ts: [t.data for t in ts]), (lambda ts: [t.scales for t in ts])
    scales = torch.rand(2, b.A, generator=g)
    return {
        "jd_shrink": (x, data(V), *seg_c, torch.empty_like(h), sc(V)),
        "jd_expand": (h, data(U), [0, d], *seg_c, y.clone(), sc(U)),
        "jd_fused": (x, data(V), S, data(U), [0, d], m.mapping(), *seg_c, y.clone(), sc(V), sc(U)),
        "lora_shrink": (x, data(A), scales, *seg_l, torch.empty_like(h), sc(A)),
        "lora_expand": (h, data(B), [0, d], *seg_l, y.clone(), sc(B)),
    }


@pytest.mark.parametrize("name", ["jd_shrink", "jd_expand", "jd_fused", "lora_shrink", "lora_expand"])
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.jdlora_ops, name).default, _op_args()[name])


@pytest.mark.parametrize("name", ["jd_expand", "jd_fused", "lora_expand"])
def test_opcheck_column_major_quantized_expand_stacks(name):
    args = list(_op_args()[name])
    i = 3 if name == "jd_fused" else 1
    args[i] = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in args[i]]
    torch.library.opcheck(getattr(torch.ops.jdlora_ops, name).default, tuple(args))


def test_compile_fullgraph_with_quantized_tables():
    b = make_batch("uniform", 13, seed_of("qcompile"))
    g = torch.Generator().manual_seed(14)
    d, r = 64, 8
    x, y = randn(b.T, d, gen=g), randn(b.T, d, gen=g)
    V, U = q(randn(b.C, r, d, gen=g), "int4", 32), q(randn(b.C, d, r, gen=g), "int8", None)
    S = randn(b.A, r, r, gen=g)

    def layer(x, y, Vd, Vs, Ud, Us, S, meta):
        Vq = QuantizedTable(Vd, Vs, "int4", 32, d)
        Uq = QuantizedTable(Ud, Us, "int8", r, r)
        return jdlora_ops.jd_fused(x, Vq, S, Uq, meta, y)

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    got = compiled(x, y.clone(), V.data, V.scales, U.data, U.scales, S, b.meta)
    ref = R.jd_fused(x, [exact(V)], [S], [exact(U)], [0], b.mapping, b.adapter_cluster, y)
    assert_close(got, ref, torch.float32, "compiled")
