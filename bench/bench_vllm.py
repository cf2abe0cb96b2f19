"""vLLM on the CPU serving 1000 adapters: a jdlora store against vLLM's own multi-LoRA.

    python bench/bench_vllm.py [--size small|realistic] [--out bench/results]

Builds (offline) a random Llama (tests_vllm/fixtures.py), 1000 PEFT adapters
in 25 planted clusters and their store (JD-Full, 25 clusters), then runs one
vLLM engine per setting, one thread each, in its own process (.venv-vllm, see
scripts/test_vllm.sh), and times one ``generate`` call over all requests (all
submitted at once; greedy tokens).

Sizes:

* ``small`` (vllm_cpu.*): hidden 128, 2 layers, adapters r = 4 on all seven
  projections, store r = 8; 256 requests x 16 tokens. The LoRA path is a large
  share of all the work here.
* ``realistic`` (vllm_cpu_realistic.*): the shape of a small production model,
  hidden 1024, 16 layers, 16 heads / 4 KV heads, MLP 2816 (about 0.2 B
  parameters, float32), adapters r = 16 on all seven projections shipped in
  float16 (19 MB each in float32), store r = 16 served store-only (vLLM's
  dense per-slot stacks would take 18 GB at 1000 slots); 1000 requests x 16
  tokens, and spreads over exactly 1, 8, 64, 256 and 1000 distinct adapters
  (the PEFT-ops mode at 64 and 1000 only, to keep the run near an hour).

Settings:

* ``base``: the base model, LoRA off;
* ``one_adapter``: every request uses the same PEFT adapter (vLLM's own path);
* ``jdlora_store``: requests spread over the store adapters, every adapter
  able to hold a slot (max_loras 1000);
* ``vllm_multi_lora``: the same spread over the PEFT adapters with vLLM's own
  path, max_loras 8 and max_cpu_loras 64, adapters loaded from disk as
  requests arrive;
* ``one_adapter_jdlora_ops`` and ``peft_jdlora_ops``: ``one_adapter`` and
  ``vllm_multi_lora`` with the plugin's PEFT-ops mode (``JDLORA_PEFT_OPS=1``,
  no store): the same PEFT adapters in vLLM's slots, computed by
  ``lora_shrink`` / ``lora_expand`` instead of vLLM's own LoRA ops.

Reported: generated tokens per second over the whole call and the time to
first token (median and 90th percentile; all requests arrive at t = 0, so it
includes queueing). ``--profile`` also writes each engine's cProfile
statistics of the timed call (for finding where time goes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests_vllm"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures  # noqa: E402
from vllm_engine import git_commit, run_engine, vllm_version  # noqa: E402

SIZES = {
    "small": dict(model=dict(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256), rank=4, jd_rank=8,
                  adapter_dtype="float32", store_only=False, requests=256, max_tokens=16, out="vllm_cpu",
                  description="random Llama, hidden 128, 2 layers, 2 heads (1 kv), MLP 256, float32"),
    "realistic": dict(model=dict(hidden=1024, layers=16, heads=16, kv_heads=4, intermediate=2816), rank=16,
                      jd_rank=16, adapter_dtype="float16", store_only=True, requests=1000, max_tokens=16,
                      out="vllm_cpu_realistic", distinct=(8, 64, 256, 1000), peft_ops_spreads=("d64", "d1000"),
                      description="random Llama, hidden 1024, 16 layers, 16 heads (4 kv), MLP 2816, float32"),
}
N_ADAPTERS, N_CLUSTERS = 1000, 25


def _prepare(work: str, size: dict) -> dict:
    model = os.path.join(work, "model")
    adapters_dir = os.path.join(work, "adapters")
    store = os.path.join(work, "store")
    if not os.path.isfile(os.path.join(model, "config.json")):
        fixtures.make_model(model, **size["model"])
    if not os.path.isdir(os.path.join(adapters_dir, f"adapter_{N_ADAPTERS - 1}")):
        import torch

        fixtures.make_adapters(model, adapters_dir, n=N_ADAPTERS, clusters=N_CLUSTERS, rank=size["rank"],
                               alpha=2 * size["rank"], dtype=getattr(torch, size["adapter_dtype"]))
    paths = [os.path.join(adapters_dir, f"adapter_{i}") for i in range(N_ADAPTERS)]
    compress_s = None
    if not os.path.isfile(os.path.join(store, "manifest.json")):
        t = time.time()
        subprocess.run([sys.executable, "-m", "jdlora_ops.cli", "compress", *paths, "--rank", str(size["jd_rank"]),
                        "--clusters", str(N_CLUSTERS), "--out", store, "--threads", "1", "-q"], check=True)
        compress_s = time.time() - t
    with open(os.path.join(store, "manifest.json")) as fh:
        m = json.load(fh)
    errs = [a["mean_error"] for a in m["adapters"]]
    return {"model": model, "adapters": paths, "store": store, "compress_seconds": compress_s,
            "store_mean_error": sum(errs) / len(errs), "store_max_error": max(a["max_error"] for a in m["adapters"])}


def _spread(kind: str, n: int, rng: random.Random) -> list[int]:
    """Adapter indices for ``n`` requests: ``uniform`` or ``zipf`` (exponent 1.1) over all adapters, or
    ``d<k>``: exactly ``k`` distinct adapters (chosen at random), each in n / k requests (rounded), shuffled."""
    if kind == "uniform":
        return [rng.randrange(N_ADAPTERS) for _ in range(n)]
    if kind.startswith("d"):
        chosen = rng.sample(range(N_ADAPTERS), int(kind[1:]))
        out = [chosen[i % len(chosen)] for i in range(n)]
        rng.shuffle(out)
        return out
    order = list(range(N_ADAPTERS))
    rng.shuffle(order)
    weights = [1.0 / (k + 1) ** 1.1 for k in range(N_ADAPTERS)]
    return [order[k] for k in rng.choices(range(N_ADAPTERS), weights=weights, k=n)]


def _run(vllm_python: str, work: str, name: str, spec: dict, profile: bool) -> dict:
    if profile:
        spec = dict(spec, profile=os.path.join(work, f"{name}.prof"))
    out, wall = run_engine(vllm_python, work, name, spec, timeout=3600)
    toks = sum(len(x) for x in out["tokens"] if x)
    ttft = sorted(x for x in out["ttft"] if x is not None)
    res = {
        "setting": name, "requests": len(spec["requests"]), "generated_tokens": toks,
        "errors": sum(e is not None for e in out["errors"]), "generate_seconds": out["generate_seconds"],
        "tokens_per_second": toks / out["generate_seconds"],
        "ttft_median_s": statistics.median(ttft) if ttft else None,
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))] if ttft else None,
        "distinct_adapters": len({r["lora"]["name"] for r in spec["requests"] if r["lora"]}),
        "max_loras": spec.get("max_loras"), "max_cpu_loras": spec.get("max_cpu_loras"),
        "process_seconds": wall,
    }
    print(f"  {name:28s} {res['tokens_per_second']:8.1f} tok/s  ttft median {res['ttft_median_s'] or 0:.3f} s  "
          f"({res['distinct_adapters']} adapters, {res['errors']} errors, {wall:.0f} s)", flush=True)
    return res


# (label, kind, match): "self" sums the own time of functions whose name contains match, "cum" takes the
# cumulative time of the function (file part, name).
_PROFILE_ROWS = (
    ("base GEMMs (onednn_mm, self)", "self", "torch._ops._C.onednn_mm"),
    ("jd_fused kernel (self)", "self", "jdlora_ops.jd_fused"),
    ("attention kernels (self)", "self", "cpu_attention|reshape_and_cache"),
    ("punica update_metadata (cum)", "cum", ("jdlora_ops/integrations/vllm/punica.py", "update_metadata")),
    ("vLLM set_active_adapters (cum)", "cum", ("vllm/lora/worker_manager.py", "set_active_adapters")),
    ("store adapter loads (cum)", "cum", ("jdlora_ops/integrations/vllm/state.py", "load_store_adapter")),
    ("request checks incl. first store open (cum)", "cum",
     ("jdlora_ops/integrations/vllm/state.py", "validate_request")),
    ("vLLM scheduler.schedule (cum)", "cum", ("vllm/v1/core/sched/scheduler.py", "schedule")),
)


def profile_summary(path: str) -> list[str]:
    """Where one engine's timed call spent its time, from its cProfile statistics (``--profile``)."""
    import pstats

    st = pstats.Stats(path)
    total = st.total_tt
    lines = [f"{os.path.basename(path)} total {total:.1f} s"]
    for label, kind, match in _PROFILE_ROWS:
        if kind == "self":
            v = sum(tt for (f, _, fn), (_, _, tt, _, _) in st.stats.items()
                    if "built-in" in fn and any(m in fn for m in match.split("|")))
        else:
            v = max((ct for (f, _, fn), (_, _, _, ct, _) in st.stats.items() if match[0] in f and fn == match[1]),
                    default=0.0)
        lines.append(f"  {label:45s} {v:7.2f} s  {100 * v / total:5.1f} %")
    return lines


