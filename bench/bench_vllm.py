"""vLLM on the CPU serving 1000 adapters: a jdlora store against vLLM's own multi-LoRA.

    python bench/bench_vllm.py [--requests 256] [--out bench/results]

Builds (offline) the tiny random Llama of tests_vllm/fixtures.py, 1000 PEFT
adapters in 25 planted clusters and their store (JD-Full, r = 8, 25
clusters), then runs one vLLM engine per setting, one thread each, in its own
process (.venv-vllm, see scripts/test_vllm.sh), and times one ``generate``
call over all requests (all submitted at once; 16 greedy tokens each):

* ``base``: the base model, LoRA off;
* ``one_adapter``: every request uses the same PEFT adapter (vLLM's own path);
* ``jdlora_store``: requests spread over the 1000 store adapters, every
  adapter able to hold a slot (max_loras 1000);
* ``vllm_multi_lora``: the same spread over the 1000 PEFT adapters with
  vLLM's own path, max_loras 8 and max_cpu_loras 64, adapters loaded from
  disk as requests arrive;
* ``one_adapter_jdlora_ops`` and ``peft_jdlora_ops``: ``one_adapter`` and
  ``vllm_multi_lora`` with the plugin's PEFT-ops mode (``JDLORA_PEFT_OPS=1``,
  no store): the same PEFT adapters in vLLM's slots, computed by
  ``lora_shrink`` / ``lora_expand`` instead of vLLM's own LoRA ops.

Spreads: ``uniform`` and ``zipf`` (exponent 1.1) over the adapters. Reported:
generated tokens per second over the whole call and the time to first token
(median and 90th percentile; all requests arrive at t = 0, so it includes
queueing). Writes vllm_cpu.json, vllm_cpu.md and vllm_cpu.png.
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
import fixtures  # noqa: E402

N_ADAPTERS, N_CLUSTERS, RANK, JD_RANK = 1000, 25, 4, 8
ENV = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1",
           VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def _prepare(work: str) -> dict:
    model = os.path.join(work, "model")
    adapters_dir = os.path.join(work, "adapters")
    store = os.path.join(work, "store")
    if not os.path.isfile(os.path.join(model, "config.json")):
        fixtures.make_model(model)
    if not os.path.isdir(os.path.join(adapters_dir, f"adapter_{N_ADAPTERS - 1}")):
        fixtures.make_adapters(model, adapters_dir, n=N_ADAPTERS, clusters=N_CLUSTERS, rank=RANK)
    paths = [os.path.join(adapters_dir, f"adapter_{i}") for i in range(N_ADAPTERS)]
    compress_s = None
    if not os.path.isfile(os.path.join(store, "manifest.json")):
        t = time.time()
        subprocess.run([sys.executable, "-m", "jdlora_ops.cli", "compress", *paths, "--rank", str(JD_RANK),
                        "--clusters", str(N_CLUSTERS), "--out", store, "--threads", "1", "-q"], check=True)
        compress_s = time.time() - t
    with open(os.path.join(store, "manifest.json")) as fh:
        m = json.load(fh)
    errs = [a["mean_error"] for a in m["adapters"]]
    return {"model": model, "adapters": paths, "store": store, "compress_seconds": compress_s,
            "store_mean_error": sum(errs) / len(errs), "store_max_error": max(a["max_error"] for a in m["adapters"])}


def _spread(kind: str, n: int, rng: random.Random) -> list[int]:
    if kind == "uniform":
        return [rng.randrange(N_ADAPTERS) for _ in range(n)]
    order = list(range(N_ADAPTERS))
    rng.shuffle(order)
    weights = [1.0 / (k + 1) ** 1.1 for k in range(N_ADAPTERS)]
    return [order[k] for k in rng.choices(range(N_ADAPTERS), weights=weights, k=n)]


def _run(vllm_python: str, work: str, name: str, spec: dict) -> dict:
    spec_path = os.path.join(work, f"{name}.json")
    out_path = os.path.join(work, f"{name}.out.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    t = time.time()
    r = subprocess.run([vllm_python, os.path.join(ROOT, "tests_vllm", "run_engine.py"), spec_path, out_path],
                       env=ENV, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: engine failed\n{(r.stdout + r.stderr)[-4000:]}")
    with open(out_path) as fh:
        out = json.load(fh)
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
        "process_seconds": time.time() - t,
    }
    print(f"  {name:28s} {res['tokens_per_second']:8.1f} tok/s  ttft median {res['ttft_median_s'] or 0:.3f} s  "
          f"({res['distinct_adapters']} adapters, {res['errors']} errors)", flush=True)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "bench_vllm"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--vllm-python", default=os.path.join(ROOT, ".venv-vllm", "bin", "python"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    data = _prepare(args.work)
    rng = random.Random(args.seed)
    words = fixtures.WORDS
    prompts = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(args.requests)]
    common = {"model": data["model"], "max_tokens": args.max_tokens, "max_lora_rank": 8, "max_num_seqs": 64,
              "warmup": 4}

    def reqs(adapters, path_of):
        return [{"prompt": p, "lora": None if a is None else {"name": f"adapter_{a}", "id": a + 1,
                                                              "path": path_of(a)}}
                for p, a in zip(prompts, adapters)]

    results = []
    print("vLLM CPU benchmark, 1 thread per engine", flush=True)
    results.append(_run(args.vllm_python, args.work, "base", dict(
        common, store=None, enable_lora=False, max_loras=1, requests=reqs([None] * args.requests, None))))
    results.append(_run(args.vllm_python, args.work, "one_adapter", dict(
        common, store=None, max_loras=8, max_cpu_loras=64,
        requests=reqs([0] * args.requests, lambda a: data["adapters"][a]))))
    results.append(_run(args.vllm_python, args.work, "one_adapter_jdlora_ops", dict(
        common, store=None, max_loras=8, max_cpu_loras=64, peft_ops=True,
        requests=reqs([0] * args.requests, lambda a: data["adapters"][a]))))
    for spread in ("uniform", "zipf"):
        ads = _spread(spread, args.requests, rng)
        r = _run(args.vllm_python, args.work, f"jdlora_store_{spread}", dict(
            common, store=data["store"], max_loras=N_ADAPTERS, max_cpu_loras=N_ADAPTERS,
            requests=reqs(ads, lambda a: data["store"])))
        r["spread"] = spread
        results.append(r)
        for name, peft_ops in ((f"vllm_multi_lora_{spread}", False), (f"peft_jdlora_ops_{spread}", True)):
            r = _run(args.vllm_python, args.work, name, dict(
                common, store=None, max_loras=8, max_cpu_loras=64, peft_ops=peft_ops,
                requests=reqs(ads, lambda a: data["adapters"][a])))
            r["spread"] = spread
            results.append(r)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    vllm_version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                                  capture_output=True, text=True, env=ENV).stdout.strip().splitlines()[-1]
    doc = {
        "benchmark": "vllm_cpu", "date": dt.date.today().isoformat(), "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "threads": 1,
        "vllm": vllm_version, "model": "random Llama, hidden 128, 2 layers, 2 heads (1 kv), MLP 256, float32",
        "adapters": N_ADAPTERS, "clusters": N_CLUSTERS, "adapter_rank": RANK, "store_rank": JD_RANK,
        "store_mean_error": data["store_mean_error"], "store_max_error": data["store_max_error"],
        "requests": args.requests, "max_tokens": args.max_tokens, "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vllm_cpu.json"), "w") as fh:
        json.dump(doc, fh, indent=2)
    base = results[0]["tokens_per_second"]
    one = results[1]["tokens_per_second"]
    lines = [f"# vLLM on the CPU: {N_ADAPTERS} adapters ({doc['date']}, commit {commit})", "",
             f"{doc['machine']}; vLLM {doc['vllm']} (CPU build), one thread per engine; {doc['model']}; "
             f"{args.requests} requests submitted at once, {args.max_tokens} greedy tokens each. Store: JD-Full "
             f"r = {JD_RANK}, {N_CLUSTERS} clusters, mean relative squared error {doc['store_mean_error']:.2e}. "
             "Time to first token includes queueing (all requests arrive at t = 0).", "",
             "| setting | spread | adapters in requests | slots (max_loras / cpu) | tokens/s | vs base | vs one "
             "adapter | TTFT median (s) | TTFT p90 (s) | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        slots = "-" if r["setting"] == "base" else f"{r['max_loras']} / {r['max_cpu_loras']}"
        lines.append(f"| {r['setting']} | {r.get('spread', '-')} | {r['distinct_adapters']} | {slots} | "
                     f"{r['tokens_per_second']:.1f} | {r['tokens_per_second'] / base:.2f} | "
                     f"{r['tokens_per_second'] / one:.2f} | {r['ttft_median_s']:.3f} | {r['ttft_p90_s']:.3f} | "
                     f"{r['errors']} |")
    with open(os.path.join(args.out, "vllm_cpu.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(doc, os.path.join(args.out, "vllm_cpu.png"))


def _plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
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
    fig.suptitle(f"vLLM {doc['vllm']} CPU, {doc['adapters']} adapters, {doc['requests']} requests, 1 thread "
                 f"({doc['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
