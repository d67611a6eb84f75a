"""Builds the fused-op library `runtime._C` from csrc/ with ninja.

CPU kernels always; CUDA kernels too when torch was built with CUDA and nvcc is found
(set SDEXPORT_NO_CUDA=1 to skip them, SDEXPORT_FORCE_CUDA=1 to build them without a GPU).
"""

import glob
import os
import platform

import torch
from setuptools import Extension, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("SDEXPORT_NO_CUDA") == "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return os.environ.get("SDEXPORT_FORCE_CUDA") == "1" or torch.cuda.is_available()


def _cpu_simd_flags() -> list[str]:
    """AVX2/FMA build of the CPU kernels (at::vec::Vectorized<float> = 8 lanes) on x86-64.

    SDEXPORT_CPU_BASELINE=1 builds the portable baseline instead (for pre-AVX2 machines)."""
    if os.environ.get("SDEXPORT_CPU_BASELINE") == "1":
        return []
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def extensions() -> list[Extension]:
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # no -std flag: torch adds the standard its headers need (C++17 up to 2.13, C++20 from 2.14)
    cxx = ["-O3", "-fvisibility=hidden", *_cpu_simd_flags()]
    link: list[str] = []
    if platform.system() == "Linux":
        # at::parallel_for is inline OpenMP: without -fopenmp it silently runs on one thread. The
        # soname libgomp.so.1 resolves to the copy torch has already loaded, so there is one runtime.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        return [
            CUDAExtension(  # type: ignore[no-untyped-call]
                "runtime._C",
                sources,
                extra_compile_args={"cxx": [*cxx, "-DSDFUSED_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=link,
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(  # type: ignore[no-untyped-call]
            "runtime._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},  # type: ignore[no-untyped-call]
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
