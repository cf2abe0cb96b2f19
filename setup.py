"""Builds jdlora_ops._C through CMakeLists.txt, the one description of the native build.

Environment:
  JDLORA_CUDA=0|1        force the CPU-only or the CUDA build (default: CUDA when a
                         toolkit is found and torch was built with CUDA)
  JDLORA_CUDA_ARCHS      e.g. "80;90a" (default)
  CUDA_HOME              toolkit root (the folder whose bin/ holds nvcc)
  JDLORA_BUILD_DIR       CMake build folder (default: build/<python tag>), reused across builds
  MAX_JOBS               parallel compile jobs
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a wrapper script outside the toolkit; prefer a real toolkit root.
        for cand in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
            if (cand / "bin" / "nvcc").exists() and (cand / "include" / "cuda_runtime.h").exists():
                return str(cand)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tag = sysconfig.get_config_var("SOABI") or "py"
        build_dir = Path(os.environ.get("JDLORA_BUILD_DIR", ROOT / "build" / tag))
        build_dir.mkdir(parents=True, exist_ok=True)

        want = os.environ.get("JDLORA_CUDA", "").strip().lower()
        cuda = {"0": "OFF", "off": "OFF", "false": "OFF", "1": "ON", "on": "ON", "true": "ON"}.get(want, "AUTO")
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DJDLORA_CUDA={cuda}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('JDLORA_BUILD_TYPE', 'Release')}",
        ]
        if os.environ.get("JDLORA_CUDA_ARCHS"):
            args.append(f"-DJDLORA_CUDA_ARCHS={os.environ['JDLORA_CUDA_ARCHS']}")
        home = _cuda_home() if cuda != "OFF" else None
        if home:
            args += [f"-DCMAKE_CUDA_COMPILER={home}/bin/nvcc", f"-DCUDAToolkit_ROOT={home}"]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        env = dict(os.environ)
        if home:
            env["CUDA_HOME"] = home
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True, env=env)

        built = next((build_dir / "python" / "jdlora_ops").glob("_C*.so"))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, out)


setup(
    ext_modules=[CMakeExtension("jdlora_ops._C")],
    cmdclass={"build_ext": CMakeBuild},
)
