"""Tenant isolation: a token's output depends only on its own adapter, the
bases of that adapter's cluster, the base model and its own input.

Every case runs an op (or a served batch) on clean tables, then again with
NaN, +Inf, -Inf or 1e30 written into the tables of ONE adapter or ONE cluster
(or into one token's input row), and compares raw bits with the clean run:

* every token outside the poisoned group has bitwise the same output;
* tokens without an adapter keep their ``y`` row bit for bit (in-place ops,
  the serving layer) or get an all-zero ``h``/``g`` row (shrink and core),
  and columns of ``y`` outside the slices stay as they were for every token;
* every token of the poisoned group did change, so a case whose poison never
  reaches the op cannot pass.

A cluster's bases are shared by all of its adapters, so a poisoned basis may
change every token of that cluster; the per-adapter tables (cores, LoRA
factors, scales) may change only that adapter's tokens. A poisoned slot that
no token of the batch uses must change nothing, even right after the same
metadata buffers served a batch that did use it.

Bits are compared through integer views, so a NaN equals itself and -0.0
differs from +0.0 (``y`` holds some -0.0 on purpose).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import jdlora_ops
from jdlora_ops.serving import AdapterCache, BatchPlanner

from conftest import DTYPES, token_mapping
from serving_data import MODULES, by_cluster, one_thread, random_collection, random_lora  # noqa: F401

POISONS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "1e30": 1e30}

D_IN = 111
WIDTHS = (37, 20)
OFFSETS = (0, 40)  # in y: columns 37..39 and 60..62 belong to no slice
Y_COLS = 63  # y is y_full[:, 1:64], a column slice with strided rows
Y_FULL_COLS = 66
A_USED, C_USED = 47, 5
ABSENT_ADAPTER, ABSENT_CLUSTER = A_USED, C_USED  # slots no token of the batch maps to
A, C = A_USED + 1, C_USED + 1
STALE_EXTRA = 21  # the previous batch held this many more tokens

DECODE_PATTERNS = ["identical", "distinct", "uniform", "zipf", "skewed"]
DECODE_T = [1, 7, 19, 33, 40]
PREFILL_PATTERNS = ["identical", "uniform", "zipf", "skewed"]  # "distinct" needs an adapter per token
PREFILL_T = [517, 800, 1061]

# Per op, what can be poisoned: a cluster's bases, an adapter's tables, one
# token's input row, or every table of a slot the batch does not use.
OP_TARGETS = {
    "jd_shrink": ["V", "x", "absent_cluster"],
    "jd_core": ["S_full", "S_diag", "h", "absent_adapter"],
    "jd_expand": ["U", "g", "absent_cluster"],
    "jd_fused": ["V", "U", "S_full", "S_diag", "x", "absent_adapter", "absent_cluster"],
    "lora_shrink": ["lora_A", "scales", "x", "absent_adapter"],
    "lora_expand": ["lora_B", "h", "absent_adapter"],
}
IN_PLACE = {"jd_expand", "jd_fused", "lora_expand"}


def dname(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def per_token(out: torch.Tensor) -> torch.Tensor:
    """``[T, ...]`` rows, one per token (``h``/``g`` are ``[S, T, r]``)."""
    return out.transpose(0, 1).reshape(out.shape[1], -1) if out.dim() == 3 else out


def randn(*shape, gen, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# --- ops ----------------------------------------------------------------------


class Case:
    """One batch and every table any op reads, on the CPU."""

    def __init__(self, pattern: str, T: int, r: int, dtype: torch.dtype, seed: int, device: str = "cpu",
                 aligned: bool = False):
        gen = torch.Generator().manual_seed(seed)
        # Odd sizes and a y one column off by default; aligned rows (d_in and
        # row strides multiples of 16 bytes) send fp16/bf16 on a GPU to the
        # tensor-core kernels, whose windows mix the runs of several groups.
        self.d_in = 128 if aligned else D_IN
        self.y_lead, self.y_full_cols = (0, 72) if aligned else (1, Y_FULL_COLS)
        self.device = device
        mapping = token_mapping(pattern, T, A_USED, gen)
        if T > 1:
            # Base-model requests ride along in every pattern, but never all of them.
            none = torch.rand(T, generator=gen) < 1 / 6
            none[int(torch.randint(T, (1,), generator=gen))] = False
            mapping = torch.where(none, torch.full_like(mapping, -1), mapping)
        if not (mapping >= 0).any():
            mapping[0] = 0
        self.T, self.r, self.dtype, self.gen = T, r, dtype, gen
        self.mapping = mapping
        self.adapter_cluster = torch.randint(C_USED, (A,), generator=gen, dtype=torch.int32)
        # The previous batch maps every token to the absent adapter, placed in
        # the absent cluster, so the buffers hold its segments until rebuilt.
        self.meta = jdlora_ops.BatchMeta.allocate(T + STALE_EXTRA, A, C, device=device)
        stale_cluster = self.adapter_cluster.clone()
        stale_cluster[ABSENT_ADAPTER] = ABSENT_CLUSTER
        jdlora_ops.build_batch_meta(torch.full((T + STALE_EXTRA,), ABSENT_ADAPTER, dtype=torch.int32).to(device),
                                    stale_cluster.to(device), self.meta)
        jdlora_ops.build_batch_meta(mapping.to(device), self.adapter_cluster.to(device), self.meta)
        d_in = self.d_in

        self.t = {
            "x": randn(T, d_in, gen=gen, dtype=dtype),
            "V": [randn(C, r, d_in, gen=gen, dtype=dtype, scale=d_in**-0.5) for _ in WIDTHS],
            "U": [randn(C, w, r, gen=gen, dtype=dtype, scale=r**-0.5) for w in WIDTHS],
            "S": [randn(A, r, r, gen=gen, dtype=dtype, scale=r**-0.5), randn(A, r, gen=gen, dtype=dtype)],
            "lora_A": [randn(A, r, d_in, gen=gen, dtype=dtype, scale=d_in**-0.5) for _ in WIDTHS],
            "lora_B": [randn(A, w, r, gen=gen, dtype=dtype, scale=r**-0.5) for w in WIDTHS],
            "scales": torch.rand(len(WIDTHS), A, generator=gen) + 0.5,
            "h": randn(len(WIDTHS), T, r, gen=gen),
            "g": randn(len(WIDTHS), T, r, gen=gen),
        }
        y0 = randn(T, self.y_full_cols, gen=gen, dtype=dtype)
        y0[:, ::7] = -0.0
        self.y0 = y0.to(device)
        self.t = {k: [s.to(device) for s in v] if isinstance(v, list) else v.to(device) for k, v in self.t.items()}

    @property
    def used(self) -> torch.Tensor:
        return self.mapping >= 0

    def token_clusters(self) -> torch.Tensor:
        """Cluster of every token, -1 for none."""
        cl = self.adapter_cluster[self.mapping.clamp_min(0).long()]
        return torch.where(self.used, cl, torch.full_like(cl, -1))

    def tables(self) -> dict:
        return {k: [s.clone() for s in v] if isinstance(v, list) else v.clone() for k, v in self.t.items()}

    def run(self, op: str, t: dict) -> torch.Tensor:
        """The op's output: ``h``/``g`` (written over NaN) or the whole ``y`` buffer."""
        meta, T, r = self.meta, self.T, self.r
        if op in IN_PLACE:
            y_full = self.y0.clone()
            y = y_full[:, self.y_lead : self.y_lead + Y_COLS]
            if op == "jd_expand":
                jdlora_ops.jd_expand(t["g"], t["U"], meta, y, OFFSETS)
            elif op == "jd_fused":
                jdlora_ops.jd_fused(t["x"], t["V"], t["S"], t["U"], meta, y, OFFSETS)
            else:
                jdlora_ops.lora_expand(t["h"], t["lora_B"], meta, y, OFFSETS)
            return y_full
        out = torch.full((len(WIDTHS), T, r), math.nan, device=self.device)
        if op == "jd_shrink":
            jdlora_ops.jd_shrink(t["x"], t["V"], meta, out=out)
        elif op == "jd_core":
            jdlora_ops.jd_core(t["h"], t["S"], meta, out=out)
        else:
            jdlora_ops.lora_shrink(t["x"], t["lora_A"], t["scales"], meta, out=out)
        return out

    def poison_site(self, target: str):
        """Where ``target`` puts its poison: ``(writes, affected tokens)``;
        ``writes`` is a list of ``(table, slice or None, index)``."""
        gen = self.gen

        def pick(n: int) -> int:
            return int(torch.randint(n, (1,), generator=gen))

        used = self.used.nonzero().flatten()
        t0 = int(used[pick(used.numel())])
        adapter, cluster = int(self.mapping[t0]), int(self.adapter_cluster[self.mapping[t0]])
        s = pick(len(WIDTHS))
        r = self.r
        if target in ("V", "U"):
            rows, cols = (r, self.d_in) if target == "V" else (WIDTHS[s], r)
            return [(target, s, (cluster, pick(rows), pick(cols)))], self.token_clusters() == cluster
        if target in ("S_full", "S_diag"):
            idx = (adapter, pick(r), pick(r)) if target == "S_full" else (adapter, pick(r))
            return [("S", 0 if target == "S_full" else 1, idx)], self.mapping == adapter
        if target in ("lora_A", "lora_B"):
            rows, cols = (r, self.d_in) if target == "lora_A" else (WIDTHS[s], r)
            return [(target, s, (adapter, pick(rows), pick(cols)))], self.mapping == adapter
        if target == "scales":
            return [("scales", None, (s, adapter))], self.mapping == adapter
        if target in ("x", "h", "g"):
            # One token with an adapter, and every token without one: the latter
            # must still come out untouched (or zero).
            none = (~self.used).nonzero().flatten().tolist()
            if target == "x":
                writes = [("x", None, (t, pick(self.d_in))) for t in [t0] + none]
            else:
                writes = [(target, None, (pick(len(WIDTHS)), t, pick(r))) for t in [t0] + none]
            return writes, torch.arange(self.T) == t0
        nobody = torch.zeros(self.T, dtype=torch.bool)
        if target == "absent_adapter":
            writes = [(k, s_, (ABSENT_ADAPTER,)) for k in ("S", "lora_A", "lora_B")
                      for s_ in range(len(WIDTHS))]
            return writes + [("scales", None, (slice(None), ABSENT_ADAPTER))], nobody
        if target == "absent_cluster":
            return [(k, s_, (ABSENT_CLUSTER,)) for k in ("V", "U") for s_ in range(len(WIDTHS))], nobody
        raise ValueError(target)


