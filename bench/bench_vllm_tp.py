"""Tensor parallelism in vLLM's CPU engine: a jdlora store at tensor_parallel_size 2 against 1.

    python bench/bench_vllm_tp.py [--vllm-python .venv-vllm/bin/python] [--out bench/results]

For each variant of the fixture model (tests_vllm/tp_check.py: ``kv1``, one KV
head that vLLM gives to both ranks; ``kv2``, two KV heads, one per rank) it
builds six PEFT adapters and their lossless store, and runs four engines
(tests_vllm/run_engine.py, one thread per process, VLLM_ENABLE_V1_MULTIPROCESSING=0,
vLLM's ``mp`` executor with one worker process per rank at size 2):

* ``store``: the plugin serving the store (five store adapters, one PEFT
  adapter, base-model requests) at sizes 1 and 2;
* ``vllm``: vLLM's own LoRA path on the PEFT adapters at sizes 1 and 2.

Every request goes in its own ``generate`` call (vLLM 0.32's CPU build cannot
take prompt logprobs for several LoRA requests in one call), with two LoRA
slots, so slots are reassigned between requests. Reported: whether the greedy
tokens agree and the largest |difference| of the prompt and generated-token
logprobs (float32) between size 2 and 1, for the store and for vLLM's own path,
and between the store and vLLM's own path at size 2 (adapter requests only:
vLLM 0.32's CPU ops give base-model requests the last slot's adapter); and
wall times. Writes vllm_tp_cpu.json and vllm_tp_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests_vllm"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tp_check  # noqa: E402
from vllm_engine import git_commit, run_engine, vllm_version  # noqa: E402

PROMPTS = ["the man said to his mother that", "water is a good thing for", "when the world came up",
           "one day the boy will go", "each year the people find", "my father made a house",
           "there was a little animal", "what did the old man say"]
ADAPTER_ROWS = sorted(tp_check.STORE_ADAPTERS + (tp_check.PEFT_ADAPTER,))


def _run(vllm_python: str, work: str, name: str, spec: dict) -> dict:
    out, wall = run_engine(vllm_python, work, name, spec, timeout=900)
    if any(out["errors"]):
        raise RuntimeError(f"{name}: requests failed: {out['errors']}")
    out["process_seconds"] = wall
    print(f"  {name:16s} process {out['process_seconds']:5.1f} s, engine {out['seconds']:5.1f} s, "
          f"generate {out['generate_seconds']:5.2f} s", flush=True)
    return out


def _compare(a: dict, b: dict, rows=None) -> dict:
    rows_ = range(len(a["tokens"])) if rows is None else rows
    return {"tokens_equal": all(a["tokens"][j] == b["tokens"][j] for j in rows_),
            "max_abs_logprob_diff": tp_check.logprob_gap(a, b, rows=None if rows is None else set(rows)),
            "requests": len(rows_)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "bench_vllm_tp"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--vllm-python", default=os.path.join(ROOT, ".venv-vllm", "bin", "python"))
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--markdown-only", action="store_true", help="rewrite vllm_tp_cpu.md from vllm_tp_cpu.json")
    args = ap.parse_args(argv)
    if args.markdown_only:
        with open(os.path.join(args.out, "vllm_tp_cpu.json")) as fh:
            _write_markdown(json.load(fh), args.out)
        return
    os.makedirs(args.work, exist_ok=True)
    cases = []
    print("vLLM CPU tensor parallelism, 1 thread per process", flush=True)
    for name in tp_check.TP_MODELS:
        data = tp_check.make_case(args.work, name)
        common = {"model": data["model"], "max_tokens": args.max_tokens, "max_lora_rank": 8, "max_loras": 2,
                  "max_num_seqs": 8, "logprobs": True}
        store_reqs = tp_check.tp_requests(PROMPTS, data["store"], data["adapters"])
        peft_reqs = tp_check.tp_requests(PROMPTS, data["store"], data["adapters"], peft_all=True)
        runs = {}
        for tp in (1, 2):
            runs[("store", tp)] = _run(args.vllm_python, args.work, f"{name}_store_tp{tp}", dict(
                common, store=data["store"], tensor_parallel_size=tp, requests=store_reqs))
            runs[("vllm", tp)] = _run(args.vllm_python, args.work, f"{name}_vllm_tp{tp}", dict(
                common, store=None, tensor_parallel_size=tp, requests=peft_reqs))
        ranks = runs[("store", 2)]["plugin"]["ranks"]
        case = {
            "model": name, "model_kwargs": tp_check.TP_MODELS[name],
            "store_tp2_vs_tp1": _compare(runs[("store", 2)], runs[("store", 1)]),
            "vllm_tp2_vs_tp1": _compare(runs[("vllm", 2)], runs[("vllm", 1)]),
            "store_vs_vllm_tp2": _compare(runs[("store", 2)], runs[("vllm", 2)], ADAPTER_ROWS),
            "adapter_shift_min": min(tp_check.adapter_shift(runs[("store", 1)], j) for j in tp_check.BASE_REPEATS),
            "rank_threads": [r["threads"] for r in ranks],
            "rank_communicator": ranks[0]["communicator"],
            "rank_qkv_u_rows": [r["u_rows"]["model.layers.0.self_attn.qkv_proj"] for r in ranks],
            "seconds": {f"{kind}_tp{tp}": {k: round(run[k], 2) for k in ("process_seconds", "seconds",
                                                                         "generate_seconds")}
                        for (kind, tp), run in runs.items()},
        }
        cases.append(case)
    doc = {"benchmark": "vllm_tp_cpu", "date": dt.date.today().isoformat(), "commit": git_commit(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
           "threads": "1 per process (OMP_NUM_THREADS=1, VLLM_CPU_OMP_THREADS_BIND=nobind)",
           "vllm": vllm_version(args.vllm_python), "requests": len(store_reqs), "max_tokens": args.max_tokens,
           "bound_in_test": tp_check.TP_LOGPROB_BOUND, "cases": cases}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vllm_tp_cpu.json"), "w") as fh:
        json.dump(doc, fh, indent=2)
    _write_markdown(doc, args.out)


def _write_markdown(doc: dict, out: str) -> None:
    cases = doc["cases"]
    lines = [f"# vLLM on the CPU: tensor_parallel_size 2 against 1 ({doc['date']}, commit {doc['commit']})", "",
             f"{doc['machine']}; vLLM {doc['vllm']} (CPU build); threads: {doc['threads']}; random Llama, hidden "
             f"128, 2 layers, MLP 256, float32; {doc['requests']} requests, one per `generate` call, "
             f"{doc['max_tokens']} "
             "greedy tokens each, 2 LoRA slots; six rank-4 adapters and their lossless store (rank 4, a cluster "
             "per adapter). Logprobs: every prompt token's and every generated token's."
             + (f" Note: {doc['machine_note']}." if doc.get("machine_note") else ""), "",
             "| model | compared | requests | same greedy tokens | max abs logprob diff |", "|---|---|---|---|---|"]
    labels = {"store_tp2_vs_tp1": "store, TP 2 vs 1", "vllm_tp2_vs_tp1": "vLLM's own LoRA, TP 2 vs 1",
              "store_vs_vllm_tp2": "store vs vLLM's own, both TP 2 (adapter requests)"}
    for c in cases:
        heads = f"{c['model']} ({c['model_kwargs']['heads']} heads, {c['model_kwargs']['kv_heads']} KV)"
        for key, label in labels.items():
            r = c[key]
            lines.append(f"| {heads} | {label} | {r['requests']} | {'yes' if r['tokens_equal'] else 'NO'} | "
                         f"{r['max_abs_logprob_diff']:.2e} |")
    lines += ["", "The store adapters move the prompt logprobs of the same prompt by at least "
              + ", ".join(f"{c['adapter_shift_min']:.3f} ({c['model']})" for c in cases)
              + " from the base model's. Per rank at TP 2: threads "
              + ", ".join(f"{c['rank_threads']} ({c['model']})" for c in cases)
              + f"; TP communicator {cases[0]['rank_communicator']}; rows of q/k/v's U per rank "
              + ", ".join(f"{c['rank_qkv_u_rows'][0]} ({c['model']})" for c in cases)
              + " (full: [128, 64, 64]).", "",
              "| model | engine | process (s) | engine start + requests (s) | requests (s) |", "|---|---|---|---|---|"]
    for c in cases:
        for k, v in c["seconds"].items():
            lines.append(f"| {c['model']} | {k} | {v['process_seconds']:.1f} | {v['seconds']:.1f} | "
                         f"{v['generate_seconds']:.2f} |")
    with open(os.path.join(out, "vllm_tp_cpu.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
