#!/usr/bin/env python3
"""Micro-benchmarks of the fused ops vs the torch code they replace (SD 1.5 shapes).

    python3 scripts/bench_ops.py                          # CUDA if present (fp16), else CPU (fp32)
    OMP_NUM_THREADS=1 python3 scripts/bench_ops.py --device cpu
    python3 scripts/bench_ops.py --verify                 # quick correctness check only
    python3 scripts/bench_ops.py --smoke --device cuda    # one tiny call per kernel (compute-sanitizer)
    python3 scripts/bench_ops.py --device cpu --cpu-kernels all   # each CPU kernels build in turn

Device time, not host dispatch: on CUDA each measurement replays a CUDA graph of --inner back-to-back
calls (back-to-back calls between two events if the graph cannot be captured) and divides by
--inner; on CPU it is the wall time of --inner back-to-back calls.  Medians over --iters
measurements, the candidates of a row measured alternately so that drifting load weighs on all alike.
Attention is compared with the best of SDPA's flash / memory-efficient / cuDNN backends on CUDA
(each tried; those that refuse the shape are skipped), group_norm with the composite and with a
same-size device copy (the bandwidth bound).  On CPU the shapes are scaled down unless --full.
Results go to --json, or to $OUT/bench_ops_<device>.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime import ops

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
Fn = Callable[[], Any]


# --------------------------------------------------------------------------------------------
# timing


class Timer:
    """Per-call device time of `fn`, measured as described in the module docstring."""

    def __init__(self, fn: Fn, device: str, inner: int) -> None:
        self.fn, self.device, self.inner = fn, device, inner
        self.graph: torch.cuda.CUDAGraph | None = None
        if device == "cuda":
            self.graph = self._capture()

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture (lazy init, cuDNN plans)
                self.fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(self.inner):
                    self.fn()
        except RuntimeError as e:  # not capturable: time back-to-back launches instead
            print(f"  (no CUDA graph: {str(e).splitlines()[0][:80]})")
            torch.cuda.synchronize()
            return None
        graph.replay()
        torch.cuda.synchronize()
        return graph

    def once(self) -> float:
        """Seconds per call, from one measurement of `inner` calls."""
        if self.device != "cuda":
            t0 = time.perf_counter()
            for _ in range(self.inner):
                self.fn()
            return (time.perf_counter() - t0) / self.inner
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        if self.graph is not None:
            self.graph.replay()
        else:
            for _ in range(self.inner):
                self.fn()
        end.record()
        end.synchronize()
        ms: float = start.elapsed_time(end)
        return ms / 1e3 / self.inner


def time_all(fns: dict[str, Fn], device: str, iters: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each fn (measured in turn, `iters` rounds)."""
    timers = {name: Timer(fn, device, inner) for name, fn in fns.items()}
    for t in timers.values():
        t.once()  # warm
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, t in timers.items():
            samples[name].append(t.once())
    return {name: statistics.median(s) for name, s in samples.items()}


