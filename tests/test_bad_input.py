"""Bad input raises an error naming the argument, the expected and the actual
value, and leaves every output (and the metadata buffers) unchanged."""

from __future__ import annotations

import pytest
import torch

import jdlora_ops

from conftest import cuda_only, make_batch

D, R_, T = 24, 8, 11


@pytest.fixture
def case():
    b = make_batch("uniform", T, seed=2)
    g = torch.Generator().manual_seed(3)
    t = dict(
        x=torch.randn(b.T, D, generator=g),
        V=torch.randn(b.C, R_, D, generator=g),
        S=torch.randn(b.A, R_, R_, generator=g),
        U=torch.randn(b.C, D, R_, generator=g),
        A=torch.randn(b.A, R_, D, generator=g),
        B=torch.randn(b.A, D, R_, generator=g),
        h=torch.randn(1, b.T, R_, generator=g),
        y=torch.randn(b.T, D, generator=g),
        scales=torch.rand(1, b.A, generator=g),
    )
    return b, t


def call(name, b, t, **over):
    """The raw op with its arguments from the case, some replaced."""
    m = b.meta
    a = dict(
        x=t["x"], V=[t["V"]], S=[t["S"]], U=[t["U"]], A=[t["A"]], B=[t["B"]], h=t["h"], y=t["y"],
        scales=t["scales"], offsets=[0], mapping=m.mapping(), sorted=m.sorted_indices(),
        cids=m.active_cluster_ids, cstart=m.cluster_token_start, lids=m.active_lora_ids,
        lstart=m.lora_token_start_loc, out=t["h"],
    )
    a.update(over)
    ops = torch.ops.jdlora_ops
    if name == "jd_shrink":
        return ops.jd_shrink(a["x"], a["V"], a["sorted"], a["cids"], a["cstart"], a["out"])
    if name == "jd_core":
        return ops.jd_core(a["h"], a["S"], a["mapping"], a["out"])
    if name == "jd_expand":
        return ops.jd_expand(a["h"], a["U"], a["offsets"], a["sorted"], a["cids"], a["cstart"], a["y"])
    if name == "jd_fused":
        return ops.jd_fused(a["x"], a["V"], a["S"], a["U"], a["offsets"], a["mapping"], a["sorted"], a["cids"],
                            a["cstart"], a["y"])
    if name == "lora_shrink":
        return ops.lora_shrink(a["x"], a["A"], a["scales"], a["sorted"], a["lids"], a["lstart"], a["out"])
    if name == "lora_expand":
        return ops.lora_expand(a["h"], a["B"], a["offsets"], a["sorted"], a["lids"], a["lstart"], a["y"])
    raise ValueError(name)


def snapshot(b, t):
    m = b.meta
    bufs = [t["h"], t["y"], m.token_lora_mapping, m.token_indices_sorted, m.active_cluster_ids,
            m.num_tokens_per_cluster, m.cluster_token_start, m.active_lora_ids, m.num_tokens_per_lora,
            m.lora_token_start_loc, m.no_lora_flag]
    return [x.clone() for x in bufs], bufs


