"""CPU attention at the UNet's own shapes: ATen's `scaled_dot_product_attention` (flash attention for the CPU)
vs our `sdfused.attention` (csrc/cpu/ops_cpu.cpp), one thread count, float32 (and bfloat16 with --bf16).

The shapes come from one UNet step of the model (a TorchFunctionMode notes every SDPA call); each distinct
shape is timed with both ops in alternation (one call each per round, median), and its share of the step is
the sum over its calls.

    OMP_NUM_THREADS=1 python scripts/probe_attention.py medium --size 256 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

Shape = tuple[tuple[int, ...], tuple[int, ...]]  # q (B, H, Lq, D), k (B, H, Lk, D)


class _Shapes(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[Shape] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            self.seen[(tuple(args[0].shape), tuple(args[1].shape))] += 1
        return func(*args, **(kwargs or {}))


def _pair(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Callable[[], Tensor]]:
    scale = q.shape[-1] ** -0.5

    def aten() -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def sdfused() -> Tensor:
        out: Tensor = torch.ops.sdfused.attention(q, k, v, scale, None)
        return out

    return {"aten": aten, "sdfused": sdfused}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="medium")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--bf16", action="store_true", help="time bfloat16 inputs too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import runtime.ops  # noqa: F401  (registers sdfused)
    from sdexport.bench import make_inputs
    from sdexport.bench_compare import time_alternating
    from sdexport.presets import open_model

    sd = open_model(args.model).to("cpu", torch.float32)
    sd.attention_backend("sdpa")
    inp = make_inputs(sd, args.size, args.size, torch.device("cpu"), torch.float32)
    mode = _Shapes()
    with torch.inference_mode():
        with mode:
            sd.unet(inp.x, inp.t, inp.context, inp.weights)
        t0 = time.perf_counter()
        sd.unet(inp.x, inp.t, inp.context, inp.weights)
        step = (time.perf_counter() - t0) * 1e3
    print(f"{args.model} {args.size} px, {args.threads} thread(s), torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}; eager sdpa step {step:.1f} ms")
    dtypes = [torch.float32] + ([torch.bfloat16] if args.bf16 else [])
    total: dict[str, float] = collections.defaultdict(float)
    torch.manual_seed(0)
    print("| dtype | q (B, H, Lq, D) | Lk | calls/step | ATen SDPA ms | sdfused ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for dtype in dtypes:
            for (qs, ks), n in sorted(mode.seen.items()):
                q, k, v = torch.randn(qs, dtype=dtype), torch.randn(ks, dtype=dtype), torch.randn(ks, dtype=dtype)
                calls = _pair(q, k, v)
                diff = float((calls["aten"]().float() - calls["sdfused"]().float()).abs().max())
                ms = time_alternating(calls, args.rounds)
                for key, value in ms.items():
                    total[f"{dtype} {key}"] += n * value
                print(f"| {str(dtype).removeprefix('torch.')} | {qs} | {ks[2]} | {n} | {ms['aten']:.2f} | "
                      f"{ms['sdfused']:.2f} | {ms['aten'] / ms['sdfused']:.2f}x | {diff:.1e} |")
    for dtype in dtypes:
        a, b = total[f"{dtype} aten"], total[f"{dtype} sdfused"]
        print(f"{dtype}: attention per step ATen {a:.1f} ms ({100 * a / step:.0f}% of the fp32 step), "
              f"sdfused {b:.1f} ms ({a / b:.2f}x)")


if __name__ == "__main__":
    main()
