"""Turns a pytest-benchmark JSON file into a markdown table with the ratios that matter.

Usage: python bench/summarize.py RESULTS.json [NOTE] > RESULTS.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str, note: str = "") -> None:
    data = json.load(open(path))
    mi, ci = data["machine_info"], data.get("commit_info", {})
    print(f"# CPU op benchmarks\n")
    print(f"- date: {data['datetime']}")
    print(f"- commit: {ci.get('id', '?')}{' (dirty)' if ci.get('dirty') else ''}")
    print(f"- machine: {mi.get('cpu', {}).get('brand_raw', mi.get('processor'))}, "
          f"{mi.get('cpu', {}).get('count', '?')} cores, python {mi.get('python_version')}")
    print(f"- timings: median of pedantic rounds (15 decode, 3 prefill), uniform popularity, float32 tables unless "
          f"a row names others")
    threads = sorted({b["extra_info"]["threads"] for b in data["benchmarks"]})
    print(f"- threads: set per case with torch.set_num_threads ({' and '.join(map(str, threads))})")
    if note:
        print(f"- note: {note}")
    print()
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        ex = b["extra_info"]
        op = b["params"]["op"]
        kind = b["name"].split("[")[0].replace("test_", "")
        rows[(ex["shape"], ex["threads"])][(kind, op)] = b["stats"]["median"] * 1e6
    print("| shape | threads | op | median us |")
    print("|---|---|---|---|")
    for (shape, th), ops in sorted(rows.items()):
        for (kind, op), us in sorted(ops.items()):
            print(f"| {shape} | {th} | {kind}:{op} | {us:,.0f} |")
    print("\n## Ratios\n")
    print("| shape | threads | gather+bmm / jd_fused | gather+bmm / lora kernels | lora kernels / jd_fused |")
    print("|---|---|---|---|---|")
    for (shape, th), ops in sorted(rows.items()):
        f = ops.get(("jd_layer", "jd_fused"))
        tj = ops.get(("jd_layer", "torch_gather_bmm"))
        ll = ops.get(("lora_layer", "lora_shrink_expand"))
        tl = ops.get(("lora_layer", "torch_gather_bmm"))
        if f and tj and ll and tl:
            print(f"| {shape} | {th} | {tj / f:.1f}x | {tl / ll:.1f}x | {ll / f:.1f}x |")
    quant = {k: {op: us for (kind, op), us in ops.items() if kind == "quantized_tables"} for k, ops in rows.items()}
    if any(quant.values()):
        print("\n## Quantized tables: time / the float table of the same model dtype and U layout\n")
        print("| shape | threads | layer | model dtype | tables | median us | / float |")
        print("|---|---|---|---|---|---|---|")
        for (shape, th), ops in sorted(quant.items()):
            for op, us in sorted(ops.items()):
                layer, spec = op.split(":")
                model, tables = spec.split("/")
                ref = ops.get(f"{layer}:{model}/{model}" + ("_column_major_U" if tables.endswith("_column_major_U")
                                                            else ""))
                print(f"| {shape} | {th} | {layer} | {model} | {tables} | {us:,.0f} | "
                      f"{us / ref:.2f} |" if ref else f"| {shape} | {th} | {layer} | {model} | {tables} | {us:,.0f} | - |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
