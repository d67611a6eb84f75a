#!/usr/bin/env bash
# GPU checks, run at the repo root on a machine with one CUDA GPU and torch preinstalled (nothing is
# downloaded there).  Run in phases, each sized for one call of at most ~9 minutes:
#
#   bash scripts/gpu_check.sh build        # build runtime/_C with the CUDA kernels (incremental)
#   bash scripts/gpu_check.sh ops          # numerics check + the CUDA tests (test_ops, test_cudagraph, test_export)
#   bash scripts/gpu_check.sh sanitizer    # compute-sanitizer memcheck + racecheck, one tiny call per kernel path
#   bash scripts/gpu_check.sh microbench   # op micro-benchmarks (fp16, bf16) vs composites and SDPA's best backend
#   bash scripts/gpu_check.sh bench        # sdexport bench sd15 / sd21-768 (fp16, random weights)
#   bash scripts/gpu_check.sh bench-sdxl   # sdexport bench sdxl: UNet step at 1024 px CFG batch 2, VAE, image
#   bash scripts/gpu_check.sh aoti         # SD 1.5 --half AOTInductor build, cold start, bench, profile
#   bash scripts/gpu_check.sh formats      # build time and cold start per format (medium preset)
#   bash scripts/gpu_check.sh lora         # LoRA load / swap / unload time, sd15 rank 32, fp16 (eager + aoti)
#   bash scripts/gpu_check.sh controlnet   # one ControlNet's cost in the sd15 UNet step, fp16 (eager + pt2 artifacts)
#   bash scripts/gpu_check.sh cpu-bf16     # the host CPU (AVX512-BF16 / AMX?): medium aoti fp32 vs --half (bf16)
#   bash scripts/gpu_check.sh cpu-kernels  # the host CPU: numerics + timings of each CPU kernels build (AVX-512?),
#                                          # and MKL vs oneDNN linear layers (--cpu-gemm's default)
#
# Several phases may be named in one call (GPU_CHECK_PHASES="..." works too); every phase first
# builds if the library is missing or lacks its CUDA kernels.  Each step runs under `timeout`;
# all output is unbuffered and also appended to $OUT/gpu_check.log (results: $OUT/*.json).
# Exit status is non-zero if any step failed or timed out.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
RES="${OUT:-${TMPDIR:-/tmp}/gpu_check}"
mkdir -p "$RES"
exec > >(tee -a "$RES/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
rc=0
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
# run SECONDS CMD...: the command under a timeout; a failure or timeout sets rc=1
run() {
  local limit=$1; shift
  timeout --kill-after=15 "$limit" "$@"
  local s=$?
  if (( s == 124 || s == 137 )); then echo "TIMEOUT after ${limit}s: $*"; rc=1
  elif (( s != 0 )); then echo "FAILED (exit $s): $*"; rc=1; fi
  return $s
}

PHASES="${*:-${GPU_CHECK_PHASES:-build ops}}"
echo "gpu_check phases: $PHASES (log: $RES/gpu_check.log)"

# ---- toolchain: nvcc and the CUDA headers the torch wheel ships (compile_cuda.sh needed them) ----
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# A toolkit root has bin/nvcc and a lib64 (or lib) with libcudart to link against; a bare nvcc on
# PATH (e.g. /usr/local/bin/nvcc) does not make /usr/local a toolkit root.
toolkit() { [[ -x "$1/bin/nvcc" ]] && ls "$1"/lib*/libcudart.so* >/dev/null 2>&1; }
if [[ -z "${CUDA_HOME:-}" ]]; then
  nvcc_root="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")")"
  for d in /usr/local/cuda /usr/local/cuda-* "$nvcc_root" "$SITE"/nvidia/cu*; do
    toolkit "$d" && { export CUDA_HOME="$d"; break; }
  done
fi
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
# cu13 wheels put every header under nvidia/cu13/include; cu12 wheels one include dir per library
INC="$(ls -d "$SITE"/nvidia/cu*/include "$SITE"/nvidia/*/include 2>/dev/null | sort -u | paste -sd: -)"

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
echo "CUDA_HOME=${CUDA_HOME:-<none>} nvcc=$(command -v nvcc || echo none) include dirs: ${INC:-<none>}"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "8.0;9.0")"
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$PY" -c "import ninja" 2>/dev/null || echo "ninja not importable: setuptools builds without it (slower)"

# The shared object alone (importing the runtime package would also need its dependencies).
has_cuda_ops() {
  "$PY" -c "
import glob, torch
torch.ops.load_library(glob.glob('runtime/_C*.so')[0])
assert torch._C._dispatch_has_kernel_for_dispatch_key('sdfused::attention', 'CUDA'), 'built without CUDA kernels'
" 2>/dev/null
}

