#!/usr/bin/env bash
# CPU micro-benchmarks: writes bench/results/cpu_ops.json and cpu_ops.md.
# Needs the package built (scripts/setup_env.sh). Threads: 1 and 2, set per case.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m pytest bench/bench_cpu_ops.py -p no:cacheprovider -q --benchmark-only \
  --benchmark-json bench/results/cpu_ops.json "$@"
# JDLORA_BENCH_NOTE: a line for the summary, e.g. what else ran on the machine.
"$PY" bench/summarize.py bench/results/cpu_ops.json "${JDLORA_BENCH_NOTE:-}" > bench/results/cpu_ops.md
cat bench/results/cpu_ops.md