def poisoned(t: dict, writes, value: float) -> dict:
    for name, s, idx in writes:
        (t[name][s] if s is not None else t[name])[idx] = value
    return t


def differing(a: torch.Tensor, b: torch.Tensor, tokens: torch.Tensor) -> list[int]:
    """Tokens (indices into the batch) among ``tokens`` whose rows differ."""
    idx = tokens.nonzero().flatten()
    return idx[(a[idx] != b[idx]).any(dim=1)].tolist()


def check_op(case: Case, op: str, clean: torch.Tensor, dirty: torch.Tensor, affected: torch.Tensor,
             what: str) -> None:
    cb, db = bits(per_token(clean)).cpu(), bits(per_token(dirty)).cpu()
    bad = differing(cb, db, ~affected)
    assert not bad, f"{what}: tokens {bad[:8]} outside the poisoned group changed"
    none = ~case.used
    if op in IN_PLACE:
        y0 = bits(case.y0).cpu()
        bad = differing(db, y0, none)
        assert not bad, f"{what}: rows {bad[:8]} of tokens without an adapter were written"
        outside = torch.ones(case.y_full_cols, dtype=torch.bool)
        for o, w in zip(OFFSETS, WIDTHS):
            outside[case.y_lead + o : case.y_lead + o + w] = False
        assert torch.equal(db[:, outside], y0[:, outside]), f"{what}: columns outside the slices were written"
    else:
        bad = differing(db, torch.zeros_like(db), none)
        assert not bad, f"{what}: rows {bad[:8]} of tokens without an adapter are not +0.0"
    missed = sorted(set(affected.nonzero().flatten().tolist()) - set(differing(cb, db, affected)))
    assert not missed, f"{what}: poisoned tokens {missed[:8]} did not change (the poison never reached them)"


