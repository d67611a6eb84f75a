"""The UNet's 1x1 convolutions on the CPU: ATen's convolution (at one thread `_slow_conv2d_forward`, ATen's
`use_mkldnn` heuristic) vs the same product as a batched matmul (`baddbmm` over channels, NCHW kept).

Prints the count and profiled time of those calls in one step, the max abs difference of the step, and the
median step time of both lowerings timed in alternation (one step each per round).

    OMP_NUM_THREADS=1 python scripts/probe_conv1x1.py medium --size 256 --threads 1 --rounds 16
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import profile


def _as_matmul(self: nn.Conv2d, x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    o = self.weight.shape[0]
    assert self.bias is not None
    out = torch.baddbmm(self.bias.view(1, o, 1), self.weight.view(o, c).expand(b, o, c), x.reshape(b, c, h * w))
    return out.view(b, o, h, w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="medium")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sdexport.bench import make_inputs
    from sdexport.presets import open_model

    sd = open_model(args.model).to("cpu", torch.float32)
    inp = make_inputs(sd, args.size, args.size, torch.device("cpu"), torch.float32)
    ones = [m for m in sd.unet.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]

    def use(matmul: bool) -> None:
        for m in ones:
            if matmul:
                m.forward = types.MethodType(_as_matmul, m)  # type: ignore[method-assign]
            elif "forward" in m.__dict__:
                del m.forward

    def step() -> Any:
        return sd.unet(inp.x, inp.t, inp.context, inp.weights)

    names = {False: "aten conv", True: "baddbmm"}
    with torch.inference_mode():
        use(False)
        ref = step()
        use(True)
        print(f"{len(ones)} 1x1 convolutions; max abs diff of the step {(step() - ref).abs().max().item():.1e}")
        for matmul in (False, True):
            use(matmul)
            with profile() as prof:
                step()
            ev = {e.key: e for e in prof.key_averages()}
            for key in ("aten::_slow_conv2d_forward", "aten::mkldnn_convolution", "aten::baddbmm"):
                if key in ev:
                    print(f"  {names[matmul]}: {key} x{ev[key].count}, {ev[key].cpu_time_total / 1e3:.1f} ms")
        times: dict[bool, list[float]] = {False: [], True: []}
        for matmul in (False, True):
            use(matmul)
            step()
        for _ in range(args.rounds):
            for matmul in (False, True):
                use(matmul)
                t0 = time.perf_counter()
                step()
                times[matmul].append((time.perf_counter() - t0) * 1e3)
    for matmul, v in times.items():
        print(f"threads {args.threads}, {names[matmul]}: UNet step median {statistics.median(v):.1f} ms "
              f"(min {min(v):.1f}, {len(v)} rounds)")


if __name__ == "__main__":
    main()
