"""Module-parallel compression (jdlora_ops.compress.distributed): 2 and 3 gloo processes give the one-process store.

Each launch is one torchrun of tests/dist_worker.py running several cases, so
that the processes start once; every launch is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jdlora_ops.compress._team import ModuleTeam
from jdlora_ops.compress.collection import ModuleSpec
from jdlora_ops.store import read_manifest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dist_worker  # noqa: E402

LAUNCH_TIMEOUT = 240

CASES = [
    {"name": "full-budget", "method": "full", "clusters": 3, "budget": 0.4},
    {"name": "diag-calibration-fp32", "method": "diag", "clusters": 3, "calibration": True, "dtype": "float32"},
    {"name": "full-calibration-budget", "method": "full", "clusters": 2, "calibration": True, "budget": 0.6},
]
# --clusters auto: the count search sums sizes and costs over modules too (one process count is enough).
# Fewer modules than processes: the last one holds none and only receives the sums.
FEW = [{"name": "few-modules", "method": "full", "clusters": 2, "modules": 2}]
# The byte budget: spectra and joint errors summed over modules, the chosen adapters' SVDs per module.
TARGET = [{"name": "full-target", "method": "full", "clusters": 3, "rank": 4, "target_ratio": 0.45, "budget": 0.9},
          # Calibrated: every process whitens and turns back its own modules (full adapters read back too).
          {"name": "full-target-calibration", "method": "full", "clusters": 3, "rank": 4, "target_ratio": 0.45,
           "calibration": True}]
AUTO = [{"name": "full-auto", "method": "full", "clusters": "auto", "cluster_range": [2, 3], "max_iter": 10,
         "tol": 1e-5}]


def launch(nproc: int, cases: list[dict], tmp_path, script: list[str] | None = None, timeout: int = LAUNCH_TIMEOUT):
    """torchrun ``nproc`` processes of the worker (or of ``script``); returns the completed process."""
    cfg = tmp_path / f"config-{nproc}.json"
    cfg.write_text(json.dumps({"cases": cases}))
    env = dict(os.environ, OMP_NUM_THREADS="1", JDLORA_DIST_TIMEOUT="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *(script or [os.path.join(HERE, "dist_worker.py"), str(cfg)])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


def store_contents(path) -> tuple[dict, dict]:
    """The manifest without timings and file names, and each tensor file's bytes by role."""
    m = read_manifest(path)
    files = m.pop("files")
    sums = m.pop("sha256")
    m.pop("created")
    md = m["metadata"]
    md.get("compressor", {}).pop("seconds", None)
    search = md.get("cluster_search")
    if search:
        search.pop("seconds")
        for step in search["steps"]:
            step.pop("seconds")
    for point in (md.get("cluster_count") or {}).get("curve", []):
        point.pop("seconds")
    for entry in m["history"]:
        entry.pop("seconds")
    for cand in (md.get("byte_budget") or {}).get("candidates", {}).values():
        cand.pop("seconds")
    blobs = {}
    for role, name in files.items():
        with open(os.path.join(path, name), "rb") as fh:
            blobs[role] = fh.read()
        m[f"sha256:{role}"] = sums[name]
    return m, blobs


def one_process_stores(cases, tmp_path) -> dict:
    out = {}
    for case in cases:
        c = dict(case, out=str(tmp_path / f"ref-{case['name']}"))
        dist_worker.run_case(c, 0)
        out[case["name"]] = store_contents(c["out"])
    return out


def no_leftovers(folder) -> list[str]:
    return sorted(x for x in os.listdir(folder) if x.startswith("."))