def op_isolation(op: str, target: str, pattern: str, T: int, r: int, dtype: torch.dtype, invariant: bool,
                 device: str = "cpu", aligned: bool = False):
    case = Case(pattern, T, r, dtype, seed_of(op, target, pattern, T, r, str(dtype)), device, aligned)
    writes, affected = case.poison_site(target)
    with jdlora_ops.batch_invariant_mode(invariant):
        clean = case.run(op, case.tables())
        for label, value in POISONS.items():
            dirty = case.run(op, poisoned(case.tables(), writes, value))
            check_op(case, op, clean, dirty, affected, f"{op}, {target} = {label}")


def decode_cases():
    for op, targets in OP_TARGETS.items():
        for target in targets:
            for pi, pattern in enumerate(DECODE_PATTERNS):
                for di, dtype in enumerate(DTYPES):
                    T = DECODE_T[(pi + di) % len(DECODE_T)]
                    yield pytest.param(op, target, pattern, T, dtype,
                                       id=f"{op}-{target}-{pattern}-T{T}-{dname(dtype)}")


@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch_invariant"])
@pytest.mark.parametrize("op,target,pattern,T,dtype", list(decode_cases()))
def test_op_isolation_decode(op, target, pattern, T, dtype, invariant):
    op_isolation(op, target, pattern, T, 16, dtype, invariant)


