"""Runs the host emulations of the CUDA kernels (csrc/cuda/emulation).

The emulations compile the kernels' device code and the library's own host
launchers with g++, simulating threads, barriers, asynchronous copies,
thread-block clusters and the CUDA runtime's launch rules on emulated sm_80
and sm_90 devices, and check every op against a float64 reference: the
tensor-core kernels with forced tiles and clusters (tc_emulation), and every
kernel as the launchers choose, size and launch it, build_batch_meta and
int8/int4 weight stacks included, and one token's outputs in batch-invariant mode bit for bit across
batch sizes and emulated A100/H200 devices (launch_emulation). They check the kernels' logic and the launch
decisions on every CI run, where no GPU exists; they do not replace running
on a GPU (see the header of launch_emulation.cpp for what they cannot catch).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")


@pytest.mark.skipif(shutil.which("g++") is None or not Path(CUDA_HOME, "include", "cuda_bf16.h").exists(),
                    reason="needs g++ and the CUDA toolkit headers")
def test_kernels_and_launchers_in_host_emulation(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "csrc/cuda/emulation/run.sh")], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp_path), "CUDA_HOME": CUDA_HOME}, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "all cases match: 0 failure(s)" in r.stdout
    assert "all launches match: 0 failure(s)" in r.stdout
