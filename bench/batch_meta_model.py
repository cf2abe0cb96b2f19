"""build_batch_meta at T = 65536 under the host emulation's cost model.

There is no GPU on the development machine, so this is a model estimate, not
a measurement: csrc/cuda/emulation/launch_emulation.cpp runs the kernel from
the real sources on the host emulation, counts the busiest warp's collective
steps and the block barriers, and prices them at 25 and 100 cycles at
1.98 GHz (an H200's boost clock). Writes bench/results/batch_meta_model.json
with the earlier one-warp placement's figures (counted by the same
emulation at the commit named there) beside the current ones. Run from the
repository root::

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
# same case, same model.
BEFORE = {"commit": "7bfeabc", "placement": "one warp walks adapters and tokens in order",
          "num_tokens": 65536, "num_adapters": 19936, "num_clusters": 64,
          "warp_steps": 10914, "block_barriers": 203, "cycles": 293150, "estimate_us": 148.1}


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
        out = os.path.join(tmp, "cost.json")
        env = {**os.environ, "TMPDIR": tmp, "JDLORA_META_COST_JSON": out}
        r = subprocess.run(["bash", "csrc/cuda/emulation/run.sh", "--meta-cost", "launch"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        sys.stdout.write(r.stdout[-2000:])
        if r.returncode != 0 or not os.path.isfile(out):
            sys.stderr.write(r.stderr[-4000:])
            return 1
        with open(out) as fh:
            after = json.load(fh)
    after = {"commit": git_head(), "placement": "block-wide: all 32 warps, 3 barriers per round of 1024 keys",
             **after}
    data = {
        "what": "build_batch_meta cost-model estimate on an H200 (not a measurement: no GPU ran this)",
        "model": "25 cycles per collective step of the busiest warp + 100 cycles per 1024-thread barrier, "
                 "1.98 GHz; counts from the host emulation (csrc/cuda/emulation/launch_emulation.cpp)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "before": BEFORE,
        "after": after,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    print(f"before {BEFORE['estimate_us']} us, after {after['estimate_us']} us (model) -> {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
