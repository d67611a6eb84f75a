"""Where the time of one UNet step (CFG batch 2) goes: torch profiler table, eager or artifact.

    OMP_NUM_THREADS=1 python scripts/profile_unet.py medium --size 256
    python scripts/profile_unet.py sd15 --device cuda --half --artifact /tmp/sd15-aoti
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="preset (demo, medium, sd15, ...) or checkpoint path")
    ap.add_argument("--artifact", default=None, help="profile this artifact's UNet instead of eager")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--half", action="store_true")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--backend", default="sdpa", help="eager kernels: reference, sdpa or fused")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()

    from sdexport.bench import make_inputs
    from sdexport.presets import open_model

    device, dtype = torch.device(args.device), torch.float16 if args.half else torch.float32
    sd = open_model(args.model).to(device, dtype).attention_backend(args.backend)
    inp = make_inputs(sd, args.size, args.size, device, dtype)
    if args.artifact:
        import runtime

        be = runtime.load(args.artifact, device=args.device).backend
    else:
        be = sd.backend

    def step() -> None:
        be.unet(inp.x, inp.t, inp.context, inp.weights)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.calls} UNet calls, {'artifact ' + args.artifact if args.artifact else 'eager ' + args.backend}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
