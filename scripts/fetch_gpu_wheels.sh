#!/usr/bin/env bash
# Downloads, on a machine with package-registry access, the wheels that the GPU machine lacks into .whl/
# (git-ignored), for scripts/gpu_check.sh to install there (its image has torch, transformers, tokenizers,
# safetensors, click, pillow, tqdm, pytest, hypothesis, onnx, onnxruntime; not diffusers). Only the
# benchmark's diffusers rows need them. Then pass carry=[".whl"] to the device call.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
# diffusers' requirements other than importlib_metadata are in the GPU image (zipp included).
for spec in diffusers==0.42.1 importlib_metadata; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$spec"
done
ls -la .whl
