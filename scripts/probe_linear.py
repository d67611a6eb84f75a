"""The UNet's float32 linear layers on the CPU, one engine against another at the shapes of one step:
oneDNN on a packed weight (what Inductor's freezing emits: `mkldnn._linear_pointwise`), MKL on a packed
weight (`mkl._mkl_linear`) and MKL sgemm on the plain weight (`addmm`, what `--cpu-gemm mkl` emits).

The shapes come from forward hooks on one eager step; each distinct (M, K, N) is timed in alternation
between the engines and weighted by how often the step calls it. The sum is what the step spends in its
linear layers under each engine (on a warm cache: the step's other work is not there).

    OMP_NUM_THREADS=1 python scripts/probe_linear.py sd15 --size 512 --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _shapes(model: str, size: int) -> Counter[tuple[int, int, int, bool]]:
    from sdexport.bench import make_inputs
    from sdexport.presets import open_model

    sd = open_model(model).to("cpu", torch.float32)
    inp = make_inputs(sd, size, size, torch.device("cpu"), torch.float32)
    seen: Counter[tuple[int, int, int, bool]] = Counter()

    def hook(m: nn.Module, args: tuple[Tensor, ...], _out: Any) -> None:
        assert isinstance(m, nn.Linear)
        seen[(args[0].numel() // m.in_features, m.in_features, m.out_features, m.bias is not None)] += 1

    for m in sd.unet.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(hook)
    with torch.inference_mode():
        sd.unet(inp.x, inp.t, inp.context, inp.weights)
    return seen


def _engines(m: int, k: int, n: int, bias: bool) -> dict[str, Callable[[], Tensor]]:
    x, w = torch.randn(m, k), torch.randn(n, k)
    b = torch.randn(n) if bias else None
    dnnl = torch.ops.mkldnn._reorder_linear_weight(w, m)
    calls: dict[str, Callable[[], Tensor]] = {
        "onednn packed": lambda: torch.ops.mkldnn._linear_pointwise(x, dnnl, b, "none", [], ""),
        "mkl addmm": lambda: torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t()),
    }
    if torch._C.has_mkl:
        mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        calls["mkl packed"] = lambda: torch.ops.mkl._mkl_linear(x, mkl, w, b, m)
    ref = nn.functional.linear(x, w, b)
    for name, call in calls.items():
        err = (call() - ref).abs().max().item()
        assert err < 1e-3 * k ** 0.5, f"{name} at {(m, k, n)}: max abs error {err}"
    return calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="medium")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = _shapes(args.model, args.size)
    print(f"{args.model} {args.size} px, CFG batch 2, {args.threads} thread(s), {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; median ms of {args.rounds} alternating rounds")
    totals: dict[str, float] = {}
    header = False
    with torch.inference_mode():
        for (m, k, n, bias), count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2]):
            calls = _engines(m, k, n, bias)
            if not header:
                print("| M x K -> N (+ bias) | calls | " + " | ".join(calls) + " |")
                print("|---|---|" + "---|" * len(calls))
                header = True
            times: dict[str, list[float]] = {name: [] for name in calls}
            for call in calls.values():
                call()
            for _ in range(args.rounds):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            med = {name: statistics.median(v) for name, v in times.items()}
            for name, t in med.items():
                totals[name] = totals.get(name, 0.0) + t * count
            print(f"| {m} x {k} -> {n}{' + b' if bias else ''} | {count} | "
                  + " | ".join(f"{t:.2f}" for t in med.values()) + " |",
                  flush=True)
    base = totals["onednn packed"]
    print("| per step | | " + " | ".join(f"{t:.1f} ({base / t:.2f}x)" for t in totals.values()) + " |")


if __name__ == "__main__":
    main()
