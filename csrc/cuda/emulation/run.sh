#!/usr/bin/env bash
# Builds and runs the host emulations of the CUDA kernels (no GPU needed):
#   tc_emulation      the tensor-core kernels with forced tiles and clusters;
#   launch_emulation  the library's launchers (kernels.cu, tc_kernels.cu) on
#                     emulated devices, running every kernel they launch.
# csrc/cuda/emulation/run.sh [--quick|--meta-cost] [tc|launch]  (both by default;
# --meta-cost: launch_emulation's build_batch_meta cost model only)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
OUT=${TMPDIR:-/tmp}/jdlora_emulation
mkdir -p "$OUT"
QUICK=""
WHICH="tc launch"
for a in "$@"; do
  case "$a" in
    --quick|--meta-cost) QUICK=$a ;;
    tc|launch) WHICH=$a ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done
CXX=(g++ -std=c++20 -O1 -g -pthread -Wall -Wno-unknown-pragmas -Wno-attributes -Wno-class-memaccess
     -Icsrc/cuda/emulation -Icsrc/include -I"$CUDA_INC")
EMU_DEFS=(-DJDLORA_TC_HW_HEADER='"tc_hw_emu.h"' -DJDLORA_LAUNCH_ENQUEUE_HEADER='"emu_launch.h"')
pids=()
if [[ " $WHICH " == *" tc "* ]]; then
  "${CXX[@]}" csrc/cuda/emulation/tc_emulation.cpp -o "$OUT/tc_emulation" & pids+=($!)
fi
if [[ " $WHICH " == *" launch "* ]]; then
  # The tensor-core launchers in their own unit (their helpers share names
  # with the simple launchers', which launch_emulation.cpp includes).
  "${CXX[@]}" "${EMU_DEFS[@]}" -include emu_runtime.h -x c++ -c csrc/cuda/tc_kernels.cu -o "$OUT/tc_kernels.o" & pids+=($!)
  "${CXX[@]}" -c csrc/cuda/emulation/emu_cudart.cpp -o "$OUT/emu_cudart.o" & pids+=($!)
  "${CXX[@]}" -c csrc/cuda/emulation/launch_emulation.cpp -o "$OUT/launch_emulation.o" & pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
if [[ " $WHICH " == *" launch "* ]]; then
  g++ -pthread "$OUT/launch_emulation.o" "$OUT/tc_kernels.o" "$OUT/emu_cudart.o" -o "$OUT/launch_emulation"
fi
rc=0
for w in $WHICH; do
  echo "== ${w}_emulation"
  "$OUT/${w}_emulation" $QUICK || rc=1
done
exit $rc