def expect_error(fn, b, t, *patterns):
    before, bufs = snapshot(b, t)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as err:
        fn()
    msg = str(err.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in message: {msg}"
    for x0, x in zip(before, bufs):
        assert torch.equal(x0, x), "an output changed on a failed call"


BAD_CASES = {
    # (op, overrides(b, t) -> dict, message fragments)
    "x dtype": ("jd_shrink", lambda b, t: dict(x=t["x"].double()),
                ["jd_shrink", "x must have dtype float32, float16 or bfloat16", "got Double"]),
    "V dtype vs x": ("jd_shrink", lambda b, t: dict(V=[t["V"].half()]),
                     ["V_stacks[0] must have the dtype of x", "Float", "got Half"]),
    "V d_in": ("jd_shrink", lambda b, t: dict(V=[t["V"][:, :, 1:]]),
               ["V_stacks[0] must have shape", str(D), "got [6, 8, 23]"]),
    "V clusters": ("jd_shrink", lambda b, t: dict(V=[t["V"][1:]]),
                   ["V_stacks[0] must have shape [6, 8, 24]", "got [5, 8, 24]"]),
    "h dtype": ("jd_shrink", lambda b, t: dict(out=t["h"].half()),
                ["h must have dtype Float", "got Half"]),
    "h tokens": ("jd_shrink", lambda b, t: dict(out=t["h"][:, 1:]),
                 ["h must have shape [1, 11, 8]", "got [1, 10, 8]"]),
    "sorted dtype": ("jd_shrink", lambda b, t: dict(sorted=b.meta.sorted_indices().long()),
                     ["token_indices_sorted must have dtype Int", "got Long"]),
    "sorted range": ("jd_shrink", lambda b, t: dict(sorted=torch.full((T,), T, dtype=torch.int32)),
                     ["token_indices_sorted[0] = 11 is out of range [0, 11)"]),
    "sorted repeats": ("jd_shrink", lambda b, t: dict(sorted=torch.zeros(T, dtype=torch.int32)),
                       ["token_indices_sorted must be a permutation of [0, 11)", "token 0 appears twice"]),
    "cluster id range": ("jd_expand", lambda b, t: dict(cids=torch.where(
        b.meta.active_cluster_ids >= 0, torch.full_like(b.meta.active_cluster_ids, 99), b.meta.active_cluster_ids)),
        ["active_cluster_ids[0] = 99 is out of range", "[0, 6)"]),
    "cluster starts": ("jd_expand", lambda b, t: dict(cstart=b.meta.cluster_token_start.flip(0)),
                       ["cluster_token_start[", "non-decreasing"]),
    "U rank": ("jd_expand", lambda b, t: dict(U=[t["U"][:, :, :4]]),
               ["U_stacks[0] must have shape [6, *, 8]", "got [6, 24, 4]"]),
    "offset past y": ("jd_expand", lambda b, t: dict(offsets=[1]),
                      ["slice 0 writes columns [1, 25)", "within y's 24 columns"]),
    "offsets count": ("jd_expand", lambda b, t: dict(offsets=[0, 3]),
                      ["slice_offsets must have one entry per slice (1), got 2"]),
    "too many slices": ("jd_expand", lambda b, t: dict(U=[t["U"]] * 9, offsets=[0] * 9),
                        ["U_stacks must hold between 1 and 8 tensors", "got 9"]),
    "slot >= capacity": ("jd_core", lambda b, t: dict(mapping=torch.full((T,), b.A, dtype=torch.int32)),
                         ["token_lora_mapping[0] = 19 is out of range", "[0, 19)"]),
    "slot < -1": ("jd_core", lambda b, t: dict(mapping=torch.full((T,), -2, dtype=torch.int32)),
                  ["token_lora_mapping[0] = -2 is out of range", "expected -1 (no adapter)"]),
    "S shape": ("jd_core", lambda b, t: dict(S=[t["S"][:, :, :3]]),
                ["S_stacks[0] must have shape [19, 8, 8]", "got [19, 8, 3]"]),
    "S count": ("jd_core", lambda b, t: dict(S=[t["S"], t["S"]]),
                ["S_stacks must hold one tensor per slice of h (1), got 2"]),
    "fused slot": ("jd_fused", lambda b, t: dict(mapping=torch.full((T,), b.A + 3, dtype=torch.int32)),
                   ["jd_fused", "token_lora_mapping[0] = 22 is out of range"]),
    "fused y dtype": ("jd_fused", lambda b, t: dict(y=t["y"].bfloat16()),
                      ["y must have the dtype of x", "got BFloat16"]),
    "fused slice counts": ("jd_fused", lambda b, t: dict(S=[t["S"], t["S"]]),
                           ["one tensor per slice each, got 1, 2 and 1"]),
    "scales shape": ("lora_shrink", lambda b, t: dict(scales=t["scales"][:, 1:]),
                     ["scales must have shape [1, 19]", "got [1, 18]"]),
    "scales dtype": ("lora_shrink", lambda b, t: dict(scales=t["scales"].double()),
                     ["scales must have dtype Float", "got Double"]),
    "lora ids range": ("lora_expand", lambda b, t: dict(lids=torch.where(
        b.meta.active_lora_ids >= 0, torch.full_like(b.meta.active_lora_ids, 500), b.meta.active_lora_ids)),
        ["active_lora_ids[0] = 500 is out of range", "[0, 19)"]),
    "B d_out past y": ("lora_expand", lambda b, t: dict(B=[torch.randn(b.A, D + 1, R_)]),
                       ["slice 0 writes columns [0, 25)"]),
}


@pytest.mark.parametrize("case_name", list(BAD_CASES))
def test_bad_op_input(case, case_name):
    b, t = case
    op, over, patterns = BAD_CASES[case_name]
    expect_error(lambda: call(op, b, t, **over(b, t)), b, t, op, *patterns)


def test_bad_meta_inputs(case):
    b, t = case
    m = b.meta
    good = b.mapping.clone()
    bad_slot = good.clone()
    bad_slot[3] = b.A
    expect_error(lambda: m.build(bad_slot, b.adapter_cluster), b, t,
                 "token_lora_mapping[3] = 19 is out of range", "[0, 19)")
    bad_slot[3] = -5
    expect_error(lambda: m.build(bad_slot, b.adapter_cluster), b, t, "token_lora_mapping[3] = -5")
    bad_cluster = b.adapter_cluster.clone()
    bad_cluster[int(good[0])] = b.C
    expect_error(lambda: m.build(good, bad_cluster), b, t,
                 f"adapter_cluster[{int(good[0])}] = 6", "out of range", "[0, 6)")
    expect_error(lambda: m.build(good.long(), b.adapter_cluster), b, t,
                 "token_lora_mapping must have dtype Int", "got Long")
    expect_error(lambda: m.build(good, b.adapter_cluster[1:]), b, t,
                 "active_lora_ids must have shape [18]", "got [19]")
    expect_error(lambda: m.build(torch.zeros(m.max_tokens + 1, dtype=torch.int32), b.adapter_cluster), b, t,
                 "at most max_tokens=16")
    with pytest.raises(ValueError, match="max_clusters must be an int in"):
        jdlora_ops.BatchMeta.allocate(4, 4, 0)


def test_check_batch_values_matches_cpu_messages(case):
    b, _ = case
    bad = b.mapping.clone()
    bad[2] = b.A
    with pytest.raises(ValueError, match=r"token_lora_mapping\[2\] = 19 is out of range"):
        jdlora_ops.ops.check_batch_values(bad, b.adapter_cluster, b.C)


@cuda_only
def test_device_mismatch(case):
    b, t = case
    expect_error(lambda: call("jd_shrink", b, t, x=t["x"].cuda()), b, t,
                 "token_indices_sorted must be on device cuda:0 (the device of x), got cpu")
    expect_error(lambda: call("jd_fused", b, t, V=[t["V"].cuda()]), b, t,
                 "V_stacks[0] must be on device cpu (the device of x), got cuda:0")


def test_overlapping_slices_are_refused(case):
    b, t = case
    U2 = t["U"][:, :10]
    expect_error(lambda: call("jd_expand", b, t, U=[U2, U2], offsets=[0, 5], h=t["h"].expand(2, -1, -1)), b, t,
                 "slices 0 and 1 write overlapping columns [0, 10) and [5, 15)")


# The most tokens one call takes (params.h kMaxTokens): the kernels' int32
# token loops step by up to a block past the last token.
MAX_TOKENS = 2**31 - 2**16


@pytest.mark.parametrize("op", ["jd_shrink", "lora_shrink", "jd_core", "jd_expand", "lora_expand", "jd_fused",
                                "build_batch_meta"])
def test_too_many_tokens_are_refused_first(case, op):
    """A batch one token over the cap is refused before anything reads or
    sizes by its token count (the tensors are stride-0 views: no memory)."""
    b, t = case
    big = MAX_TOKENS + 1
    if op == "build_batch_meta":
        m = b.meta
        mapping = m.token_lora_mapping[:1].expand(big)
        fn = lambda: torch.ops.jdlora_ops.build_batch_meta(  # noqa: E731
            mapping, b.adapter_cluster, m.token_indices_sorted, m.active_cluster_ids, m.num_tokens_per_cluster,
            m.cluster_token_start, m.active_lora_ids, m.num_tokens_per_lora, m.lora_token_start_loc,
            m.no_lora_flag)
    else:
        over = {
            "jd_shrink": dict(x=t["x"][:1].expand(big, D)),
            "lora_shrink": dict(x=t["x"][:1].expand(big, D)),
            "jd_fused": dict(x=t["x"][:1].expand(big, D)),
            "jd_core": dict(h=t["h"][:, :1].expand(1, big, R_)),
            "jd_expand": dict(y=t["y"][:1].expand(big, D)),
            "lora_expand": dict(y=t["y"][:1].expand(big, D)),
        }[op]
        fn = lambda: call(op, b, t, **over)  # noqa: E731
    expect_error(fn, b, t, op, f"num_tokens = {big}", f"exceeds the most one call takes, {MAX_TOKENS}")


def _overlapping(base, shape, strides):
    return torch.as_strided(base, shape, strides)


@pytest.mark.parametrize("op,arg,make", [
    ("jd_expand", "y", lambda t: t["y"][:1].expand(T, D)),
    ("lora_expand", "y", lambda t: t["y"][:1].expand(T, D)),
    ("jd_fused", "y", lambda t: _overlapping(t["y"], (T, D), (D // 2, 1))),
    ("jd_shrink", "out", lambda t: t["h"][:, :1].expand(1, T, R_)),
    ("lora_shrink", "out", lambda t: _overlapping(t["h"], (1, T, R_), (T * R_, R_ - 3, 1))),
    ("jd_core", "out", lambda t: t["h"][:, :1].expand(1, T, R_)),
], ids=["jd_expand-expanded-y", "lora_expand-expanded-y", "jd_fused-overlapping-rows", "jd_shrink-expanded-h",
        "lora_shrink-overlapping-h", "jd_core-expanded-g"])
def test_self_overlapping_outputs_are_refused(case, op, arg, make):
    """Two indices of an output on one element would race in the kernels'
    read-modify-writes: such views are refused, naming the output."""
    b, t = case
    name = {"out": {"jd_core": "g"}.get(op, "h"), "y": "y"}[arg]
    expect_error(lambda: call(op, b, t, **{arg: make(t)}), b, t, op,
                 f"{name} is written in place, so no two of its elements may share memory")
