#!/usr/bin/env bash
# Creates .venv (if missing), installs what the package, its tests and its
# benchmarks need, and builds + installs jdlora_ops in editable mode.
#
# Sourced by scripts/demo.sh and scripts/test.sh. Honours JDLORA_CUDA (0/1),
# JDLORA_CUDA_ARCHS, CUDA_HOME and PYTHON (the interpreter that creates the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${JDLORA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"
# shellcheck disable=SC2034
PYTHON_BIN="$VENV/bin/python"

start=$(date +%s)
echo "[setup] installing dependencies"
python -m pip install -q --disable-pip-version-check --upgrade "pip>=23.2"
# torch first and pinned: the build links against exactly this version.
python -m pip install -q --disable-pip-version-check "torch==2.14.1"
python -m pip install -q --disable-pip-version-check \
  "setuptools>=77" wheel "pybind11>=2.12" "nvidia-cutlass==4.2.0.0" ninja \
  numpy "safetensors>=0.4" tqdm matplotlib pytest pytest-benchmark "peft>=0.13" "transformers>=4.45"

# A CUDA toolkit whose nvcc is on the PATH as a wrapper script: point CUDA_HOME
# at the real toolkit root so torch and CMake find libcudart and the headers.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

echo "[setup] building jdlora_ops (JDLORA_CUDA=${JDLORA_CUDA:-auto}, archs ${JDLORA_CUDA_ARCHS:-80;90a})"
build_start=$(date +%s)
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
end=$(date +%s)
echo "[setup] build took $((end - build_start)) s; setup in all $((end - start)) s"
python -m jdlora_ops
