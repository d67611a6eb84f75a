"""Cost of one ControlNet in the UNet step (sdexport/bench_control.py, as `sdexport bench --control`), with
the artifacts built here first when missing: the model and a random ControlNet mirroring its UNet, in one
format (AOTInductor by default). Random weights (a preset's architecture).

    OMP_NUM_THREADS=1 python scripts/bench_controlnet.py --model medium --size 256 --work /tmp/cn-bench
    python scripts/bench_controlnet.py --model sd15 --size 512 --device cuda --half   # scripts/gpu_check.sh controlnet
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import runtime
from runtime import ops
from sdexport.bench import _git_revision, make_inputs, time_call
from sdexport.bench_control import RANDOM, control_cost, format_control, open_control
from sdexport.export.build import BuildOptions
from sdexport.presets import open_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="medium")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cn-bench"))
    ap.add_argument("--format", default="aoti")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--half", action="store_true", help="float16 on CUDA, bfloat16 on the CPU (as `build --half`)")
    args = ap.parse_args()
    device = torch.device(args.device)
    opts = dict(format=args.format, max_batch=1, min_size=args.size, max_size=args.size, max_chunks=1,
                kernels="fused" if ops.available() else "native", device=args.device, half=args.half)
    dtype = BuildOptions(**opts).dtype
    sd = open_model(args.model).attention_backend("sdpa")
    tag = f"{args.model}-{args.format}-{args.device}{'-half' if args.half else ''}"
    model_art = args.work / tag
    cn_art = args.work / f"{tag}-cn"
    if not (model_art / "manifest.json").is_file():
        sd.export(model_art, overwrite=True, **opts)
    if not (cn_art / "manifest.json").is_file():
        open_control(RANDOM, sd, "cpu")[0].export(cn_art, overwrite=True, **opts)
    sd = sd.to(device, dtype)
    inp = make_inputs(sd, args.size, args.size, device, dtype)
    path = f"artifact {args.format} ({model_art})"
    result = control_cost(sd, inp, str(cn_art), [(path, runtime.load(model_art, device=args.device).backend)],
                          args.device, lambda fn: time_call(fn, device, args.repeat), args.size, args.size)
    print(format_control(result))
    print(json.dumps({"model": args.model, "size": args.size, "device": args.device, "dtype": str(dtype),
                      "revision": _git_revision(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "kernels": opts["kernels"], **result}, indent=2))


if __name__ == "__main__":
    main()
