#!/usr/bin/env bash
# GPU check of jdlora_ops on an H200 machine without network access (its own
# python3 with torch 2.11.0+cu130, nvcc 13.0, cmake, ninja, pybind11, pytest,
# pytest-xdist, pytest-timeout, matplotlib; no nvidia-cutlass):
#
#   1. build the package with that machine's torch (editable install, the
#      carried nvidia-cutlass wheel installed into /tmp/site for its headers);
#   2. pytest tests/test_cuda.py tests/test_opcheck.py, the serving cache's CUDA test and the CUDA
#      cases of tests/test_quant_ops.py (quantized tables);
#   3. a reduced selection of the same tests under compute-sanitizer memcheck
#      (with the inputs of the issue-12 defects and the serving cache's CUDA
#      test), and one small case per kernel (a cluster of 8 included) under
#      racecheck and synccheck, where the runtime allows the sanitizer;
#   4. the benchmark sweep (bench/gpu_sweep.py), batch-invariant mode's cost included;
#
# writing JSON, markdown, the plot and the logs to $OUT (8 files), and the
# summary (gpu_check.md) last on stdout. Each stage runs under a time limit
# derived from one deadline, so the whole script ends within 8 minutes.
#
# Preparation, once, in the repository root of the machine that sends the job:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0.0
# (one pure-Python wheel of 6.4 MB). The job, one command over a copy of the
# repository with the .whl folder carried along:
#   command:  JDLORA_COMMIT=<commit sha> bash bench/gpu_check.sh
#   carry:    [".whl"]
#   timeout:  540 s (the script itself stops within 480 s)
# A second, partial run on a fresh machine picks stages (the build is always
# needed first), e.g.
#   command:  GPU_CHECK_STAGES=build,sweep SWEEP_BUDGET_S=120 bash bench/gpu_check.sh
#   carry:    [".whl"]
#   timeout:  400 s
#
# Environment: OUT (default /tmp/gpu_check_out), GPU_CHECK_STAGES (default
# build,tests,sanitizer,sweep), GPU_CHECK_DEADLINE_S (default 470),
# SWEEP_BUDGET_S (default: what the deadline leaves), JDLORA_COMMIT, WHEELS
# (default .whl), PYTHON (default python3), PYTEST_WORKERS (default 12),
# SWEEP_ARGS (extra arguments of gpu_sweep.py, e.g. --smoke for a dry run
# of this script on a machine without a GPU).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# Stages change directory: make a relative interpreter path absolute (without
# resolving links, which would step out of a virtual environment).
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
STAGES=${GPU_CHECK_STAGES:-build,tests,sanitizer,sweep}
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_DEADLINE_S:-470}))
WORKERS=${PYTEST_WORKERS:-12}
SUMMARY="$OUT/gpu_check.md"
export PYTHONUNBUFFERED=1

has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
now() { date +%s; }
left() { echo $((DEADLINE - $(now))); }
# Time limit of a stage: its cap, or what the deadline leaves after `reserve` seconds for later stages.
limit() {
  local cap=$1 reserve=$2 l
  l=$(($(left) - reserve))
  ((l > cap)) && l=$cap
  ((l < 10)) && l=10
  echo "$l"
}
note() { echo "$*" | tee -a "$SUMMARY"; }

: >"$SUMMARY"
note "# jdlora_ops GPU check"
note ""
note "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit: ${JDLORA_COMMIT:-unknown}, stages: $STAGES"
GPU_LINE=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | head -1)
note "- gpu: $GPU_LINE"
note "- python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
# The toolkit root: the folder whose bin/ holds nvcc and whose include/ holds
# the runtime headers (an nvcc on the PATH may be a wrapper outside it).
if [[ -z "${CUDA_HOME:-}" ]]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /x/x/x)")")")"; do
    if [[ -x "$c/bin/nvcc" && -f "$c/include/cuda_runtime.h" ]]; then CUDA_HOME=$c; break; fi
  done
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=$CUDA_HOME/bin/nvcc
note "- nvcc: $("$NVCC" --version 2>&1 | tail -1), CUDA_HOME=$CUDA_HOME"
note ""