def prefill_cases():
    i = 0
    for op, targets in OP_TARGETS.items():
        for target in targets:
            pattern = PREFILL_PATTERNS[i % len(PREFILL_PATTERNS)]
            T = PREFILL_T[i % len(PREFILL_T)]
            dtype = DTYPES[i % len(DTYPES)]
            invariant = i % 2 == 1
            mode = "batch_invariant" if invariant else "default"
            i += 1
            yield pytest.param(op, target, pattern, T, dtype, invariant,
                               id=f"{op}-{target}-{pattern}-T{T}-{dname(dtype)}-{mode}")


@pytest.mark.parametrize("op,target,pattern,T,dtype,invariant", list(prefill_cases()))
def test_op_isolation_prefill(op, target, pattern, T, dtype, invariant):
    # Two threads, so that the work items of one batch are split between
    # threads, each with its own scratch, as on a serving host.
    torch.set_num_threads(2)
    op_isolation(op, target, pattern, T, 8, dtype, invariant)


@pytest.mark.parametrize("pattern,T",
                         [(p, 33) for p in DECODE_PATTERNS] + [(p, 800) for p in PREFILL_PATTERNS],
                         ids=lambda v: f"T{v}" if isinstance(v, int) else v)
def test_batch_meta_segments_hold_only_their_own_tokens(pattern, T):
    """The segments every op reads hold exactly their own tenant's tokens, with
    buffers that last held another batch (larger, all of it on one adapter)."""
    case = Case(pattern, T, 8, torch.float32, seed_of("meta", pattern, T))
    m, mapping, ac = case.meta, case.mapping, case.adapter_cluster
    idx = m.sorted_indices()
    assert sorted(idx.tolist()) == list(range(T))
    n_used = int(case.used.sum())
    for ids, starts, owner, what in (
        (m.active_cluster_ids, m.cluster_token_start, case.token_clusters(), "cluster"),
        (m.active_lora_ids, m.lora_token_start_loc, mapping, "adapter"),
    ):
        present = sorted(set(owner[case.used].tolist()))
        active = ids.tolist()
        assert sorted(active[: len(present)]) == present, f"{what} segments: {active} for {present}"
        assert all(i == -1 for i in active[len(present):]), f"stale {what} ids after the active ones"
        assert all(s == n_used for s in starts[len(present):].tolist()), f"stale {what} segment starts"
        for j, g in enumerate(active[: len(present)]):
            seg = idx[int(starts[j]) : int(starts[j + 1])].long()
            assert seg.numel() and bool((owner[seg] == g).all()), \
                f"{what} {g}'s segment holds {owner[seg].tolist()}"
    assert bool((mapping[idx[n_used:].long()] == -1).all()), "a token with an adapter sorted among the rest"
    assert bool(m.no_lora_flag.item()) is (n_used == 0)