def _works(fn: Fn) -> bool:
    try:
        fn()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def _no_backend_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sdpa_candidates(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Fn]:
    """SDPA per backend that accepts these inputs (CUDA), or SDPA's default choice (CPU)."""
    if q.device.type != "cuda":
        return {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    out: dict[str, Fn] = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):

        def fn(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        with _no_backend_warnings():
            if _works(fn):
                out[f"sdpa_{backend.name.lower().replace('_attention', '')}"] = fn
    return out


# --------------------------------------------------------------------------------------------
# benchmark


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = args.device, DTYPES[args.dtype]
    cpu_small = device == "cpu" and not args.full
    rows: list[dict[str, Any]] = []
    esz = torch.empty((), dtype=dtype).element_size()

    def timed(fns: dict[str, Fn]) -> dict[str, float]:
        return time_all(fns, device, args.iters, args.inner)

    with torch.inference_mode():
        # group_norm + SiLU (32 groups): every UNet level of SD 1.5 at CFG batch 2, and the VAE
        # decoder's two largest levels at 512 px
        gn_shapes = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
        if device == "cuda" or args.full:
            gn_shapes += [(1, 256, 256, 256), (1, 128, 512, 512)]
        if cpu_small:
            gn_shapes = [(1, *s[1:]) for s in gn_shapes]
        for shape in gn_shapes:
            for cl in (False, True):
                x = torch.randn(shape, device=device, dtype=dtype)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                w = torch.randn(shape[1], device=device, dtype=dtype)
                b = torch.randn(shape[1], device=device, dtype=dtype)
                y = torch.empty_like(x)
                t = timed(
                    {
                        "fused": functools.partial(ops.group_norm, x, 32, w, b, 1e-5, True),
                        "torch": functools.partial(ops.reference_group_norm, x, 32, w, b, 1e-5, True),
                        "copy": functools.partial(y.copy_, x),
                    }
                )
                gbs = 2 * x.numel() * esz / t["fused"] / 1e9
                rows.append(
                    {
                        "op": "group_norm+silu",
                        "shape": f"{'x'.join(map(str, shape))}{' CL' if cl else ''}",
                        "fused_ms": t["fused"] * 1e3,
                        "torch_ms": t["torch"] * 1e3,
                        "speedup": t["torch"] / t["fused"],
                        "fused_GBps": gbs,
                        "pct_of_copy": 100 * t["copy"] / t["fused"],
                    }
                )

        # attention: SD 1.5 self-attention per level (tokens, head dim, 8 heads) and cross-attention
        # with 77 text tokens; the VAE mid-block (one head of 512 channels, 64x64 latents)
        batch = 1 if cpu_small else 2
        att = [(4096, 40), (1024, 80), (256, 160)]
        if cpu_small:
            att[0] = (1024, 40)
        cases = [(batch, 8, n, n, d) for n, d in att] + [(batch, 8, n, 77, d) for n, d in att]
        cases.append((1, 1, 1024 if cpu_small else 4096, 1024 if cpu_small else 4096, 512))
        for nb, h, lq, lk, d in cases:
            q = torch.randn(nb, h, lq, d, device=device, dtype=dtype)
            k = torch.randn(nb, h, lk, d, device=device, dtype=dtype)
            v = torch.randn(nb, h, lk, d, device=device, dtype=dtype)
            vw = torch.rand(nb, lk, device=device, dtype=dtype) + 0.5
            sdpa = sdpa_candidates(q, k, v)
            t = timed(
                {
                    "fused": functools.partial(ops.attention, q, k, v, d**-0.5, None),
                    "fused_weighted": functools.partial(ops.attention, q, k, v, d**-0.5, vw),
                    **sdpa,
                }
            )
            best = min(sdpa, key=lambda name: t[name])
            flops = 4 * nb * h * lq * lk * d
            kind = "vae" if d == 512 else ("self" if lk == lq else "cross")
            rows.append(
                {
                    "op": f"attention {kind}",
                    "shape": f"{nb}x{h}x{lq}x{lk} d{d}",
                    "fused_ms": t["fused"] * 1e3,
                    "fused_weighted_ms": t["fused_weighted"] * 1e3,
                    "torch_ms": t[best] * 1e3,
                    "torch_best": best,
                    "sdpa_ms": {name: t[name] * 1e3 for name in sdpa},
                    "speedup": t[best] / t["fused"],
                    "weighted_vs_best": t[best] / t["fused_weighted"],
                    "fused_TFLOPs": flops / t["fused"] / 1e12,
                }
            )

        # geglu: feed-forward inner dim 4C, input 2 * 4C
        gg = [(batch, 4096, 2 * 1280), (batch, 1024, 2 * 2560), (batch, 256, 2 * 5120)]
        for gshape in gg:
            x = torch.randn(gshape, device=device, dtype=dtype)
            y = torch.empty(*gshape[:-1], gshape[-1] // 2, device=device, dtype=dtype)
            t = timed(
                {
                    "fused": functools.partial(ops.geglu, x),
                    "torch": functools.partial(ops.reference_geglu, x),
                    "copy": functools.partial(y.copy_, x[..., : y.shape[-1]]),
                }
            )
            gbs = 1.5 * x.numel() * esz / t["fused"] / 1e9
            rows.append(
                {
                    "op": "geglu",
                    "shape": "x".join(map(str, gshape)),
                    "fused_ms": t["fused"] * 1e3,
                    "torch_ms": t["torch"] * 1e3,
                    "speedup": t["torch"] / t["fused"],
                    "fused_GBps": gbs,
                    # a copy of the output's size moves 2/3 of geglu's bytes
                    "pct_of_copy": 100 * 1.5 * t["copy"] / t["fused"],
                }
            )

    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "cpu_kernels": ops.cpu_kernels(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "inner": args.inner,
        "iters": args.iters,
    }
    return {"env": env, "rows": rows}


def print_table(res: dict[str, Any]) -> None:
    env = res["env"]
    print(f"# {env['device']}  dtype={env['dtype']}  torch={env['torch']}  ({env['inner']} calls per sample)"
          f"  CPU kernels: {env['cpu_kernels']}")
    print(f"{'op':<18} {'shape':<26} {'fused ms':>9} {'torch ms':>9} {'speedup':>8}  extra")
    for r in res["rows"]:
        extra = []
        if "fused_GBps" in r:
            extra.append(f"{r['fused_GBps']:.0f} GB/s, {r['pct_of_copy']:.0f}% of a same-size copy")
        if "torch_best" in r:
            extra.append(
                f"vs {r['torch_best']}; weighted {r['fused_weighted_ms']:.3f} ms ({r['weighted_vs_best']:.2f}x); "
                f"{r['fused_TFLOPs']:.1f} TFLOP/s"
            )
        print(
            f"{r['op']:<18} {r['shape']:<26} {r['fused_ms']:9.3f} {r['torch_ms']:9.3f} {r['speedup']:7.2f}x  "
            + " ".join(extra)
        )


# --------------------------------------------------------------------------------------------
# correctness


def verify(device: str) -> bool:
    """Quick numerics check (usable without pytest): half results within 2x of the torch
    composite's error vs an fp32 reference, fp32 results within 1e-4."""
    torch.manual_seed(0)
    ok = True
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if device == "cuda" else [torch.float32, torch.bfloat16]

    def check(name: str, ours: torch.Tensor, comp: torch.Tensor, ref: torch.Tensor) -> None:
        nonlocal ok
        e_o = float((ours.double() - ref.double()).abs().max())
        e_c = float((comp.double() - ref.double()).abs().max())
        ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}.get(ours.dtype, 0.0)
        tol = 2 * e_c + ulp * (float(ref.abs().max()) + 1) + (1e-4 if ours.dtype == torch.float32 else 0)
        good = bool(torch.isfinite(ours).all()) and e_o <= tol
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} {name:<48} err {e_o:.3g} (torch composite {e_c:.3g})")

    with torch.inference_mode():
        for dt in dtypes:
            gn_cases = [((2, 320, 64, 64), False), ((2, 640, 32, 32), True), ((1, 40, 9, 7), False)]
            gn_cases += [((2, 320, 64, 64), True), ((1, 128, 256, 256), True)]
            for shape, cl in gn_cases:
                x = torch.randn(shape, device=device) * 2 + 0.5
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                w, b = torch.randn(shape[1], device=device), torch.randn(shape[1], device=device)
                g = 32 if shape[1] % 32 == 0 else 8
                ref = ops.reference_group_norm(x, g, w, b, 1e-5, True)
                xh, wh, bh = x.to(dt), w.to(dt), b.to(dt)
                check(
                    f"group_norm {shape} cl={cl} {dt}",
                    ops.group_norm(xh, g, wh, bh, 1e-5, True),
                    F.silu(F.group_norm(xh, g, wh, bh, 1e-5)),
                    ref,
                )
            for bb, hh, lq, lk, d in [
                (2, 8, 4096, 4096, 40),
                (2, 8, 1024, 77, 80),
                (2, 8, 256, 256, 160),
                (2, 8, 100, 77, 64),
                (2, 8, 37, 50, 24),
                (1, 1, 4096, 4096, 512),
            ]:
                if device == "cpu" and lq > 1024:
                    continue
                q, k, v = (torch.randn(bb, hh, n, d, device=device) for n in (lq, lk, lk))
                w = torch.rand(bb, lk, device=device) * 2 - 0.5
                ref = ops.reference_attention(q, k, v, d**-0.5, w)
                qh, kh, vh = q.to(dt), k.to(dt), v.to(dt)
                comp = F.scaled_dot_product_attention(qh, kh, vh * w.to(dt)[:, None, :, None])
                out = ops.attention(qh, kh, vh, d**-0.5, w)
                check(f"attention {bb}x{hh}x{lq}x{lk} d{d} weighted {dt}", out, comp, ref)
            x = torch.randn(2, 1024, 2 * 1280, device=device)
            xh = x.to(dt)
            check(f"geglu {tuple(x.shape)} {dt}", ops.geglu(xh), ops.reference_geglu(xh), ops.reference_geglu(x))
    return ok