def _settings(size: dict, data: dict, prompts: list[str], rng: random.Random, only: set[str] | None,
              store_slots: int = N_ADAPTERS):
    """(name, spread, spec) of every setting of ``size``, in the order they run."""
    n = len(prompts)
    common = {"model": data["model"], "max_tokens": size["max_tokens"], "max_lora_rank": size["rank"],
              "max_num_seqs": 64, "warmup": 4}

    def reqs(adapters, path_of):
        return [{"prompt": p, "lora": None if a is None else {"name": f"adapter_{a}", "id": a + 1,
                                                              "path": path_of(a)}}
                for p, a in zip(prompts, adapters)]

    peft = lambda a: data["adapters"][a]  # noqa: E731
    store = dict(common, store=data["store"], store_only=size["store_only"], max_loras=store_slots,
                 max_cpu_loras=store_slots)
    vllm_lora = dict(common, store=None, max_loras=8, max_cpu_loras=64)
    out = [("base", "-", dict(common, store=None, enable_lora=False, max_loras=1, requests=reqs([None] * n, None))),
           ("one_adapter", "-", dict(vllm_lora, requests=reqs([0] * n, peft))),
           ("one_adapter_jdlora_ops", "-", dict(vllm_lora, peft_ops=True, requests=reqs([0] * n, peft)))]
    if "distinct" in size:
        out.append(("jdlora_store_d1", "d1", dict(store, requests=reqs([0] * n, lambda a: data["store"]))))
        spreads = [f"d{k}" for k in size["distinct"]]
    else:
        spreads = ["uniform", "zipf"]
    for spread in spreads:
        ads = _spread(spread, n, rng)
        out.append((f"jdlora_store_{spread}", spread, dict(store, requests=reqs(ads, lambda a: data["store"]))))
        out.append((f"vllm_multi_lora_{spread}", spread, dict(vllm_lora, requests=reqs(ads, peft))))
        if spread in size.get("peft_ops_spreads", spreads):
            out.append((f"peft_jdlora_ops_{spread}", spread, dict(vllm_lora, peft_ops=True,
                                                                  requests=reqs(ads, peft))))
    return [s for s in out if only is None or s[0] in only]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--requests", type=int, help="default: 256 (small), 1000 (realistic)")
    ap.add_argument("--max-tokens", type=int, help="default: 16")
    ap.add_argument("--only", help="comma-separated setting names to run (default: all)")
    ap.add_argument("--store-slots", type=int, default=N_ADAPTERS,
                    help="max_loras and max_cpu_loras of the store settings (default: one per adapter)")
    ap.add_argument("--profile", action="store_true", help="write each engine's cProfile statistics to --work")
    ap.add_argument("--prepare-only", action="store_true", help="build the model, adapters and store, then stop")
    ap.add_argument("--work", help="default: build/bench_vllm (small), build/bench_vllm_realistic (realistic)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--vllm-python", default=os.path.join(ROOT, ".venv-vllm", "bin", "python"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    size = dict(SIZES[args.size])
    size["requests"] = args.requests or size["requests"]
    size["max_tokens"] = args.max_tokens or size["max_tokens"]
    commit = git_commit()  # of the code measured, read before the engines run
    work = args.work or os.path.join(ROOT, "build", "bench_vllm" if args.size == "small" else "bench_vllm_realistic")
    os.makedirs(work, exist_ok=True)
    data = _prepare(work, size)
    if args.prepare_only:
        print(f"prepared {work}: store mean error {data['store_mean_error']:.3e}", flush=True)
        return
    rng = random.Random(args.seed)
    prompts = [" ".join(rng.choice(fixtures.WORDS) for _ in range(8)) for _ in range(size["requests"])]
    only = set(args.only.split(",")) if args.only else None
    print(f"vLLM CPU benchmark ({args.size}), 1 thread per engine", flush=True)
    results = []
    if args.store_slots != N_ADAPTERS and only is None:
        ap.error("--store-slots: only with --only (the committed results use one slot per adapter)")
    for name, spread, spec in _settings(size, data, prompts, rng, only, args.store_slots):
        r = _run(args.vllm_python, work, name, spec, args.profile)
        r["spread"] = spread
        results.append(r)
        if args.profile:
            print("\n".join(profile_summary(os.path.join(work, f"{name}.prof"))), flush=True)
    doc = {
        "benchmark": size["out"], "date": dt.date.today().isoformat(), "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "threads": 1,
        "vllm": vllm_version(args.vllm_python), "model": size["description"],
        "adapters": N_ADAPTERS, "clusters": N_CLUSTERS, "adapter_rank": size["rank"],
        "adapter_dtype": size["adapter_dtype"], "store_rank": size["jd_rank"], "store_only": size["store_only"],
        "store_mean_error": data["store_mean_error"], "store_max_error": data["store_max_error"],
        "compress_seconds": data["compress_seconds"],
        "requests": size["requests"], "max_tokens": size["max_tokens"], "results": results,
    }
    if only is not None:
        print(json.dumps(doc, indent=1))
        return  # a partial run is for looking, not for the committed results
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{size['out']}.json"), "w") as fh:
        json.dump(doc, fh, indent=2)
    lines = _markdown(doc)
    with open(os.path.join(args.out, f"{size['out']}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(doc, os.path.join(args.out, f"{size['out']}.png"))


def _markdown(doc: dict) -> list[str]:
    res = {r["setting"]: r for r in doc["results"]}
    base = res["base"]["tokens_per_second"]
    one = res["one_adapter"]["tokens_per_second"]
    store_one = res.get("jdlora_store_d1")
    lines = [f"# vLLM on the CPU: {doc['adapters']} adapters ({doc['date']}, commit {doc['commit']})", "",
             f"{doc['machine']}; vLLM {doc['vllm']} (CPU build), one thread per engine; {doc['model']}; adapters "
             f"r = {doc['adapter_rank']} on all seven projections ({doc['adapter_dtype']} files); "
             f"{doc['requests']} requests submitted at once, {doc['max_tokens']} greedy tokens each. Store: JD-Full "
             f"r = {doc['store_rank']}, {doc['clusters']} clusters, mean relative squared error "
             f"{doc['store_mean_error']:.2e}{', served store-only' if doc['store_only'] else ''}. "
             "Time to first token includes queueing (all requests arrive at t = 0).", "",
             "| setting | spread | adapters in requests | slots (max_loras / cpu) | tokens/s | vs base | vs one "
             f"adapter (vLLM) |{' vs store, one adapter |' if store_one else ''} TTFT median (s) | TTFT p90 (s) | "
             "errors |",
             "|---|---|---|---|---|---|---|" + ("---|" if store_one else "") + "---|---|---|"]
    for r in doc["results"]:
        slots = "-" if r["setting"] == "base" else f"{r['max_loras']} / {r['max_cpu_loras']}"
        vs_store = (f" {r['tokens_per_second'] / store_one['tokens_per_second']:.2f} |" if store_one else "")
        lines.append(f"| {r['setting']} | {r.get('spread', '-')} | {r['distinct_adapters']} | {slots} | "
                     f"{r['tokens_per_second']:.1f} | {r['tokens_per_second'] / base:.2f} | "
                     f"{r['tokens_per_second'] / one:.2f} |{vs_store} {r['ttft_median_s']:.3f} | "
                     f"{r['ttft_p90_s']:.3f} | {r['errors']} |")
    return lines


def _plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    title = (f"vLLM {doc['vllm']} CPU, {doc['model']}, {doc['adapters']} adapters, {doc['requests']} requests, "
             f"1 thread ({doc['date']})")
    if any(r["spread"].startswith("d") for r in res):
        # Tokens/s and time to first token against the number of distinct adapters in the requests.
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        base = next(r for r in res if r["setting"] == "base")
        # vLLM's own path and the PEFT-ops mode with one adapter are the lines' first points
        for prefix, one, label, color in (
                ("jdlora_store_d", None, "jdlora store", "tab:blue"),
                ("vllm_multi_lora_d", "one_adapter", "vLLM multi-LoRA (8 / 64 slots)", "tab:red"),
                ("peft_jdlora_ops_d", "one_adapter_jdlora_ops", "PEFT adapters, jdlora ops (8 / 64 slots)",
                 "tab:green")):
            rows = sorted((r for r in res if r["setting"].startswith(prefix) or r["setting"] == one),
                          key=lambda r: r["distinct_adapters"])
            if not rows:
                continue
            xs = [r["distinct_adapters"] for r in rows]
            axes[0].plot(xs, [r["tokens_per_second"] for r in rows], "o-", color=color, label=label)
            axes[1].plot(xs, [r["ttft_median_s"] for r in rows], "o-", color=color, label=f"{label}, median")
            axes[1].plot(xs, [r["ttft_p90_s"] for r in rows], "x--", color=color, label=f"{label}, p90")
        axes[0].axhline(base["tokens_per_second"], color="black", ls=":", label="base model")
        axes[0].set_ylabel("generated tokens / s")
        axes[1].set_ylabel("time to first token (s)")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("distinct adapters in the requests")
            ax.legend(fontsize=7)
    else:
        labels = [r["setting"].replace("_", "\n") for r in res]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].bar(labels, [r["tokens_per_second"] for r in res], color="tab:blue")
        axes[0].set_ylabel("generated tokens / s")
        axes[1].bar(labels, [r["ttft_median_s"] for r in res], color="tab:orange", label="median")
        axes[1].scatter(labels, [r["ttft_p90_s"] for r in res], color="black", marker="_", s=400, label="p90")
        axes[1].set_ylabel("time to first token (s)")
        axes[1].legend()
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
