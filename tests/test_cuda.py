"""CUDA kernels against the float64 reference and against the CPU kernels.

Skipped without a CUDA device. Covers every op over popularity x T x d x r x
dtype, multi-slice calls (3 slices, widths d, d/4, d/4 like q/k/v with GQA)
with strided and misaligned activations, corrupt metadata (skipped, never
read out of bounds), large adapter/cluster tables, CUDA graphs that capture
every op and are replayed on new inputs written into the same buffers,
torch.compile(mode="reduce-overhead", fullgraph=True), and batch-invariant
mode (one token's outputs bitwise equal across batch sizes, eager and in a
CUDA graph).

Dispatch (jdlora/cuda/tc_launchers.h): fp16/bf16 calls with r % 8 == 0,
r <= 128 and 16-byte-aligned rows take the tensor-core kernels, with decode
tiles below 1024 tokens and prefill tiles from 1024 on; fp32, odd widths and
misaligned views take the simple kernels. The "fast path" tests pick sizes on
both sides of each rule; one test reruns a set of calls in a subprocess with
JDLORA_CUDA_SIMPLE=1 and compares the two implementations.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import jdlora_ops
from jdlora_ops import reference as R

from conftest import (DTYPES, POPULARITY, assert_batch_invariant, assert_close, make_batch, probe_batch, probe_bits,
                      probe_outputs, randn, run_probe, token_mapping)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
TOKENS = [1, 7, 133]
DIMS = [111, 4096]
RANKS = [8, 16, 64, 128]
META_FIELDS = [
    "token_indices_sorted", "active_cluster_ids", "num_tokens_per_cluster", "cluster_token_start",
    "active_lora_ids", "num_tokens_per_lora", "lora_token_start_loc", "no_lora_flag",
]


def dtype_id(d: torch.dtype) -> str:
    return str(d).split(".")[-1]


def grid(fn, dims=True):
    fn = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)(fn)
    fn = pytest.mark.parametrize("r", RANKS)(fn)
    if dims:
        fn = pytest.mark.parametrize("d", DIMS)(fn)
    fn = pytest.mark.parametrize("T", TOKENS)(fn)
    return pytest.mark.parametrize("pattern", POPULARITY)(fn)


def grid_no_d(fn):
    return grid(fn, dims=False)


def seed_of(*parts) -> int:
    # crc32, not hash(): str hashes change from one interpreter run to the next.
    return zlib.crc32(repr(parts).encode()) % (2**31)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_meta(meta: jdlora_ops.BatchMeta, T: int, want: dict[str, torch.Tensor], what: str = "") -> None:
    for name in META_FIELDS:
        got, exp = getattr(meta, name).cpu(), want[name].cpu()
        if name == "token_indices_sorted":
            got, exp = got[:T], exp[:T]
        assert torch.equal(got, exp), f"{what} {name}: {got} != {exp}"


def widths_of(d: int) -> list[int]:
    """Output widths of 3 slices, like q/k/v of a GQA layer scaled to d."""
    return [d, max(1, d // 4), max(1, d // 4)]


# --- build_batch_meta -------------------------------------------------------


@pytest.mark.parametrize("pattern", POPULARITY)
@pytest.mark.parametrize("T", TOKENS + [1000])
def test_build_batch_meta(pattern, T):
    seed = seed_of("meta", pattern, T)
    b = make_batch(pattern, T, seed, device=DEV)
    assert_meta(b.meta, b.T, R.build_batch_meta(b.mapping, b.adapter_cluster, b.C), "reference")
    cpu = make_batch(pattern, T, seed, device="cpu")
    assert_meta(b.meta, b.T, {name: getattr(cpu.meta, name) for name in META_FIELDS}, "cpu op")
    assert torch.equal(b.meta.mapping().cpu(), b.mapping.cpu())


# Serving-size tables: thousands of adapter slots, hundreds of clusters, a
# prefill-size batch; 20000 slots need more than the default 48 KiB of shared
# memory; 65536 tokens are 64 rounds of the block-wide placement; many
# clusters over fewer adapters; 1 slot / 1 cluster is the smallest table.
@pytest.mark.parametrize("T,A,C", [(8192, 4000, 300), (5000, 20000, 64), (65536, 19936, 64), (4096, 3000, 17000),
                                   (3, 1, 1)])
@pytest.mark.parametrize("pattern", ["identical", "uniform", "zipf", "skewed", "all_none"])
def test_build_batch_meta_large(T, A, C, pattern):
    b = make_batch(pattern, T, seed_of("meta-large", pattern, T, A, C), device=DEV, A=A, C=C)
    assert_meta(b.meta, b.T, R.build_batch_meta(b.mapping, b.adapter_cluster, C))


def test_build_batch_meta_reuses_buffers():
    """A second, smaller batch overwrites every table entry of the first."""
    A, C = 50, 7
    meta = jdlora_ops.BatchMeta.allocate(200, A, C, DEV)
    for i, (pattern, T) in enumerate([("uniform", 200), ("identical", 9), ("all_none", 4), ("empty", 0)]):
        g = gen(seed_of("reuse", i))
        mapping = token_mapping(pattern, T, A, g)
        cl = torch.randint(C, (A,), generator=g, dtype=torch.int32)
        meta.build(mapping.to(DEV), cl.to(DEV))
        assert_meta(meta, mapping.numel(), R.build_batch_meta(mapping, cl, C), pattern)


def test_build_batch_meta_out_of_range_values():
    """Slots outside [-1, A) and slots whose cluster is outside [0, C) count as no adapter."""
    T, A, C = 40, 10, 4
    g = gen(7)
    mapping = torch.randint(-3, A + 3, (T,), generator=g, dtype=torch.int32)
    cl = torch.randint(C, (A,), generator=g, dtype=torch.int32)
    cl[2], cl[5] = C, -2
    clean = mapping.clone()
    bad = (mapping < 0) | (mapping >= A)
    clean[bad] = -1
    clean[(clean == 2) | (clean == 5)] = -1
    meta = jdlora_ops.BatchMeta.allocate(T, A, C, DEV).build(mapping.to(DEV), cl.to(DEV))
    assert_meta(meta, T, R.build_batch_meta(clean, cl, C))


# --- every op over the grid, one slice ----------------------------------------


@grid
def test_jd_shrink(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("shrink", pattern, T, d, r), device=DEV)
    g = gen(1)
    x = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    h = torch.full((1, b.T, r), float("nan"), device=DEV)  # every row must be written
    jdlora_ops.jd_shrink(x, V, b.meta, out=h)
    assert_close(h, R.jd_shrink(x, [V], b.mapping, b.adapter_cluster), dtype, "h")


@grid_no_d
def test_jd_core(pattern, T, r, dtype):
    b = make_batch(pattern, T, seed_of("core", pattern, T, r), device=DEV)
    g = gen(2)
    h = randn(2, b.T, r, gen=g, device=DEV)
    S_full = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    S_diag = randn(b.A, r, dtype=dtype, gen=g, device=DEV)
    out = torch.full_like(h, float("nan"))
    jdlora_ops.jd_core(h, [S_full, S_diag], b.meta, out=out)
    assert_close(out, R.jd_core(h, [S_full, S_diag], b.mapping), dtype, "g")


@grid
def test_jd_expand(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("expand", pattern, T, d, r), device=DEV)
    g = gen(3)
    gin = randn(1, b.T, r, gen=g, device=DEV)
    U = randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    ref = R.jd_expand(gin, [U], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_expand(gin, U, b.meta, y)
    assert_close(y, ref, dtype, "y")


def test_column_major_expand_stacks_are_copied_by_the_wrapper_and_refused_by_the_raw_op():
    """The CUDA kernels read U and B row by row; a column-major stack (taken in place on the CPU) is made
    contiguous by the Python wrapper on CUDA and refused, naming it, by the raw op."""
    b = make_batch("uniform", 37, seed=4, device=DEV)
    g = gen(9)
    gin = randn(1, b.T, 16, gen=g, device=DEV)
    U = randn(b.C, 16, 64, scale=0.25, gen=g, device=DEV).transpose(1, 2)
    y0 = randn(b.T, 64, gen=g, device=DEV)
    ref = R.jd_expand(gin, [U], [0], b.mapping, b.adapter_cluster, y0)
    y = jdlora_ops.jd_expand(gin, U, b.meta, y0.clone())
    assert_close(y, ref, torch.float32, "y")
    y = y0.clone()
    with pytest.raises(RuntimeError, match=r"U_stacks\[0\] must have stride 1 in its last dimension on cuda:0 "
                                           r"\(a column-major stack, strides \[1024, 1, 16\], is taken on the CPU only\)"):
        torch.ops.jdlora_ops.jd_expand(gin, [U], [0], b.meta.sorted_indices(), b.meta.active_cluster_ids,
                                       b.meta.cluster_token_start, y)
    assert torch.equal(y, y0)


@grid
def test_jd_fused(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("fused", pattern, T, d, r), device=DEV)
    g = gen(4)
    x = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    U = randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    ref = R.jd_fused(x, [V], [S], [U], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    assert_close(y, ref, dtype, "y")


@grid
def test_lora_shrink(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("lshrink", pattern, T, d, r), device=DEV)
    g = gen(5)
    x = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    A = randn(b.A, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    scales = (torch.rand(b.A, generator=g) + 0.5).to(DEV)
    h = torch.full((1, b.T, r), float("nan"), device=DEV)
    jdlora_ops.lora_shrink(x, A, scales, b.meta, out=h)
    assert_close(h, R.lora_shrink(x, [A], scales, b.mapping), dtype, "h")


@grid
def test_lora_expand(pattern, T, d, r, dtype):
    b = make_batch(pattern, T, seed_of("lexpand", pattern, T, d, r), device=DEV)
    g = gen(6)
    h = randn(1, b.T, r, gen=g, device=DEV)
    B = randn(b.A, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    ref = R.lora_expand(h, [B], [0], b.mapping, y)
    jdlora_ops.lora_expand(h, B, b.meta, y)
    assert_close(y, ref, dtype, "y")


# --- multi-slice, strided and misaligned activations -------------------------


class SliceCase:
    """Three slices of one layer: shared d_in, widths d, d/4, d/4, rank r.

    ``layout`` is how x and y sit in memory: "contiguous"; "strided" (column
    slices of wider tensors, aligned, so rows have a stride > width); or
    "misaligned" (column slices starting one element in, so 16-byte vector
    loads cannot be used and the one-element path runs). y's slices sit at
    offsets with gaps between them.
    """

    def __init__(self, pattern, T, d, r, dtype, layout, seed):
        self.b = make_batch(pattern, T, seed, device=DEV)
        self.T, self.d, self.r, self.dtype = self.b.T, d, r, dtype
        g = gen(seed)
        A, C, T = self.b.A, self.b.C, self.b.T
        self.widths = widths_of(d)
        self.offsets, col = [], 3
        for w in self.widths:
            self.offsets.append(col)
            col += w + 5
        ycols = col
        self.x = self._activation(randn(T, d, dtype=dtype, gen=g), layout, g)
        self.y = self._activation(randn(T, ycols, dtype=dtype, gen=g), layout, g)
        self.V = [randn(C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV) for _ in self.widths]
        self.S = [randn(A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV),
                  randn(A, r, dtype=dtype, gen=g, device=DEV),
                  randn(A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)]
        self.U = [randn(C, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV) for w in self.widths]
        self.Af = [randn(A, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV) for _ in self.widths]
        self.Bf = [randn(A, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV) for w in self.widths]
        self.scales = (torch.rand(len(self.widths), A, generator=g) + 0.5).to(DEV)
        self.h = randn(len(self.widths), T, r, gen=g, device=DEV)

    @staticmethod
    def _activation(values: torch.Tensor, layout: str, g: torch.Generator) -> torch.Tensor:
        T, n = values.shape
        if layout == "contiguous":
            return values.to(DEV)
        lead = 8 if layout == "strided" else 1
        big = randn(T, n + 24, dtype=values.dtype, gen=g, device=DEV)
        view = big[:, lead : lead + n]
        view.copy_(values.to(DEV))
        assert view.stride(0) == n + 24 and view.stride(1) == 1
        return view


LAYOUTS = ["contiguous", "strided", "misaligned"]


def slice_grid(fn):
    fn = pytest.mark.parametrize("layout", LAYOUTS)(fn)
    fn = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)(fn)
    fn = pytest.mark.parametrize("d,r", [(111, 16), (4096, 16), (256, 128)])(fn)
    fn = pytest.mark.parametrize("T", [7, 133])(fn)
    return pytest.mark.parametrize("pattern", ["distinct", "zipf", "skewed", "all_none"])(fn)


@slice_grid
def test_multi_slice_shrink_core(pattern, T, d, r, dtype, layout):
    c = SliceCase(pattern, T, d, r, dtype, layout, seed_of("ms-sc", pattern, T, d, r, layout))
    b = c.b
    h = torch.full((3, c.T, r), float("nan"), device=DEV)
    jdlora_ops.jd_shrink(c.x, c.V, b.meta, out=h)
    assert_close(h, R.jd_shrink(c.x, c.V, b.mapping, b.adapter_cluster), dtype, "jd_shrink h")
    jdlora_ops.lora_shrink(c.x, c.Af, c.scales, b.meta, out=h)
    assert_close(h, R.lora_shrink(c.x, c.Af, c.scales, b.mapping), dtype, "lora_shrink h")
    # Core in place (out=h), mixed full and diagonal slices.
    ref = R.jd_core(c.h, c.S, b.mapping)
    jdlora_ops.jd_core(c.h, c.S, b.meta, out=c.h)
    assert_close(c.h, ref, dtype, "jd_core g (in place)")


@slice_grid
def test_multi_slice_expand_fused(pattern, T, d, r, dtype, layout):
    c = SliceCase(pattern, T, d, r, dtype, layout, seed_of("ms-ef", pattern, T, d, r, layout))
    b = c.b
    y0 = c.y.clone()
    ref = R.jd_expand(c.h, c.U, c.offsets, b.mapping, b.adapter_cluster, c.y)
    jdlora_ops.jd_expand(c.h, c.U, b.meta, c.y, c.offsets)
    assert_close(c.y, ref, dtype, "jd_expand y")

    c.y.copy_(y0)
    ref = R.lora_expand(c.h, c.Bf, c.offsets, b.mapping, c.y)
    jdlora_ops.lora_expand(c.h, c.Bf, b.meta, c.y, c.offsets)
    assert_close(c.y, ref, dtype, "lora_expand y")

    c.y.copy_(y0)
    ref = R.jd_fused(c.x, c.V, c.S, c.U, c.offsets, b.mapping, b.adapter_cluster, c.y)
    jdlora_ops.jd_fused(c.x, c.V, c.S, c.U, b.meta, c.y, c.offsets)
    assert_close(c.y, ref, dtype, "jd_fused y")
    # Columns outside the slices (the gaps) are untouched.
    cols = torch.ones(c.y.shape[1], dtype=torch.bool)
    for off, w in zip(c.offsets, c.widths):
        cols[off : off + w] = False
    assert torch.equal(c.y[:, cols.to(DEV)], y0[:, cols.to(DEV)])


# --- CUDA against the CPU kernels -------------------------------------------


def run_all_ops(device: str, pattern: str, dtype: torch.dtype, T: int = 133) -> dict[str, torch.Tensor]:
    """Every op on `device` with the same inputs (made on the CPU from one seed)."""
    d, r = 4096, 16
    b = make_batch(pattern, T, seed_of("vs-cpu", pattern, T), device=device)
    g = gen(seed_of("vs-cpu-data", pattern, T))
    widths = [256, 64, 64]
    x = randn(b.T, d, dtype=dtype, gen=g, device=device)
    y = randn(b.T, sum(widths), dtype=dtype, gen=g, device=device)
    V = [randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=device) for _ in widths]
    S = [randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=device),
         randn(b.A, r, dtype=dtype, gen=g, device=device),
         randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=device)]
    U = [randn(b.C, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=device) for w in widths]
    Af = [randn(b.A, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=device) for _ in widths]
    Bf = [randn(b.A, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=device) for w in widths]
    scales = (torch.rand(3, b.A, generator=g) + 0.5).to(device)
    out = {}
    out["jd_shrink"] = jdlora_ops.jd_shrink(x, V, b.meta)
    out["jd_core"] = jdlora_ops.jd_core(out["jd_shrink"], S, b.meta)
    out["jd_expand"] = jdlora_ops.jd_expand(out["jd_core"], U, b.meta, y.clone())
    out["jd_fused"] = jdlora_ops.jd_fused(x, V, S, U, b.meta, y.clone())
    out["lora_shrink"] = jdlora_ops.lora_shrink(x, Af, scales, b.meta)
    out["lora_expand"] = jdlora_ops.lora_expand(out["lora_shrink"], Bf, b.meta, y.clone())
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("pattern", POPULARITY)
def test_matches_cpu_ops(pattern, dtype):
    cuda, cpu = run_all_ops(DEV, pattern, dtype), run_all_ops("cpu", pattern, dtype)
    for name in cuda:
        assert_close(cuda[name], cpu[name], dtype, name)


# --- corrupt metadata is skipped ----------------------------------------------


# fp32: simple kernels; bf16: tensor-core kernels with decode and prefill tiles.
CORRUPT_CASES = [(torch.float32, 64), (torch.bfloat16, 64), (torch.bfloat16, 1100)]


@pytest.mark.parametrize("dtype,T", CORRUPT_CASES, ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else str(v))
def test_corrupt_segment_tables_are_skipped(dtype, T):
    """Ids outside [0, capacity) and token indices outside [0, T) are skipped on CUDA."""
    d, r = 256, 16
    b = make_batch("uniform", T, seed_of("corrupt"), device=DEV)
    g = gen(11)
    x = randn(T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    U = randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    ref_h = R.jd_shrink(x, [V], b.mapping, b.adapter_cluster)
    m = b.meta
    ids = m.active_cluster_ids.clone()
    start = m.cluster_token_start.cpu()
    sorted_idx = m.sorted_indices().clone()
    # Segment 0's id out of range: its tokens get zero h rows and no y update.
    ids[0] = b.C + 7
    seg0 = sorted_idx[int(start[0]) : int(start[1])].cpu().long()
    h = torch.full((1, T, r), float("nan"), device=DEV)
    torch.ops.jdlora_ops.jd_shrink(x, [V], sorted_idx, ids, m.cluster_token_start, h)
    want = ref_h.clone()
    want[0, seg0] = 0
    assert_close(h, want, dtype, "h with a bad cluster id")

    y = randn(T, d, dtype=dtype, gen=g, device=DEV)
    gin = randn(1, T, r, gen=g, device=DEV)
    want_y = R.jd_expand(gin, [U], [0], b.mapping, b.adapter_cluster, y)
    want_y[seg0] = y.cpu().double()[seg0]
    torch.ops.jdlora_ops.jd_expand(gin, [U], [0], sorted_idx, ids, m.cluster_token_start, y)
    assert_close(y, want_y, dtype, "y with a bad cluster id")

    # Token indices out of range are skipped; nothing faults.
    bad_sorted = sorted_idx.clone()
    bad_sorted[::5] = T + 1000
    bad_sorted[1::5] = -3
    torch.ops.jdlora_ops.jd_shrink(x, [V], bad_sorted, m.active_cluster_ids, m.cluster_token_start, h)
    torch.ops.jdlora_ops.jd_expand(gin, [U], [0], bad_sorted, m.active_cluster_ids, m.cluster_token_start, y)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype,T", CORRUPT_CASES, ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else str(v))
def test_out_of_range_slots_are_skipped(dtype, T):
    """Slots >= the number of S rows (or < -1) give zero g rows and add nothing in jd_fused."""
    d, r = 128, 16
    b = make_batch("uniform", T, seed_of("slots"), device=DEV)
    g = gen(12)
    h = randn(1, T, r, gen=g, device=DEV)
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    bad = b.mapping.clone()
    bad[::3] = b.A + 4
    bad[1::7] = -9
    clean = torch.where((bad < 0) | (bad >= b.A), torch.full_like(bad, -1), bad)
    out = torch.full_like(h, float("nan"))
    torch.ops.jdlora_ops.jd_core(h, [S], bad, out)
    assert_close(out, R.jd_core(h, [S], clean), dtype, "g")

    # jd_fused with the batch's (valid) segments but a corrupt per-token mapping.
    x = randn(T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    U = randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y = randn(T, d, dtype=dtype, gen=g, device=DEV)
    # Tokens whose slot is corrupt keep y; the others get the full update.
    ref = R.jd_fused(x, [V], [S], [U], [0], clean, b.adapter_cluster, y)
    m = b.meta
    torch.ops.jdlora_ops.jd_fused(x, [V], [S], [U], [0], bad, m.sorted_indices(), m.active_cluster_ids,
                                  m.cluster_token_start, y)
    assert_close(y, ref, dtype, "y")


# --- CUDA graph -----------------------------------------------------------------


def test_cuda_graph_replay():
    """Capture build_batch_meta + jd_fused + lora_shrink + lora_expand once, then
    write new mappings and activations into the captured buffers and replay:
    the results must follow the new inputs (grids never depend on metadata)."""
    T, A, C, d, r, dtype = 48, 64, 5, 256, 16, torch.bfloat16
    widths = [256, 64, 64]
    offsets = [0, 256, 320]
    g = gen(21)
    V = [randn(C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV) for _ in widths]
    S = [randn(A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV),
         randn(A, r, dtype=dtype, gen=g, device=DEV),
         randn(A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)]
    U = [randn(C, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV) for w in widths]
    Af = [randn(A, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV) for _ in widths]
    Bf = [randn(A, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV) for w in widths]
    scales = (torch.rand(3, A, generator=g) + 0.5).to(DEV)
    adapter_cluster = torch.randint(C, (A,), generator=g, dtype=torch.int32).to(DEV)

    # Static buffers: the graph reads and writes only these.
    meta = jdlora_ops.BatchMeta.allocate(T, A, C, DEV)
    mapping = meta.token_lora_mapping[:T]  # build() reads it in place, no copy
    x = torch.empty(T, d, dtype=dtype, device=DEV)
    y_jd = torch.empty(T, sum(widths), dtype=dtype, device=DEV)
    y_lora = torch.empty_like(y_jd)
    h = torch.empty(3, T, r, dtype=torch.float32, device=DEV)

    def write_inputs(pattern: str, seed: int):
        gg = gen(seed)
        m = token_mapping(pattern, T, A, gg)
        xv = randn(T, d, dtype=dtype, gen=gg)
        y0 = randn(T, sum(widths), dtype=dtype, gen=gg)
        mapping.copy_(m.to(DEV))
        x.copy_(xv.to(DEV))
        y_jd.copy_(y0.to(DEV))
        y_lora.copy_(y0.to(DEV))
        return m, xv, y0

    def step():
        meta.build(mapping, adapter_cluster)
        jdlora_ops.jd_fused(x, V, S, U, meta, y_jd, offsets)
        jdlora_ops.lora_shrink(x, Af, scales, meta, out=h)
        jdlora_ops.lora_expand(h, Bf, meta, y_lora, offsets)

    write_inputs("identical", 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for pattern, seed in [("zipf", 2), ("distinct", 3), ("all_none", 4), ("skewed", 5)]:
        m, xv, y0 = write_inputs(pattern, seed)
        graph.replay()
        torch.cuda.synchronize()
        assert_meta(meta, T, R.build_batch_meta(m, adapter_cluster, C), pattern)
        ref = R.jd_fused(xv, V, S, U, offsets, m, adapter_cluster, y0)
        assert_close(y_jd, ref, dtype, f"{pattern}: jd_fused y")
        ref_h = R.lora_shrink(xv, Af, scales, m)
        assert_close(h, ref_h, dtype, f"{pattern}: lora_shrink h")
        assert_close(y_lora, R.lora_expand(ref_h, Bf, offsets, m, y0), dtype, f"{pattern}: lora_expand y")


# --- tensor-core paths ------------------------------------------------------------

FAST_DTYPES = [torch.bfloat16, torch.float16]
FAST_RANKS = [8, 16, 64, 128]

# (T, pattern, adapter slots, clusters, d): decode tiles below 1024 tokens,
# prefill tiles from 1024 on. One token per adapter (windows of 16 one-token
# runs), thousands of adapters, one cluster, zipf with tokens without adapter;
# d = 200 is a multiple of 8 but not of the 64-wide steps (tails of both the
# shrink steps and the expand column tiles); d = 64 gives every block of a
# cluster at most one shrink step.
FAST_CASES = [
    (1, "identical", 19, 6, 1024),
    (16, "distinct", 40, 6, 1024),
    (133, "zipf", 1000, 25, 1024),
    (256, "uniform", 1000, 25, 200),
    (300, "skewed", 64, 1, 64),
    (1024, "uniform", 1000, 25, 1024),
    (1500, "skewed", 64, 1, 200),
    (4096, "zipf", 4000, 64, 512),
]


def fast_grid(fn):
    fn = pytest.mark.parametrize("dtype", FAST_DTYPES, ids=dtype_id)(fn)
    fn = pytest.mark.parametrize("r", FAST_RANKS)(fn)
    return pytest.mark.parametrize("T,pattern,A,C,d", FAST_CASES)(fn)


@fast_grid
def test_fast_shrink(T, pattern, A, C, d, r, dtype):
    b = make_batch(pattern, T, seed_of("fshrink", T, pattern, r), device=DEV, A=A, C=C)
    g = gen(seed_of("fshrink-data", T, r))
    x = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    Af = randn(A, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    scales = (torch.rand(A, generator=g) + 0.5).to(DEV)
    h = torch.full((1, b.T, r), float("nan"), device=DEV)  # every row must be written
    jdlora_ops.jd_shrink(x, V, b.meta, out=h)
    assert_close(h, R.jd_shrink(x, [V], b.mapping, b.adapter_cluster), dtype, "jd_shrink h")
    h.fill_(float("nan"))
    jdlora_ops.lora_shrink(x, Af, scales, b.meta, out=h)
    assert_close(h, R.lora_shrink(x, [Af], scales, b.mapping), dtype, "lora_shrink h")


@fast_grid
def test_fast_expand(T, pattern, A, C, d, r, dtype):
    b = make_batch(pattern, T, seed_of("fexpand", T, pattern, r), device=DEV, A=A, C=C)
    g = gen(seed_of("fexpand-data", T, r))
    gin = randn(1, b.T, r, gen=g, device=DEV)
    U = randn(C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    Bf = randn(A, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y0 = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    y = y0.clone()
    jdlora_ops.jd_expand(gin, U, b.meta, y)
    assert_close(y, R.jd_expand(gin, [U], [0], b.mapping, b.adapter_cluster, y0), dtype, "jd_expand y")
    y = y0.clone()
    jdlora_ops.lora_expand(gin, Bf, b.meta, y)
    assert_close(y, R.lora_expand(gin, [Bf], [0], b.mapping, y0), dtype, "lora_expand y")


@fast_grid
def test_fast_fused(T, pattern, A, C, d, r, dtype):
    b = make_batch(pattern, T, seed_of("ffused", T, pattern, r), device=DEV, A=A, C=C)
    g = gen(seed_of("ffused-data", T, r))
    x = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    S = randn(A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    U = randn(C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y0 = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    y = y0.clone()
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    assert_close(y, R.jd_fused(x, [V], [S], [U], [0], b.mapping, b.adapter_cluster, y0), dtype, "jd_fused y")


# q/k/v of a GQA layer: one call, three slices with their own widths, y column
# offsets on 8-element boundaries (the tensor-core path's y condition) with
# gaps between slices, x and y column views of wider tensors; mixed full and
# diagonal cores. Token counts on both sides of the decode/prefill rule and a
# number of slices that changes the cluster size picked on sm_90.
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("T,r,d", [(7, 16, 512), (256, 64, 1024), (1100, 16, 512), (2048, 128, 256),
                                   (4096, 64, 1024)])
def test_fast_multi_slice(T, r, d, dtype):
    b = make_batch("zipf", T, seed_of("fms", T, r, d), device=DEV, A=300, C=25)
    g = gen(seed_of("fms-data", T, r, d))
    widths = [d, d // 4, d // 4]
    offsets = [8, d + 24, d + d // 4 + 40]
    ycols = offsets[-1] + widths[-1] + 16
    x = randn(b.T, d + 32, dtype=dtype, gen=g, device=DEV)[:, 16 : 16 + d]
    y_big = randn(b.T, ycols + 24, dtype=dtype, gen=g, device=DEV)
    y0 = y_big[:, 8 : 8 + ycols]

    def fresh_y():  # a strided view again, like y0 (clone() of a view would be contiguous)
        return y_big.clone()[:, 8 : 8 + ycols]

    V = [randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV) for _ in widths]
    S = [randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV),
         randn(b.A, r, dtype=dtype, gen=g, device=DEV),
         randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)]
    U = [randn(b.C, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV) for w in widths]
    Af = [randn(b.A, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV) for _ in widths]
    Bf = [randn(b.A, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV) for w in widths]
    scales = (torch.rand(3, b.A, generator=g) + 0.5).to(DEV)

    h = torch.full((3, b.T, r), float("nan"), device=DEV)
    jdlora_ops.jd_shrink(x, V, b.meta, out=h)
    ref_h = R.jd_shrink(x, V, b.mapping, b.adapter_cluster)
    assert_close(h, ref_h, dtype, "jd_shrink h")
    gg = jdlora_ops.jd_core(h, S, b.meta)
    ref_g = R.jd_core(ref_h, S, b.mapping)
    assert_close(gg, ref_g, dtype, "jd_core g")
    y = fresh_y()
    jdlora_ops.jd_expand(gg, U, b.meta, y, offsets)
    assert_close(y, R.jd_expand(gg, U, offsets, b.mapping, b.adapter_cluster, y0), dtype, "jd_expand y")
    y = fresh_y()
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y, offsets)
    assert_close(y, R.jd_fused(x, V, S, U, offsets, b.mapping, b.adapter_cluster, y0), dtype, "jd_fused y")
    hl = torch.full((3, b.T, r), float("nan"), device=DEV)
    jdlora_ops.lora_shrink(x, Af, scales, b.meta, out=hl)
    ref_hl = R.lora_shrink(x, Af, scales, b.mapping)
    assert_close(hl, ref_hl, dtype, "lora_shrink h")
    y = fresh_y()
    jdlora_ops.lora_expand(hl, Bf, b.meta, y, offsets)
    assert_close(y, R.lora_expand(hl, Bf, offsets, b.mapping, y0), dtype, "lora_expand y")
    # Columns outside the slices are untouched.
    cols = torch.ones(ycols, dtype=torch.bool)
    for off, w in zip(offsets, widths):
        cols[off : off + w] = False
    assert torch.equal(y[:, cols.to(DEV)], y0[:, cols.to(DEV)])


def test_fast_results_are_deterministic():
    """The cluster split of d_in sums its partials in a fixed order: two runs agree bit for bit."""
    T, d, r, dtype = 600, 1024, 64, torch.bfloat16
    b = make_batch("zipf", T, seed_of("det"), device=DEV, A=500, C=25)
    g = gen(seed_of("det-data"))
    x = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    U = randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y0 = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    outs = []
    for _ in range(2):
        h = jdlora_ops.jd_shrink(x, V, b.meta)
        y = jdlora_ops.jd_fused(x, V, S, U, b.meta, y0.clone())
        outs.append((h, y))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


SIMPLE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_cuda import run_all_ops
    out = {}
    for pattern, T in [("zipf", 133), ("uniform", 1100), ("distinct", 16)]:
        for name, v in run_all_ops("cuda", pattern, torch.bfloat16, T).items():
            out[f"{pattern}-{T}-{name}"] = v.cpu()
    torch.save(out, sys.argv[2])
    """
)


