"""Multi-slice calls (fused q/k/v with GQA widths) and non-contiguous inputs."""

from __future__ import annotations

import pytest
import torch

import jdlora_ops
from jdlora_ops import reference as R

from conftest import DTYPES, assert_close, make_batch, randn

DT_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731


def qkv(d: int):
    """Slice widths of a fused q/k/v projection with 4 query heads per kv head,
    and offsets leaving a gap column so offsets are honoured, not assumed."""
    widths = [d, max(1, d // 4), max(1, d // 4)]
    offsets = [0, d + 1, d + 1 + widths[1]]
    return widths, offsets, offsets[-1] + widths[-1]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("pattern", ["uniform", "zipf", "skewed"])
@pytest.mark.parametrize("T", [7, 133])
@pytest.mark.parametrize("diagonal", [False, True])
def test_multislice_jd(pattern, T, dtype, diagonal):
    d, r = 96, 16
    b = make_batch(pattern, T, seed=T + len(pattern))
    g = torch.Generator().manual_seed(7)
    widths, offsets, d_y = qkv(d)
    x = randn(b.T, d, dtype=dtype, gen=g)
    Vs = [randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g) for _ in widths]
    Ss = [randn(b.A, r, dtype=dtype, gen=g) if diagonal else randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g)
          for _ in widths]
    Us = [randn(b.C, w, r, dtype=dtype, scale=r**-0.5, gen=g) for w in widths]
    y0 = randn(b.T, d_y, dtype=dtype, gen=g)
    ref = R.jd_fused(x, Vs, Ss, Us, offsets, b.mapping, b.adapter_cluster, y0)

    y = y0.clone()
    jdlora_ops.jd_fused(x, Vs, Ss, Us, b.meta, y, offsets)
    assert_close(y, ref, dtype, "fused y")

    h = jdlora_ops.jd_shrink(x, Vs, b.meta)
    assert_close(h, R.jd_shrink(x, Vs, b.mapping, b.adapter_cluster), dtype, "h")
    gg = jdlora_ops.jd_core(h, Ss, b.meta)
    y = y0.clone()
    jdlora_ops.jd_expand(gg, Us, b.meta, y, offsets)
    assert_close(y, ref, dtype, "staged y")
    # The gap column between slices is never written.
    assert torch.equal(y[:, d], y0[:, d])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("pattern", ["distinct", "zipf"])
def test_multislice_lora(pattern, dtype):
    d, r, T = 64, 8, 33
    b = make_batch(pattern, T, seed=11)
    g = torch.Generator().manual_seed(8)
    widths, offsets, d_y = qkv(d)
    x = randn(b.T, d, dtype=dtype, gen=g)
    As = [randn(b.A, r, d, dtype=dtype, scale=d**-0.5, gen=g) for _ in widths]
    Bs = [randn(b.A, w, r, dtype=dtype, scale=r**-0.5, gen=g) for w in widths]
    scales = torch.rand(len(widths), b.A, generator=g) + 0.5
    h = jdlora_ops.lora_shrink(x, As, scales, b.meta)
    assert_close(h, R.lora_shrink(x, As, scales, b.mapping), dtype, "h")
    y0 = randn(b.T, d_y, dtype=dtype, gen=g)
    y = jdlora_ops.lora_expand(h, Bs, b.meta, y0.clone(), offsets)
    assert_close(y, R.lora_expand(h, Bs, offsets, b.mapping, y0), dtype, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_non_contiguous(dtype):
    """Column slices for x and y, every-other-cluster stacks, strided h/g and
    a transposed (last-stride != 1) read-only input that the wrapper copies."""
    d, r, T = 80, 16, 45
    b = make_batch("uniform", T, seed=5)
    g = torch.Generator().manual_seed(9)
    x_big = randn(b.T, d + 13, dtype=dtype, gen=g)
    x = x_big[:, 5 : 5 + d]
    V = randn(2 * b.C, r + 3, d, dtype=dtype, scale=d**-0.5, gen=g)[::2, :r]
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g).transpose(1, 2)  # last stride != 1
    U = randn(b.C, d, 2 * r, dtype=dtype, scale=r**-0.5, gen=g)[:, :, ::2]  # last stride 2
    y_big = randn(b.T, d + 7, dtype=dtype, gen=g)
    y_big0 = y_big.clone()
    y = y_big[:, 7:]
    assert not x.is_contiguous() and not V.is_contiguous() and not y.is_contiguous()

    ref = R.jd_fused(x, [V], [S], [U], [0], b.mapping, b.adapter_cluster, y_big0[:, 7:])
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    assert_close(y, ref, dtype, "fused y")
    assert torch.equal(y_big[:, :7], y_big0[:, :7])

    h_big = torch.zeros(b.T, 1, 2 * r)
    h = h_big[:, :, :r].permute(1, 0, 2)  # [1, T, r] with stride_t = 2r
    jdlora_ops.jd_shrink(x, V, b.meta, out=h)
    assert_close(h, R.jd_shrink(x, [V], b.mapping, b.adapter_cluster), dtype, "h")
    assert torch.count_nonzero(h_big[:, :, r:]) == 0


