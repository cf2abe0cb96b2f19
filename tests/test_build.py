"""The package reports how it was built, fails clearly without its extension,
and the CPU-only variant builds from CMakeLists.txt with the same API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jdlora_ops

ROOT = Path(__file__).resolve().parents[1]
OPS = ["build_batch_meta", "jd_shrink", "jd_core", "jd_expand", "jd_fused", "lora_shrink", "lora_expand"]


def test_build_info():
    info = jdlora_ops.build_info()
    assert info["version"] == jdlora_ops.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["cutlass_version"].count(".") == 2
    if info["cuda_enabled"]:
        assert info["cuda_version"].startswith(torch.version.cuda.split(".")[0])
        assert info["cuda_archs"]
    else:
        assert info["cuda_archs"] == ""


def test_every_op_is_registered_for_cpu_and_has_a_fake():
    for name in OPS:
        op = getattr(torch.ops.jdlora_ops, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), name
        if jdlora_ops.build_info()["cuda_enabled"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name


def test_mutated_arguments_are_marked():
    for name in OPS:
        schema = getattr(torch.ops.jdlora_ops, name).default._schema
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written, f"{name} writes no marked argument"
        assert not schema.returns, f"{name} should return nothing (outputs are passed in)"


def test_python_m_prints_build_info():
    out = subprocess.run([sys.executable, "-m", "jdlora_ops"], capture_output=True, text=True, check=True).stdout
    for key in ("version", "torch_version", "cuda_archs", "cutlass_version"):
        assert key in out


def test_missing_extension_message(tmp_path):
    pkg = tmp_path / "jdlora_ops"
    shutil.copytree(ROOT / "python" / "jdlora_ops", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    code = "import jdlora_ops"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert r.returncode != 0
    assert "jdlora_ops: the native extension jdlora_ops._C failed to load" in r.stderr
    assert "pip install --no-build-isolation -e ." in r.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cpu_only_build_from_cmake(tmp_path):
    """`cmake -DJDLORA_CUDA=OFF` builds the extension with CPU kernels only; it
    loads in a fresh interpreter and serves an op with the same Python API."""
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                    "-DJDLORA_CUDA=OFF", *gen], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--parallel", "2"], check=True, capture_output=True)
    so = next((build / "python" / "jdlora_ops").glob("_C*.so"))
    pkg = tmp_path / "pkg" / "jdlora_ops"
    shutil.copytree(ROOT / "python" / "jdlora_ops", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy2(so, pkg / so.name)
    code = (
        "import torch, jdlora_ops as J\n"
        "assert not J.build_info()['cuda_enabled']\n"
        "m = J.BatchMeta.allocate(4, 3, 2).build(torch.tensor([0, 2, -1, 1], dtype=torch.int32),"
        " torch.tensor([1, 0, 1], dtype=torch.int32))\n"
        "x = torch.randn(4, 8); V = torch.randn(2, 4, 8)\n"
        "h = J.jd_shrink(x, V, m)\n"
        "ref = J.reference.jd_shrink(x, [V], m.mapping(), torch.tensor([1, 0, 1]))\n"
        "assert (h.double() - ref).abs().max() < 1e-5\n"
        "print('cpu-only ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cpu-only ok" in r.stdout
