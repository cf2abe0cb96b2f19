"""The quantized table formats (jdlora_ops.quant): packing, scales, the dequantised contract, bad input."""

from __future__ import annotations

import pytest
import torch

from jdlora_ops import NonFiniteError
from jdlora_ops.quant import (GROUP_SIZES, check_quantized, effective_group_size, pack_int4, quantize,
                              unpack_int4)

F64 = torch.float64
# Shapes as the tables have them, reduction dimension last: U [K, d_out, r], V^T [K, r, d_in], odd sizes.
SHAPES = [(3, 40, 16), (2, 16, 256), (1, 7, 64), (5, 128), (2, 3, 384)]


def _table(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # Rows of very different scales, as real factors have.
    return torch.randn(*shape, generator=g, dtype=F64) * torch.logspace(-3, 1, shape[-2] if len(shape) > 1 else 1,
                                                                        dtype=F64)[:, None]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt,group", [("int8", None)] + [("int4", g) for g in GROUP_SIZES])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantised_values_lie_within_half_a_step(shape, fmt, group, scale_dtype):
    w = _table(shape, 1).to(torch.float32)
    qt = quantize(w, fmt, group, scale_dtype=scale_dtype)
    L = shape[-1]
    g = effective_group_size(fmt, L, group)
    qmax = 127 if fmt == "int8" else 7
    assert qt.shape == tuple(shape) and qt.scales.dtype == scale_dtype and qt.group_size == g
    assert qt.scales.shape == (*shape[:-1], L // g)
    q = qt.values()
    assert int(q.abs().max()) <= qmax
    # The contract: w_hat = q * s per group, exactly, on the stored tensors.
    ref = q.double() * qt.scales.double().repeat_interleave(g, dim=-1)
    assert torch.equal(qt.dequantize(F64), ref)
    s = qt.scales.double().repeat_interleave(g, dim=-1)
    # Half a step, plus what rounding the scale to its dtype can push past the clamp.
    eps = torch.finfo(scale_dtype).eps
    bound = 0.5 * s + qmax * s * eps + 1e-7 * w.double().abs()
    assert bool(((w.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("fmt,group,qmax", [("int4", 64, 7), ("int8", None, 127)])
def test_values_on_the_grid_come_back_exactly(fmt, group, qmax):
    q = torch.randint(-qmax, qmax + 1, (4, 128), generator=torch.Generator().manual_seed(0))
    q[:, 0] = qmax  # every group's maximum on the grid, so its scale is exactly the step
    q[:, 64] = -qmax
    w = q.double() * 2.0 ** -5
    assert torch.equal(quantize(w.float(), fmt, group).dequantize(F64), w)


def test_int4_packing_layout():
    q = torch.tensor([[1, -1, -8, 7, 0, 3]], dtype=torch.int8)
    packed = pack_int4(q)
    # byte j: value 2j + 8 in the low nibble, value 2j + 1 + 8 in the high nibble
    assert packed.tolist() == [[9 | (7 << 4), 0 | (15 << 4), 8 | (11 << 4)]]
    assert torch.equal(unpack_int4(packed), q)
    qt = quantize(torch.randn(3, 64), "int4", 32)
    assert qt.data.dtype == torch.uint8 and qt.data.shape == (3, 32) and qt.nbytes == 3 * 32 + 3 * 2 * 4


def test_a_group_of_zeros_has_scale_zero():
    w = torch.randn(2, 128)
    w[0, :64] = 0
    qt = quantize(w, "int4", 64)
    assert float(qt.scales[0, 0]) == 0 and bool((qt.values()[0, :64] == 0).all())
    assert bool((qt.dequantize()[0, :64] == 0).all())


def test_group_size_is_capped_at_the_row():
    assert effective_group_size("int4", 16, 32) == 16  # U at r = 16: one group per row
    assert effective_group_size("int4", 4096, 128) == 128
    assert effective_group_size("int8", 4096) == 4096


@pytest.mark.parametrize("fmt,length,group,match", [
    ("int3", 64, None, "must be one of int8, int4, got 'int3'"),
    ("int4", 64, 48, "must be one of 32, 64, 128, got 48"),
    ("int4", 96, 64, "group_size \\(--group-size\\) 64 does not divide the reduction dimension 96"),
    ("int4", 33, 32, "must be even, got 33"),
    ("int8", 64, 32, "applies to int4 only"),
])
def test_bad_formats_and_group_sizes(fmt, length, group, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(2, length), fmt, group)


def test_quantize_refuses_non_finite_tables():
    w = torch.randn(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="quantize: w holds NaN"):
        quantize(w, "int8")


def _good():
    return quantize(torch.randn(3, 5, 128), "int4", 32)


@pytest.mark.parametrize("change,error,match", [
    (lambda qt: (qt.data.to(torch.int8), qt.scales), ValueError, "V: int4 values must be uint8, got int8"),
    (lambda qt: (qt.data[..., :-1], qt.scales), ValueError, "must have shape \\[3, 5, 64\\] \\(two values per "
                                                            "byte\\), got \\[3, 5, 63\\]"),
    (lambda qt: (qt.data, qt.scales[..., :-1]), ValueError, "V_scales: one scale per group of 32 must have shape "
                                                            "\\[3, 5, 4\\], got \\[3, 5, 3\\]"),
    (lambda qt: (qt.data, qt.scales.to(torch.int32)), ValueError, "V_scales: must be float32, float16 or bfloat16, "
                                                                  "got int32"),
    (lambda qt: (qt.data, qt.scales.index_fill(-1, torch.tensor([2]), float("inf"))), NonFiniteError,
     "V_scales: holds NaN or infinite"),
    (lambda qt: (qt.data, -qt.scales), ValueError, "V_scales: scales must be >= 0"),
])
def test_check_quantized_names_the_argument(change, error, match):
    data, scales = change(_good())
    with pytest.raises(error, match=match):
        check_quantized("V", data, scales, "int4", 128, 32, leading=(3, 5))


def test_check_quantized_accepts_what_quantize_wrote():
    qt = _good()
    back = check_quantized("V", qt.data, qt.scales, "int4", 128, 32, leading=(3, 5))
    assert torch.equal(back.dequantize(F64), qt.dequantize(F64))
    with pytest.raises(ValueError, match="must have shape \\[2, 5, 64\\]"):
        check_quantized("V", qt.data, qt.scales, "int4", 128, 32, leading=(2, 5))
