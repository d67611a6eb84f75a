"""Builds the fused-op library `runtime._C` from csrc/ with ninja.

CPU kernels always: a portable build in runtime._C and, on x86-64, AVX2 and AVX-512 builds beside it
(SDEXPORT_CPU_BASELINE=1 skips those). CUDA kernels too when torch was built with CUDA and nvcc is
found (set SDEXPORT_NO_CUDA=1 to skip them, SDEXPORT_FORCE_CUDA=1 to build them without a GPU).
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


# The CPU kernels (csrc/cpu/kernels.cpp) per instruction set, chosen at run time (csrc/cpu/kernels.h):
# the portable baseline goes into runtime._C, these into shared objects of their own.
SIMD_BUILDS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    # -Wno-maybe-uninitialized: GCC 12 warns inside its own AVX-512 intrinsics headers
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-Wno-maybe-uninitialized"],
}


def _simd_builds() -> dict[str, list[str]]:
    """SIMD builds for this machine's architecture; SDEXPORT_CPU_BASELINE=1 skips them (quicker build)."""
    if os.environ.get("SDEXPORT_CPU_BASELINE") == "1":
        return {}
    if platform.machine().lower() in ("x86_64", "amd64"):
        return SIMD_BUILDS
    return {}


def extensions() -> list[Extension]:
    # runtime._C: schemas, CPU entry points, the run-time choice and the portable kernels build
    sources = [*sorted(glob.glob("csrc/*.cpp")), *(f"csrc/cpu/{f}.cpp" for f in ("dispatch", "kernels", "ops_cpu"))]
    # no -std flag: torch adds the standard its headers need (C++17 up to 2.13, C++20 from 2.14)
    cxx = ["-O3", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    link: list[str] = []
    if platform.system() == "Linux":
        # at::parallel_for is inline OpenMP: without -fopenmp it silently runs on one thread. The
        # soname libgomp.so.1 resolves to the copy torch has already loaded, so there is one runtime.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # loaded with dlopen by runtime._C, never imported; -Bsymbolic: each binds its own inline copies
    simd = [
        CppExtension(  # type: ignore[no-untyped-call]
            f"runtime._sdfused_cpu_{name}",
            [f"csrc/cpu/kernels_{name}.cpp"],
            extra_compile_args={"cxx": [*cxx, *flags, "-DSDFUSED_KERNELS_DSO"]},
            extra_link_args=[*link, "-Wl,-Bsymbolic"],
            py_limited_api=True,
        )
        for name, flags in _simd_builds().items()
    ]
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
            ),
            *simd,
        ]
    return [
        CppExtension(  # type: ignore[no-untyped-call]
            "runtime._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True
        ),
        *simd,
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},  # type: ignore[no-untyped-call]
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