# --- serving layer --------------------------------------------------------------

SERVING_TARGETS = ["core", "U", "V", "lora_A", "lora_B", "absent"]
POISONED_MODULE = MODULES[0].name  # layer 0 q_proj; the other modules must not change at all


def serving_cache(dtype: torch.dtype):
    coll = random_collection(n=12, K=4, r=6, seed=3)
    cache = AdapterCache(coll, dtype=dtype, device="cpu", max_uncompressed=3, uncompressed_rank=6)
    cache.register_uncompressed("peft_a", random_lora(rank=5, seed=1))
    cache.register_uncompressed("peft_b", random_lora(rank=3, seed=2, skip={MODULES[0].name}))
    cache.register_uncompressed("peft_idle", random_lora(rank=6, seed=3))
    return coll, cache


def serving_requests(coll) -> tuple[list, list, str, int]:
    """Requests over clusters 0..2 (cluster 3 stays out of the batch), prefill
    chunks and decode steps mixed; returns (adapters, counts, target, cluster)."""
    c0, c1, c2 = by_cluster(coll, 0), by_cluster(coll, 1), by_cluster(coll, 2)
    target = c0[0]
    reqs = [(target, 9), (c0[1], 1), (None, 4), (c1[0], 7), ("peft_a", 1), (target, 1), ("peft_b", 5),
            (None, 1), (c2[0], 3), (c1[1], 1), ("peft_a", 6), (None, 2)]
    return [a for a, _ in reqs], [c for _, c in reqs], target, 0


def serve(plan, xs: dict, y0s: dict) -> dict:
    """Every module alone, plus layer 0's q and v in one call (they share x)."""
    out = {}
    for name, x in xs.items():
        y = y0s[name].clone()
        if isinstance(name, tuple):
            plan.apply(list(name), x, y)
        else:
            plan.apply(name, x, y)
        out[name] = y
    return out