# --- 1. build ----------------------------------------------------------------------
BUILD_OK=1
if has_stage build; then
  t0=$(now)
  {
    WHEELS=${WHEELS:-$ROOT/.whl}
    if ls "$WHEELS"/nvidia_cutlass-*.whl >/dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    else
      echo "no nvidia-cutlass wheel under $WHEELS: the build will not find the CUTLASS headers"
    fi
    echo "== tools"
    for t in cmake ninja "$NVCC" compute-sanitizer; do echo "$t: $(command -v "$t" || echo MISSING)"; done
    PYTHONPATH=/tmp/site $PY -c 'import torch, pybind11, cutlass_library, setuptools; print("torch", torch.__version__, "pybind11", pybind11.__version__, "cutlass_library", cutlass_library.__file__)'
    echo "== build"
    export PYTHONPATH=/tmp/site
    timeout -k 10 "$(limit 200 270)" env JDLORA_CUDA=1 MAX_JOBS="$(nproc)" JDLORA_BUILD_DIR=/tmp/jdlora-build \
      $PY -m pip install --no-build-isolation --no-deps -e . ||
      { echo "== editable install failed; building in place"
        timeout -k 10 "$(limit 150 270)" env JDLORA_CUDA=1 MAX_JOBS="$(nproc)" JDLORA_BUILD_DIR=/tmp/jdlora-build \
          $PY setup.py build_ext --inplace; }
    echo "== build info"
    PYTHONPATH=$ROOT/python:/tmp/site $PY -c 'import jdlora_ops, json; print(json.dumps(jdlora_ops.build_info()))'
  } >"$OUT/build.log" 2>&1
  BUILD_RC=$?
  ((BUILD_RC == 0)) || BUILD_OK=0
  note "## build: rc $BUILD_RC in $(($(now) - t0)) s"
  note ""
  note '```'
  grep -E "^torch|^\{|MISSING|rror" "$OUT/build.log" | head -20 | tee -a "$SUMMARY"
  note '```'
fi
export PYTHONPATH=$ROOT/python:/tmp/site

if ((BUILD_OK == 0)); then
  note "build failed: no further stage can run (see build.log)"
  cat "$SUMMARY"
  exit 1
fi

# --- 2. tests ----------------------------------------------------------------------
if has_stage tests; then
  t0=$(now)
  XDIST=""
  $PY -c 'import xdist' 2>/dev/null && XDIST="-n $WORKERS"
  TIMEOUT_OPT=""
  $PY -c 'import pytest_timeout' 2>/dev/null && TIMEOUT_OPT="--timeout 120 --timeout-method=thread"
  # test_quant_ops.py: its CUDA cases only (the CPU grid runs in CI).
  (cd tests && timeout -k 10 "$(limit 150 200)" $PY -m pytest test_cuda.py test_opcheck.py \
    test_serving_cache.py::test_cuda_pinned_host_side_stream_and_events -p no:cacheprovider -q \
    -rfE $XDIST $TIMEOUT_OPT && timeout -k 10 "$(limit 60 90)" $PY -m pytest test_quant_ops.py -k cuda \
    -p no:cacheprovider -q -rfE $XDIST $TIMEOUT_OPT) >"$OUT/pytest.log" 2>&1
  TESTS_RC=$?
  note "## tests: rc $TESTS_RC in $(($(now) - t0)) s"
  note ""
  note '```'
  grep -E "^(FAILED|ERROR)|passed|failed|Timeout|timed out" "$OUT/pytest.log" | head -40 | tee -a "$SUMMARY"
  note '```'
fi

