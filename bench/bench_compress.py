"""Compressor benchmark: JD-Full, JD-Diag and clustered JD against a stacked-SVD baseline.

Part ``single`` (one 4096 x 4096 module, r_i = 16): for n in {100, 1000} adapters
and r in {16, 64}, on a realistic synthetic collection and on unstructured
random adapters, it times

* the baseline: a straightforward JD-Full that stacks the (r n) x d matrix
  ``[dW_i V]`` and calls ``torch.svd_lowrank`` for each half-step, 10 alternating
  steps from a random start (written below, as the reference implementation
  does it);
* JD-Full (uniform weights, the baseline's objective): the time to reach the
  baseline's objective, and the time and error at convergence;
* JD-Full with relative weights (the default), JD-Diag, and clustered JD.

Part ``stream``: a Llama-7B-shaped collection (32 layers x q 4096x4096, k and v
1024x4096, r_i = 16, 1000 adapters, about 19 GB in bf16) generated lazily module
by module and compressed with r = 16 and K = 25 clusters; wall time, peak RSS,
errors, rounds, and the time to project one new adapter into the result. With
``--allocate RATIO`` also what a byte budget adds to that compression: the
spectra and residual options read during the fit (timed inside it and taken out
of ``wall_seconds``), the allocation and the chosen factors' pass.

Results are merged into ``bench/results/compress_cpu.json`` (one key per run,
``--tag`` or the part name) with the commit, the machine, the date, the load
average and the torch thread count. Run from the repository root::

    PYTHONPATH=python python bench/bench_compress.py --part single --threads 2
    PYTHONPATH=python python bench/bench_compress.py --part stream --threads 1
    PYTHONPATH=python python bench/bench_compress.py --part stream --threads 1 --allocate 0.15 \
        --tag byte_budget_n1000_layers32
    PYTHONPATH=python python bench/bench_compress.py --part single --threads 1 --ns 100 --ranks 16 \
        --tag single_n100_r16_threads1

Timings on a shared 2-core machine move with the load of other processes;
baseline and JD runs are interleaved so that both see the same conditions.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from jdlora_ops.compress import ModuleFactors, compress, full_sigma, jd_diag, jd_full
from jdlora_ops.compress.projection import project_adapters
from jdlora_ops.synthetic import SyntheticCollection, SyntheticSpec, llama_like_modules
from jdlora_ops.compress.collection import ModuleSpec

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "compress_cpu.json")


# ---------------------------------------------------------------- baseline
def stacked_svd_baseline(A: torch.Tensor, Bt: torch.Tensor, r: int, steps: int = 10, seed: int = 0):
    """JD-Full the straightforward way.

    ``A: [n, r_i, d_in]``, ``Bt: [n, r_i, d_out]`` (scaling folded in). Each
    half-step forms the stacked ``[d, n r]`` matrix of all ``dW_i V`` (resp.
    ``dW_i^T U``) and takes its top-``r`` left singular vectors with
    ``torch.svd_lowrank(q = r + 2, niter = 2)``, restarted at random each time;
    ``steps`` alternating steps from random orthonormal ``U``, ``V``.
    """
    torch.manual_seed(seed)
    n, _, d_in = A.shape
    d_out = Bt.shape[2]
    U = torch.linalg.qr(torch.randn(d_out, r, dtype=A.dtype))[0]
    V = torch.linalg.qr(torch.randn(d_in, r, dtype=A.dtype))[0]
    B = Bt.transpose(1, 2)
    for _ in range(steps):
        X = torch.bmm(B, torch.matmul(A, V)).transpose(0, 1).reshape(d_out, n * r)
        U = torch.svd_lowrank(X, q=r + 2, niter=2)[0][:, :r]
        del X
        Y = torch.bmm(A.transpose(1, 2), torch.matmul(Bt, U)).transpose(0, 1).reshape(d_in, n * r)
        V = torch.svd_lowrank(Y, q=r + 2, niter=2)[0][:, :r]
        del Y
    return U, V


def errors_of(f: ModuleFactors, U: torch.Tensor, V: torch.Tensor):
    """Per-adapter (squared error, relative error) for orthonormal U, V, in float64."""
    norms = f.norms_sq().double()
    cap = full_sigma(f, U, V).double().square().sum(dim=(1, 2))
    err = (norms - cap).clamp_min(0)
    return err, err / norms


def stats(rel: torch.Tensor) -> dict:
    return {"mean_rel_error": float(rel.mean()), "max_rel_error": float(rel.max())}


# ----------------------------------------------------------- environment
def machine() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(threads: int) -> dict:
    return {"commit": commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "torch_threads": threads, "load_average_at_start": os.getloadavg()}


def save(part: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    data = {}
    if os.path.isfile(RESULTS):
        with open(RESULTS) as fh:
            data = json.load(fh)
    data[part] = payload
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, RESULTS)


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


# ------------------------------------------------------------------ single
def bench_single(ns, ranks, kinds, d, repeats, repeats_large, clusters_for, log) -> list[dict]:
    rows = []
    spec = ModuleSpec("model.layers.0.self_attn.q_proj", d, d)
    for kind in kinds:
        for n in ns:
            # Random adapters all get the same magnitude: i.i.d. Gaussian factors, the hardest case.
            col = SyntheticCollection(SyntheticSpec(n, [spec], kind=kind, ranks=(16,), num_families=max(4, n // 40),
                                                    num_seeds=4, seed=1, norm_spread=0.5 if kind == "realistic" else 0.0))
            f, t_gen = timed(col.load_module, spec)
            g = f.groups[0]
            A, Bt = g.A, g.Bt
            for r in ranks:
                row = {"kind": kind, "n": n, "d": d, "r_i": 16, "r": r, "generate_s": t_gen}
                log(f"[{kind} n={n} r={r}]")
                # Interleave baseline and JD runs so that load from other processes hits both alike.
                base_t, jd_reach_t, jd_reach_it = [], [], []
                base_err = None
                for rep in range(repeats if n <= 100 else repeats_large):
                    (U, V), tb = timed(stacked_svd_baseline, A, Bt, r, 10, rep)
                    base_t.append(tb)
                    err, rel = errors_of(f, U, V)
                    if base_err is None or float(err.sum()) < base_err["objective"]:
                        base_err = {"objective": float(err.sum()), **stats(rel)}
                    target = float(err.sum())
                    # Smallest iteration count whose (uniform) objective is at or below the baseline's.
                    it, hit_t = None, None
                    for k in range(1, 60):
                        res, tj = timed(jd_full, f, r, weights="uniform", max_iter=k, tol=0.0, seed=rep)
                        if res.history[-1] <= target:
                            it, hit_t = k, tj
                            break
                    jd_reach_it.append(it)
                    jd_reach_t.append(hit_t)
                    log(f"  rep {rep}: baseline {tb:.3f} s, JD-Full reaches it in {it} iterations, {hit_t} s")
                row["baseline"] = {"seconds_runs": base_t, "seconds_median": statistics.median(base_t), **base_err}
                ok = [t for t in jd_reach_t if t is not None]
                row["jd_full_reach_baseline"] = {
                    "iterations_runs": jd_reach_it, "seconds_runs": jd_reach_t,
                    "seconds_median": statistics.median(ok) if ok else None,
                    "time_ratio_vs_baseline_median": (statistics.median(ok) / statistics.median(base_t)) if ok else None,
                    "time_ratio_per_run": [(a / b) if a is not None else None for a, b in zip(jd_reach_t, base_t)],
                }
                res, tc = timed(jd_full, f, r, weights="uniform", max_iter=200, tol=1e-7)
                row["jd_full_uniform_converged"] = {"seconds": tc, "iterations": res.iterations,
                                                    "converged": res.converged,
                                                    "objective": res.history[-1], **stats(res.rel_errors.double()),
                                                    "below_baseline": res.history[-1] < base_err["objective"]}
                res, tc = timed(jd_full, f, r, weights="relative", max_iter=200, tol=1e-7)
                row["jd_full_relative_converged"] = {"seconds": tc, "iterations": res.iterations,
                                                     "converged": res.converged,
                                                     **stats(res.rel_errors.double())}
                res, tc = timed(jd_full, f, r, weights="relative", max_iter=200, tol=1e-4)
                row["jd_full_relative_tol1e-4"] = {"seconds": tc, "iterations": res.iterations,
                                                   **stats(res.rel_errors.double())}
                res, tc = timed(jd_diag, f, r, weights="relative", max_iter=100, tol=1e-5)
                row["jd_diag_relative"] = {"seconds": tc, "iterations": res.iterations, **stats(res.rel_errors.double())}
                K = clusters_for(n)
                cres, tc = timed(compress, col, r, num_clusters=K, max_iter=50, tol=1e-5)
                row["clustered_jd_full_relative"] = {"clusters": cres.num_clusters, "seconds": tc,
                                                     "rounds": len(cres.history), **cres.summary()}
                log("  " + json.dumps({k: v for k, v in row.items() if isinstance(v, dict)}, default=str)[:2000])
                rows.append(row)
                del res, cres
            del f, A, Bt, g
    return rows


# ------------------------------------------------------------------ stream
def bench_stream(n, layers, K, r, max_iter, tol, max_rounds, warmup_rounds, log, allocate_ratio=None) -> dict:
    mods = llama_like_modules(layers, 4096, 1024)
    col = SyntheticCollection(SyntheticSpec(n, mods, ranks=(16,), num_families=K, num_seeds=4, seed=2))
    params = sum(16 * (m.d_out + m.d_in) for m in mods) * n
    hook = None
    if allocate_ratio is not None:
        # As compress_for_budget does it: the ranks from the collection, the spectra and the fit's residual
        # options read during the fit (their time is the hook's, taken out of the plain compression's).
        from jdlora_ops.compress.allocation import FitSpectra, nominal_ranks

        (_, kmax), t_ranks = timed(nominal_ranks, col)
        hook = FitSpectra(col, kmax)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    res = compress(col, r, num_clusters=K, max_iter=max_iter, tol=tol, max_rounds=max_rounds,
                   warmup_rounds=warmup_rounds, progress=True, log=log, module_hook=hook)
    wall = time.perf_counter() - t0 - (hook.seconds if hook else 0.0)
    cpu = time.process_time() - cpu0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    # Before the projection below adds an adapter; on a copy, since it moves adapters out of the tables.
    allocation = (None if allocate_ratio is None else
                  bench_allocation(col, copy.deepcopy(res), allocate_ratio, wall, hook, t_ranks))
    rel = res.rel_errors()
    by_kind = {}
    for j, m in enumerate(res.modules.values()):
        by_kind.setdefault(m.spec.kind, []).append(rel[:, j])
    # Project one new adapter (same generator, a new index) into the result; its factors are
    # read into memory first so that only the projection is timed.
    extra = SyntheticCollection(SyntheticSpec(n + 1, mods, ranks=(16,), num_families=K, num_seeds=4, seed=2))
    from jdlora_ops.compress.collection import InMemoryCollection

    factors = {}
    for m in mods:
        g = extra.load_module(m, adapters=[n]).groups[0]
        factors[m.name] = (g.A[0].clone(), g.Bt[0].t().clone(), 1.0)
    one = InMemoryCollection({"new": factors}, modules=mods)
    rep, t_proj = timed(project_adapters, res, one)
    fam = torch.tensor(col.metadata["families"])
    pairs = set(zip(fam.tolist(), res.assignment.tolist()))
    return {
        "byte_budget": allocation,
        "n_adapters": n, "layers": layers, "modules": len(mods), "r_i": 16, "r": r, "clusters": K,
        "adapter_params": params, "adapter_bytes_bf16": 2 * params,
        "max_iter": max_iter, "tol": tol, "max_rounds": max_rounds, "warmup_rounds": warmup_rounds,
        "wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_gb": rss_gb,
        "rounds": res.history, **res.summary(),
        "mean_rel_error_by_kind": {k: float(torch.stack(v).mean()) for k, v in by_kind.items()},
        "memory_bf16": res.memory(2),
        "cluster_sizes": torch.bincount(res.assignment).tolist(),
        "distinct_family_cluster_pairs": len(pairs),
        "project_one_adapter": {"seconds": t_proj, "cluster": int(rep.clusters[0]),
                                "mean_rel_error": float(rep.rel_errors.mean()),
                                "true_family": int(extra.metadata["families"][n])},
    }


def bench_allocation(col, res, ratio: float, compress_wall: float, hook, t_ranks: float) -> dict:
    """What ``--target-ratio`` adds to a plain compression at the given rank and K: the spectra and residual
    options read during the fit (``hook``), the allocation and the chosen adapters' own factors, timed
    step by step (bf16 store bytes); ``compress_wall`` is the fit's time without the hook's."""
    from jdlora_ops.compress.allocation import allocate, apply_allocation, joint_option, original_bytes

    t = {"ranks": t_ranks, "spectra_and_residual_spectra_during_the_fit": hook.seconds}
    (opts, res_opts), t["combine_over_modules"] = timed(lambda: (hook.options(), hook.residual_options()))
    jd, t["joint_errors"] = timed(joint_option, res, 2, residual=res_opts)
    budget = ratio * original_bytes(opts, 2)
    alloc, t["allocate"] = timed(allocate, opts, budget, jd=jd, itemsize=2)
    moved = 0
    if alloc is not None:
        names, t["individual_factors"] = timed(apply_allocation, res, col, alloc)
        moved = len(names)
    total = sum(t.values())
    return {"target_ratio": ratio, "seconds": t, "total_seconds": total,
            "compress_wall_seconds_without_the_hook": compress_wall,
            "added_share": total / compress_wall, "fits": alloc is not None,
            "representations": alloc.counts() if alloc else None, "moved_out": moved,
            "predicted_mean_rel_error": alloc.mean_error if alloc else None,
            "plain_mean_rel_error": float(jd.mean.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["single", "stream"], required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ns", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--kinds", nargs="+", default=["realistic", "random"])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3, help="baseline/JD repetitions for n <= 100")
    p.add_argument("--repeats-large", type=int, default=1, help="repetitions for n > 100")
    p.add_argument("--n", type=int, default=1000, help="stream: adapters")
    p.add_argument("--layers", type=int, default=32, help="stream: layers (3 modules each)")
    p.add_argument("--clusters", type=int, default=25)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=5)
    p.add_argument("--tag", default=None, help="store the result under this key instead of the part name")
    p.add_argument("--allocate", type=float, default=None, metavar="RATIO",
                   help="stream: also time the byte budget's allocation at this fraction of the original bytes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    head = header(torch.get_num_threads())
    if args.part == "single":
        rows = bench_single(args.ns, args.ranks, args.kinds, args.d, args.repeats, args.repeats_large,
                            lambda n: max(2, n // 40), log)
        payload = {**head, "rows": rows}
    else:
        payload = {**head, **bench_stream(args.n, args.layers, args.clusters, args.rank, args.max_iter, args.tol,
                                          args.max_rounds, args.warmup_rounds, log, args.allocate)}
    payload["load_average_at_end"] = os.getloadavg()
    save(args.tag or args.part, payload)
    print(json.dumps(payload, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
