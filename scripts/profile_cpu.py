"""Where a CPU step goes: one UNet step or VAE decode of an artifact, by op, beside OpenVINO's per-layer
counters on an ONNX artifact's graph (issue 15: which op class keeps an engine ahead).

Ours: oneDNN's own execution times (ONEDNN_VERBOSE=profile_exec, set in a child process before oneDNN
starts) per primitive kind and implementation, torch.profiler's times of our sdfused ops, and the rest of
the wall time (Inductor's generated loops: pointwise ops, copies; other ATen ops). OpenVINO: its PERF_COUNT
per layer type and kernel. One call each, after a warm-up; single calls on a shared VM vary by several per
cent, so compare op classes, not the totals of two separate runs.

    OMP_NUM_THREADS=1 python scripts/profile_cpu.py ART ONNX_ART --component unet --threads 1 --size 512
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARK = "=== profile_cpu: timed call ==="


def _inputs(info: Any, component: str, size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    h = size // 8
    if component == "vae":
        return (torch.randn(1, info.latent_channels, h, h, generator=g),)
    return (torch.randn(2, info.unet_in_channels, h, h, generator=g), torch.tensor([500.0]),
            torch.randn(2, 77, info.context_dim, generator=g), torch.ones(2, 77))


def _ours_child(art: str, component: str, threads: int, size: int) -> None:
    """Runs under ONEDNN_VERBOSE: a warm-up, MARK, then one call under the profiler; prints JSON."""
    import runtime

    be: Any = runtime.load(art, device="cpu", threads=threads).backend
    args = _inputs(be.info, component, size)
    call: Callable[[], object] = ((lambda: be.decode(*args)) if component == "vae"
                                  else (lambda: be.unet(*args, None, None)))
    with torch.inference_mode():
        call()
        print(MARK, flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            call()
            wall = (time.perf_counter() - t0) * 1e3
    # only our ops: ATen ops that run oneDNN primitives (eager, pt2) would count twice
    ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages() if e.key.startswith("sdfused::")}
    print(json.dumps({"wall": wall, "ops": ops}), flush=True)


def ours(art: str, component: str, threads: int, size: int) -> tuple[float, dict[str, float]]:
    env = {**os.environ, "ONEDNN_VERBOSE": "profile_exec", "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--child", art, "--component", component, "--threads",
                          str(threads), "--size", str(size)], env=env, capture_output=True, text=True)
    if out.returncode != 0 or MARK not in out.stdout:  # e.g. not an artifact: the child's own error, not ours
        errors = out.stderr.strip().splitlines()
        raise SystemExit(f"profiling {art} failed: {errors[-1] if errors else f'exit status {out.returncode}'}")
    timed = out.stdout.split(MARK)[1].strip().splitlines()
    result = json.loads(timed[-1])
    ms: dict[str, float] = collections.defaultdict(float)
    for line in timed:
        f = line.split(",")  # onednn_verbose,v1,primitive,exec,cpu,KIND,IMPL,...,PROBLEM,MS
        if line.startswith("onednn_verbose") and len(f) > 7 and f[3] == "exec":
            ms[f"oneDNN {f[5]} {f[6]}"] += float(f[-1])
    ms.update({f"op {k}": v for k, v in result["ops"].items()})
    ms["rest (Inductor loops, other ATen ops, copies)"] = result["wall"] - sum(ms.values())
    return result["wall"], ms


def openvino(onnx_art: str, component: str, threads: int, size: int) -> tuple[float, dict[str, float]]:
    import openvino as ov

    from runtime.openvino import cpu_config

    file = Path(onnx_art) / ("vae_decoder.onnx" if component == "vae" else "unet.onnx")
    compiled = ov.Core().compile_model(str(file), "CPU", {**cpu_config(threads, "f32"), "PERF_COUNT": True})
    rng = np.random.default_rng(0)
    feeds = []
    for i in compiled.inputs:  # dynamic batch: 2 (CFG) for the UNet, 1 for the VAE; spatial: size / 8
        dims = [d.get_length() if not d.is_dynamic else (1 if component == "vae" else 2) if k == 0 else size // 8
                for k, d in enumerate(i.get_partial_shape())]
        name = i.get_any_name()
        a = (np.full(dims, 500.0) if name == "t" else np.ones(dims) if name == "weights"
             else np.zeros(dims) if name.startswith("control_") else rng.standard_normal(dims))
        feeds.append(a.astype(np.float32))
    request = compiled.create_infer_request()
    request.infer(feeds)
    t0 = time.perf_counter()
    request.infer(feeds)
    wall = (time.perf_counter() - t0) * 1e3
    ms: dict[str, float] = collections.defaultdict(float)
    for p in request.profiling_info:
        ms[f"{p.node_type} {p.exec_type}"] += p.real_time.total_seconds() * 1e3
    return wall, ms


def _table(title: str, wall: float, ms: dict[str, float]) -> str:
    rows = [f"{title}: wall {wall:.1f} ms", "", "| op | ms | share |", "|---|---|---|"]
    rows += [f"| {k} | {v:.1f} | {100 * v / wall:.1f}% |" for k, v in sorted(ms.items(), key=lambda kv: -kv[1])
             if v >= 0.05]
    return "\n".join(rows)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="a CPU artifact (aoti, pt2, ...) to profile")
    ap.add_argument("onnx_artifact", nargs="?", help="a float32 onnx artifact for OpenVINO's counters")
    ap.add_argument("--component", choices=("unet", "vae"), default="unet")
    ap.add_argument("--threads", type=_positive, default=1)
    ap.add_argument("--size", type=_positive, default=512, help="image size in pixels (latents are size / 8)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _ours_child(args.artifact, args.component, args.threads, args.size)
        return
    torch.set_num_threads(args.threads)
    print(f"{args.component} at {args.size} px, {args.threads} thread(s), torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    print(_table(f"{args.artifact}", *ours(args.artifact, args.component, args.threads, args.size)))
    if args.onnx_artifact:
        print()
        print(_table(f"OpenVINO f32 on {args.onnx_artifact}",
                     *openvino(args.onnx_artifact, args.component, args.threads, args.size)))


if __name__ == "__main__":
    main()
