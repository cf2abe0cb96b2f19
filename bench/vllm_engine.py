"""Runs one vLLM engine (tests_vllm/run_engine.py) in the vLLM environment for the vLLM benchmarks.

Every engine gets its own process with one thread and vLLM's engine core in
that process, so that settings compare on equal terms.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1",
           VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def run_engine(vllm_python: str, work: str, name: str, spec: dict, *, timeout: float = 1800,
               env: dict | None = None) -> tuple[dict, float]:
    """Runs ``spec`` as setting ``name``; returns run_engine.py's output and the process's wall seconds.

    Raises RuntimeError with the end of the engine's output if it fails.
    """
    spec_path, out_path = os.path.join(work, f"{name}.json"), os.path.join(work, f"{name}.out.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    t = time.time()
    r = subprocess.run([vllm_python, os.path.join(ROOT, "tests_vllm", "run_engine.py"), spec_path, out_path],
                       env=ENV | (env or {}), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: engine failed\n{(r.stdout + r.stderr)[-4000:]}")
    with open(out_path) as fh:
        return json.load(fh), time.time() - t


def git_commit() -> str:
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def vllm_version(vllm_python: str) -> str:
    out = subprocess.run([vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                         text=True, env=ENV).stdout.strip().splitlines()
    return out[-1] if out else "unknown"
