"""GPU sweep: the shared-basis (JD) path against the uncompressed multi-LoRA
baseline and the base GEMM of the same layer.

    python bench/gpu_sweep.py --out DIR [--budget-s 240]
    python bench/gpu_sweep.py --out DIR --smoke        # tiny, any device (CPU too)

Writes DIR/gpu_sweep.json (rewritten after every case, so a run stopped early
still leaves its numbers), DIR/gpu_sweep.md and DIR/gpu_sweep.png.

What is measured, per case (shape, rank r, tokens T, adapters, popularity,
clusters):

* jd_fused (one launch), jd_staged (jd_shrink + jd_core + jd_expand), lora
  (lora_shrink + lora_expand: the uncompressed baseline serving the same
  adapters), build_batch_meta, and the base GEMM y = x W^T through torch;
* the median time in microseconds: CUDA events around single calls, or, for
  calls under 20 us, around replays of a CUDA graph holding many calls (so
  launch gaps do not count);
* inputs rotated between calls so that the L2 cache does not flatter: several
  copies of the JD tables, disjoint adapter-slot and cluster ranges per input
  set for every path, fresh activations and batch metadata per set, several
  copies of the base weight;
* achieved GB/s against the minimal bytes of each path (every input read
  once, y read and written once, intermediates h and g written and read once
  where a path has them);
* ratios: JD(n adapters) / JD(1 adapter), JD / baseline at the same adapters,
  (base GEMM + JD) / base GEMM, where JD is the faster of jd_fused and
  jd_staged;
* quantized tables (int8 rows, 4-bit groups of 64 along d_in and the whole
  rank along r, scales in bf16): jd_fused and the baseline on the same
  adapters with every V, U, A and B quantized, their time against the bf16
  tables' and their GB/s against their own minimal bytes, and the check that
  they compute what the bf16 path computes on the dequantised tables.

The card's copy bandwidth (a device-to-device copy, bytes read plus written)
and bf16 matrix rate are measured first and recorded as the ceilings. The two
speed bars of the H200 are checked at the end (see BARS below).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import jdlora_ops  # noqa: E402
from jdlora_ops.quant import QuantizedTable, quantize  # noqa: E402

# The quantized formats timed beside the bf16 tables: (format, 4-bit group size).
QUANT_FORMATS = (("int8", None), ("int4", 64))

GRAPH_BELOW_US = 20.0
BAR_BANDWIDTH_FRACTION = 0.70
BAR_VS_BASELINE = 3.0
BAR_VS_SINGLE = 2.0
BAR_INVARIANT_COST = 1.10

BARS = (
    f"(1) at T >= 1024 the best JD path reaches >= {BAR_BANDWIDTH_FRACTION:.0%} of the measured copy "
    f"bandwidth against the minimal bytes of the fused computation; (2) at T = 256 with 1000 adapters "
    f"over 25 clusters the best JD path is >= {BAR_VS_BASELINE:g}x faster than the baseline serving the "
    f"same adapters and takes <= {BAR_VS_SINGLE:g}x the time of the JD path with a single adapter. "
    f"(3) batch-invariant mode costs < {BAR_INVARIANT_COST - 1:.0%} on every path and case "
    f"(time with the mode on / off)."
)


@dataclass(frozen=True)
class Shape:
    name: str
    d_in: int
    widths: tuple[int, ...]

    @property
    def d_out(self) -> int:
        return sum(self.widths)

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for w in self.widths:
            out.append(acc)
            acc += w
        return out


@dataclass(frozen=True)
class Case:
    shape: Shape
    r: int
    T: int
    adapters: int
    popularity: str
    clusters: int

    def key(self) -> str:
        return (f"{self.shape.name}/r{self.r}/T{self.T}/A{self.adapters}/{self.popularity}/C{self.clusters}")


@dataclass
class Config:
    shapes: list[Shape]
    ranks: list[int]
    tokens: list[int]
    adapters: list[int]
    popularity: list[str]
    clusters_main: int
    clusters_extra: list[int]
    extra_tokens: list[int]
    max_adapters: int
    max_clusters: int
    dtype: torch.dtype
    reps_target_ms: float
    smoke: bool = False


def full_config() -> Config:
    return Config(
        shapes=[Shape("q_proj", 4096, (4096,)), Shape("qkv", 4096, (4096, 1024, 1024))],
        ranks=[16, 64],
        tokens=[1, 16, 64, 256, 1024, 4096],
        adapters=[1, 64, 1000, 4000],
        popularity=["uniform", "zipf"],
        clusters_main=25,
        clusters_extra=[1, 64],
        extra_tokens=[256, 4096],
        max_adapters=4000,
        max_clusters=64,
        dtype=torch.bfloat16,
        reps_target_ms=25.0,
    )


def smoke_config() -> Config:
    return Config(
        shapes=[Shape("q_proj", 64, (64,)), Shape("qkv", 64, (64, 16, 16))],
        ranks=[16],
        tokens=[1, 16],
        adapters=[1, 8],
        popularity=["uniform", "zipf"],
        clusters_main=3,
        clusters_extra=[1],
        extra_tokens=[16],
        max_adapters=8,
        max_clusters=4,
        dtype=torch.bfloat16,
        reps_target_ms=2.0,
        smoke=True,
    )


def cases_in_priority(cfg: Config) -> list[Case]:
    """Cases the speed bars need first, then the rest of the grid, then other cluster counts."""
    main: list[Case] = []
    for sh in cfg.shapes:
        for r in cfg.ranks:
            for T in cfg.tokens:
                for A in cfg.adapters:
                    pops = ["identical"] if A == 1 else cfg.popularity
                    for pop in pops:
                        main.append(Case(sh, r, T, A, pop, 1 if A == 1 else min(cfg.clusters_main, A)))
    bar_T = 256 if not cfg.smoke else cfg.tokens[-1]
    bar_A = 1000 if not cfg.smoke else cfg.adapters[-1]

    def prio(c: Case) -> int:
        if c.T == bar_T and c.adapters in (1, bar_A):
            return 0
        if c.T >= 1024:
            return 1
        return 2

    main.sort(key=prio)
    extra = []
    for sh in cfg.shapes[:1]:
        for r in cfg.ranks[:1]:
            for T in cfg.extra_tokens:
                for C in cfg.clusters_extra:
                    extra.append(Case(sh, r, T, cfg.adapters[-2] if len(cfg.adapters) > 2 else cfg.adapters[-1],
                                      "uniform", C))
    return main + extra


# --- timing -----------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, nsets: int, device: torch.device, target_ms: float) -> dict:
    """Median microseconds of one call of fn(i) (i cycles over input sets)."""
    for i in range(nsets):
        fn(i)
    sync(device)
    if device.type != "cuda":
        times = []
        reps = 0
        t_end = time.perf_counter() + target_ms / 1e3
        while reps < 5 or (time.perf_counter() < t_end and reps < 200):
            t0 = time.perf_counter()
            fn(reps % nsets)
            times.append((time.perf_counter() - t0) * 1e6)
            reps += 1
        return {"us": statistics.median(times), "method": "wall", "reps": reps}

    # Rough cost of one call, to pick the method and the repetitions.
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n0 = max(nsets, 8)
    start.record()
    for i in range(n0):
        fn(i % nsets)
    stop.record()
    torch.cuda.synchronize()
    est_us = start.elapsed_time(stop) * 1e3 / n0

    if est_us < GRAPH_BELOW_US:
        inner = int(min(400, max(nsets, math.ceil(400.0 / max(est_us, 0.5)))))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(nsets):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(inner):
                fn(i % nsets)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        replays = int(min(50, max(10, target_ms * 1e3 / max(est_us * inner, 1.0))))
        for _ in range(replays):
            start.record()
            graph.replay()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) * 1e3 / inner)
        del graph
        return {"us": statistics.median(times), "method": f"graph x{inner}", "reps": replays}

    reps = int(min(100, max(10, target_ms * 1e3 / est_us)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for k, (a, b) in enumerate(events):
        a.record()
        fn(k % nsets)
        b.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) * 1e3 for a, b in events]
    return {"us": statistics.median(times), "method": "events", "reps": reps}


def measure_ceilings(device: torch.device, smoke: bool) -> dict:
    out = {}
    n = (1 << 22) if smoke else (1 << 30)  # bytes
    src = torch.empty(n, dtype=torch.uint8, device=device)
    src.random_()
    dst = torch.empty_like(src)
    t = time_calls(lambda i: dst.copy_(src), 1, device, 50.0)
    out["copy_GBps"] = 2 * n / (t["us"] * 1e-6) / 1e9
    out["copy_bytes"] = n
    del src, dst
    if device.type == "cuda":
        m = 8192
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        c = torch.empty(m, m, device=device, dtype=torch.bfloat16)
        t = time_calls(lambda i: torch.mm(a, b, out=c), 1, device, 100.0)
        out["bf16_mm_TFLOPs"] = 2 * m**3 / (t["us"] * 1e-6) / 1e12
        del a, b, c
        torch.cuda.empty_cache()
    return out


# --- tables and inputs ------------------------------------------------------------


class Tables:
    """Weights of one (shape, r) at full capacity: several copies of the JD
    tables, one of the baseline factors, a few copies of the base weight."""

    def __init__(self, cfg: Config, shape: Shape, r: int, device: torch.device, l2_bytes: int):
        dt = cfg.dtype
        C, A, d = cfg.max_clusters, cfg.max_adapters, shape.d_in
        el = torch.finfo(dt).bits // 8

        def rnd(*s, scale=1.0):
            return torch.randn(*s, device=device, dtype=torch.float32).mul_(scale).to(dt)

        jd_copy = el * (len(shape.widths) * (C * r * d + A * r * r) + C * shape.d_out * r)
        self.jd_copies = int(min(16, max(1, math.ceil(4 * l2_bytes / jd_copy))))
        self.max_clusters, self.max_adapters = C, A
        self.V = [[rnd(C, r, d, scale=d**-0.5) for _ in shape.widths] for _ in range(self.jd_copies)]
        self.S = [[rnd(A, r, r, scale=r**-0.5) for _ in shape.widths] for _ in range(self.jd_copies)]
        self.U = [[rnd(C, w, r, scale=r**-0.5) for w in shape.widths] for _ in range(self.jd_copies)]
        self.A = [rnd(A, r, d, scale=d**-0.5) for _ in shape.widths]
        self.B = [rnd(A, w, r, scale=r**-0.5) for w in shape.widths]
        self.scales = (torch.rand(len(shape.widths), A, device=device) + 0.5)
        # Quantized copies of the same tables (as many JD copies, so the rotation reads as many bytes apart).
        self.quant = {qf: {"V": [[quantize(v, qf, gs) for v in vs] for vs in self.V],
                           "U": [[quantize(u, qf, gs) for u in us] for us in self.U],
                           "A": [quantize(a, qf, gs) for a in self.A],
                           "B": [quantize(b, qf, gs) for b in self.B]}
                      for qf, gs in QUANT_FORMATS}
        base_copy = el * shape.d_out * d
        self.base_copies = int(min(8, max(1, math.ceil(4 * l2_bytes / base_copy))))
        self.W = [rnd(shape.d_out, d, scale=d**-0.5) for _ in range(self.base_copies)]


def popularity_mapping(pop: str, T: int, A: int, gen: torch.Generator) -> torch.Tensor:
    """Adapter (local index in [0, A)) of each token; every token has one."""
    if pop == "identical" or A == 1:
        return torch.zeros(T, dtype=torch.int64)
    if pop == "uniform":
        return torch.randint(A, (T,), generator=gen)
    if pop == "zipf":
        p = torch.arange(1, A + 1, dtype=torch.float64).pow(-1.1)
        draw = torch.multinomial(p / p.sum(), T, replacement=True, generator=gen)
        return torch.randperm(A, generator=gen)[draw]
    raise ValueError(pop)


@dataclass
class InputSet:
    x: torch.Tensor
    y: torch.Tensor
    h: torch.Tensor
    g: torch.Tensor
    hl: torch.Tensor
    meta: jdlora_ops.BatchMeta
    mapping: torch.Tensor
    adapter_cluster: torch.Tensor
    jd: int  # which copy of the JD tables
    active_adapters: int
    active_clusters: int


def make_sets(cfg: Config, case: Case, tables: Tables, device: torch.device, nsets: int, seed: int):
    sh, T, A, C = case.shape, case.T, case.adapters, case.clusters
    gen = torch.Generator().manual_seed(seed)
    dt = cfg.dtype
    sets = []
    # Disjoint slot and cluster ranges per set (as far as capacity allows), so
    # successive calls read different weights.
    slot_ranges = max(1, cfg.max_adapters // A)
    cluster_ranges = max(1, cfg.max_clusters // C)
    local_cluster = torch.randint(C, (A,), generator=gen)
    local_cluster[: min(A, C)] = torch.arange(min(A, C))  # every cluster has an adapter
    for i in range(nsets):
        slot0 = (i % slot_ranges) * A
        clu0 = (i % cluster_ranges) * C
        local = popularity_mapping(case.popularity, T, A, gen)
        mapping = (local + slot0).to(torch.int32)
        ac = torch.zeros(cfg.max_adapters, dtype=torch.int32)
        ac[slot0 : slot0 + A] = (local_cluster + clu0).to(torch.int32)
        mapping_d, ac_d = mapping.to(device), ac.to(device)
        meta = jdlora_ops.BatchMeta.allocate(T, cfg.max_adapters, cfg.max_clusters, device)
        meta.build(mapping_d, ac_d)
        S = len(sh.widths)
        sets.append(InputSet(
            x=torch.randn(T, sh.d_in, device=device, dtype=torch.float32).to(dt),
            y=torch.randn(T, sh.d_out, device=device, dtype=torch.float32).to(dt),
            h=torch.empty(S, T, case.r, device=device), g=torch.empty(S, T, case.r, device=device),
            hl=torch.empty(S, T, case.r, device=device), meta=meta, mapping=mapping_d, adapter_cluster=ac_d,
            jd=i % tables.jd_copies,
            active_adapters=int(torch.unique(local).numel()),
            active_clusters=int(torch.unique(local_cluster[torch.unique(local)]).numel()),
        ))
    sync(device)
    return sets


def _table_bytes(t) -> int:
    return t.nbytes if isinstance(t, QuantizedTable) else t.numel() * t.element_size()


def minimal_bytes(case: Case, el: int, n_a: float, n_c: float, tables: "Tables | None" = None) -> dict:
    """Each path's minimal bytes; with ``tables``, the quantized paths' too (the bytes per cluster or adapter of
    the stored values and scales, every table read once)."""
    sh, T, r = case.shape, case.T, case.r
    S = len(sh.widths)
    io = T * sh.d_in * el + 2 * T * sh.d_out * el + 2 * T * 4  # x, y read+write, mapping + sorted order
    jd_w = n_c * (S * r * sh.d_in + sh.d_out * r) * el + n_a * S * r * r * el
    lora_w = n_a * (S * r * sh.d_in + sh.d_out * r) * el
    inter = S * T * r * 4
    out = {
        "jd_fused": io + jd_w,
        "jd_staged": io + jd_w + 4 * inter,  # h written, read; g written, read
        "lora": io + lora_w + 2 * inter,
        "base_gemm": T * sh.d_in * el + sh.d_out * sh.d_in * el + T * sh.d_out * el,
    }
    if tables is not None:
        for qf, q in tables.quant.items():
            per_c = sum(_table_bytes(t) for t in q["V"][0] + q["U"][0]) / tables.max_clusters
            per_a = sum(_table_bytes(t) for t in q["A"] + q["B"]) / tables.max_adapters
            out[f"jd_fused_{qf}"] = io + n_c * per_c + n_a * S * r * r * el
            out[f"lora_{qf}"] = io + n_a * per_a + 2 * inter
    return out


# --- the sweep ---------------------------------------------------------------------


@dataclass
class Result:
    case: dict
    us: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)
    GBps: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    active_adapters: float = 0.0
    active_clusters: float = 0.0
    tile: str = ""


def run_case(cfg: Config, case: Case, tables: Tables, device: torch.device, base_cache: dict) -> Result:
    sh = case.shape
    nsets = max(4, tables.jd_copies) if not cfg.smoke else 2
    sets = make_sets(cfg, case, tables, device, nsets, seed=zlib.crc32(case.key().encode()))
    offs = sh.offsets
    el = torch.finfo(cfg.dtype).bits // 8
    res = Result(case={"shape": sh.name, "d_in": sh.d_in, "widths": list(sh.widths), "r": case.r, "T": case.T,
                       "adapters": case.adapters, "popularity": case.popularity, "clusters": case.clusters})
    res.active_adapters = statistics.mean(s.active_adapters for s in sets)
    res.active_clusters = statistics.mean(s.active_clusters for s in sets)
    res.tile = "prefill" if case.T >= 1024 else "decode"

    def V(s): return tables.V[s.jd]
    def Sg(s): return tables.S[s.jd]
    def U(s): return tables.U[s.jd]

    def fused(i):
        s = sets[i]
        jdlora_ops.jd_fused(s.x, V(s), Sg(s), U(s), s.meta, s.y, offs)

    def staged(i):
        s = sets[i]
        jdlora_ops.jd_shrink(s.x, V(s), s.meta, out=s.h)
        jdlora_ops.jd_core(s.h, Sg(s), s.meta, out=s.g)
        jdlora_ops.jd_expand(s.g, U(s), s.meta, s.y, offs)

    def lora(i):
        s = sets[i]
        jdlora_ops.lora_shrink(s.x, tables.A, tables.scales, s.meta, out=s.hl)
        jdlora_ops.lora_expand(s.hl, tables.B, s.meta, s.y, offs)

    scratch = jdlora_ops.BatchMeta.allocate(case.T, cfg.max_adapters, cfg.max_clusters, device)

    def meta_build(i):
        s = sets[i]
        scratch.build(s.mapping, s.adapter_cluster)

    # Sanity before timing: fused and staged compute the same update.
    s0 = sets[0]
    y0 = s0.y.clone()
    fused(0)
    yf = s0.y.clone()
    s0.y.copy_(y0)
    staged(0)
    delta = (s0.y.float() - y0.float()).norm().item()
    res.check["fused_vs_staged_rel"] = (yf.float() - s0.y.float()).norm().item() / max(delta, 1e-30)
    res.check["finite"] = bool(torch.isfinite(yf).all().item())

    def quant_paths():
        for qf, q in tables.quant.items():
            def qfused(i, q=q):
                s = sets[i]
                jdlora_ops.jd_fused(s.x, q["V"][s.jd], Sg(s), q["U"][s.jd], s.meta, s.y, offs)

            def qlora(i, q=q):
                s = sets[i]
                jdlora_ops.lora_shrink(s.x, q["A"], tables.scales, s.meta, out=s.hl)
                jdlora_ops.lora_expand(s.hl, q["B"], s.meta, s.y, offs)

            yield qf, q, qfused, qlora

    # The quantized paths compute what the bf16 path computes on their dequantised tables.
    for qf, q, qfused, _ in quant_paths():
        s0.y.copy_(y0)
        qfused(0)
        yq = s0.y.clone()
        s0.y.copy_(y0)
        jdlora_ops.jd_fused(s0.x, [t.dequantize(cfg.dtype) for t in q["V"][s0.jd]], Sg(s0),
                            [t.dequantize(cfg.dtype) for t in q["U"][s0.jd]], s0.meta, s0.y, offs)
        res.check[f"{qf}_vs_dequantised_rel"] = (yq.float() - s0.y.float()).norm().item() / max(delta, 1e-30)
    s0.y.copy_(y0)

    paths = (("jd_fused", fused), ("jd_staged", staged), ("lora", lora))
    for qf, _, qfused, qlora in quant_paths():
        paths += ((f"jd_fused_{qf}", qfused), (f"lora_{qf}", qlora))
    for name, fn in paths + (("build_batch_meta", meta_build),):
        t = time_calls(fn, nsets, device, cfg.reps_target_ms)
        res.us[name] = t["us"]
        res.method[name] = t["method"]
    # The same calls in batch-invariant mode (graphs captured inside it keep
    # its launch decisions); its cost is the time ratio, bar 3.
    with jdlora_ops.batch_invariant_mode():
        for name, fn in paths:
            t = time_calls(fn, nsets, device, cfg.reps_target_ms)
            res.us[name + "_invariant"] = t["us"]
            res.method[name + "_invariant"] = t["method"]
            res.ratios[name + "_invariant_cost"] = t["us"] / res.us[name]

    if (sh.name, case.T) not in base_cache:  # the base GEMM does not depend on r or the adapters
        ybase = [torch.empty(case.T, sh.d_out, device=device, dtype=cfg.dtype) for _ in range(nsets)]

        def base(i):
            torch.mm(sets[i].x, tables.W[i % tables.base_copies].t(), out=ybase[i])

        t = time_calls(base, nsets, device, cfg.reps_target_ms)
        base_cache[(sh.name, case.T)] = (t["us"], t["method"])
        del ybase
    res.us["base_gemm"], res.method["base_gemm"] = base_cache[(sh.name, case.T)]

    res.bytes = minimal_bytes(case, el, res.active_adapters, res.active_clusters, tables)
    for k in res.bytes:
        res.GBps[k] = res.bytes[k] / (res.us[k] * 1e-6) / 1e9
    for qf in tables.quant:
        res.ratios[f"jd_fused_{qf}_vs_bf16"] = res.us[f"jd_fused_{qf}"] / res.us["jd_fused"]
        res.ratios[f"lora_{qf}_vs_bf16"] = res.us[f"lora_{qf}"] / res.us["lora"]
    jd = min(res.us["jd_fused"], res.us["jd_staged"])
    res.us["jd_best"] = jd
    res.GBps["jd_best_vs_fused_bytes"] = res.bytes["jd_fused"] / (jd * 1e-6) / 1e9
    res.ratios["jd_vs_lora"] = jd / res.us["lora"]
    res.ratios["lora_speedup_of_jd"] = res.us["lora"] / jd
    res.ratios["base_plus_jd_vs_base"] = (res.us["base_gemm"] + jd) / res.us["base_gemm"]
    res.ratios["base_plus_lora_vs_base"] = (res.us["base_gemm"] + res.us["lora"]) / res.us["base_gemm"]
    del sets, scratch
    return res


def fill_single_adapter_ratios(results: list[Result]) -> None:
    single = {}
    for r in results:
        c = r.case
        if c["adapters"] == 1:
            single[(c["shape"], c["r"], c["T"])] = r.us["jd_best"], r.us["lora"]
    for r in results:
        c = r.case
        one = single.get((c["shape"], c["r"], c["T"]))
        if one:
            r.ratios["jd_vs_jd_single"] = r.us["jd_best"] / one[0]
            r.ratios["lora_vs_lora_single"] = r.us["lora"] / one[1]


def check_bars(results: list[Result], ceilings: dict, smoke: bool) -> dict:
    copy = ceilings.get("copy_GBps", float("nan"))
    bw = []
    for r in results:
        c = r.case
        if c["T"] >= 1024:
            frac = r.GBps["jd_best_vs_fused_bytes"] / copy
            bw.append({"case": c, "fraction_of_copy_bw": frac, "pass": frac >= BAR_BANDWIDTH_FRACTION})
    multi = []
    for r in results:
        c = r.case
        if c["T"] == 256 and c["adapters"] == 1000 and c["clusters"] == 25:
            vs_lora = r.ratios["lora_speedup_of_jd"]
            vs_single = r.ratios.get("jd_vs_jd_single", float("nan"))
            multi.append({"case": c, "lora_over_jd": vs_lora, "jd_over_jd_single": vs_single,
                          "pass": vs_lora >= BAR_VS_BASELINE and vs_single <= BAR_VS_SINGLE})
    invariant = []
    for r in results:
        worst = max(v for k, v in r.ratios.items() if k.endswith("_invariant_cost"))
        invariant.append({"case": r.case, "worst_cost": worst, "pass": worst < BAR_INVARIANT_COST})
    return {
        "definition": BARS,
        "batch_invariant": invariant,
        "batch_invariant_pass": bool(invariant) and all(b["pass"] for b in invariant),
        "bandwidth": bw,
        "bandwidth_pass": bool(bw) and all(b["pass"] for b in bw),
        "many_adapters": multi,
        "many_adapters_pass": bool(multi) and all(b["pass"] for b in multi),
        "applies": not smoke,
    }


def environment(device: torch.device) -> dict:
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
        "build_info": jdlora_ops.build_info(),
        "simple_only": os.environ.get("JDLORA_CUDA_SIMPLE", ""),
    }
    commit = os.environ.get("JDLORA_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                    timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - no git on the machine: the commit stays unknown
            commit = ""
    env["commit"] = commit or "unknown"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sms=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", 0),
                   memory_bytes=p.total_memory, cc=f"{p.major}.{p.minor}")
    return env


# --- reports -----------------------------------------------------------------------


def fmt(v, nd=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def markdown(doc: dict) -> str:
    env, ceil, results, bars = doc["environment"], doc["ceilings"], doc["results"], doc["bars"]
    lines = ["# GPU sweep: JD path vs uncompressed multi-LoRA baseline", ""]
    lines.append(f"- device: {env.get('gpu', env['device'])} (cc {env.get('cc', '-')}, {env.get('sms', '-')} SMs), "
                 f"torch {env['torch']}, commit {env['commit']}, {env['date']}")
    lines.append(f"- measured copy bandwidth {fmt(ceil.get('copy_GBps'), 0)} GB/s (read + write); "
                 f"bf16 matmul {fmt(ceil.get('bf16_mm_TFLOPs'), 0)} TFLOP/s")
    if doc.get("truncated"):
        lines.append(f"- budget reached: {len(doc['skipped'])} cases not run")
    lines.append(f"- bars: {bars['definition']}")
    if bars["applies"]:
        lines.append(f"- bar 1 (bandwidth at T >= 1024): {'PASS' if bars['bandwidth_pass'] else 'FAIL'}; "
                     f"bar 2 (1000 adapters at T = 256): {'PASS' if bars['many_adapters_pass'] else 'FAIL'}; "
                     f"bar 3 (batch-invariant cost): {'PASS' if bars['batch_invariant_pass'] else 'FAIL'}")
    else:
        lines.append("- smoke run: bars not applicable")
    lines += ["", "## Bar 2: T = 256, 1000 adapters, 25 clusters", "",
              "| shape | r | popularity | JD us | JD(1) us | lora us | lora/JD | JD/JD(1) | pass |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b in bars["many_adapters"]:
        c = b["case"]
        r = next(x for x in results if x["case"] == c)
        one = r["us"]["jd_best"] / r["ratios"].get("jd_vs_jd_single", float("nan"))
        lines.append(f"| {c['shape']} | {c['r']} | {c['popularity']} | {fmt(r['us']['jd_best'])} | {fmt(one)} | "
                     f"{fmt(r['us']['lora'])} | {fmt(b['lora_over_jd'], 2)} | {fmt(b['jd_over_jd_single'], 2)} | "
                     f"{'yes' if b['pass'] else 'NO'} |")
    lines += ["", "## Bar 1: fraction of copy bandwidth at T >= 1024 (best JD path, fused minimal bytes)", "",
              "| shape | r | T | adapters | pop | C | JD us | GB/s | fraction | pass |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for b in bars["bandwidth"]:
        c = b["case"]
        r = next(x for x in results if x["case"] == c)
        lines.append(f"| {c['shape']} | {c['r']} | {c['T']} | {c['adapters']} | {c['popularity']} | {c['clusters']} | "
                     f"{fmt(r['us']['jd_best'])} | {fmt(r['GBps']['jd_best_vs_fused_bytes'], 0)} | "
                     f"{fmt(b['fraction_of_copy_bw'], 2)} | {'yes' if b['pass'] else 'NO'} |")
    lines += ["", "## Bar 3: batch-invariant mode, time with the mode on / off", "",
              "| shape | r | T | adapters | pop | C | fused | staged | lora | pass |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for b in bars["batch_invariant"]:
        c = b["case"]
        ra = next(x for x in results if x["case"] == c)["ratios"]
        lines.append(f"| {c['shape']} | {c['r']} | {c['T']} | {c['adapters']} | {c['popularity']} | {c['clusters']} | "
                     f"{fmt(ra['jd_fused_invariant_cost'], 2)} | {fmt(ra['jd_staged_invariant_cost'], 2)} | "
                     f"{fmt(ra['lora_invariant_cost'], 2)} | {'yes' if b['pass'] else 'NO'} |")
    quant = sorted({k[len("jd_fused_"):] for r in results for k in r["us"]
                    if k.startswith("jd_fused_") and not k.endswith("_invariant")})
    if quant:
        lines += ["", "## Quantized tables: time against the bf16 tables' (GB/s against their own minimal bytes)", "",
                  "| shape | r | T | A | pop | C | " + " | ".join(
                      f"fused {f} us | fused {f}/bf16 | fused {f} GB/s | lora {f}/bf16 | {f} check" for f in quant) + " |",
                  "|---|---|---|---|---|---|" + "---|---|---|---|---|" * len(quant)]
        for r in results:
            c, us, gb, ra = r["case"], r["us"], r["GBps"], r["ratios"]
            cells = []
            for f in quant:
                cells += [fmt(us.get(f"jd_fused_{f}")), fmt(ra.get(f"jd_fused_{f}_vs_bf16"), 2),
                          fmt(gb.get(f"jd_fused_{f}"), 0), fmt(ra.get(f"lora_{f}_vs_bf16"), 2),
                          f"{r['check'].get(f'{f}_vs_dequantised_rel', float('nan')):.1e}"]
            lines.append(f"| {c['shape']} | {c['r']} | {c['T']} | {c['adapters']} | {c['popularity']} | "
                         f"{c['clusters']} | " + " | ".join(cells) + " |")
    lines += ["", "## All cases (median us; GB/s against each path's minimal bytes)", "",
              "| shape | r | T | A | pop | C | fused us | staged us | lora us | base us | meta us | fused GB/s | "
              "lora GB/s | JD/lora | JD/JD(1) | (base+JD)/base | fused~staged |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, us, gb, ra = r["case"], r["us"], r["GBps"], r["ratios"]
        lines.append(
            f"| {c['shape']} | {c['r']} | {c['T']} | {c['adapters']} | {c['popularity']} | {c['clusters']} | "
            f"{fmt(us['jd_fused'])} | {fmt(us['jd_staged'])} | {fmt(us['lora'])} | {fmt(us['base_gemm'])} | "
            f"{fmt(us['build_batch_meta'])} | {fmt(gb['jd_fused'], 0)} | {fmt(gb['lora'], 0)} | "
            f"{fmt(ra['jd_vs_lora'], 2)} | {fmt(ra.get('jd_vs_jd_single'), 2)} | {fmt(ra['base_plus_jd_vs_base'], 2)} | "
            f"{r['check']['fused_vs_staged_rel']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    results = doc["results"]
    panels = sorted({(r["case"]["shape"], r["case"]["r"]) for r in results})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, rank) in zip(axes[0], panels):
        main_c = doc["config"]["clusters_main"]
        rows = [r for r in results if r["case"]["shape"] == shape and r["case"]["r"] == rank
                and r["case"]["popularity"] in ("identical", "uniform")
                and (r["case"]["adapters"] == 1 or r["case"]["clusters"] == min(main_c, r["case"]["adapters"]))]
        for T in sorted({r["case"]["T"] for r in rows}):
            pts = sorted((r["case"]["adapters"], r["us"]["jd_best"], r["us"]["lora"]) for r in rows
                         if r["case"]["T"] == T)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            line = ax.plot(xs, [p[1] for p in pts], marker="o", label=f"JD T={T}")[0]
            ax.plot(xs, [p[2] for p in pts], marker="x", linestyle="--", color=line.get_color(),
                    label=f"baseline T={T}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r["case"]["adapters"] for r in rows})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("adapters in the batch's table (uniform popularity)")
        ax.set_ylabel("median us per call")
        ax.set_title(f"{shape}, r={rank}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"JD (best of fused/staged) vs uncompressed baseline - {doc['environment'].get('gpu', 'cpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc: dict, out: str, final: bool) -> None:
    tmp = os.path.join(out, "gpu_sweep.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, "gpu_sweep.json"))
    if final:
        with open(os.path.join(out, "gpu_sweep.md"), "w") as f:
            f.write(markdown(doc))
        plot(doc, os.path.join(out, "gpu_sweep.png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new cases after this")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on the CPU too")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        print("gpu_sweep: no CUDA device; use --smoke for the CPU run", file=sys.stderr)
        return 2
    cfg = smoke_config() if args.smoke else full_config()
    torch.manual_seed(0)
    env = environment(device)
    print(f"gpu_sweep: {env.get('gpu', device)} torch {env['torch']} commit {env['commit']}", flush=True)
    ceilings = measure_ceilings(device, cfg.smoke)
    print(f"gpu_sweep: copy {ceilings['copy_GBps']:.0f} GB/s, mm {ceilings.get('bf16_mm_TFLOPs', 0):.0f} TFLOP/s",
          flush=True)
    l2 = env.get("l2_bytes") or (50 << 20)

    cases = cases_in_priority(cfg)
    doc = {"environment": env, "ceilings": ceilings,
           "config": {"dtype": str(cfg.dtype), "smoke": cfg.smoke, "graph_below_us": GRAPH_BELOW_US,
                      "clusters_main": cfg.clusters_main, "budget_s": args.budget_s},
           "results": [], "skipped": [], "truncated": False, "errors": []}
    tables_cache: dict = {}
    base_cache: dict = {}
    results: list[Result] = []
    for n, case in enumerate(cases):
        if time.time() - t_start > args.budget_s:
            doc["truncated"] = True
            doc["skipped"] = [c.key() for c in cases[n:]]
            print(f"gpu_sweep: budget of {args.budget_s:.0f} s reached, {len(cases) - n} cases left", flush=True)
            break
        tk = (case.shape, case.r)
        if tk not in tables_cache:
            tables_cache.clear()  # one (shape, r) at a time keeps memory bounded
            if device.type == "cuda":
                torch.cuda.empty_cache()
            tables_cache[tk] = Tables(cfg, case.shape, case.r, device, l2)
        try:
            res = run_case(cfg, case, tables_cache[tk], device, base_cache)
        except Exception as e:  # noqa: BLE001 - record and go on: one bad case must not lose the rest
            doc["errors"].append({"case": case.key(), "error": repr(e)})
            print(f"gpu_sweep: {case.key()} failed: {e!r}", flush=True)
            continue
        results.append(res)
        fill_single_adapter_ratios(results)
        doc["results"] = [asdict(r) for r in results]
        doc["elapsed_s"] = time.time() - t_start
        write_outputs(doc, args.out, final=False)
        us = res.us
        print(f"[{n + 1}/{len(cases)} {time.time() - t_start:5.0f}s] {case.key():38s} fused {us['jd_fused']:9.1f} "
              f"staged {us['jd_staged']:9.1f} lora {us['lora']:9.1f} base {us['base_gemm']:9.1f} us  "
              f"check {res.check['fused_vs_staged_rel']:.1e}", flush=True)

    doc["bars"] = check_bars(results, ceilings, cfg.smoke)
    doc["elapsed_s"] = time.time() - t_start
    write_outputs(doc, args.out, final=True)
    print(markdown(doc).split("## All cases")[0], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
