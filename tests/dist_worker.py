"""One process of the distributed-compression tests (tests/test_distributed.py), started by torchrun.

    python -m torch.distributed.run --nproc-per-node W tests/dist_worker.py CONFIG.json

CONFIG: {"cases": [CASE...]}; each case compresses :func:`case_collection` into
``case["out"]`` through :func:`compress_to_store` on the default process group
(the Python API with an existing group). ``case["fail_on"]``: a module whose
loading raises on the rank that owns it; ``case["seed_by_rank"]``: each rank
uses seed + its rank (arguments that disagree). A case that raises prints
``CASE <name> FAILED: <message>`` and the next case runs (the group stays usable).
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jdlora_ops.compress import CallableCollection  # noqa: E402
from jdlora_ops.compress.calibration import CalibrationStats  # noqa: E402
from jdlora_ops.compress import compress_to_store  # noqa: E402
from jdlora_ops.synthetic import SyntheticCollection, SyntheticSpec, llama_like_modules  # noqa: E402

F64 = torch.float64


def case_collection(fail_on: str | None = None, modules: int | None = None, nan_on: str | None = None):
    """12 adapters in 3 families on 2 layers x (q, k, v, o) of a small Llama-like model (the first ``modules``).

    ``nan_on``: a module where one factor of the first adapter of rank 3 holds a NaN."""
    mods = llama_like_modules(2, 24, 12, targets=("q_proj", "k_proj", "v_proj", "o_proj"))[:modules]
    col = SyntheticCollection(SyntheticSpec(12, mods, ranks=(3, 5), num_families=3, family_dim=6, seed=5))
    if fail_on is None and nan_on is None:
        return col

    def load(spec, dtype, device):
        if spec.name == fail_on:
            raise ValueError(f"cannot read module {spec.name} (planted failure)")
        f = col.load_module(spec, dtype=dtype, device=device)
        if spec.name == nan_on:
            f.groups[0].Bt[0, 1, 2] = float("nan")
        return f

    return CallableCollection(col.adapter_names, mods, load)


def case_stats(collection) -> CalibrationStats:
    gen = torch.Generator().manual_seed(3)
    moments = {}
    for spec in collection.modules:
        X = torch.randn(4 * spec.d_in, spec.d_in, generator=gen, dtype=F64) * torch.linspace(0.2, 2.0, spec.d_in)
        moments[spec.name] = X.T @ X / X.shape[0]
    return CalibrationStats("test/base", moments, 100)


def case_args(case: dict, rank: int) -> dict:
    seed = case.get("seed", 0) + (rank if case.get("seed_by_rank") else 0)
    return dict(method=case.get("method", "full"), num_clusters=case.get("clusters", 3), seed=seed,
                dtype=getattr(torch, case.get("dtype", "float64")), max_iter=case.get("max_iter", 40),
                tol=case.get("tol", 1e-9), max_rounds=4,
                max_rel_error=case.get("budget"), store_dtype=torch.float32, target_ratio=case.get("target_ratio"),
                cluster_range=tuple(case["cluster_range"]) if "cluster_range" in case else None)


def run_case(case: dict, rank: int) -> None:
    collection = case_collection(case.get("fail_on"), case.get("modules"), case.get("nan_on"))
    stats = case_stats(collection) if case.get("calibration") else None
    compress_to_store(collection, case.get("rank", 4), case["out"], calibration=stats, **case_args(case, rank))


def main() -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    with open(sys.argv[1]) as fh:
        config = json.load(fh)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    status = 0
    for case in config["cases"]:
        try:
            run_case(case, rank)
        except Exception as exc:  # reported for the test to read; the next case still runs
            print(f"CASE {case['name']} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            status = 3
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