@pytest.mark.parametrize("nproc", [2, 3])
def test_processes_write_the_one_process_store(nproc, tmp_path, one_thread):
    todo = CASES + (AUTO if nproc == 2 else FEW + TARGET)
    ref = one_process_stores(todo, tmp_path)
    assert ref["full-budget"][0]["individual"], "the budget case must move some adapters out of the joint tables"
    assert ref["full-calibration-budget"][0]["individual"]
    assert all(m["num_clusters"] > 1 for name, (m, _) in ref.items() if not name.startswith("full-target"))
    if "full-target" in ref:
        target = ref["full-target"][0]
        assert set(target["metadata"]["byte_budget"]["candidates"]) == {"r=4 K=3"}
        # Residual factors, computed per module by each process and assembled by the first (own factors
        # leaving the tables: the error-budget cases).
        paths = {e["path"] for e in target["individual"]}
        assert "residual" in paths and target["num_adapters"], f"joint cores with residuals expected; got {paths}"
        calibrated = ref["full-target-calibration"][0]["metadata"]
        assert calibrated["byte_budget"]["metric"] == "activation-weighted" and calibrated["calibration"]
    cases = [dict(c, out=str(tmp_path / f"dist-{c['name']}")) for c in todo]
    proc = launch(nproc, cases, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in cases:
        manifest, blobs = store_contents(case["out"])
        ref_manifest, ref_blobs = ref[case["name"]]
        assert manifest == ref_manifest, case["name"]
        assert blobs == ref_blobs, case["name"]  # byte-identical tensor files
    assert no_leftovers(tmp_path) == []


def test_a_failing_rank_fails_the_job_and_leaves_no_store(tmp_path, one_thread):
    # The last module belongs to the last rank; the others wait for it in the first relay.
    last = dist_worker.case_collection().modules[-1].name
    cases = [{"name": "boom", "fail_on": last, "out": str(tmp_path / "boom")},
             {"name": "disagree", "seed_by_rank": True, "out": str(tmp_path / "disagree")},
             {"name": "after", "clusters": 2, "out": str(tmp_path / "after")}]
    proc = launch(2, cases, tmp_path)
    assert proc.returncode != 0
    err = proc.stderr
    # Both ranks fail the case: the owner with its own error, the other naming it.
    assert f"CASE boom FAILED: ValueError: cannot read module {last} (planted failure)" in err
    assert f"CASE boom FAILED: RankFailed: rank 1 of 2 failed: ValueError: cannot read module {last}" in err
    assert "CASE disagree FAILED: ValueError: every rank must compress the same collection with the same " \
           "arguments; the arguments of rank 1 differ" in err
    assert "'seed': (0, 1)" in err
    assert not os.path.exists(tmp_path / "boom") and not os.path.exists(tmp_path / "disagree")
    assert no_leftovers(tmp_path) == []
    # The group survives a failed case: the next one completes.
    assert read_manifest(tmp_path / "after")["num_clusters"] == 2


def test_cli_under_torchrun_writes_the_one_process_store(tmp_path, one_thread):
    from jdlora_ops.cli import main
    from jdlora_ops.synthetic import SyntheticCollection, SyntheticSpec, llama_like_modules, write_peft_adapters

    mods = llama_like_modules(2, 24, 12)
    write_peft_adapters(SyntheticCollection(SyntheticSpec(8, mods, ranks=(4,), num_families=2, seed=1)),
                        tmp_path / "adapters")
    args = ["compress", str(tmp_path / "adapters"), "--rank", "3", "--clusters", "2", "--compute-dtype", "float64",
            "--max-rel-error", "0.5", "--seed", "4", "-q"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    proc = launch(2, [], tmp_path, script=["-m", "jdlora_ops.cli", *args, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 processes" in proc.stdout
    assert store_contents(tmp_path / "two") == store_contents(tmp_path / "one")
    # svd/none do not split by module: a clear error, no store.
    proc = launch(2, [], tmp_path, script=["-m", "jdlora_ops.cli", *args[:2], "--rank", "3", "--method", "svd", "-q",
                                          "--out", str(tmp_path / "svd")])
    assert proc.returncode != 0 and "method must be 'full' or 'diag' with several processes" in proc.stderr
    assert not os.path.exists(tmp_path / "svd")


def test_module_blocks_are_contiguous_and_balanced():
    class Fake(ModuleTeam):
        def __init__(self, rank, world):
            super().__init__()
            self.rank, self.world = rank, world

    specs = [ModuleSpec(f"m{i}", d, 64) for i, d in enumerate([64, 16, 16, 64] * 6)]
    for world in (1, 2, 3, 5, 30):
        owners = Fake(0, world).owners(specs, 10)
        assert owners == sorted(owners)  # contiguous blocks in module order: the relay's order
        work = [sum(s.d_out for s, o in zip(specs, owners) if o == r) for r in range(world)]
        if world <= 5:
            assert owners[0] == 0 and owners[-1] == world - 1
            assert max(work) - min(work) <= 64, (world, work)
        assert sorted(i for r in range(world) for i in Fake(r, world).local(specs, 10)) == list(range(len(specs)))