def test_fast_path_matches_simple_path(tmp_path):
    """The same calls with JDLORA_CUDA_SIMPLE=1 (read when the library loads,
    hence a subprocess) and without it: two independent implementations."""
    out_file = tmp_path / "simple.pt"
    script = tmp_path / "simple.py"
    script.write_text(SIMPLE_SCRIPT)
    env = dict(os.environ, JDLORA_CUDA_SIMPLE="1")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, str(script), here, str(out_file)], env=env, check=True, timeout=600)
    simple = torch.load(out_file)
    for pattern, T in [("zipf", 133), ("uniform", 1100), ("distinct", 16)]:
        for name, v in run_all_ops(DEV, pattern, torch.bfloat16, T).items():
            assert_close(v, simple[f"{pattern}-{T}-{name}"], torch.bfloat16, f"{pattern} T={T} {name}")


# --- CUDA graphs and torch.compile of every op ----------------------------------


class GraphLayer:
    """Static buffers and tables of one layer (q/k/v slices) for graph tests."""

    def __init__(self, T: int, A: int = 300, C: int = 7, d: int = 512, r: int = 16, dtype=torch.bfloat16):
        self.T, self.A, self.C, self.d, self.r, self.dtype = T, A, C, d, r, dtype
        g = gen(seed_of("graph-layer", T, d, r))
        self.widths = [d, d // 4, d // 4]
        self.offsets = [0, d, d + d // 4]
        self.ycols = sum(self.widths)
        W = self.widths
        self.V = [randn(C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV) for _ in W]
        self.S = [randn(A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV),
                  randn(A, r, dtype=dtype, gen=g, device=DEV),
                  randn(A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)]
        self.U = [randn(C, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV) for w in W]
        self.Af = [randn(A, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV) for _ in W]
        self.Bf = [randn(A, w, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV) for w in W]
        self.scales = (torch.rand(3, A, generator=g) + 0.5).to(DEV)
        self.adapter_cluster = torch.randint(C, (A,), generator=g, dtype=torch.int32).to(DEV)

    def new_inputs(self, pattern: str, seed: int):
        gg = gen(seed)
        m = token_mapping(pattern, self.T, self.A, gg)
        x = randn(self.T, self.d, dtype=self.dtype, gen=gg)
        y0 = randn(self.T, self.ycols, dtype=self.dtype, gen=gg)
        return m, x, y0

    def check(self, m, x, y0, out: dict[str, torch.Tensor], what: str):
        V, S, U, Af, Bf, offs, ac = self.V, self.S, self.U, self.Af, self.Bf, self.offsets, self.adapter_cluster
        dt = self.dtype
        ref_h = R.jd_shrink(x, V, m, ac)
        assert_close(out["h"], ref_h, dt, f"{what}: jd_shrink h")
        ref_g = R.jd_core(ref_h, S, m)
        assert_close(out["g"], ref_g, dt, f"{what}: jd_core g")
        assert_close(out["y_staged"], R.jd_expand(out["g"], U, offs, m, ac, y0), dt, f"{what}: jd_expand y")
        assert_close(out["y_fused"], R.jd_fused(x, V, S, U, offs, m, ac, y0), dt, f"{what}: jd_fused y")
        ref_hl = R.lora_shrink(x, Af, self.scales, m)
        assert_close(out["hl"], ref_hl, dt, f"{what}: lora_shrink h")
        assert_close(out["y_lora"], R.lora_expand(out["hl"], Bf, offs, m, y0), dt, f"{what}: lora_expand y")


# T = 48: decode tiles; T = 1100: prefill tiles (and on sm_90 other cluster sizes).
@pytest.mark.parametrize("T", [48, 1100])
def test_cuda_graph_every_op(T):
    """Capture build_batch_meta and every other op once; write new mappings and
    activations into the captured buffers and replay; compare with float64."""
    L = GraphLayer(T)
    meta = jdlora_ops.BatchMeta.allocate(T, L.A, L.C, DEV)
    mapping = meta.token_lora_mapping[:T]  # build() reads it in place
    x = torch.empty(T, L.d, dtype=L.dtype, device=DEV)
    y = {k: torch.empty(T, L.ycols, dtype=L.dtype, device=DEV) for k in ("y_staged", "y_fused", "y_lora")}
    h = torch.empty(3, T, L.r, device=DEV)
    g = torch.empty_like(h)
    hl = torch.empty_like(h)

    def write(pattern, seed):
        m, xv, y0 = L.new_inputs(pattern, seed)
        mapping.copy_(m.to(DEV))
        x.copy_(xv.to(DEV))
        for t in y.values():
            t.copy_(y0.to(DEV))
        return m, xv, y0

    def step():
        meta.build(mapping, L.adapter_cluster)
        jdlora_ops.jd_shrink(x, L.V, meta, out=h)
        jdlora_ops.jd_core(h, L.S, meta, out=g)
        jdlora_ops.jd_expand(g, L.U, meta, y["y_staged"], L.offsets)
        jdlora_ops.jd_fused(x, L.V, L.S, L.U, meta, y["y_fused"], L.offsets)
        jdlora_ops.lora_shrink(x, L.Af, L.scales, meta, out=hl)
        jdlora_ops.lora_expand(hl, L.Bf, meta, y["y_lora"], L.offsets)

    write("identical", 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for pattern, seed in [("zipf", 2), ("distinct", 3), ("all_none", 4), ("skewed", 5), ("uniform", 6)]:
        if pattern == "distinct" and L.A < T:
            continue
        m, xv, y0 = write(pattern, seed)
        graph.replay()
        torch.cuda.synchronize()
        assert_meta(meta, T, R.build_batch_meta(m, L.adapter_cluster, L.C), pattern)
        L.check(m, xv, y0, {"h": h, "g": g, "hl": hl, **y}, pattern)


@pytest.mark.parametrize("T", [40, 1030])
def test_compile_reduce_overhead(T):
    """torch.compile(mode="reduce-overhead", fullgraph=True) over every op but
    build_batch_meta (which writes into its inputs, which would keep the
    compiled function off CUDA graphs), called on new inputs of the same shape."""
    L = GraphLayer(T)
    meta = jdlora_ops.BatchMeta.allocate(T, L.A, L.C, DEV)

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def layer(x, y0, meta):
        h = jdlora_ops.jd_shrink(x, L.V, meta)
        g = jdlora_ops.jd_core(h, L.S, meta)
        y_staged = jdlora_ops.jd_expand(g, L.U, meta, y0.clone(), L.offsets)
        y_fused = jdlora_ops.jd_fused(x, L.V, L.S, L.U, meta, y0.clone(), L.offsets)
        hl = jdlora_ops.lora_shrink(x, L.Af, L.scales, meta)
        y_lora = jdlora_ops.lora_expand(hl, L.Bf, meta, y0.clone(), L.offsets)
        return {"h": h, "g": g, "y_staged": y_staged, "y_fused": y_fused, "hl": hl, "y_lora": y_lora}

    for pattern, seed in [("zipf", 11), ("uniform", 12), ("skewed", 13), ("zipf", 14)]:
        m, xv, y0 = L.new_inputs(pattern, seed)
        meta.build(m.to(DEV), L.adapter_cluster)
        torch.compiler.cudagraph_mark_step_begin()
        out = layer(xv.to(DEV), y0.to(DEV), meta)
        out = {k: v.clone() for k, v in out.items()}
        L.check(m, xv, y0, out, f"compiled {pattern}")


# --- launch limits and numeric edges found by reading the code (issue 12) ----------
#
# Each uses the inputs that triggered the defect; the host emulation
# (csrc/cuda/emulation/launch_emulation.cpp) runs the same decisions on
# emulated devices on every CI run.

# build_batch_meta keeps 128 bytes of static shared memory besides 8 bytes
# per adapter slot and cluster and a 32 KiB placement table: from A + C =
# 2032 the block needs more than 48 KiB and the launch must opt in (2031 is
# the last that does not).
@pytest.mark.parametrize("A,C", [(1967, 64), (1968, 64), (5700, 64), (6080, 64), (6081, 64)])
def test_build_batch_meta_static_plus_dynamic_shared(A, C):
    b = make_batch("uniform", 4096, seed_of("meta-smem", A, C), device=DEV, A=A, C=C)
    assert_meta(b.meta, b.T, R.build_batch_meta(b.mapping, b.adapter_cluster, C))


# A + C = 26000 leaves no room for the 32 KiB placement table on a 227 KiB
# device: one warp places the tokens (the same tables).
def test_build_batch_meta_one_warp_placement():
    if torch.cuda.get_device_properties(0).shared_memory_per_block_optin < 227 * 1024:
        pytest.skip("needs 227 KiB of shared memory per block (sm_90)")
    b = make_batch("zipf", 4096, seed_of("meta-walk"), device=DEV, A=25936, C=64)
    assert_meta(b.meta, b.T, R.build_batch_meta(b.mapping, b.adapter_cluster, 64))


def simple_case(T, d, r, dtype, seed):
    b = make_batch("uniform", T, seed, device=DEV, A=6, C=2)
    g = gen(seed)
    x = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    U = randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y = randn(b.T, d, dtype=dtype, gen=g, device=DEV)
    gin = randn(1, b.T, r, gen=g, device=DEV)
    return b, x, V, S, U, y, gin


# The simple fused kernel holds 2 x 16 x r fp32 values (r = 384: exactly
# 48 KiB) besides its static token arrays; r = 383 / 384 failed to launch.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("r", [383, 384])
def test_simple_fused_at_the_shared_memory_edge(r, dtype):
    b, x, V, S, U, y, _ = simple_case(5, 24, r, dtype, seed_of("fused-edge", r))
    ref = R.jd_fused(x, [V], [S], [U], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    assert_close(y, ref, dtype, "y")


# The simple expand kernel: 16 x r fp32 values; r = 767 / 768 failed.
@pytest.mark.parametrize("r", [767, 768])
def test_simple_expand_at_the_shared_memory_edge(r):
    b, _, _, _, U, y, gin = simple_case(5, 8, r, torch.float32, seed_of("expand-edge", r))
    ref = R.jd_expand(gin, [U], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_expand(gin, U, b.meta, y)
    assert_close(y, ref, torch.float32, "y")


def test_rank_beyond_shared_memory_is_a_clear_error():
    """r = 2000 needs 256000 bytes in the simple fused kernel, more than any current GPU offers a block."""
    b, x, V, S, U, y, _ = simple_case(3, 8, 2000, torch.float32, seed_of("too-large"))
    y0 = y.clone()
    with pytest.raises(RuntimeError, match=r"jd_fused: rank 2000 needs more shared memory"):
        jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    torch.cuda.synchronize()
    assert torch.equal(y, y0)
    # The failure leaves nothing behind for the next op.
    jdlora_ops.jd_expand(torch.zeros(1, b.T, 16, device=DEV), randn(b.C, 8, 16, device=DEV), b.meta, y)
    torch.cuda.synchronize()


# fp16 tensor-core expand splits g into hi + lo halves: |g| >= 65520 gave
# inf - inf = NaN, and |g| ~ 1e-6 (below fp16's normal range) lost most of
# its bits. Large g with small U keeps y in range; tiny g with large U too.
@pytest.mark.parametrize("T", [20, 1100])
@pytest.mark.parametrize("magnitude", ["large", "tiny"])
def test_fp16_expand_g_beyond_half_range(magnitude, T):
    dtype, d, r = torch.float16, 64, 16
    b = make_batch("uniform", T, seed_of("fp16-range", magnitude, T), device=DEV, A=8, C=2)
    g = gen(seed_of("fp16-range-data", magnitude, T))
    g_scale, u_scale = (1e5, 1e-3) if magnitude == "large" else (1e-6, 1e3)
    gin = randn(1, b.T, r, scale=g_scale, gen=g, device=DEV)
    U = randn(b.C, d, r, dtype=dtype, scale=u_scale * r**-0.5, gen=g, device=DEV)
    B = randn(b.A, d, r, dtype=dtype, scale=u_scale * r**-0.5, gen=g, device=DEV)
    for name, run, ref in [
        ("jd_expand", lambda y: jdlora_ops.jd_expand(gin, U, b.meta, y),
         lambda y: R.jd_expand(gin, [U], [0], b.mapping, b.adapter_cluster, y)),
        ("lora_expand", lambda y: jdlora_ops.lora_expand(gin, B, b.meta, y),
         lambda y: R.lora_expand(gin, [B], [0], b.mapping, y)),
    ]:
        y = torch.zeros(b.T, d, dtype=dtype, device=DEV)
        want = ref(y)
        run(y)
        assert torch.isfinite(y).all(), f"{name}: non-finite y"
        err = float((y.cpu().double() - want).abs().max())
        assert err <= 2e-3 * float(want.abs().max()), f"{name}: error {err:.3e} vs max |y| {float(want.abs().max()):.3e}"


def test_fp16_fused_h_beyond_half_range():
    """x ~ 1e4 and V ~ 8 / sqrt(d): h and g pass 65520 inside the fused kernel."""
    dtype, T, d, r = torch.float16, 16, 64, 16
    b = make_batch("uniform", T, seed_of("fp16-fused-range"), device=DEV, A=8, C=2)
    g = gen(seed_of("fp16-fused-range-data"))
    x = randn(T, d, dtype=dtype, scale=1e4, gen=g, device=DEV).clamp(-6e4, 6e4)
    V = randn(b.C, r, d, dtype=dtype, scale=8 * d**-0.5, gen=g, device=DEV)
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    U = randn(b.C, d, r, dtype=dtype, scale=1e-3 * r**-0.5, gen=g, device=DEV)
    y = randn(T, d, dtype=dtype, gen=g, device=DEV)
    ref = R.jd_fused(x, [V], [S], [U], [0], b.mapping, b.adapter_cluster, y)
    assert float(R.jd_shrink(x, [V], b.mapping, b.adapter_cluster).abs().max()) > 65520
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    assert torch.isfinite(y).all()
    assert_close(y, ref, dtype, "y")


# On an sm_90 device the launchers split d_in over a cluster of 8 for this
# call (one window, d_in = 1024). Clusters are now decided from the loaded
# image: with a build for sm_80 only (JDLORA_CUDA_ARCHS=80) on an sm_90 device
# the same call must run without clusters and still match.
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=dtype_id)
def test_cluster_split_follows_the_image(dtype):
    T, d, r = 16, 1024, 16
    b = make_batch("uniform", T, seed_of("cluster-image"), device=DEV, A=20, C=3)
    g = gen(seed_of("cluster-image-data"))
    x = randn(T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    U = randn(b.C, d, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y = randn(T, d, dtype=dtype, gen=g, device=DEV)
    h = torch.full((1, T, r), float("nan"), device=DEV)
    jdlora_ops.jd_shrink(x, V, b.meta, out=h)
    assert_close(h, R.jd_shrink(x, [V], b.mapping, b.adapter_cluster), dtype, "h")
    ref = R.jd_fused(x, [V], [S], [U], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    assert_close(y, ref, dtype, "y")


# The tensor-core tiles that need the most shared memory (r = 128, prefill
# windows): they opt in above 48 KiB; when a launch cannot run, the op falls
# back to the simple kernels instead of reporting success with nothing done.
@pytest.mark.parametrize("T", [16, 1100])
def test_largest_tensor_core_tiles(T):
    dtype, d, r = torch.bfloat16, 5128, 128
    b = make_batch("zipf", T, seed_of("largest-tiles", T), device=DEV, A=64, C=4)
    g = gen(seed_of("largest-tiles-data", T))
    x = randn(T, d, dtype=dtype, gen=g, device=DEV)
    V = randn(b.C, r, d, dtype=dtype, scale=d**-0.5, gen=g, device=DEV)
    S = randn(b.A, r, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    U = randn(b.C, 256, r, dtype=dtype, scale=r**-0.5, gen=g, device=DEV)
    y = randn(T, 256, dtype=dtype, gen=g, device=DEV)
    ref = R.jd_fused(x, [V], [S], [U], [0], b.mapping, b.adapter_cluster, y)
    jdlora_ops.jd_fused(x, V, S, U, b.meta, y)
    torch.cuda.synchronize()
    assert_close(y, ref, dtype, "y")


# --- batch-invariant mode ------------------------------------------------------
#
# One probe token (same slot, rows and weights) in batches of 1, 37 and 4096
# tokens: with the mode on its outputs from every op are bitwise equal. d_in =
# 520 and 4096: by default sm_90 splits d_in over a cluster of 8 for small
# batches and fewer for large ones; bf16/fp16 take the tensor-core kernels
# (decode tiles, then prefill tiles at 4096), fp32 the simple ones.

@pytest.mark.parametrize("d", [520, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_batch_invariant_mode(dtype, d):
    with jdlora_ops.batch_invariant_mode():
        assert_batch_invariant({T: probe_outputs(T, dtype, DEV, d=d) for T in (1, 37, 4096)})


def test_batch_invariant_mode_matches_the_reference():
    """The mode changes rounding only: every op still matches float64."""
    with jdlora_ops.batch_invariant_mode():
        L = GraphLayer(1100)
        m, xv, y0 = L.new_inputs("zipf", 21)
        meta = jdlora_ops.BatchMeta.allocate(1100, L.A, L.C, DEV).build(m.to(DEV), L.adapter_cluster)
        x, y = xv.to(DEV), y0.to(DEV)
        h = jdlora_ops.jd_shrink(x, L.V, meta)
        g = jdlora_ops.jd_core(h, L.S, meta)
        hl = jdlora_ops.lora_shrink(x, L.Af, L.scales, meta)
        out = {"h": h, "g": g, "y_staged": jdlora_ops.jd_expand(g, L.U, meta, y.clone(), L.offsets),
               "y_fused": jdlora_ops.jd_fused(x, L.V, L.S, L.U, meta, y.clone(), L.offsets),
               "hl": hl, "y_lora": jdlora_ops.lora_expand(hl, L.Bf, meta, y.clone(), L.offsets)}
        L.check(m, xv, y0, out, "batch-invariant")


def test_batch_invariant_mode_in_a_cuda_graph():
    """A graph captured with the mode on replays its decisions: the probe's
    outputs in a replayed batch of 37 equal those of an eager batch of 1."""
    with jdlora_ops.batch_invariant_mode():
        want = probe_outputs(1, torch.bfloat16, DEV, d=520)
        b = probe_batch(37, torch.bfloat16, DEV, d=520)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_probe(b)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run_probe(b)
    graph.replay()  # the mode is off again: the graph keeps its captured kernels
    torch.cuda.synchronize()
    assert_batch_invariant({"eager T=1": want, "graph T=37": probe_bits(out)})


# Tenant isolation on the GPU kernels: the CPU suite's property
# (tests/test_isolation.py) with rows aligned so that fp16/bf16 run the
# tensor-core kernels, whose 16/64-token windows mix several groups' runs.
def gpu_isolation_cases():
    from test_isolation import DECODE_PATTERNS, OP_TARGETS
    i = 0
    for op, targets in OP_TARGETS.items():
        for target in targets:
            for T in (7, 40, 1061):
                pattern = DECODE_PATTERNS[i % len(DECODE_PATTERNS)]
                dtype = DTYPES[i % len(DTYPES)]
                i += 1
                yield pytest.param(op, target, pattern, T, dtype, id=f"{op}-{target}-{pattern}-T{T}-{dtype_id(dtype)}")


@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch_invariant"])
@pytest.mark.parametrize("op,target,pattern,T,dtype", list(gpu_isolation_cases()))
def test_op_isolation_on_gpu(op, target, pattern, T, dtype, invariant):
    from test_isolation import op_isolation
    op_isolation(op, target, pattern, T, 16, dtype, invariant, device=DEV, aligned=True)
