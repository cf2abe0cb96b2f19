#!/usr/bin/env bash
# Builds and runs the host emulation of the tensor-core kernels (no GPU
# needed): csrc/cuda/emulation/run.sh [--quick]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
OUT=${TMPDIR:-/tmp}/jdlora_tc_emulation
g++ -std=c++20 -O1 -g -Wall -Wno-unknown-pragmas -Wno-attributes -Wno-class-memaccess \
  -Icsrc/cuda/emulation -Icsrc/include -I"$CUDA_INC" \
  csrc/cuda/emulation/tc_emulation.cpp -o "$OUT"
"$OUT" "$@"
