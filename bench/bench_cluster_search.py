"""Time of the clustered compressor's partition search against an earlier commit's, in one run.

The earlier ``clustering.py`` is read from git (``--before``, default ``HEAD``) and
imported beside the current one, so both run in the same process, with the same
thread count, on the same streamed synthetic collection (the stream benchmark's
generator at a reduced size). Reported per variant: wall seconds in all,
process CPU seconds (less disturbed than wall time by other work on a shared
machine), seconds of the fit/reassign rounds over all modules, the rest (initial
partition and its search), the final objective, the mean relative error and the
cluster sizes.
Results are stored under ``--tag`` (default ``cluster_search``) in
``bench/results/compress_cpu.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_compress import header, save  # noqa: E402

from jdlora_ops.compress import compress  # noqa: E402
from jdlora_ops.synthetic import SyntheticCollection, SyntheticSpec, llama_like_modules  # noqa: E402


def load_before(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:python/jdlora_ops/compress/clustering.py"], cwd=HERE,
                         check=True, capture_output=True, text=True).stdout
    name = "jdlora_ops.compress._clustering_before"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "jdlora_ops.compress"
    exec(compile(src, f"{rev}:clustering.py", "exec"), mod.__dict__)
    return mod.compress


def run(fn, col, args) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    res = fn(col, args.rank, num_clusters=args.clusters, max_iter=args.max_iter, tol=args.tol,
             max_rounds=args.max_rounds, warmup_rounds=args.warmup_rounds)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rounds = sum(h["seconds"] for h in res.history)
    return {"wall_seconds": wall, "cpu_seconds": cpu, "round_seconds": rounds, "search_seconds": wall - rounds,
            "rounds": len(res.history), "objective": res.history[-1]["objective"],
            "mean_rel_error": res.summary()["mean_rel_error"],
            "cluster_sizes": sorted(torch.bincount(res.assignment).tolist(), reverse=True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="HEAD")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--clusters", type=int, default=25)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tag", default="cluster_search")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mods = llama_like_modules(args.layers, 4096, 1024)
    col = SyntheticCollection(SyntheticSpec(args.n, mods, ranks=(16,), num_families=args.clusters, num_seeds=4, seed=2))
    before = load_before(args.before)
    out = {**header(torch.get_num_threads()), "before": args.before, "n_adapters": args.n, "modules": len(mods),
           "clusters": args.clusters, "r": args.rank, "max_iter": args.max_iter, "tol": args.tol,
           "max_rounds": args.max_rounds, "warmup_rounds": args.warmup_rounds, "runs": []}
    for rep in range(args.repeats):
        for label, fn in (("before", before), ("after", compress)):
            row = {"variant": label, "repeat": rep, **run(fn, col, args)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            out["runs"].append(row)
    for key in ("wall_seconds", "cpu_seconds", "search_seconds"):
        b = [r[key] for r in out["runs"] if r["variant"] == "before"]
        a = [r[key] for r in out["runs"] if r["variant"] == "after"]
        out[f"ratio_{key}"] = (sum(a) / len(a)) / (sum(b) / len(b))
    out["load_average_at_end"] = os.getloadavg()
    save(args.tag, out)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