def test_outputs_with_unit_stride_violation_are_refused():
    b = make_batch("uniform", 9, seed=1)
    x = torch.randn(b.T, 32)
    V = torch.randn(b.C, 8, 32)
    h = torch.zeros(1, 8, b.T).transpose(1, 2)
    with pytest.raises(RuntimeError, match="h must have stride 1 in its last dimension"):
        jdlora_ops.jd_shrink(x, V, b.meta, out=h)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("pattern", ["identical", "distinct", "uniform", "zipf", "skewed"])
@pytest.mark.parametrize("T", [1, 6, 300])
def test_column_major_expand_stacks_on_cpu(pattern, T, dtype):
    """U and B given as transposed views of [C, r, d_out] tensors are read in place on the CPU, with bitwise the
    results of the row-major copies, and match the float64 reference (widths beyond one column chunk)."""
    d, r = 40, 16
    widths, offsets, d_y = [300, 75, 1], [0, 301, 376], 377
    b = make_batch(pattern, T, seed=T + 3)
    g = torch.Generator().manual_seed(12)
    x = randn(b.T, d, dtype=dtype, gen=g)
    Vs = [randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g) for _ in widths]
    Ss = [randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g) for _ in widths]
    Ut = [randn(b.C, r, w, dtype=dtype, scale=r**-0.5, gen=g) for w in widths]
    Ucm = [u.transpose(1, 2) for u in Ut]
    Urm = [u.contiguous() for u in Ucm]
    assert Ucm[0].stride(1) == 1 and not Ucm[0].is_contiguous()
    y0 = randn(b.T, d_y, dtype=dtype, gen=g)
    ref = R.jd_fused(x, Vs, Ss, Urm, offsets, b.mapping, b.adapter_cluster, y0)
    y_cm = jdlora_ops.jd_fused(x, Vs, Ss, Ucm, b.meta, y0.clone(), offsets)
    y_rm = jdlora_ops.jd_fused(x, Vs, Ss, Urm, b.meta, y0.clone(), offsets)
    assert torch.equal(y_cm, y_rm)
    assert_close(y_cm, ref, dtype, "fused y, column-major U")
    h = jdlora_ops.jd_core(jdlora_ops.jd_shrink(x, Vs, b.meta), Ss, b.meta)
    y_cm = jdlora_ops.jd_expand(h, Ucm, b.meta, y0.clone(), offsets)
    assert torch.equal(y_cm, jdlora_ops.jd_expand(h, Urm, b.meta, y0.clone(), offsets))
    # the raw op too (no wrapper in between), and the baseline expand with B
    y_raw = y0.clone()
    torch.ops.jdlora_ops.jd_expand(h, Ucm, offsets, b.meta.sorted_indices(), b.meta.active_cluster_ids,
                                   b.meta.cluster_token_start, y_raw)
    assert torch.equal(y_raw, y_cm)
    Bt = [randn(b.A, r, w, dtype=dtype, scale=r**-0.5, gen=g) for w in widths]
    y_cm = jdlora_ops.lora_expand(h, [t.transpose(1, 2) for t in Bt], b.meta, y0.clone(), offsets)
    y_rm = jdlora_ops.lora_expand(h, [t.transpose(1, 2).contiguous() for t in Bt], b.meta, y0.clone(), offsets)
    assert torch.equal(y_cm, y_rm)
    assert_close(y_cm, R.lora_expand(h, [t.transpose(1, 2) for t in Bt], offsets, b.mapping, y0), dtype,
                 "lora y, column-major B")


def test_column_major_is_only_for_expand_stacks():
    """V (read along d_in) and S keep the unit-last-stride rule: a column-major V is copied by the wrapper and
    refused by the raw op, naming it."""
    b = make_batch("uniform", 9, seed=1)
    x = torch.randn(b.T, 32)
    V = torch.randn(b.C, 32, 8).transpose(1, 2)
    h = torch.zeros(1, b.T, 8)
    with pytest.raises(RuntimeError, match=r"V_stacks\[0\] must have stride 1 in its last dimension"):
        torch.ops.jdlora_ops.jd_shrink(x, [V], b.meta.sorted_indices(), b.meta.active_cluster_ids,
                                       b.meta.cluster_token_start, h)
    jdlora_ops.jd_shrink(x, V, b.meta, out=h)  # the wrapper makes it contiguous
