"""Shared test data: token-to-adapter popularity patterns and random tables.

Popularity patterns follow how a serving batch spreads over adapters:
identical (one adapter), distinct (one adapter per token), uniform, zipf,
skewed (one hot adapter plus stragglers and tokens without adapter), all -1,
and the empty batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import jdlora_ops

POPULARITY = ["identical", "distinct", "uniform", "zipf", "skewed", "all_none", "empty"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Max abs error allowed, relative to max(1, max |reference|): fp32 accumulation
# everywhere, so the bound is set by rounding of inputs/outputs to the dtype.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: on tiny compressor problems thread start-up and
    contention cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def token_mapping(pattern: str, T: int, A: int, gen: torch.Generator) -> torch.Tensor:
    """int32 [T] adapter slots in [-1, A) spread by ``pattern``."""
    if pattern == "empty":
        return torch.empty(0, dtype=torch.int32)
    if pattern == "all_none":
        return torch.full((T,), -1, dtype=torch.int32)
    if pattern == "identical":
        return torch.full((T,), int(torch.randint(A, (1,), generator=gen)), dtype=torch.int32)
    if pattern == "distinct":
        assert A >= T
        return torch.randperm(A, generator=gen)[:T].to(torch.int32)
    if pattern == "uniform":
        return torch.randint(A, (T,), generator=gen, dtype=torch.int32)
    if pattern == "zipf":
        ranks = torch.arange(1, A + 1, dtype=torch.float64)
        p = ranks.pow(-1.1)
        draw = torch.multinomial(p / p.sum(), T, replacement=True, generator=gen)
        slots = torch.randperm(A, generator=gen)[draw].to(torch.int32)
        none = torch.rand(T, generator=gen) < 0.1
        return torch.where(none, torch.full_like(slots, -1), slots)
    if pattern == "skewed":
        hot = int(torch.randint(A, (1,), generator=gen))
        slots = torch.full((T,), hot, dtype=torch.int32)
        u = torch.rand(T, generator=gen)
        other = torch.randint(A, (T,), generator=gen, dtype=torch.int32)
        slots = torch.where(u > 0.8, other, slots)
        return torch.where(u > 0.95, torch.full_like(slots, -1), slots)
    raise ValueError(pattern)


@dataclass
class Batch:
    T: int
    A: int
    C: int
    mapping: torch.Tensor
    adapter_cluster: torch.Tensor
    meta: jdlora_ops.BatchMeta


def make_batch(pattern: str, T: int, seed: int, device="cpu", A: int | None = None, C: int = 6) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    A = A or max(T, 16) + 3
    mapping = token_mapping(pattern, T, A, gen)
    T = mapping.numel()
    adapter_cluster = torch.randint(C, (A,), generator=gen, dtype=torch.int32)
    mapping, adapter_cluster = mapping.to(device), adapter_cluster.to(device)
    meta = jdlora_ops.BatchMeta.allocate(max(T, 1) + 5, A, C, device).build(mapping, adapter_cluster)
    return Batch(T, A, C, mapping, adapter_cluster, meta)


def randn(*shape, dtype=torch.float32, scale=1.0, gen=None, device="cpu"):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    out64 = out.detach().cpu().to(torch.float64)
    ref64 = ref.detach().cpu().to(torch.float64)
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    if ref64.numel() == 0:
        return
    scale = max(1.0, float(ref64.abs().max()))
    err = float((out64 - ref64).abs().max())
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3e} > {TOL[dtype]:.1e} * {scale:.3g}"


PROBE_WIDTHS = (64, 32)


def probe_batch(T: int, dtype: torch.dtype, device="cpu", d: int = 111, r: int = 16, A: int = 12,
                C: int = 3) -> dict:
    """Inputs of every op for a batch of ``T`` whose last token is the probe.

    The probe's slot, its rows of x, h, g and y, and every weight come from a
    fixed seed, the same for every ``T``; the other tokens come from a seed
    that changes with ``T``. Two slices (widths ``PROBE_WIDTHS``), the second
    core diagonal.
    """
    fixed = torch.Generator().manual_seed(1234)
    other = torch.Generator().manual_seed(T)
    ac = torch.randint(C, (A,), generator=fixed, dtype=torch.int32)
    mapping = torch.randint(-1, A, (T,), generator=other, dtype=torch.int32)
    mapping[-1] = 5

    def stacks(shapes, scale):
        return [randn(*s, dtype=dtype, scale=scale, gen=fixed, device=device) for s in shapes]

    def rows(*shape, dtype=torch.float32):
        """[T, *shape]: the probe's row from the fixed seed, the others from T's."""
        head = randn(T - 1, *shape, gen=other)
        return torch.cat([head, randn(1, *shape, gen=fixed)]).to(device=device, dtype=dtype)

    b = {
        "V": stacks([(C, r, d)] * len(PROBE_WIDTHS), d**-0.5),
        "U": stacks([(C, w, r) for w in PROBE_WIDTHS], r**-0.5),
        "S": stacks([(A, r, r)], r**-0.5) + stacks([(A, r)], 1.0),
        "A": stacks([(A, r, d)] * len(PROBE_WIDTHS), d**-0.5),
        "B": stacks([(A, w, r) for w in PROBE_WIDTHS], r**-0.5),
        "scales": (torch.rand(len(PROBE_WIDTHS), A, generator=fixed) + 0.5).to(device),
    }
    b["x"] = rows(d, dtype=dtype)
    b["y0"] = rows(sum(PROBE_WIDTHS), dtype=dtype)
    b["g"] = rows(len(PROBE_WIDTHS), r).transpose(0, 1).contiguous()
    b["meta"] = jdlora_ops.BatchMeta.allocate(T, A, C, device).build(mapping.to(device), ac.to(device))
    return b


def run_probe(b: dict) -> dict[str, torch.Tensor]:
    """Every op on a probe_batch; the probe's output rows, on the batch's device
    (no host synchronisation: a CUDA graph can capture it)."""
    meta = b["meta"]

    def y_after(op, *args):
        y = b["y0"].clone()
        op(*args, meta, y)
        return y[-1]

    return {
        "jd_shrink": jdlora_ops.jd_shrink(b["x"], b["V"], meta)[:, -1],
        "lora_shrink": jdlora_ops.lora_shrink(b["x"], b["A"], b["scales"], meta)[:, -1],
        "jd_core": jdlora_ops.jd_core(b["g"], b["S"], meta)[:, -1],
        "jd_expand": y_after(jdlora_ops.jd_expand, b["g"], b["U"]),
        "lora_expand": y_after(jdlora_ops.lora_expand, b["g"], b["B"]),
        "jd_fused": y_after(jdlora_ops.jd_fused, b["x"], b["V"], b["S"], b["U"]),
    }


def probe_bits(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw bit views (int16/int32) on the CPU, so that equality is bitwise
    (-0.0 differs from 0.0, a NaN equals itself)."""
    return {k: v.cpu().contiguous().view(torch.int32 if v.element_size() == 4 else torch.int16)
            for k, v in out.items()}


def probe_outputs(T: int, dtype: torch.dtype, device="cpu", **kw) -> dict[str, torch.Tensor]:
    """probe_bits of run_probe on probe_batch(T, dtype, device, **kw)."""
    return probe_bits(run_probe(probe_batch(T, dtype, device, **kw)))


def assert_batch_invariant(runs: dict) -> None:
    """``runs``: {label: probe_outputs(...)}; every run bitwise equal to the first."""
    (first, want), *rest = runs.items()
    for label, got in rest:
        for op in want:
            assert torch.equal(got[op], want[op]), f"{op}: probe output of {label} differs from {first}"
