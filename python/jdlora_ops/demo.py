"""The main job: 1000 LoRA adapters compressed jointly and served through a Llama model.

``jdlora demo`` (or ``python -m jdlora_ops.demo``) with no arguments:

1. builds a small Llama-architecture model from a config (random weights,
   nothing downloaded) and a realistic synthetic collection of 1000 rank-16
   LoRA adapters of its q/k/v/o projections (:mod:`jdlora_ops.synthetic`);
2. compresses the collection (JD-Full with clusters) and prints the
   reconstruction error and the memory before and after;
3. serves one stream of batches -- every round a prefill of ``--batch``
   prompts, each with its own adapter drawn from a Zipf popularity, then
   ``--decode`` decode steps with the KV cache -- four ways, the rounds of the
   four interleaved so that they share the machine's conditions:

   (a) the base model alone;
   (b) one adapter for every sequence (uncompressed, the baseline ops);
   (c) the 1000 adapters compressed (``jd_fused``), from an
       :class:`~jdlora_ops.serving.AdapterCache` holding every cluster and
       adapter core on the device;
   (d) the 1000 adapters uncompressed (``lora_shrink`` + ``lora_expand``)
       with the same device memory as (c): room for only a fraction of the
       adapters, the others swapped in from host memory on demand;

4. prints a table of tokens/s, the output error of (c) against (d) next to
   the reconstruction error, and writes ``<tag>.json``, ``<tag>.md`` and
   ``<tag>.png`` to ``--out``.

``--adapters DIR...`` serves real PEFT adapter directories instead (the
model's shapes are read off the adapters, or ``--base-model DIR`` loads a
local checkpoint). On a CUDA device the CUDA kernels are used.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["main", "run", "build_parser"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jdlora demo",
        description="Compress 1000 LoRA adapters jointly and serve them through a small Llama model, "
        "against the base model, one adapter, and the same adapters uncompressed.",
    )
    g = p.add_argument_group("adapters and model")
    g.add_argument("--adapters", nargs="+", metavar="DIR", help="PEFT adapter directories (default: synthetic)")
    g.add_argument("--base-model", metavar="DIR", help="local Hugging Face checkpoint (default: random weights)")
    g.add_argument("--num-adapters", type=int, default=1000, help="synthetic adapters (default 1000)")
    g.add_argument("--adapter-rank", type=int, default=16, help="rank of the synthetic adapters (default 16)")
    g.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    g.add_argument("--hidden", type=int, default=256, help="hidden width (default 256)")
    g.add_argument("--kv-width", type=int, default=128, help="k/v projection width, GQA (default 128)")
    g.add_argument("--head-dim", type=int, default=32, help="attention head width (default 32)")
    g.add_argument("--intermediate", type=int, default=688, help="MLP width (default 688)")
    g.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default 2048)")
    c = p.add_argument_group("compression")
    c.add_argument("--rank", type=int, default=16, help="rank r of the shared bases (default 16)")
    c.add_argument("--clusters", type=int, default=16, help="clusters K (default 16)")
    c.add_argument("--max-rounds", type=int, default=3, help="cluster fit/reassign rounds (default 3)")
    c.add_argument("--max-iter", type=int, default=30, help="JD iterations per cluster and module (default 30)")
    s = p.add_argument_group("serving")
    s.add_argument("--batch", type=int, default=32, help="sequences per batch (default 32)")
    s.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence (default 64)")
    s.add_argument("--decode", type=int, default=16, help="decode steps per batch (default 16)")
    s.add_argument("--rounds", type=int, default=10, help="timed batches per variant (default 10)")
    s.add_argument("--warmup", type=int, default=1, help="untimed batches per variant first (default 1)")
    s.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity (default 1.0)")
    s.add_argument("--uncompressed-slots", type=int, default=0,
                   help="device slots of (d) (default: what (c)'s table memory holds)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="model and table dtype (default float32 on the CPU, bfloat16 on CUDA)")
    s.add_argument("--threads", type=int, default=1,
                   help="CPU threads of torch (default 1: the small model gains little from more, and a single "
                   "thread is not stalled when other processes share the cores)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="jdlora_demo", help="output directory (default ./jdlora_demo)")
    o.add_argument("--tag", default="demo", help="output file stem (default demo)")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------- helpers
def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _commit() -> tuple[str | None, bool | None]:
    """``(git rev-parse HEAD, whether the working tree differs from it)`` of the source tree, if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        st = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=30)
        return head.stdout.strip() or None, (bool(st.stdout.strip()) if st.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def _machine(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


def _llama_config(args, specs=None):
    """A LlamaConfig from the arguments, or read off the adapted modules' shapes."""
    from transformers import LlamaConfig

    max_pos = args.prompt + args.decode + 8
    if specs is None:
        hidden, q_out, kv, layers, inter = args.hidden, args.hidden, args.kv_width, args.layers, args.intermediate
        head_dim = args.head_dim
    else:
        by_kind: dict[str, tuple[int, int]] = {}
        layers = 0
        for s in specs:
            if s.layer is None:
                raise SystemExit(f"jdlora demo: module {s.name} has no layer index; pass --base-model for this model")
            layers = max(layers, s.layer + 1)
            by_kind.setdefault(s.kind, (s.d_out, s.d_in))
        known = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        other = sorted(set(by_kind) - known)
        if other:
            raise SystemExit(
                f"jdlora demo: the adapters target {other[0]}, not a Llama projection; pass --base-model DIR"
            )

        def first(*options):
            return next((v for v in options if v), None)

        def dim(kind, side):  # side 0: d_out, 1: d_in
            return by_kind[kind][side] if kind in by_kind else None

        hidden = first(dim("q_proj", 1), dim("k_proj", 1), dim("v_proj", 1), dim("o_proj", 0), dim("gate_proj", 1),
                       dim("up_proj", 1), dim("down_proj", 0))
        q_out = first(dim("q_proj", 0), dim("o_proj", 1), hidden)
        kv = first(dim("k_proj", 0), dim("v_proj", 0), q_out)
        inter = first(dim("gate_proj", 0), dim("up_proj", 0), dim("down_proj", 1), args.intermediate)
        head_dim = next((h for h in (128, 64, 32, 16, 8) if q_out % h == 0 and kv % h == 0), 8)
    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=q_out // head_dim, num_key_value_heads=kv // head_dim, head_dim=head_dim,
        max_position_embeddings=max_pos, tie_word_embeddings=False,
    )


def _uncompressed_factors(collection, progress: bool) -> dict[str, dict]:
    """Every adapter's factors, ``name -> module -> (A, B with scaling folded in, 1.0)``."""
    names = collection.adapter_names
    out: dict[str, dict] = {n: {} for n in names}
    for spec in _progress(collection.modules, progress, desc="read adapters", unit="module", leave=False):
        f = collection.load_module(spec)
        for g in f.groups:
            for t, i in enumerate(g.index.tolist()):
                out[names[i]][spec.name] = (g.A[t], g.Bt[t].t(), 1.0)
    return out


@dataclass
class _Variant:
    key: str
    label: str
    served: object  # ServedModel or None (base model)
    adapters: object  # callable(round adapters) -> per-row adapter names
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def tokens_per_s(self, which: str = "total") -> float:
        if which == "prefill":
            return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0
        if which == "decode":
            return self.decode_tokens / self.decode_s if self.decode_s else 0.0
        t = self.prefill_s + self.decode_s
        return (self.prefill_tokens + self.decode_tokens) / t if t else 0.0


def _kv_cache_names(model) -> tuple[str, str]:
    """(forward argument, output field) of the KV cache: ``cache`` in newer transformers,
    ``past_key_values`` in older ones."""
    import inspect

    if "cache" in inspect.signature(model.forward).parameters:
        return "cache", "cache"
    return "past_key_values", "past_key_values"


def _serve_round(model, served, adapters, prompt_ids, decode_ids, device, keep_logits=False):
    """One batch: prefill then decode steps. Returns (prefill s, decode s, logits or None)."""
    import contextlib

    kv_arg, kv_out = _kv_cache_names(model)

    def ctx(n):
        return served.batch(adapters, n) if served is not None else contextlib.nullcontext()

    logits = []
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        with ctx(prompt_ids.shape[1]):
            out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
        pkv = getattr(out, kv_out)
        if keep_logits:
            logits.append(out.logits[:, -1].float().cpu())
        _sync(device)
        t1 = time.perf_counter()
        for j in range(decode_ids.shape[1]):
            with ctx(1):
                out = model(input_ids=decode_ids[:, j : j + 1], use_cache=True, **{kv_arg: pkv})
            pkv = getattr(out, kv_out)
            if keep_logits:
                logits.append(out.logits[:, -1].float().cpu())
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, (torch.cat(logits) if keep_logits else None)


# ------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict:
    """Run the demo; returns the results (also written to ``args.out``)."""
    from transformers import LlamaForCausalLM

    from .compress import compress
    from .serving import AdapterCache, table_bytes, wrap_model

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, int(args.threads)))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("jdlora demo: --device cuda but no CUDA device is available")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    progress = not args.no_progress
    torch.manual_seed(args.seed)
    _say(f"jdlora demo: device {device}, dtype {str(dtype).replace('torch.', '')}, "
         f"{torch.get_num_threads()} CPU threads")

    # ---- adapters and model
    t = time.perf_counter()
    if args.adapters:
        from .peft_io import PeftCollection

        collection = PeftCollection(args.adapters)
        source = f"{len(collection)} PEFT adapters"
    else:
        from .synthetic import SyntheticCollection, SyntheticSpec, llama_like_modules

        specs = llama_like_modules(args.layers, args.hidden, args.kv_width, _TARGETS)
        collection = SyntheticCollection(SyntheticSpec(
            num_adapters=args.num_adapters, modules=specs, ranks=(args.adapter_rank,),
            num_families=max(1, args.clusters), seed=args.seed, base_model="synthetic/llama-demo",
        ))
        source = f"{len(collection)} synthetic rank-{args.adapter_rank} adapters"
    specs = collection.modules
    if args.base_model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.base_model, local_files_only=True, torch_dtype=dtype)
    else:
        cfg = _llama_config(args, specs if args.adapters else None)
        model = LlamaForCausalLM(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    cfg = model.config
    n = len(collection)
    names = list(collection.adapter_names)
    _say(f"model: Llama, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
         f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters (random weights); "
         f"adapters: {source} on {len(specs)} modules")

    # ---- compression
    t = time.perf_counter()
    K = max(1, min(args.clusters, n))
    compressed = compress(
        collection, args.rank, method="full", num_clusters=K, max_rounds=args.max_rounds, max_iter=args.max_iter,
        seed=args.seed, device=device if device.type == "cuda" else "cpu", progress=progress,
    )
    compress_s = time.perf_counter() - t
    es = torch.empty(0, dtype=dtype).element_size()
    mem = compressed.memory(es)
    summ = compressed.summary()
    _say(f"compressed in {compress_s:.1f} s: JD-Full, r = {args.rank}, {compressed.num_clusters} clusters; "
         f"reconstruction error (relative squared) mean {summ['mean_rel_error']:.3f}, max {summ['max_rel_error']:.3f}")
    _say(f"adapter memory ({str(dtype).replace('torch.', '')}): {mem['bytes_before'] / 2**20:.1f} MiB before, "
         f"{mem['bytes_after'] / 2**20:.1f} MiB after ({mem['ratio']:.1f}x smaller)")

    # ---- caches: (c) everything resident; (d) same device bytes, uncompressed
    t = time.perf_counter()
    max_tokens = args.batch * max(args.prompt, 1)
    cache_c = AdapterCache(compressed, device=device, dtype=dtype)
    budget = cache_c.tables.nbytes()["total"]
    factors = _uncompressed_factors(collection, progress)
    ru = max((a.shape[0] for f in factors.values() for a, _b, _s in f.values()), default=1)
    per_adapter = table_bytes(specs, rank=0, max_clusters=0, max_adapters=0, max_uncompressed=1,
                              uncompressed_rank=ru, dtype=dtype)["uncompressed"]
    slots_d = args.uncompressed_slots or max(1, budget // per_adapter)
    over_budget = slots_d < min(args.batch, n)
    if over_budget:
        slots_d = min(args.batch, n)  # a batch's distinct adapters must fit at once
    cache_d = AdapterCache(None, modules=specs, max_uncompressed=int(slots_d), uncompressed_rank=ru,
                           device=device, dtype=dtype, base_model=compressed.metadata.get("base_model"))
    for name in _progress(names, progress, desc="host copies for (d)", unit="adapter", leave=False):
        cache_d.register_uncompressed(name, factors[name])
    # Popularity: a fixed random order of the adapters, Zipf weights over it.
    gen = torch.Generator().manual_seed(args.seed + 1)
    order = torch.randperm(n, generator=gen).tolist()
    popular = names[order[0]]
    cache_b = AdapterCache(None, modules=specs, max_uncompressed=1, uncompressed_rank=ru, device=device, dtype=dtype)
    cache_b.register_uncompressed(popular, factors[popular])
    del factors
    served_c = wrap_model(model, cache_c, max_tokens=max_tokens)
    served_d = served_c.for_cache(cache_d)
    served_b = served_c.for_cache(cache_b)
    setup_s = time.perf_counter() - t
    dev_mb = {k: c.tables.nbytes()["total"] / 2**20 for k, c in (("b", cache_b), ("c", cache_c), ("d", cache_d))}
    _say(f"device tables: (c) {dev_mb['c']:.2f} MiB for all {compressed.num_clusters} clusters and {n} adapters; "
         f"(d) {dev_mb['d']:.2f} MiB for {slots_d} of {n} uncompressed adapters"
         + (" (more than (c): one batch's adapters must fit)" if over_budget else ""))

    # ---- workload
    w = torch.arange(1, n + 1, dtype=torch.float64).pow(-args.zipf)
    rounds = []
    for _ in range(args.warmup + args.rounds):
        draw = torch.multinomial(w / w.sum(), args.batch, replacement=True, generator=gen).tolist()
        rounds.append((
            [names[order[d]] for d in draw],
            torch.randint(cfg.vocab_size, (args.batch, args.prompt), generator=gen).to(device),
            torch.randint(cfg.vocab_size, (args.batch, args.decode), generator=gen).to(device),
        ))
    variants = [
        _Variant("a", "(a) base model", None, lambda ad: ad),
        _Variant("b", "(b) one adapter", served_b, lambda ad: [popular] * len(ad)),
        _Variant("c", f"(c) {n} adapters, compressed", served_c, lambda ad: ad),
        _Variant("d", f"(d) {n} adapters, uncompressed", served_d, lambda ad: ad),
    ]

    # ---- output error: (c) against the exact adapters (d), on the first batch
    ad0, p0, d0 = rounds[0]
    _, _, la = _serve_round(model, None, ad0, p0, d0, device, keep_logits=True)
    _, _, lc = _serve_round(model, served_c, ad0, p0, d0, device, keep_logits=True)
    _, _, ld = _serve_round(model, served_d, ad0, p0, d0, device, keep_logits=True)
    effect = float((ld - la).double().norm())
    out_err = float((lc - ld).double().norm()) / effect if effect > 0 else 0.0
    _say(f"output error on one batch (logits of (c) vs the exact adapters (d), relative to the adapters' effect "
         f"||(d) - (a)||): {out_err:.3f} (squared {out_err ** 2:.3f}); reconstruction error mean "
         f"{summ['mean_rel_error']:.3f}")

    # ---- timed stream, rounds of the four variants interleaved
    it = _progress(range(args.warmup + args.rounds), progress, desc="serving", unit="round")
    for r in it:
        ad, pids, dids = rounds[r]
        if r == args.warmup:  # counters cover the timed batches only
            for c in (cache_b, cache_c, cache_d):
                c.reset_stats()
        for v in variants[r % 4:] + variants[: r % 4]:  # rotate who goes first
            tp, td, _ = _serve_round(model, v.served, v.adapters(ad), pids, dids, device)
            if r >= args.warmup:
                v.prefill_s += tp
                v.decode_s += td
                v.prefill_tokens += pids.numel()
                v.decode_tokens += dids.numel()
    served_c.unwrap()
    for v, c in zip(variants[1:], (cache_b, cache_c, cache_d)):
        st = c.state()
        v.extra = {"device_table_bytes": st["device"]["table_bytes"]["total"], "stats": st["stats"],
                   "capacity": st["device"]["capacity"]}

    # ---- report
    base_b = variants[1].tokens_per_s()
    rows = []
    for v in variants:
        s = v.extra.get("stats", {})
        rows.append({
            "variant": v.key, "label": v.label,
            "tokens_per_s": v.tokens_per_s(), "prefill_tokens_per_s": v.tokens_per_s("prefill"),
            "decode_tokens_per_s": v.tokens_per_s("decode"),
            "vs_one_adapter": v.tokens_per_s() / base_b if base_b else None,
            "seconds": v.prefill_s + v.decode_s,
            "device_table_mib": v.extra.get("device_table_bytes", 0) / 2**20,
            "host_to_device_mib": s.get("bytes_host_to_device", 0) / 2**20,
            "adapter_misses": s.get("adapter_misses", 0) + s.get("uncompressed_misses", 0),
            "evictions": s.get("adapter_evictions", 0) + s.get("uncompressed_evictions", 0),
            "stats": s,
        })
    rc, rd = rows[2]["tokens_per_s"], rows[3]["tokens_per_s"]
    bars = {
        "compressed_vs_one_adapter": rows[2]["vs_one_adapter"],
        "compressed_keeps_80pct": bool(rows[2]["vs_one_adapter"] and rows[2]["vs_one_adapter"] >= 0.8),
        "compressed_vs_uncompressed": rc / rd if rd else None,
        "compressed_faster_than_uncompressed": rc > rd,
    }
    total_s = time.perf_counter() - t_start
    commit, dirty = _commit()
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "worktree_modified": dirty,
        "machine": _machine(device),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k not in ("no_plot", "no_progress")},
        "model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size},
        "adapters": {"source": source, "count": n, "modules": len(specs), "popular": popular},
        "compression": {"seconds": compress_s, "clusters": compressed.num_clusters, "rank": args.rank,
                        "mean_rel_error": summ["mean_rel_error"], "max_rel_error": summ["max_rel_error"],
                        "memory": mem, "history": compressed.history},
        "output_error": {"relative": out_err, "relative_squared": out_err ** 2},
        "device_budget": {"compressed_table_bytes": budget, "uncompressed_slots": int(slots_d),
                          "uncompressed_bytes_per_adapter": per_adapter, "over_budget": over_budget},
        "workload": {"batch": args.batch, "prompt": args.prompt, "decode": args.decode, "rounds": args.rounds,
                     "warmup": args.warmup, "zipf": args.zipf,
                     "distinct_adapters_per_batch": sum(len(set(r[0])) for r in rounds) / len(rounds)},
        "rows": rows,
        "bars": bars,
        "seconds": {"setup": setup_s, "total": total_s},
    }
    _write(result, args)
    return result


