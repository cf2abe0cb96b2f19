"""build_batch_meta at T = 65536 under the host emulation's cost model.

There is no GPU on the development machine, so this is a model estimate, not
a measurement: csrc/cuda/emulation/launch_emulation.cpp runs the kernel from
the real sources on the host emulation, counts the busiest warp's collective
steps, the block barriers and the atomics on the busiest shared address, and
prices them at 25, 100 and 8 cycles at 1.98 GHz (an H200's boost clock), for
a zipf spread and for a single-adapter prefill ("identical"). Writes
bench/results/batch_meta_model.json with earlier versions' figures (counted
by the same emulation at the commits named there) beside the current ones.
Run from the repository root::

    python bench/batch_meta_model.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "batch_meta_model.json")

# The one-warp placement (batch_meta.cuh before the block-wide placement),
# zipf, counted before atomics were part of the model.
ONE_WARP = {"commit": "7bfeabc", "placement": "one warp walks adapters and tokens in order",
            "spread": "zipf", "num_tokens": 65536, "num_adapters": 19936, "num_clusters": 64,
            "warp_steps": 10914, "block_barriers": 203, "cycles": 293150, "estimate_us": 148.1}

# The block-wide placement with one shared atomic per token and counter
# (203d7e2), counted by this model (atomics included).
PER_TOKEN_ATOMICS = [
    {"commit": "203d7e2", "counting": "one shared atomic per token and counter", "spread": "zipf",
     "num_tokens": 65536, "num_adapters": 19936, "num_clusters": 64, "warp_steps": 314, "block_barriers": 328,
     "atomics": 181439, "atomics_busiest_address": 10137, "cycles": 121746, "estimate_us": 61.5},
    {"commit": "203d7e2", "counting": "one shared atomic per token and counter", "spread": "identical",
     "num_tokens": 65536, "num_adapters": 19936, "num_clusters": 64, "warp_steps": 314, "block_barriers": 328,
     "atomics": 133122, "atomics_busiest_address": 65537, "cycles": 564946, "estimate_us": 285.3},
]


def git_head() -> str:
    """The commit, with "+changes" when the working tree differs from it."""
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    return r.stdout.strip() + ("+changes" if dirty else "")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cost.jsonl")
        env = {**os.environ, "TMPDIR": tmp, "JDLORA_META_COST_JSON": out}
        r = subprocess.run(["bash", "csrc/cuda/emulation/run.sh", "--meta-cost", "launch"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        sys.stdout.write(r.stdout[-2000:])
        if r.returncode != 0 or not os.path.isfile(out):
            sys.stderr.write(r.stderr[-4000:])
            return 1
        with open(out) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    head = git_head()
    now = [{"commit": head, "counting": "one shared atomic per warp, key and counter (match, leader adds)", **row}
           for row in rows]
    data = {
        "what": "build_batch_meta cost-model estimate on an H200 (not a measurement: no GPU ran this)",
        "model": "25 cycles per collective step of the busiest warp + 100 cycles per 1024-thread barrier + "
                 "8 cycles per atomic on the busiest shared address, 1.98 GHz; counts from the host emulation "
                 "(csrc/cuda/emulation/launch_emulation.cpp)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "one_warp_placement": ONE_WARP,
        "per_token_atomics": PER_TOKEN_ATOMICS,
        "now": now,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    for row in now:
        print(f"{row['spread']}: {row['estimate_us']} us (model) -> {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
