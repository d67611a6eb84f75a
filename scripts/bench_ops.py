#!/usr/bin/env python3
"""Micro-benchmarks of the fused ops vs the torch composites they replace (SD 1.5 shapes).

    python3 scripts/bench_ops.py                          # CUDA if present (fp16), else CPU (fp32)
    OMP_NUM_THREADS=1 python3 scripts/bench_ops.py --device cpu
    python3 scripts/bench_ops.py --verify                 # quick correctness check only

CUDA timings are medians of CUDA-event timings; CPU timings are medians of wall time; each fused op
and its torch composite are called alternately.  On CPU
the attention shapes are scaled down (batch 1, no 4096-token self-attention) unless --full.
Results go to --json, or to $OUT/bench_ops.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime import ops

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _once(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timeit(fn: Callable[[], Any], device: str, iters: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return statistics.median(_once(fn, device) for _ in range(iters))


def time_pair(fa: Callable[[], Any], fb: Callable[[], Any], device: str, iters: int,
              warmup: int = 3) -> tuple[float, float]:
    """Median seconds per call of fa and of fb, called alternately so that a shared machine's drifting
    load weighs on both alike."""
    for _ in range(warmup):
        fa()
        fb()
    if device == "cuda":
        torch.cuda.synchronize()
    ta, tb = [], []
    for _ in range(iters):
        ta.append(_once(fa, device))
        tb.append(_once(fb, device))
    return statistics.median(ta), statistics.median(tb)


def copy_bandwidth(device: str, iters: int) -> float:
    """GB/s of a plain device copy (read + write counted)."""
    n = (256 << 20) if device == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, iters)
    return 2 * n / t / 1e9


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = args.device, DTYPES[args.dtype]
    iters = args.iters
    cpu_small = device == "cpu" and not args.full
    rows: list[dict[str, Any]] = []
    copy_gbs = copy_bandwidth(device, iters)
    esz = torch.empty((), dtype=dtype).element_size()

    def row(op: str, shape: str, t_fused: float, t_ref: float, **extra: Any) -> None:
        rows.append(
            {
                "op": op,
                "shape": shape,
                "fused_ms": t_fused * 1e3,
                "torch_ms": t_ref * 1e3,
                "speedup": t_ref / t_fused,
                **extra,
            }
        )

    with torch.inference_mode():
        # group_norm + SiLU (32 groups), every UNet resolution of SD 1.5
        gn_shapes = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
        if cpu_small:
            gn_shapes = [(1, 320, 64, 64), (1, 640, 32, 32), (1, 1280, 16, 16), (1, 1280, 8, 8)]
        layouts = [False, True]
        for shape in gn_shapes:
            for cl in layouts:
                x = torch.randn(shape, device=device, dtype=dtype)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                w = torch.randn(shape[1], device=device, dtype=dtype)
                b = torch.randn(shape[1], device=device, dtype=dtype)
                tf, tr = time_pair(lambda x=x, w=w, b=b: ops.group_norm(x, 32, w, b, 1e-5, True),
                                   lambda x=x, w=w, b=b: F.silu(F.group_norm(x, 32, w, b, 1e-5)), device, iters)
                gbs = 2 * x.numel() * esz / tf / 1e9
                row(
                    "group_norm+silu",
                    f"{'x'.join(map(str, shape))}{' CL' if cl else ''}",
                    tf,
                    tr,
                    fused_GBps=gbs,
                    pct_copy_bw=100 * gbs / copy_gbs,
                )

        # attention: SD 1.5 self-attention per resolution (tokens, head dim), 8 heads, and
        # cross-attention with 77 text tokens
        batch, heads = (1, 8) if cpu_small else (2, 8)
        att = [(4096, 40), (1024, 80), (256, 160)]
        if cpu_small:
            att = [(1024, 40), (1024, 80), (256, 160)]
        for tokens, d in att:
            for lk in (tokens, 77):
                q = torch.randn(batch, heads, tokens, d, device=device, dtype=dtype)
                k = torch.randn(batch, heads, lk, d, device=device, dtype=dtype)
                v = torch.randn(batch, heads, lk, d, device=device, dtype=dtype)
                tf, tr = time_pair(lambda q=q, k=k, v=v, d=d: ops.attention(q, k, v, d**-0.5, None),
                                   lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), device, iters)
                flops = 4 * batch * heads * tokens * lk * d
                kind = "self" if lk == tokens else "cross"
                row(
                    f"attention {kind}",
                    f"{batch}x{heads}x{tokens}x{lk} d{d}",
                    tf,
                    tr,
                    fused_TFLOPs=flops / tf / 1e12,
                    torch_TFLOPs=flops / tr / 1e12,
                )

        # geglu: feed-forward inner dim 4C, input 2 * 4C
        gg = [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 256, 2 * 5120)]
        if cpu_small:
            gg = [(1, 4096, 2 * 1280), (1, 1024, 2 * 2560), (1, 256, 2 * 5120)]
        for shape in gg:
            x = torch.randn(shape, device=device, dtype=dtype)
            tf, tr = time_pair(lambda x=x: ops.geglu(x), lambda x=x: ops.reference_geglu(x), device, iters)
            gbs = 1.5 * x.numel() * esz / tf / 1e9
            row("geglu", "x".join(map(str, shape)), tf, tr, fused_GBps=gbs, pct_copy_bw=100 * gbs / copy_gbs)

    env = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "copy_GBps": copy_gbs,
    }
    return {"env": env, "rows": rows}


def print_table(res: dict[str, Any]) -> None:
    env = res["env"]
    print(f"# {env['device']}  dtype={env['dtype']}  torch={env['torch']}  copy={env['copy_GBps']:.1f} GB/s")
    print(f"{'op':<18} {'shape':<26} {'fused ms':>9} {'torch ms':>9} {'speedup':>8}  extra")
    for r in res["rows"]:
        extra = []
        if "fused_GBps" in r:
            extra.append(f"{r['fused_GBps']:.1f} GB/s ({r['pct_copy_bw']:.0f}% of copy)")
        if "fused_TFLOPs" in r:
            extra.append(f"{r['fused_TFLOPs']:.2f} vs {r['torch_TFLOPs']:.2f} TFLOP/s")
        print(
            f"{r['op']:<18} {r['shape']:<26} {r['fused_ms']:9.3f} {r['torch_ms']:9.3f} {r['speedup']:7.2f}x  "
            + " ".join(extra)
        )


def verify(device: str) -> bool:
    """Quick numerics check (usable without pytest): half results within 2x of the torch
    composite's error vs an fp32 reference, fp32 results within 1e-4."""
    torch.manual_seed(0)
    ok = True
    dtypes = [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float32]

    def check(name: str, ours: torch.Tensor, comp: torch.Tensor, ref: torch.Tensor) -> None:
        nonlocal ok
        e_o = float((ours.double() - ref.double()).abs().max())
        e_c = float((comp.double() - ref.double()).abs().max())
        ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}.get(ours.dtype, 0.0)
        good = e_o <= 2 * e_c + ulp * (float(ref.abs().max()) + 1) + (
            1e-4 if ours.dtype == torch.float32 else 0
        )
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} {name:<44} err {e_o:.3g} (torch composite {e_c:.3g})")

    with torch.inference_mode():
        for dt in dtypes:
            for shape, cl in [((2, 320, 64, 64), False), ((2, 640, 32, 32), True), ((1, 40, 9, 7), False)]:
                x = torch.randn(shape, device=device) * 2 + 0.5
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                w, b = torch.randn(shape[1], device=device), torch.randn(shape[1], device=device)
                ref = ops.reference_group_norm(x, 32 if shape[1] % 32 == 0 else 8, w, b, 1e-5, True)
                g = 32 if shape[1] % 32 == 0 else 8
                xh, wh, bh = x.to(dt), w.to(dt), b.to(dt)
                check(
                    f"group_norm {shape} cl={cl} {dt}",
                    ops.group_norm(xh, g, wh, bh, 1e-5, True),
                    F.silu(F.group_norm(xh, g, wh, bh, 1e-5)),
                    ref,
                )
            for lq, lk, d in [(4096, 4096, 40), (1024, 77, 80), (256, 256, 160), (100, 77, 64), (37, 50, 24)]:
                if device == "cpu" and lq > 1024:
                    continue
                q, k, v = (torch.randn(2, 8, n, d, device=device) for n in (lq, lk, lk))
                w = torch.rand(2, lk, device=device) * 2 - 0.5
                ref = ops.reference_attention(q, k, v, d**-0.5, w)
                qh, kh, vh = q.to(dt), k.to(dt), v.to(dt)
                comp = F.scaled_dot_product_attention(qh, kh, vh * w.to(dt)[:, None, :, None])
                check(
                    f"attention {lq}x{lk} d{d} weighted {dt}",
                    ops.attention(qh, kh, vh, d**-0.5, w),
                    comp,
                    ref,
                )
            x = torch.randn(2, 1024, 2 * 1280, device=device)
            check(
                f"geglu {tuple(x.shape)} {dt}",
                ops.geglu(x.to(dt)),
                ops.reference_geglu(x.to(dt)),
                ops.reference_geglu(x),
            )
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 50 CUDA, 5 CPU)")
    p.add_argument("--full", action="store_true", help="full SD shapes on CPU too")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--verify", action="store_true", help="only run the quick correctness check")
    args = p.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.iters = args.iters or (50 if args.device == "cuda" else 5)
    ops.load()
    if args.verify:
        return 0 if verify(args.device) else 1
    res = bench(args)
    print_table(res)
    out = args.json
    if out is None and os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / f"bench_ops_{args.device}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
