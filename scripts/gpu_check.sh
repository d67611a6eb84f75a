#!/usr/bin/env bash
# GPU check of the fused-op library, run at the repo root on a machine with one CUDA GPU and
# torch preinstalled (nothing is downloaded).  Steps:
#   1. build runtime/_C in place with the CUDA kernels (ninja if importable)
#   2. quick numerics check (scripts/bench_ops.py --verify; needs no pytest)
#   3. CUDA tests of tests/test_ops.py (pytest if importable)
#   4. micro-benchmarks at SD 1.5 shapes, fp16 (table on stdout, JSON in $OUT if set)
#   5. [hook] pipeline benchmark, appended by the lead (section at the end)
# Exits non-zero if the build, the numerics check or the tests fail.  Budget: well under 5 min.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
rc=0
LOG="${OUT:-${TMPDIR:-/tmp}}/build_gpu_check.log"
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "8.0;9.0")"
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$PY" -c "import ninja" 2>/dev/null || echo "ninja not importable: setuptools builds without it (slower)"

step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! SDEXPORT_FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace > "$LOG" 2>&1; then
  tail -n 60 "$LOG"
  echo "BUILD FAILED"
  exit 1
fi
"$PY" -c "
import torch, runtime.ops as o
o.load()
assert torch._C._dispatch_has_kernel_for_dispatch_key('sdfused::attention', 'CUDA'), 'built without CUDA kernels'
print('op library loaded with CUDA kernels')" || exit 1

step "numerics check"
"$PY" scripts/bench_ops.py --verify --device cuda || rc=1

step "CUDA tests"
if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest tests/test_ops.py -q -m cuda -p no:cacheprovider -x || rc=1
else
  echo "pytest not importable: relying on the numerics check above"
fi

step "micro-benchmarks (fp16)"
"$PY" scripts/bench_ops.py --device cuda --dtype fp16 --iters 30 || rc=1

# ============================================================================================
# HOOK: pipeline benchmark (to be appended by the lead).  Keep the total under ~5 minutes.
# Set rc=1 on failure; $OUT (if set) is the place for JSON results.
# ============================================================================================

step "done (rc=$rc)"
exit $rc