@pytest.mark.parametrize("io", ["same", "mixed"], ids=["io_same_dtype", "io_other_dtype"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_isolation(target, dtype, io):
    """The same property through AdapterCache + BatchPlanner + BatchPlan.apply,
    for compressed and uncompressed tenants in one batch; ``io_other_dtype``
    gives x and y another dtype than the tables (autocast, or tables kept in
    another dtype than the model), the path where BatchPlan.apply converts."""
    coll, cache = serving_cache(dtype)
    cache.load(coll.adapter_names)  # resident but idle adapters and clusters, for "absent"
    adapters, counts, victim, victim_cluster = serving_requests(coll)
    io_dtype = dtype if io == "same" else (torch.bfloat16 if dtype == torch.float32 else torch.float32)
    gen = torch.Generator().manual_seed(seed_of("serving", target, str(dtype), io))
    planner = BatchPlanner(cache, max_tokens=64)
    with planner.prepare(adapters, counts) as plan:
        T = plan.num_tokens
        xs, y0s = {}, {}
        for spec in MODULES:
            xs[spec.name] = randn(T, spec.d_in, gen=gen, dtype=io_dtype)
            y0s[spec.name] = randn(T, spec.d_out, gen=gen, dtype=io_dtype)
        fused = (MODULES[0].name, MODULES[1].name)
        xs[fused] = xs[MODULES[0].name]
        y0s[fused] = randn(T, MODULES[0].d_out + MODULES[1].d_out, gen=gen, dtype=io_dtype)
        for y in y0s.values():
            y[:, ::5] = -0.0
        clean = serve(plan, xs, y0s)

        token_adapter = [a for a, c in zip(adapters, counts) for _ in range(c)]
        none = torch.tensor([a is None for a in token_adapter])
        tabs = cache.tables[POISONED_MODULE]
        lease = plan.lease
        if target == "core":
            dst, affected = tabs.S[lease.adapter_slots[victim]], [a == victim for a in token_adapter]
        elif target in ("U", "V"):
            slot = lease.cluster_slots[victim_cluster]
            dst = (tabs.U if target == "U" else tabs.V)[slot]
            members = set(by_cluster(coll, victim_cluster))
            affected = [a in members for a in token_adapter]
        elif target in ("lora_A", "lora_B"):
            # Within peft_a's rank (5 of the tables' 6): beyond it the zero padding
            # would hide the poison.
            slot = lease.uncompressed_slots["peft_a"]
            dst = tabs.lora_A[slot, :5] if target == "lora_A" else tabs.lora_B[slot, :, :5]
            affected = [a == "peft_a" for a in token_adapter]
        else:
            # Resident slots of an adapter, a cluster and an uncompressed adapter
            # that this batch does not use.
            idle = cache.acquire([by_cluster(coll, 3)[0], "peft_idle"])
            cache.release(idle)
            (idle_adapter,), idle_cluster = idle.adapter_slots.values(), idle.cluster_slots[3]
            idle_unc = idle.uncompressed_slots["peft_idle"]
            dst, affected = None, [False] * T
        affected = torch.tensor(affected)
        assert target == "absent" or bool(affected.any())

        for label, value in POISONS.items():
            # Registration refuses adapters with non-finite factors, so the poison is
            # written into the resident tables after registration, where a corrupted
            # copy or a bad slot write would leave it. Nothing refills them between
            # the two runs: the batch's slots are pinned and nothing else is loaded.
            saved = [t.clone() for m in cache.tables.modules.values() for t in m.tensors()]
            if target == "absent":
                for m in cache.tables.modules.values():
                    for t, s in ((m.S, idle_adapter), (m.U, idle_cluster), (m.V, idle_cluster),
                                 (m.lora_A, idle_unc), (m.lora_B, idle_unc)):
                        t[s] = value
            else:
                dst[tuple(int(torch.randint(n, (1,), generator=gen)) for n in dst.shape)] = value
            dirty = serve(plan, xs, y0s)
            for table, before in zip([t for m in cache.tables.modules.values() for t in m.tensors()], saved):
                table.copy_(before)

            what = f"serving, {target} = {label}, tables {dname(dtype)}, x/y {dname(io_dtype)}"
            for name in xs:
                cb, db, y0 = bits(clean[name]), bits(dirty[name]), bits(y0s[name])
                hit = POISONED_MODULE == name or (isinstance(name, tuple) and POISONED_MODULE in name)
                mask = affected if hit else torch.zeros(T, dtype=torch.bool)
                bad = differing(cb, db, ~mask)
                assert not bad, f"{what}, {name}: tokens {bad[:8]} outside the poisoned tenant changed"
                bad = differing(db, y0, none)
                assert not bad, f"{what}, {name}: rows {bad[:8]} of base-model requests were written"
                missed = sorted(set(mask.nonzero().flatten().tolist()) - set(differing(cb, db, mask)))
                assert not missed, f"{what}, {name}: poisoned tenant's tokens {missed[:8]} did not change"


@pytest.mark.parametrize("kind", ["compressed", "cluster", "uncompressed"])
def test_serving_slot_reuse_leaks_nothing(kind):
    """A slot handed to a new tenant carries nothing of its previous one: the
    previous tenant's slot is poisoned (everywhere, padding included), the
    tenant evicted, and the next tenant that lands in that slot serves exactly
    what it serves from a fresh cache. The uncompressed newcomer has a lower
    rank than the slot's previous tenant and lacks a module, so the stale rows
    beyond its rank are what would leak."""
    coll = random_collection(n=12, K=4, r=6, seed=5)
    dtype = torch.bfloat16

    def fresh():
        cache = AdapterCache(coll, dtype=dtype, device="cpu", max_clusters=2, max_adapters=3,
                             max_uncompressed=2, uncompressed_rank=6)
        cache.register_uncompressed("old_peft", random_lora(rank=6, seed=1))
        cache.register_uncompressed("new_peft", random_lora(rank=3, seed=2, skip={MODULES[0].name}))
        cache.register_uncompressed("other_peft", random_lora(rank=4, seed=4))
        return cache

    c0, c1, c2 = by_cluster(coll, 0), by_cluster(coll, 1), by_cluster(coll, 2)
    if kind == "compressed":
        old, new, company = c0[0], c0[1], [c1[0]]
    elif kind == "cluster":
        old, new, company = c2[0], c0[0], [c1[0]]
    else:
        old, new, company = "old_peft", "new_peft", ["other_peft"]

    gen = torch.Generator().manual_seed(seed_of("reuse", kind))
    counts = [3, 1, 2]
    T = sum(counts)
    xs = {s.name: randn(T, s.d_in, gen=gen, dtype=dtype) for s in MODULES}
    y0s = {s.name: randn(T, s.d_out, gen=gen, dtype=dtype) for s in MODULES}

    def outputs(cache):
        with BatchPlanner(cache, max_tokens=16).prepare([new, None] + company, counts) as plan:
            slots = (plan.lease.adapter_slots, plan.lease.cluster_slots, plan.lease.uncompressed_slots)
            return serve(plan, xs, y0s), slots

    want, _ = outputs(fresh())

    cache = fresh()
    lease = cache.acquire([old] + company)
    cache.release(lease)
    if kind == "compressed":
        slot = lease.adapter_slots[old]
        for m in cache.tables.modules.values():
            m.S[slot] = math.nan
        assert cache.evict(old)
    elif kind == "cluster":
        slot = lease.cluster_slots[2]
        for m in cache.tables.modules.values():
            m.U[slot] = math.nan
            m.V[slot] = math.inf
        assert cache.evict_cluster(2)
    else:
        slot = lease.uncompressed_slots[old]
        for m in cache.tables.modules.values():
            m.lora_A[slot] = math.inf
            m.lora_B[slot] = math.nan
        assert cache.evict(old)
    got, (adapter_slots, cluster_slots, unc_slots) = outputs(cache)
    landed = {"compressed": adapter_slots.get(new), "cluster": cluster_slots.get(0),
              "uncompressed": unc_slots.get(new)}[kind]
    assert landed == slot, f"the newcomer took slot {landed}, not the previous tenant's slot {slot}"
    for name in want:
        assert torch.equal(bits(got[name]), bits(want[name])), f"{name}: the slot's previous tenant leaked"


# --- quantized tables ------------------------------------------------------------

QUANT_TARGETS = [("jd_shrink", "V"), ("jd_expand", "U"), ("jd_fused", "V"), ("jd_fused", "U"),
                 ("lora_shrink", "lora_A"), ("lora_expand", "lora_B")]


def quantized(t: dict, fmt: str) -> dict:
    """The case's tables with every shrink and expand stack quantized (4-bit: groups of 32, capped at r)."""
    from jdlora_ops.quant import quantize

    return {**t, **{k: [quantize(w, fmt, 32 if fmt == "int4" else None) for w in t[k]]
                    for k in ("V", "U", "lora_A", "lora_B")}}


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("op,target", QUANT_TARGETS, ids=[f"{o}-{t}" for o, t in QUANT_TARGETS])
def test_op_isolation_quantized_scales(op, target, fmt, dtype):
    """A poisoned scale of one cluster's (or adapter's) quantized table changes that group's tokens only."""
    case = Case("zipf", 19, 16, dtype, seed_of("quantized", op, target, fmt, str(dtype)), aligned=True)
    writes, affected = case.poison_site(target)
    clean = case.run(op, quantized(case.tables(), fmt))
    for label, value in POISONS.items():
        t = quantized(case.tables(), fmt)
        for name, s, (slot, row, col) in writes:
            table = t[name][s]
            table.scales[slot, row, col // table.group_size] = value
        check_op(case, op, clean, case.run(op, t), affected, f"{op}, {fmt} scale of {target} = {label}")