build() {
  if [[ "${1:-}" != force ]] && has_cuda_ops; then echo "op library with CUDA kernels already built"; return 0; fi
  step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  command -v nvcc >/dev/null || { echo "no nvcc on this machine: the CUDA kernels cannot be built"; rc=1; return 1; }
  SDEXPORT_FORCE_CUDA=1 run 480 "$PY" setup.py -q build_ext --inplace ${INC:+--include-dirs "$INC"} \
    > "$RES/build.log" 2>&1 || { tail -n 60 "$RES/build.log"; echo "BUILD FAILED"; return 1; }
  has_cuda_ops && echo "op library loaded with CUDA kernels" || { echo "BUILD FAILED: no CUDA kernels"; rc=1; return 1; }
}

want() { [[ " $PHASES " == *" $1 "* ]]; }

if want build; then build force || { step "done (rc=$rc)"; exit 1; }
else build || { step "done (rc=$rc)"; exit 1; }; fi

if want ops; then
  step "numerics check (fp16, bf16, fp32 vs torch composites)"
  run 180 "$PY" scripts/bench_ops.py --verify --device cuda
  step "CUDA tests"
  if "$PY" -c "import pytest" 2>/dev/null; then
    run 420 "$PY" -m pytest tests/test_ops.py tests/test_cudagraph.py tests/test_export.py -q -m cuda \
      -p no:cacheprovider -x --junitxml="$RES/pytest_cuda.xml"
  else
    echo "pytest not importable: relying on the numerics check above"
  fi
fi

if want sanitizer; then
  SAN="$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)"
  if [[ -z "$SAN" ]]; then
    echo "compute-sanitizer not found: sanitizer phase skipped"
  else
    # torch's own allocator pools memory: memcheck sees the pool, so also turn caching off
    for tool in memcheck racecheck; do
      step "compute-sanitizer --tool $tool (one tiny call per kernel path)"
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 run 240 "$SAN" --tool "$tool" --error-exitcode 1 \
        "$PY" scripts/bench_ops.py --smoke --device cuda
    done
  fi
fi

if want microbench; then
  for dt in fp16 bf16; do
    step "micro-benchmarks ($dt): device time of back-to-back calls in a CUDA graph"
    run 240 "$PY" scripts/bench_ops.py --device cuda --dtype "$dt" --json "$RES/bench_ops_cuda_$dt.json"
  done
fi

# Pipeline benchmarks (sdexport bench), random weights at the published sizes, fp16.  diffusers rows
# need the diffusers wheel carried in .whl/ (scripts/fetch_gpu_wheels.sh, carry=[".whl"]).
if want bench || want bench-sdxl || want aoti || want formats; then
  if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
fi
if want bench; then
  step "bench sd15: fp16, 512 px, CFG batch 2, 30 steps"
  run 300 "$PY" -m sdexport.cli bench sd15 --device cuda --half --steps 30 --repeat 10 --json "$RES/bench_sd15.json"
  step "bench sd21-768: fp16, 768 px"
  run 200 "$PY" -m sdexport.cli bench sd21-768 --device cuda --half --steps 30 --repeat 5 --backends sdpa,fused \
    --no-diffusers --json "$RES/bench_sd21_768.json"
fi
# SDXL base (#11): its own phase, so that each phase fits one call.  Goal: UNet step <= 25 ms on an
# H100-class GPU.  The VAE runs in fp32 (force_upcast), as diffusers' SDXL pipeline does.
if want bench-sdxl; then
  step "bench sdxl: fp16, 1024 px, CFG batch 2, 30 steps (eager sdpa / fused, diffusers)"
  run 420 "$PY" -m sdexport.cli bench sdxl --device cuda --half --steps 30 --repeat 10 --backends sdpa,fused \
    --json "$RES/bench_sdxl.json"
fi
if want aoti; then
  step "build sd15 aoti --half (512 px, batch 1)"
  bt0=$(date +%s)
  run 330 "$PY" -m sdexport.cli build sd15 -o /tmp/sd15-aoti --format aoti --half --device cuda --max-batch 1 \
    --min-size 512 --max-size 512 --max-chunks 1 --force
  echo "build seconds: $(( $(date +%s) - bt0 ))"
  step "cold start of the aoti artifact (fresh process: import + load + first 30-step image)"
  run 90 "$PY" scripts/bench_formats.py --existing /tmp/sd15-aoti --device cuda --size 512 --steps 30 \
    --json "$RES/cold_sd15_aoti.json"
  step "bench sd15 with the aoti artifact"
  run 120 "$PY" -m sdexport.cli bench sd15 --device cuda --half --steps 30 --repeat 10 --backends sdpa,fused \
    --no-diffusers --artifact /tmp/sd15-aoti --json "$RES/bench_sd15_aoti.json"
  step "profile of the compiled UNet step"
  run 60 "$PY" scripts/profile_unet.py sd15 --device cuda --half --size 512 --artifact /tmp/sd15-aoti --rows 25
