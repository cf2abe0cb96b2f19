"""Quantized shared bases on real adapters: the reconstruction error they add, cores refitted.

On the large real collection (bench/real_collection, 220 MiniLM adapters, built by
``make_collection.py train --large``), JD at r = 16 is fitted in float32; then the bases are put on
the int8 grid (one scale per row) and on the 4-bit grid (groups of 32, 64, 128 along the reduction
dimension), scales in float16, with every core refitted to them (``compress/quantized_bases.py``).
Reported per setting
and format: the mean relative squared error over adapters and modules, its increase relative to the
float bases (the target: within 2% for 4-bit at r = 16), and the bases' bytes against float16
bases. The task metric (retained loss reduction) of quantized stores is not measured here::

    PYTHONPATH=python python bench/bench_quantized_bases.py [--threads 1]

Writes ``bench/results/quantized_bases_cpu.{json,md}`` with the commit, machine, date and threads.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_real_collection import cpu_model, git_commit  # noqa: E402  (the same machine and commit facts)

ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "quantized_bases_cpu")
ADAPTERS = os.environ.get("JDLORA_REAL_ADAPTERS") or os.path.join(ROOT, "build", "real_collection_large")
SETTINGS = [("full", 16, 1), ("full", 16, 4), ("full", 16, 16), ("diag", 16, 16), ("full", 32, 16)]
FORMATS = [("int8", None), ("int4", 128), ("int4", 64), ("int4", 32)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from jdlora_ops.compress import compress
    from jdlora_ops.compress.quantized_bases import quantize_bases
    from jdlora_ops.peft_io import PeftCollection

    if not os.path.isdir(ADAPTERS):
        raise SystemExit(f"{ADAPTERS}: build the large collection first "
                         f"(python bench/real_collection/make_collection.py train --large)")
    paths = sorted(os.path.join(ADAPTERS, d) for d in os.listdir(ADAPTERS)
                   if os.path.isfile(os.path.join(ADAPTERS, d, "adapter_config.json")))
    col = PeftCollection(paths)
    rows = []
    for method, r, k in SETTINGS:
        t0 = time.perf_counter()
        fit = compress(col, r, num_clusters=k, method=method, seed=0)
        fit_s = time.perf_counter() - t0
        float_err = float(fit.rel_errors().mean())
        float_bytes = sum(2 * (cm.U.numel() + cm.Vt.numel()) for cm in fit.modules.values())
        for fmt, group in FORMATS:
            q = copy.deepcopy(fit)
            t0 = time.perf_counter()
            tables = quantize_bases(q, col, fmt, group, scale_dtype=torch.float16)  # a float16 store's scales
            q_s = time.perf_counter() - t0
            err = float(q.rel_errors().mean())
            q_bytes = sum(t.nbytes for pair in tables.values() for t in pair)
            row = {"method": method, "rank": r, "clusters": k, "format": fmt, "group_size": group,
                   "float_mean_rel_error": float_err, "mean_rel_error": err,
                   "relative_increase": (err - float_err) / float_err if float_err else 0.0,
                   "bases_bytes": q_bytes, "bases_bytes_float16": float_bytes,
                   "bytes_vs_float16": q_bytes / float_bytes, "fit_seconds": round(fit_s, 1),
                   "quantize_and_refit_seconds": round(q_s, 1)}
            rows.append(row)
            print(f"JD-{method} r={r} K={k} {fmt}{'' if group is None else f' G={group}'}: error {float_err:.4f} -> "
                  f"{err:.4f} ({100 * row['relative_increase']:+.2f}%), bases x{row['bytes_vs_float16']:.3f} of "
                  f"float16 ({q_s:.1f} s)", flush=True)
    payload = {"commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{cpu_model()}, {os.cpu_count()} cores", "threads": torch.get_num_threads(),
               "torch": torch.__version__, "adapters": len(paths), "modules": len(col.modules),
               "command": "PYTHONPATH=python python bench/bench_quantized_bases.py --threads "
                          f"{torch.get_num_threads()}", "rows": rows}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".json", "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    lines = ["| setting | format | mean rel. error, float bases | quantized, cores refitted | increase | "
             "bases bytes / float16 |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| JD-{r['method'].capitalize()} r={r['rank']} K={r['clusters']} | {r['format']}"
                     f"{'' if r['group_size'] is None else ' G=' + str(r['group_size'])} | "
                     f"{r['float_mean_rel_error']:.4f} | {r['mean_rel_error']:.4f} | "
                     f"{100 * r['relative_increase']:+.2f}% | {r['bytes_vs_float16']:.3f} |")
    with open(RESULTS + ".md", "w", encoding="utf-8") as fh:
        fh.write("# quantized_bases_cpu\n\n" + "\n".join(f"- {k}: {v}" for k, v in payload.items() if k != "rows")
                 + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
