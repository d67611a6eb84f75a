#!/usr/bin/env bash
# Compile-checks the fused-op library with CUDA (sm_80 + sm_90) on a machine without a GPU.
#
# Uses a CUDA build of torch in .cudavenv (created here when missing; pip takes torch from the
# local wheel store), the local CUDA toolkit (CUDA_HOME, default /usr/local/cuda) plus the
# headers shipped in the venv's nvidia/cu13 wheels (the local toolkit lacks cusparse.h etc.).
# Builds into build/cuda-check (incremental with ninja), never touches runtime/_C*.so.
# Exit status is non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A cache outside the checkout, so CI clones reuse it; created on first use.
VENV="${SDEXPORT_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sdexport/cudavenv}"
TORCH_SPEC="${SDEXPORT_CUDA_TORCH:-torch==2.14.1}"
OUT_DIR="$ROOT/build/cuda-check"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import torch, ninja; assert torch.version.cuda" 2>/dev/null; then
  echo "[compile_cuda] creating $VENV with $TORCH_SPEC (a few minutes, ~5.5 GB)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" numpy ninja "setuptools>=77" wheel
fi
PY="$VENV/bin/python"
# pyproject.toml's SPDX license string needs setuptools >= 77 (a venv starts with an older one)
"$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' \
  || "$VENV/bin/pip" install -q "setuptools>=77"
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
EXTRA_INC="$SITE/nvidia/cu13/include"
[[ -d "$EXTRA_INC" ]] || EXTRA_INC="$(ls -d "$SITE"/nvidia/cu*/include 2>/dev/null | head -1 || true)"
echo "[compile_cuda] torch $("$PY" -c 'import torch; print(torch.__version__)'), nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), archs $TORCH_CUDA_ARCH_LIST"

cd "$ROOT"
start=$(date +%s)
# SDEXPORT_CPU_BASELINE=1: the CPU SIMD builds are not what this script checks (CI builds them anyway)
SDEXPORT_CPU_BASELINE=1 SDEXPORT_FORCE_CUDA=1 "$PY" setup.py -q build_ext \
  --build-temp "$OUT_DIR/temp" --build-lib "$OUT_DIR/lib" ${EXTRA_INC:+--include-dirs "$EXTRA_INC"}

SO="$(ls "$OUT_DIR"/lib/runtime/_C*.so | head -1)"
[[ -f "$SO" ]] || { echo "[compile_cuda] FAIL: no shared object built" >&2; exit 1; }

# Both architectures must be in the fat binary, and the CUDA kernels must be in it.
# The local toolkit may lack cuobjdump; triton's wheel (in the venv) ships one.
CUOBJDUMP="$(command -v "$CUDA_HOME/bin/cuobjdump" || ls "$SITE"/triton/backends/nvidia/bin/cuobjdump 2>/dev/null || true)"
if [[ -z "$CUOBJDUMP" ]]; then
  echo "[compile_cuda] WARNING: no cuobjdump found; architectures and kernel names are not checked" >&2
else
  elfs="$("$CUOBJDUMP" --list-elf "$SO" 2>/dev/null || true)"
  for arch in sm_80 sm_90; do
    grep -q "$arch" <<<"$elfs" || { echo "[compile_cuda] FAIL: no $arch code in $SO" >&2; exit 1; }
  done
  syms="$("$CUOBJDUMP" --list-text "$SO" 2>/dev/null || true)"
  for k in gn_kernel geglu_kernel; do
    grep -q "$k" <<<"$syms" || { echo "[compile_cuda] FAIL: kernel $k missing" >&2; exit 1; }
  done
  echo "[compile_cuda] sm_80 and sm_90 code and all kernels are in the binary ($CUOBJDUMP)"
fi
echo "[compile_cuda] OK: $SO ($(( $(date +%s) - start ))s)"