# --- 3. compute-sanitizer ---------------------------------------------------------
if has_stage sanitizer; then
  t0=$(now)
  SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  MEMCHECK_TESTS=(
    "test_cuda.py::test_fast_shrink[bfloat16-16-133-zipf-1000-25-1024]"
    "test_cuda.py::test_fast_expand[bfloat16-16-133-zipf-1000-25-1024]"
    "test_cuda.py::test_fast_fused[bfloat16-16-133-zipf-1000-25-1024]"
    "test_cuda.py::test_fast_fused[float16-64-1500-skewed-64-1-200]"
    "test_cuda.py::test_fast_shrink[float16-64-1500-skewed-64-1-200]"
    "test_cuda.py::test_fast_expand[float16-64-1500-skewed-64-1-200]"
    "test_cuda.py::test_fast_fused[bfloat16-128-256-uniform-1000-25-200]"
    "test_cuda.py::test_fast_fused[bfloat16-8-300-skewed-64-1-64]"
    "test_cuda.py::test_fast_multi_slice[1100-16-512-bfloat16]"
    "test_cuda.py::test_corrupt_segment_tables_are_skipped[bfloat16-64]"
    "test_cuda.py::test_corrupt_segment_tables_are_skipped[bfloat16-1100]"
    "test_cuda.py::test_corrupt_segment_tables_are_skipped[float32-64]"
    "test_cuda.py::test_out_of_range_slots_are_skipped[bfloat16-1100]"
    "test_cuda.py::test_out_of_range_slots_are_skipped[float32-64]"
    "test_cuda.py::test_build_batch_meta_large[uniform-5000-20000-64]"
    "test_cuda.py::test_jd_core[bfloat16-64-133-zipf]"
    "test_cuda.py::test_jd_fused[float32-16-111-133-zipf]"
    "test_cuda.py::test_multi_slice_expand_fused[misaligned-bfloat16-4096-16-133-zipf]"
    "test_cuda.py::test_cuda_graph_every_op[48]"
    # The inputs that triggered the launch and fp16 defects of issue 12.
    "test_cuda.py::test_build_batch_meta_static_plus_dynamic_shared[1968-64]"
    "test_cuda.py::test_simple_fused_at_the_shared_memory_edge[383-float32]"
    "test_cuda.py::test_simple_fused_at_the_shared_memory_edge[384-bfloat16]"
    "test_cuda.py::test_simple_expand_at_the_shared_memory_edge[767]"
    "test_cuda.py::test_rank_beyond_shared_memory_is_a_clear_error"
    "test_cuda.py::test_fp16_expand_g_beyond_half_range[large-20]"
    "test_cuda.py::test_fp16_expand_g_beyond_half_range[tiny-1100]"
    "test_cuda.py::test_fp16_fused_h_beyond_half_range"
    "test_cuda.py::test_cluster_split_follows_the_image[bfloat16]"
    "test_cuda.py::test_largest_tensor_core_tiles[1100]"
    # Batch-invariant mode's fixed split (a cluster of 8 from a single token on).
    "test_cuda.py::test_batch_invariant_mode[520-bfloat16]"
    # The serving cache: pinned host tiers, side-stream copies and events.
    "test_serving_cache.py::test_cuda_pinned_host_side_stream_and_events"
  )
  # One small case per kernel for racecheck and synccheck (both replay every
  # shared-memory access, so sizes stay small): build_batch_meta (one round of
