"""Writes a CMake file that locates torch, pybind11 and CUTLASS for this interpreter.

Usage: python cmake/locate_deps.py OUT.cmake
"""

import os
import sys


def main(out_path: str) -> None:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        sys.exit(f"torch is not importable: {e}")
    try:
        import pybind11
    except ImportError as e:
        sys.exit(f"pybind11 is not importable (pip install pybind11): {e}")
    # CUTLASS is needed by the CUDA kernels only: a CPU-only build (e.g. into a
    # serving environment that pins another torch) goes without it, and
    # CMakeLists.txt stops a CUDA build when it is missing.
    try:
        import cutlass_library
    except ImportError:
        cutlass_inc = ""
    else:
        cutlass_inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
        if not os.path.isfile(os.path.join(cutlass_inc, "cutlass", "version.h")):
            sys.exit(f"nvidia-cutlass is installed but {cutlass_inc}/cutlass/version.h is missing")

    torch_dir = os.path.dirname(torch.__file__)
    # Headers that torch's CUDA headers include but a bare toolkit may lack
    # (cusparse.h, cublas_v2.h, ...) ship in the nvidia-* wheels torch depends on.
    extra_cuda = []
    site = os.path.dirname(torch_dir)
    for sub in ("cu13", "cu12"):
        inc = os.path.join(site, "nvidia", sub, "include")
        if os.path.isdir(inc):
            extra_cuda.append(inc)
    for name in ("cusparse", "cublas", "cusolver", "curand", "cufft", "cuda_runtime"):
        inc = os.path.join(site, "nvidia", name, "include")
        if os.path.isdir(inc):
            extra_cuda.append(inc)

    def q(v: str) -> str:
        return '"' + v.replace("\\", "/").replace('"', '\\"') + '"'

    values = {
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": torch.version.cuda or "",
        "TORCH_CXX11_ABI": "1" if torch.compiled_with_cxx11_abi() else "0",
        "TORCH_LIBRARY_DIR": os.path.join(torch_dir, "lib"),
        "PYBIND11_CMAKE_DIR": pybind11.get_cmake_dir(),
        "CUTLASS_INCLUDE_DIR": cutlass_inc,
    }
    lists = {
        "TORCH_INCLUDE_DIRS": cpp_extension.include_paths(),
        "TORCH_EXTRA_CUDA_INCLUDE_DIRS": extra_cuda,
    }
    with open(out_path, "w") as f:
        for k, v in values.items():
            f.write(f"set({k} {q(v)})\n")
        for k, vs in lists.items():
            f.write(f"set({k} {' '.join(q(v) for v in vs)})\n")


if __name__ == "__main__":
    main(sys.argv[1])
