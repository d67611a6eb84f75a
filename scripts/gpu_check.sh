#!/usr/bin/env bash
# GPU check of the fused-op library, run at the repo root on a machine with one CUDA GPU and
# torch preinstalled (nothing is downloaded).  Steps:
#   1. build runtime/_C in place with the CUDA kernels (ninja if importable)
#   2. [phase ops] quick numerics check (scripts/bench_ops.py --verify; needs no pytest), the CUDA tests
#      (pytest if importable), micro-benchmarks at SD 1.5 shapes, fp16 (JSON in $OUT if set)
#   3. [phase bench] sdexport bench sd15 and sd21-768; [phase aoti] SD 1.5 aoti build, bench, cold start,
#      profile; [phase formats] build time and cold start per format (GPU_CHECK_PHASES, see below)
# Exits non-zero if the build, the numerics check or the tests fail.  Budget: well under 5 min.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
rc=0
LOG="${OUT:-${TMPDIR:-/tmp}}/build_gpu_check.log"
mkdir -p "$(dirname "$LOG")"
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

PHASES="${GPU_CHECK_PHASES:-ops bench}"
if [[ " $PHASES " == *" ops "* ]]; then
  step "numerics check"
  "$PY" scripts/bench_ops.py --verify --device cuda || rc=1

  step "CUDA tests"
  if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest tests/test_ops.py tests/test_cudagraph.py tests/test_export.py -q -m cuda -p no:cacheprovider \
      || rc=1
  else
    echo "pytest not importable: relying on the numerics check above"
  fi

  step "micro-benchmarks (fp16)"
  "$PY" scripts/bench_ops.py --device cuda --dtype fp16 --iters 30 || rc=1
fi

# ============================================================================================
# Pipeline benchmarks (sdexport bench), random weights at the published sizes, fp16.
# GPU_CHECK_PHASES picks what runs after the build (default "ops bench": the op checks above and the
# pipeline benchmarks); "aoti" adds an SD 1.5 AOTInductor build
# (--half, 512 px), benchmarks it and times its cold start: run it as a second call, it needs most of a
# 10-minute slot. "formats" times build and cold start of every format on the medium preset.
# diffusers rows need the diffusers wheel carried in .whl/ (scripts/fetch_gpu_wheels.sh, carry=[".whl"]).
# ============================================================================================
RES="${OUT:-${TMPDIR:-/tmp}}"
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
if [[ " $PHASES " == *" bench "* ]]; then
  step "bench sd15: fp16, 512 px, CFG batch 2, 30 steps"
  "$PY" -m sdexport.cli bench sd15 --device cuda --half --steps 30 --repeat 10 --json "$RES/bench_sd15.json" || rc=1
  step "bench sd21-768: fp16, 768 px"
  "$PY" -m sdexport.cli bench sd21-768 --device cuda --half --steps 30 --repeat 5 --backends sdpa,fused \
    --no-diffusers --json "$RES/bench_sd21_768.json" || rc=1
fi
if [[ " $PHASES " == *" aoti "* ]]; then
  step "build sd15 aoti --half (512 px, batch 1)"
  bt0=$(date +%s)
  "$PY" -m sdexport.cli build sd15 -o /tmp/sd15-aoti --format aoti --half --device cuda --max-batch 1 \
    --min-size 512 --max-size 512 --max-chunks 1 --force || rc=1
  echo "build seconds: $(( $(date +%s) - bt0 ))"
  step "cold start of the aoti artifact (fresh process: import + load + first 30-step image)"
  "$PY" scripts/bench_formats.py --existing /tmp/sd15-aoti --device cuda --size 512 --steps 30 \
    --json "$RES/cold_sd15_aoti.json" || rc=1
  step "bench sd15 with the aoti artifact"
  "$PY" -m sdexport.cli bench sd15 --device cuda --half --steps 30 --repeat 10 --backends sdpa,fused \
    --no-diffusers --artifact /tmp/sd15-aoti --json "$RES/bench_sd15_aoti.json" || rc=1
  step "profile of the compiled UNet step"
  "$PY" scripts/profile_unet.py sd15 --device cuda --half --size 512 --artifact /tmp/sd15-aoti --rows 25 || rc=1
fi
if [[ " $PHASES " == *" formats "* ]]; then
  # Build time and cold start of every format on the medium preset (a few minutes); onnx only where
  # onnxruntime has the CUDA provider.
  fmts="pt2,torchscript,aoti"
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    2>/dev/null && fmts="$fmts,onnx"
  step "build time and cold start per format: medium, fp16, 256 px ($fmts)"
  "$PY" scripts/bench_formats.py medium --device cuda --half --kernels fused --size 256 --steps 20 \
    --formats "$fmts" --json "$RES/formats_medium.json" || rc=1
fi

step "done (rc=$rc)"
exit $rc