def _table(result: dict) -> str:
    lines = [
        "| variant | tokens/s | prefill tokens/s | decode tokens/s | vs (b) | device tables MiB | host->device MiB | adapter loads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        vs = f"{r['vs_one_adapter']:.2f}" if r["vs_one_adapter"] is not None else "-"
        lines.append(
            f"| {r['label']} | {r['tokens_per_s']:.0f} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['decode_tokens_per_s']:.0f} | {vs} | {r['device_table_mib']:.2f} | "
            f"{r['host_to_device_mib']:.1f} | {r['adapter_misses']} |"
        )
    return "\n".join(lines)


def _markdown(result: dict) -> str:
    c, m, w, b = result["compression"], result["machine"], result["workload"], result["bars"]
    mem = c["memory"]
    return "\n".join([
        f"# jdlora demo ({result['device']}, {result['dtype']})",
        "",
        f"Date {result['date']}, commit `{result['commit']}`"
        f"{' (plus uncommitted changes)' if result.get('worktree_modified') else ''}, {m.get('gpu') or m['cpu']} "
        f"({m['logical_cpus']} logical CPUs), torch {m['torch']}, {result['threads']} threads, "
        f"load average at the end {m.get('load_average')}.",
        "",
        f"Model: Llama, {result['model']['layers']} layers, hidden {result['model']['hidden']}, random weights. "
        f"Adapters: {result['adapters']['source']} on {result['adapters']['modules']} modules.",
        f"Compression: JD-Full, r = {c['rank']}, {c['clusters']} clusters, {c['seconds']:.1f} s; "
        f"reconstruction error mean {c['mean_rel_error']:.3f}, max {c['max_rel_error']:.3f}; "
        f"memory {mem['bytes_before'] / 2**20:.1f} MiB -> {mem['bytes_after'] / 2**20:.1f} MiB "
        f"({mem['ratio']:.1f}x). Output error of (c) against (d): {result['output_error']['relative']:.3f} "
        f"(squared {result['output_error']['relative_squared']:.3f}).",
        f"Workload: {w['rounds']} timed batches per variant (after {w['warmup']} warm-up), each {w['batch']} "
        f"sequences with a {w['prompt']}-token prefill and {w['decode']} decode steps; adapters Zipf "
        f"({w['zipf']}), {w['distinct_adapters_per_batch']:.1f} distinct per batch; (d) holds "
        f"{result['device_budget']['uncompressed_slots']} adapters on the device.",
        "",
        _table(result),
        "",
        f"(c) / (b) = {b['compressed_vs_one_adapter']:.3f} (bar: >= 0.8: "
        f"{'met' if b['compressed_keeps_80pct'] else 'NOT met'}); (c) / (d) = {b['compressed_vs_uncompressed']:.3f} "
        f"(bar: > 1: {'met' if b['compressed_faster_than_uncompressed'] else 'NOT met'}). "
        f"Whole run {result['seconds']['total']:.0f} s.",
        "",
    ])


def _write(result: dict, args) -> None:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag)
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1, default=str)
        fh.write("\n")
    md = _markdown(result)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    _say("")
    _say(_table(result))
    _say("")
    _say(md.strip().splitlines()[-1])
    files = [stem + ".json", stem + ".md"]
    if not args.no_plot:
        try:
            _plot(result, stem + ".png")
            files.append(stem + ".png")
        except ImportError:
            _say("matplotlib is not installed: no plot")
    _say("wrote " + ", ".join(files))


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["label"] for r in rows]
    kinds = [("tokens_per_s", "all tokens"), ("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colors = ["#888888", "#4c72b0", "#55a868", "#c44e52"]
    for ax, (key, title) in zip(axes, kinds):
        vals = [r[key] for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([l.split(")")[0] + ")" for l in labels])
        ax.set_title(f"{title}, tokens/s")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(
        f"jdlora demo on {result['device']} ({result['threads']} threads): " + "; ".join(labels), fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jdlora demo`` and ``python -m jdlora_ops.demo``; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("num_adapters", "adapter_rank", "layers", "hidden", "rank", "clusters", "batch", "prompt",
                 "rounds", "threads", "max_rounds", "max_iter"):
        if getattr(args, name) < 1:
            print(f"jdlora demo: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.decode < 0 or args.warmup < 0:
        print("jdlora demo: error: --decode and --warmup must be >= 0", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
