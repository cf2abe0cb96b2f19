"""Every op against the float64 reference over popularity x T x (d, r) x dtype.

One grid for all ops; each test builds its batch metadata through the op
under test's own path (BatchMeta.build) and checks results, and for the
expand-type ops also that tokens without an adapter keep their y rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

import jdlora_ops
from jdlora_ops import reference as R

from conftest import DTYPES, POPULARITY, assert_batch_invariant, assert_close, make_batch, probe_outputs, randn

TOKENS = [1, 7, 133]
DIMS = [111, 4096]
RANKS = [8, 16, 64, 128]


def grid(fn):
    fn = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])(fn)
    fn = pytest.mark.parametrize("r", RANKS)(fn)
    fn = pytest.mark.parametrize("d", DIMS)(fn)
    fn = pytest.mark.parametrize("T", TOKENS)(fn)
    return pytest.mark.parametrize("pattern", POPULARITY)(fn)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("T", TOKENS)
def test_build_batch_meta(pattern, T):
    b = make_batch(pattern, T, seed_of("meta", pattern, T))
    ref = R.build_batch_meta(b.mapping, b.adapter_cluster, b.C)
    for name, want in ref.items():
        got = getattr(b.meta, name)
        if name == "token_indices_sorted":
            got = got[: b.T]
        assert torch.equal(got, want), name
    assert torch.equal(b.meta.mapping(), b.mapping)


@grid
def test_jd_shrink(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("shrink", pattern, T, d, r))
    g = torch.Generator().manual_seed(1)
    x = randn(b.T, d, dtype=dtype, gen=g)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g)
    h = torch.full((1, b.T, r), float("nan"))
    jdlora_ops.jd_shrink(x, V, b.meta, out=h)
    assert_close(h, R.jd_shrink(x, [V], b.mapping, b.adapter_cluster), dtype, "h")


@grid
def test_jd_core(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("core", pattern, T, d, r))
    g = torch.Generator().manual_seed(2)
    h = randn(2, b.T, r, gen=g)
    S_full = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g)
    S_diag = randn(b.A, r, dtype=dtype, gen=g)
    out = jdlora_ops.jd_core(h, [S_full, S_diag], b.meta)
    assert_close(out, R.jd_core(h, [S_full, S_diag], b.mapping), dtype, "g")


@grid
def test_jd_expand(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("expand", pattern, T, d, r))
    g = torch.Generator().manual_seed(3)
    gin = randn(1, b.T, r, gen=g)
    U = randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g)
    y = randn(b.T, d, dtype=dtype, gen=g)
    ref = R.jd_expand(gin, [U], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_expand(gin, U, b.meta, y)
    assert_close(y, ref, dtype, "y")


@grid
def test_jd_fused(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("fused", pattern, T, d, r))
    g = torch.Generator().manual_seed(4)
    x = randn(b.T, d, dtype=dtype, gen=g)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g)
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g)
    U = randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g)
    y = randn(b.T, d, dtype=dtype, gen=g)
    ref = R.jd_fused(x, [V], [S], [U], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    assert_close(y, ref, dtype, "y")


@grid
def test_lora_shrink(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("lshrink", pattern, T, d, r))
    g = torch.Generator().manual_seed(5)
    x = randn(b.T, d, dtype=dtype, gen=g)
    A = randn(b.A, r, d, dtype=dtype, scale=d**-0.5, gen=g)
    scales = torch.rand(b.A, generator=g) + 0.5
    h = jdlora_ops.lora_shrink(x, A, scales, b.meta)
    assert_close(h, R.lora_shrink(x, [A], scales, b.mapping), dtype, "h")


@grid
def test_lora_expand(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("lexpand", pattern, T, d, r))
    g = torch.Generator().manual_seed(6)
    h = randn(1, b.T, r, gen=g)
    B = randn(b.A, d, r, dtype=dtype, scale=r**-0.5, gen=g)
    y = randn(b.T, d, dtype=dtype, gen=g)
    ref = R.lora_expand(h, [B], [0], b.mapping, y)
    jdlora_ops.lora_expand(h, B, b.meta, y)
    assert_close(y, ref, dtype, "y")


# --- batch invariance ---------------------------------------------------------


@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch_invariant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cpu_kernels_are_batch_invariant(dtype, invariant):
    """The CPU kernels sum each token's products in one fixed order whatever
    the batch (work is split by token, never within a token's sums), in both
    modes: one token's output is bitwise the same alone and in batches of 37
    and 4096 (d_in = 111, so its x rows sit at every alignment)."""
    with jdlora_ops.batch_invariant_mode(invariant):
        assert_batch_invariant({T: probe_outputs(T, dtype) for T in (1, 37, 4096)})


def test_batch_invariant_switch():
    before = jdlora_ops.batch_invariant()
    with jdlora_ops.batch_invariant_mode():
        assert jdlora_ops.batch_invariant()
        with jdlora_ops.batch_invariant_mode(False):
            assert not jdlora_ops.batch_invariant()
        assert jdlora_ops.batch_invariant()
    assert jdlora_ops.batch_invariant() == before
    with pytest.raises(TypeError, match="on must be a bool, got int"):
        jdlora_ops.set_batch_invariant(1)
    assert jdlora_ops.batch_invariant() == before


@pytest.mark.parametrize("value,want", [("1", True), ("0", False), ("", False)])
def test_batch_invariant_from_environment(value, want):
    code = "import jdlora_ops; print(jdlora_ops.batch_invariant())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JDLORA_BATCH_INVARIANT": value})
    assert r.stdout.strip() == str(want)


def test_batch_invariant_under_torch_compile():
    """The mode reaches ops called from compiled code (read at launch, no new op input)."""
    def fused(x, V, S, U, meta, y):
        jdlora_ops.jd_fused(x, V, S, U, meta, y)
        return y

    b = make_batch("uniform", 9, seed_of("compile-invariant"))
    g = torch.Generator().manual_seed(7)
    x = randn(b.T, 64, dtype=torch.bfloat16, gen=g)
    V = randn(b.C, 16, 64, dtype=torch.bfloat16, gen=g)
    S = randn(b.A, 16, 16, dtype=torch.bfloat16, gen=g)
    U = randn(b.C, 64, 16, dtype=torch.bfloat16, gen=g)
    y = randn(b.T, 64, dtype=torch.bfloat16, gen=g)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with jdlora_ops.batch_invariant_mode():
        got = compiled(x, V, S, U, b.meta, y.clone())
        want = fused(x, V, S, U, b.meta, y.clone())
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