def smoke(device: str) -> None:
    """One small call through every kernel path (for compute-sanitizer): group_norm's one-launch and
    two-launch paths in both layouts and every pack width, geglu's vector and scalar paths, attention
    with and without weights, in each dtype."""
    torch.manual_seed(0)
    with torch.inference_mode():
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            for shape, g, cl in [
                ((2, 64, 8, 8), 32, False),  # one launch, 16-byte packs (fp16)
                ((2, 64, 8, 8), 32, True),  # Cg = 2
                ((1, 16, 72, 72), 2, False),  # Cg * S = 41472: split over blocks
                ((1, 16, 72, 72), 2, True),  # 16-byte channels_last packs, split
                ((1, 15, 7, 5), 5, True),  # odd channels: 1-element packs
            ]:
                x = torch.randn(shape, device=device, dtype=dt)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                ops.group_norm(x, g, torch.randn(shape[1], device=device), None, 1e-5, True)
            ops.geglu(torch.randn(3, 5, 2 * 16, device=device, dtype=dt))  # 16-byte packs
            ops.geglu(torch.randn(7, 2 * 9, device=device, dtype=dt))  # F odd: 1-element packs
            q = torch.randn(1, 2, 33, 40, device=device, dtype=dt)
            k = torch.randn(1, 2, 17, 40, device=device, dtype=dt)
            ops.attention(q, k, k, None, None)
            ops.attention(q, k, k, None, torch.rand(1, 17, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    print("smoke: every kernel path ran")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, default=None, help="measurements per candidate (default 20 CUDA, 5 CPU)")
    p.add_argument(
        "--inner", type=int, default=None, help="back-to-back calls per measurement (default 20 CUDA, 2 CPU)"
    )
    p.add_argument("--full", action="store_true", help="full SD shapes on CPU too")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--cpu-kernels", default=None,
        help="CPU kernels build(s), comma-separated (default, avx2, avx512) or 'all' this CPU runs "
        "(default: the one chosen for this CPU; --verify on the CPU checks all)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--verify", action="store_true", help="only run the quick correctness check")
    mode.add_argument("--smoke", action="store_true", help="only run one tiny call per kernel path")
    args = p.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.iters = args.iters or (20 if args.device == "cuda" else 5)
    args.inner = args.inner or (20 if args.device == "cuda" else 2)
    ops.load()
    if args.smoke:
        smoke(args.device)
        return 0
    if args.cpu_kernels in (None, "all"):
        verify_all = args.verify and args.device == "cpu"
        builds = list(ops.cpu_kernel_capabilities()) if args.cpu_kernels == "all" or verify_all else [ops.cpu_kernels()]
    else:
        builds = args.cpu_kernels.split(",")
    results, ok = [], True
    for build in builds:
        try:
            ops.use_cpu_kernels(build)
        except ValueError as e:
            p.error(f"--cpu-kernels: {e}")
        if args.verify:
            if args.device == "cpu":
                print(f"CPU kernels: {build}")
            ok &= verify(args.device)
            continue
        res = bench(args)
        print_table(res)
        results.append(res)
    if args.verify:
        return 0 if ok else 1
    out = args.json
    if out is None and os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / f"bench_ops_{args.device}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=1))
        print(f"wrote {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
