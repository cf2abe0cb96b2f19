"""Runs the host emulation of the tensor-core CUDA kernels (csrc/cuda/emulation).

The emulation compiles the kernels' device code with g++, simulating threads,
barriers, asynchronous copies and thread-block clusters, and checks every
fast-path op against a float64 reference. It checks the kernels' logic on
every CI run, where no GPU exists; it does not replace running on a GPU.
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
def test_tensor_core_kernels_in_host_emulation(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "csrc/cuda/emulation/run.sh")], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp_path), "CUDA_HOME": CUDA_HOME}, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "all cases match: 0 failure(s)" in r.stdout
