"""The CPU kernels' instruction-set builds and their run-time choice (csrc/cpu/kernels.h, dispatch.cpp).

The numerics of every build this machine runs are checked in test_ops.py (its `cpu_kernels` fixture);
these tests check the choice itself, the fallbacks, and that no wide instruction leaks into a build
meant for narrower CPUs.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason=ops.BUILD_HINT)

RUNTIME = Path(ops.__file__).resolve().parent
X86 = platform.machine().lower() in ("x86_64", "amd64")
ORDER = ("default", "avx2", "avx512")


def _cpu_runs(name: str) -> bool:
    if name == "default":
        return True
    if name == "avx2":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or bool(torch.cpu._is_avx512_supported())
    return bool(torch.cpu._is_avx512_supported())


def _shipped(name: str) -> bool:
    return name == "default" or any(RUNTIME.glob(f"_sdfused_cpu_{name}.*.so"))


def _python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=120)


def test_capabilities_are_what_this_cpu_runs_and_the_install_ships() -> None:
    caps = ops.cpu_kernel_capabilities()
    assert caps == tuple(n for n in ORDER if _cpu_runs(n) and _shipped(n))
    assert caps[0] == "default"
    assert ops.cpu_kernels() in caps


@pytest.mark.parametrize("aten", [None, "default", "avx2"])
def test_first_choice_is_the_best_build_capped_at_atens(aten: str | None) -> None:
    code = "from runtime import ops; import torch, json; print(json.dumps([ops.cpu_kernels(), " \
           "torch.backends.cpu.get_cpu_capability()]))"
    env = {} if aten is None else {"ATEN_CPU_CAPABILITY": aten}
    r = _python(code, env, cwd=RUNTIME.parent)
    assert r.returncode == 0, r.stderr
    ours, aten_cap = json.loads(r.stdout.strip().splitlines()[-1])
    cap_rank = {"AVX512": 2, "AVX2": 1}.get(aten_cap, 0)
    usable = [n for n in ORDER[: cap_rank + 1] if _cpu_runs(n) and _shipped(n)]
    assert ours == usable[-1]
    if aten == "default":
        assert ours == "default"


def test_use_cpu_kernels_switches_and_rejects_clearly() -> None:
    before = ops.cpu_kernels()
    try:
        for name in ops.cpu_kernel_capabilities():
            ops.use_cpu_kernels(name)
            assert ops.cpu_kernels() == name
            x = torch.randn(3, 2 * 37)
            assert float((ops.geglu(x) - ops.reference_geglu(x)).abs().max()) <= 1e-5
        ops.use_cpu_kernels(before)
        with pytest.raises(ValueError, match=r"unknown CPU kernels 'sse4': choose one of default, avx2, avx512"):
            ops.use_cpu_kernels("sse4")
        with pytest.raises(TypeError, match="must be a str"):
            ops.use_cpu_kernels(2)  # type: ignore[arg-type]
        if not _cpu_runs("avx512"):
            with pytest.raises(ValueError, match=r"this CPU cannot run the avx512 kernels \(they need AVX-512"):
                ops.use_cpu_kernels("avx512")
        assert ops.cpu_kernels() == before  # a refused switch changes nothing
    finally:
        ops.use_cpu_kernels(before)


# A copy of runtime._C alone in a directory: which build it picks, and what it says.
_LOAD_COPY = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
x = torch.randn(2, 8)
torch.testing.assert_close(torch.ops.sdfused.geglu(x), x[:, :4] * torch.nn.functional.gelu(x[:, 4:]))
chosen = mod.cpu_kernels()
try:
    mod.use_cpu_kernels("avx2"); err = ""
except ValueError as e:
    err = str(e)
print(json.dumps({"chosen": chosen, "caps": mod.cpu_kernel_capabilities(), "err": err}))
"""


def _copy_of_c(tmp_path: Path) -> Path:
    lib = next(RUNTIME.glob("_C.*so"))
    dst = tmp_path / lib.name
    shutil.copy(lib, dst)
    return dst


def _run_copy(lib: Path) -> tuple[dict[str, object], str]:
    """What the copy chose, and its stderr (where c10 prints TORCH_WARN from an op call)."""
    r = subprocess.run([sys.executable, "-c", _LOAD_COPY, str(lib)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out, r.stderr


@pytest.mark.skipif(not X86, reason="the SIMD builds exist on x86-64 only")
def test_install_without_simd_builds_runs_the_portable_kernels_quietly(tmp_path: Path) -> None:
    res, stderr = _run_copy(_copy_of_c(tmp_path))
    assert res["chosen"] == "default" and res["caps"] == ["default"]
    assert "sdfused" not in stderr
    assert "this install has no avx2 build" in str(res["err"]) or "cannot run the avx2" in str(res["err"])


@pytest.mark.skipif(not X86 or not _cpu_runs("avx2"), reason="needs an AVX2 CPU")
def test_broken_simd_build_warns_and_falls_back(tmp_path: Path) -> None:
    lib = _copy_of_c(tmp_path)
    (tmp_path / "_sdfused_cpu_avx2.abi3.so").write_bytes(b"not an ELF file")
    res, stderr = _run_copy(lib)
    assert res["chosen"] == "default"
    assert re.search(r"sdfused: cannot load \S*_sdfused_cpu_avx2\.abi3\.so: .*; using slower CPU kernels", stderr)
    assert "cannot load" in str(res["err"])


def _wide_registers(lib: Path) -> set[str]:
    r = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True, check=True)
    return {reg for reg in ("ymm", "zmm") if f"%{reg}" in r.stdout}


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_no_wide_instructions_leak_into_narrower_builds() -> None:
    # runtime._C must run on any x86-64 CPU: no AVX (ymm) or AVX-512 (zmm) code, even from inlined
    # torch-header functions; the AVX2 build must have no AVX-512 code.
    assert _wide_registers(next(RUNTIME.glob("_C.*so"))) == set()
    for lib in RUNTIME.glob("_sdfused_cpu_avx2.*.so"):
        assert _wide_registers(lib) == {"ymm"}
    for lib in RUNTIME.glob("_sdfused_cpu_avx512.*.so"):
        assert "zmm" in _wide_registers(lib)
