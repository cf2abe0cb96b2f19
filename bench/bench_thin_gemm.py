"""Thin products of the compressor on this CPU: why `compress._linalg.gemm_width` pads.

Part 1 times the two thin GEMMs every JD pass runs, ``D @ X`` (project) and
``D^T C`` (expand), for ``D`` a column-layout ``[n r_i, d]`` factor stack, at
block widths m, once as a plain GEMM of width m and once padded to
``gemm_width(m)``. Part 2 times JD-Full on the realistic synthetic collection
(one 4096 x 4096 module, rank-16 adapters) at small ranks, with the adaptive
block (default) and with a fixed oversampled block, and reports both errors.

Results go to ``bench/results/thin_gemm_cpu.json`` with the commit, machine,
date and thread count. Run from the repository root::

    PYTHONPATH=python python bench/bench_thin_gemm.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench_compress import header
from jdlora_ops.compress import jd_full
from jdlora_ops.compress._linalg import expand, gemm_width, project
from jdlora_ops.compress.collection import ModuleSpec, empty_factors
from jdlora_ops.synthetic import SyntheticCollection, SyntheticSpec

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "thin_gemm_cpu.json")


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def thin_gemms(rows: int, d: int, widths, repeats: int) -> list[dict]:
    out = []
    for dtype in (torch.float32, torch.float64):
        D = empty_factors(rows // 16, 16, d, dtype=dtype, device="cpu")
        D.copy_(torch.randn(rows // 16, 16, d, dtype=dtype))
        flat = D.reshape(-1, d)
        for m in widths:
            X = torch.randn(d, m, dtype=dtype)
            C = torch.randn(rows // 16, 16, m, dtype=dtype)
            out.append({
                "dtype": str(dtype).replace("torch.", ""), "m": m, "padded_to": gemm_width(m, dtype, X.device),
                "project_plain_ms": best_ms(lambda: flat @ X, repeats),
                "project_padded_ms": best_ms(lambda: project([D], X), repeats),
                "expand_plain_ms": best_ms(lambda: flat.t() @ C.reshape(-1, m), repeats),
                "expand_padded_ms": best_ms(lambda: expand([D], [C], d, m, X), repeats),
            })
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def small_ranks(ranks, repeats: int) -> list[dict]:
    spec = ModuleSpec("model.layers.0.self_attn.q_proj", 4096, 4096)
    col = SyntheticCollection(SyntheticSpec(100, [spec], kind="realistic", ranks=(16,), num_families=4,
                                            num_seeds=4, seed=1, norm_spread=0.5))
    f = col.load_module(spec)
    out = []
    for r in ranks:
        row = {"n": 100, "d": 4096, "r_i": 16, "r": r, "weights": "relative", "tol": 1e-5}
        for name, over in (("adaptive", None), ("fixed", max(8, r // 2))):
            res = None

            def run():
                nonlocal res
                res = jd_full(f, r, max_iter=200, tol=1e-5, oversample=over)

            row[name] = {"oversample": over, "seconds_best": best_ms(run, repeats) / 1e3,
                         "iterations": res.iterations, "mean_rel_error": float(res.rel_errors.mean())}
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = {**header(torch.get_num_threads()),
               "thin_gemm": {"rows": 1600, "d": 4096,
                             "cases": thin_gemms(1600, 4096, [1, 2, 4, 8, 11, 12, 16, 24, 32], args.repeats)},
               "jd_full_small_ranks": small_ranks([4, 8, 12, 16], 3)}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