# its block-wide placement, and four); the simple
  # shrink, core, expand and fused (fp32); the tensor-core shrink, expand and
  # fused with decode tiles, and with a cluster of 8 (one window, d_in 1024,
  # on sm_90); prefill tiles; the fp16 row scaling of g.
  SHARED_TESTS=(
    "test_cuda.py::test_build_batch_meta[133-zipf]"
    "test_cuda.py::test_build_batch_meta_static_plus_dynamic_shared[1968-64]"
    "test_cuda.py::test_jd_shrink[float32-16-111-7-zipf]"
    "test_cuda.py::test_jd_core[float32-16-7-zipf]"
    "test_cuda.py::test_jd_expand[float32-16-111-7-zipf]"
    "test_cuda.py::test_jd_fused[float32-16-111-7-zipf]"
    "test_cuda.py::test_fast_shrink[bfloat16-16-133-zipf-1000-25-1024]"
    "test_cuda.py::test_fast_expand[bfloat16-16-133-zipf-1000-25-1024]"
    "test_cuda.py::test_fast_fused[bfloat16-16-133-zipf-1000-25-1024]"
    "test_cuda.py::test_cluster_split_follows_the_image[bfloat16]"
    "test_cuda.py::test_fast_fused[float16-64-1500-skewed-64-1-200]"
    "test_cuda.py::test_fp16_expand_g_beyond_half_range[large-20]"
  )
  # No separate probe: starting torch under the sanitizer costs tens of
  # seconds. A runtime that refuses the sanitizer (gVisor: "Device not
  # supported") shows in the log before any test runs.
  if [[ -x "$SAN" ]]; then
    # Without the caching allocator an out-of-bounds access lands outside any
    # allocation instead of in a neighbour inside the same cached segment.
    echo "== memcheck" >"$OUT/sanitizer.log"
    (cd tests && PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$(limit 110 200)" "$SAN" --tool memcheck \
      --error-exitcode 86 --print-limit 30 $PY -m pytest -p no:cacheprovider -q -x "${MEMCHECK_TESTS[@]}") \
      >>"$OUT/sanitizer.log" 2>&1
    MEM_RC=$?
    if grep -qiE "not supported|error 999" "$OUT/sanitizer.log" && ! grep -q "passed" "$OUT/sanitizer.log"; then
      note "## compute-sanitizer: refused by this runtime (see sanitizer.log)"
    else
      echo "== racecheck" >>"$OUT/sanitizer.log"
      (cd tests && timeout -k 10 "$(limit 60 140)" "$SAN" --tool racecheck --error-exitcode 87 --print-limit 30 \
        $PY -m pytest -p no:cacheprovider -q -x "${SHARED_TESTS[@]}") >>"$OUT/sanitizer.log" 2>&1
      RACE_RC=$?
      echo "== synccheck" >>"$OUT/sanitizer.log"
      (cd tests && timeout -k 10 "$(limit 50 90)" "$SAN" --tool synccheck --error-exitcode 88 --print-limit 30 \
        $PY -m pytest -p no:cacheprovider -q -x "${SHARED_TESTS[@]}") >>"$OUT/sanitizer.log" 2>&1
      SYNC_RC=$?
      note "## compute-sanitizer: memcheck rc $MEM_RC, racecheck rc $RACE_RC, synccheck rc $SYNC_RC in $(($(now) - t0)) s (0: clean, 86/87/88: errors found, 124: stage time limit)"
    fi
  else
    echo "compute-sanitizer not found" >"$OUT/sanitizer.log"
    note "## compute-sanitizer: not found on this machine"
  fi
  note ""
  note '```'
  grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|Invalid|Race|Barrier|rror" "$OUT/sanitizer.log" | head -40 | tee -a "$SUMMARY"
  note '```'
fi

# --- 4. sweep ------------------------------------------------------------------------
if has_stage sweep; then
  t0=$(now)
  BUDGET=${SWEEP_BUDGET_S:-$(($(left) - 40))}
  ((BUDGET < 45)) && BUDGET=45
  timeout -k 10 "$((BUDGET + 40))" env JDLORA_COMMIT="${JDLORA_COMMIT:-}" \
    $PY bench/gpu_sweep.py --out "$OUT" --budget-s "$BUDGET" ${SWEEP_ARGS:-} >"$OUT/sweep.log" 2>&1
  SWEEP_RC=$?
  note "## sweep: rc $SWEEP_RC in $(($(now) - t0)) s (budget $BUDGET s)"
  note ""
  if [[ -f "$OUT/gpu_sweep.md" ]]; then
    sed -n '1,/^## All cases/p' "$OUT/gpu_sweep.md" | head -60 >>"$SUMMARY"
  else
    tail -20 "$OUT/sweep.log" >>"$SUMMARY"
  fi
  rm -f "$OUT/gpu_sweep.json.tmp"  # left only by a sweep stopped mid-write; 8 files come back at most
fi

note ""
note "total: $(($(now) - START)) s"
cat "$SUMMARY"
