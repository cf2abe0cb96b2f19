"""A tour of every op on a realistic mixed batch, checked and timed.

Builds random resident tables for many adapter slots spread over clusters (a
fused q/k/v projection by default: 4096 -> 4096, 1024, 1024), a batch whose
tokens follow a Zipf popularity over the adapters (some tokens without one),
runs every op, checks each against the float64 reference and prints a table
of median times next to the plain-PyTorch (gather + bmm) composition.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import torch

import jdlora_ops
from jdlora_ops import reference as R
from jdlora_ops.torch_baseline import jd_fused_torch, lora_torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jdlora_ops.op_tour", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256, help="tokens in the batch (default 256)")
    p.add_argument("--adapters", type=int, default=1000, help="adapter slots (default 1000)")
    p.add_argument("--clusters", type=int, default=25, help="cluster slots (default 25)")
    p.add_argument("--rank", type=int, default=16, help="shared-basis rank r (default 16)")
    p.add_argument("--d-model", type=int, default=4096, help="input width and q width (default 4096)")
    p.add_argument("--kv-width", type=int, default=1024, help="k and v widths (default 1024; 0: q only)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per op (median reported)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _zipf_mapping(T: int, A: int, gen: torch.Generator) -> torch.Tensor:
    p = torch.arange(1, A + 1, dtype=torch.float64).pow(-1.0)
    slots = torch.randperm(A, generator=gen)[torch.multinomial(p / p.sum(), T, replacement=True, generator=gen)]
    none = torch.rand(T, generator=gen) < 0.05
    return torch.where(none, torch.full_like(slots, -1), slots).to(torch.int32)


def _median_us(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(torch.float64)
    return float((out.detach().cpu().to(torch.float64) - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    T, A, C, r, d = args.tokens, args.adapters, args.clusters, args.rank, args.d_model
    widths = [d] + ([args.kv_width, args.kv_width] if args.kv_width else [])
    offsets = [sum(widths[:i]) for i in range(len(widths))]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rnd(T, d)
    Vs = [rnd(C, r, d, scale=d**-0.5) for _ in widths]
    Ss = [rnd(A, r, r, scale=r**-0.5) for _ in widths]
    Us = [rnd(C, w, r, scale=r**-0.5) for w in widths]
    As = [rnd(A, r, d, scale=d**-0.5) for _ in widths]
    Bs = [rnd(A, w, r, scale=r**-0.5) for w in widths]
    scales = (torch.rand(A, generator=gen) + 0.5).to(device)
    y0 = rnd(T, sum(widths))
    mapping = _zipf_mapping(T, A, gen).to(device)
    adapter_cluster = torch.randint(C, (A,), generator=gen, dtype=torch.int32).to(device)
    meta = jdlora_ops.BatchMeta.allocate(T, A, C, device)
    meta.build(mapping, adapter_cluster)

    h = jdlora_ops.jd_shrink(x, Vs, meta)
    g = jdlora_ops.jd_core(h, Ss, meta)
    hl = jdlora_ops.lora_shrink(x, As, scales, meta)
    y_jd = R.jd_fused(x, Vs, Ss, Us, offsets, mapping, adapter_cluster, y0)
    y_lora = R.lora_expand(R.lora_shrink(x, As, scales, mapping), Bs, offsets, mapping, y0)

    rows: list[dict] = []

    def add(name: str, fn: Callable[[], object], err: float, baseline: Callable[[], object] | None = None):
        us = _median_us(fn, args.repeats, device)
        base = _median_us(baseline, args.repeats, device) if baseline else None
        rows.append({"op": name, "us": us, "rel_err": err, "torch_us": base})

    ref_meta = R.build_batch_meta(mapping, adapter_cluster, C)
    meta_ok = all(
        torch.equal((getattr(meta, k)[:T] if k == "token_indices_sorted" else getattr(meta, k)).cpu(), v)
        for k, v in ref_meta.items()
    )
    add("build_batch_meta", lambda: meta.build(mapping, adapter_cluster), 0.0 if meta_ok else float("inf"))
    add("jd_shrink", lambda: jdlora_ops.jd_shrink(x, Vs, meta, out=h),
        _rel_err(h, R.jd_shrink(x, Vs, mapping, adapter_cluster)))
    add("jd_core", lambda: jdlora_ops.jd_core(h, Ss, meta, out=g), _rel_err(g, R.jd_core(h, Ss, mapping)))
    y = y0.clone()
    jdlora_ops.jd_expand(g, Us, meta, y, offsets)
    add("jd_expand", lambda: jdlora_ops.jd_expand(g, Us, meta, y.copy_(y0), offsets), _rel_err(y, y_jd))
    y = y0.clone()
    jdlora_ops.jd_fused(x, Vs, Ss, Us, meta, y, offsets)
    y_t = y0.clone()
    add("jd_fused", lambda: jdlora_ops.jd_fused(x, Vs, Ss, Us, meta, y.copy_(y0), offsets), _rel_err(y, y_jd),
        lambda: jd_fused_torch(x, Vs, Ss, Us, offsets, mapping, adapter_cluster, y_t.copy_(y0)))
    add("lora_shrink", lambda: jdlora_ops.lora_shrink(x, As, scales, meta, out=hl),
        _rel_err(hl, R.lora_shrink(x, As, scales, mapping)))
    y = y0.clone()
    jdlora_ops.lora_expand(hl, Bs, meta, y, offsets)
    add("lora_expand", lambda: jdlora_ops.lora_expand(hl, Bs, meta, y.copy_(y0), offsets), _rel_err(y, y_lora))
    y_t = y0.clone()
    add("lora_shrink+expand", lambda: jdlora_ops.lora_expand(jdlora_ops.lora_shrink(x, As, scales, meta, out=hl),
                                                             Bs, meta, y.copy_(y0), offsets),
        _rel_err(y, y_lora),
        lambda: lora_torch(x, As, Bs, scales, offsets, mapping, y_t.copy_(y0)))
    return rows


_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dtype = _DTYPES[args.dtype]
    t0 = time.perf_counter()
    print(
        f"jdlora demo: {args.tokens} tokens, {args.adapters} adapter slots over {args.clusters} clusters, "
        f"r={args.rank}, d={args.d_model}, kv={args.kv_width}, {args.dtype} on {args.device} "
        f"({torch.get_num_threads() if not args.threads else args.threads} CPU threads)"
    )
    rows = run(args)
    ok = all(r["rel_err"] <= _TOL[dtype] for r in rows)
    print(f"{'op':<20} {'median us':>12} {'max rel err':>12} {'gather+bmm us':>14} {'speed-up':>9}")
    for r in rows:
        base = f"{r['torch_us']:>14.1f} {r['torch_us'] / r['us']:>8.1f}x" if r["torch_us"] else f"{'':>14} {'':>9}"
        flag = "" if r["rel_err"] <= _TOL[dtype] else "  MISMATCH"
        print(f"{r['op']:<20} {r['us']:>12.1f} {r['rel_err']:>12.2e} {base}{flag}")
    print(f"every op matches the float64 reference: {'yes' if ok else 'NO'} "
          f"(tolerance {_TOL[dtype]:.0e}); took {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