fi
if want formats; then
  # onnx only where onnxruntime has the CUDA provider
  fmts="pt2,torchscript,aoti"
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    2>/dev/null && fmts="$fmts,onnx"
  step "build time and cold start per format: medium, fp16, 256 px ($fmts)"
  run 480 "$PY" scripts/bench_formats.py medium --device cuda --half --kernels fused --size 256 --steps 20 \
    --formats "$fmts" --json "$RES/formats_medium.json"
fi
# LoRA hot swap (#12): goal <= 1 s for an SD 1.5-size rank-32 LoRA; eager, and a 64 px aoti build of sd15.
if want lora; then
  step "LoRA swap time: sd15, rank 32, fp16, eager and aoti (64 px build)"
  run 420 "$PY" scripts/bench_lora.py sd15 --rank 32 --device cuda --half --repeat 5 --build-artifact aoti \
    --json "$RES/bench_lora_sd15.json"
fi
# ControlNet (#13): UNet step without / with one random ControlNet mirroring sd15's UNet, 512 px, fp16, eager and
# through pt2 artifacts (quick to build; aoti: --format aoti, ~2x the time). Goal: one ControlNet adds <= 60%.
if want controlnet; then
  step "ControlNet cost: sd15, fp16, 512 px, CFG batch 2 (eager sdpa; pt2 model + control artifacts)"
  run 420 "$PY" scripts/bench_controlnet.py --model sd15 --size 512 --device cuda --half --format pt2 --repeat 20 \
    --work /tmp/cn-bench > "$RES/bench_controlnet_sd15.txt"
  cat "$RES/bench_controlnet_sd15.txt"
fi

# CPU bfloat16 (#15): the host CPU of the GPU machine may have AVX512-BF16 / AMX, which the dev VM lacks. The
# default aoti artifact of the medium preset (prepacked at load) in float32 and with --half (bfloat16), beside
# eager fp32, at 1 thread and every core. Stretch goal: bf16 artifact >= 4x eager fp32 per image. OpenVINO's
# rows (--compare-openvino) would need its wheel carried (over the size limit with onnxruntime).
if want cpu-bf16; then
  step "CPU: $(lscpu | sed -n 's/^Model name: *//p'); bf16 flags: $(grep -o -w 'avx512_bf16\|amx_bf16\|amx_tile' /proc/cpuinfo | sort -u | paste -sd' ')"
  for half in "" --half; do
    run 240 "$PY" -m sdexport.cli build medium -o "/tmp/medium-cpu$half" --min-size 256 --max-size 256 \
      --max-batch 1 --max-chunks 1 $half --force
  done
  for n in 1 "$(nproc)"; do
    step "bench medium on the CPU, $n thread(s): eager fp32, aoti fp32, aoti bf16"
    run 200 "$PY" -m sdexport.cli bench medium -W 256 -H 256 --steps 10 --repeat 5 --backends sdpa,fused \
      --no-diffusers --threads "$n" --artifact /tmp/medium-cpu --artifact /tmp/medium-cpu--half \
      --json "$RES/bench_cpu_bf16_t$n.json"
  done
fi

if want cpu-kernels; then
  step "CPU kernels builds on $(lscpu | sed -n 's/^Model name: *//p'): $("$PY" -c 'from runtime import ops; print(ops.cpu_kernel_capabilities(), "chosen:", ops.cpu_kernels())')"
  run 240 "$PY" scripts/bench_ops.py --verify --device cpu
  if "$PY" -c "import pytest" 2>/dev/null; then
    run 300 "$PY" -m pytest tests/test_cpu_kernels.py tests/test_ops.py -q -m "not cuda" -p no:cacheprovider -x \
      --junitxml="$RES/pytest_cpu_kernels.xml"
  fi
  for n in 1 "$(nproc)"; do
    step "op micro-benchmarks per CPU kernels build, fp32, $n thread(s)"
    OMP_NUM_THREADS=$n run 240 "$PY" scripts/bench_ops.py --device cpu --cpu-kernels all --json "$RES/bench_ops_cpu_t$n.json"
    step "SD 1.5 UNet linear layers: oneDNN packed vs MKL (settles --cpu-gemm's default on this CPU), $n thread(s)"
    OMP_NUM_THREADS=$n run 240 "$PY" scripts/probe_linear.py sd15 --size 512 --threads "$n" --rounds 5
  done
fi

step "done (rc=$rc)"
exit $rc
