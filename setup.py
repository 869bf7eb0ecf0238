"""Builds gm and its native extension gm._C by driving CMake (pattern of pybind/cmake_example).

Environment switches:
  GM_CUDA=0|1      skip the CUDA kernels / require them (default: build them when nvcc is found)
  GM_CUDA_ARCHS    CUDA architectures, default "80;90"
  MAX_JOBS         parallel compile jobs (default: CPU count, bounded by memory at ~2 GiB a job)
  GM_NO_EXT=1      install the pure-Python package only (reference and Triton backends)
  CMAKE_ARGS       extra arguments for CMake
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _default_jobs() -> int:
    cpus = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return max(1, min(cpus, int(mem_gib // 2)))
    except (ValueError, OSError, AttributeError):
        return cpus


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cuda = os.environ.get("GM_CUDA", "").strip().lower()
        cuda_mode = {"0": "OFF", "off": "OFF", "false": "OFF", "1": "ON", "on": "ON", "true": "ON"}.get(cuda, "AUTO")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building gm._C needs CMake: `pip install cmake` or install it with your package manager")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DGM_CUDA={cuda_mode}",
            f"-DGM_CUDA_ARCHS={os.environ.get('GM_CUDA_ARCHS', '80;90')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            import pybind11

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError as err:
            raise RuntimeError("building gm._C needs pybind11: `pip install pybind11`") from err
        if shutil.which("ninja"):
            args.append("-GNinja")
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(_default_jobs())
        subprocess.run([cmake, str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "-j", jobs], cwd=build_temp, check=True)


ext_modules = [] if os.environ.get("GM_NO_EXT") == "1" else [CMakeExtension("gm._C")]

setup(
    packages=[
        "gm",
        "gm.ops",
        "gm.reference",
        "gm.nn",
        "gm.models",
        "gm.data",
        "gm.kernels",
        "gm.kernels.tuned",  # data only: the autotuner picks that tuned() launches, one table per GPU
    ],
    package_dir={"gm": "gm", "gm.kernels": "kernels"},
    package_data={"gm.kernels.tuned": ["*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
