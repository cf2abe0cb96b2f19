#!/usr/bin/env bash
# Quickstart 2: set up, build (CUDA variant when a toolkit is present) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k jd_fused`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
echo "[test] running pytest"
t0=$(date +%s)
python -m pytest -q -p no:cacheprovider "$@"
echo "[test] tests took $(( $(date +%s) - t0 )) s"
