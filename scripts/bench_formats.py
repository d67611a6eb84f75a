"""Build time and cold start (fresh process: import + load + first image) of every artifact format.

    OMP_NUM_THREADS=1 python scripts/bench_formats.py demo --size 128 --steps 20
    python scripts/bench_formats.py --existing ART --device cuda --size 512 --steps 30   # cold start only
Prints a markdown table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import sys, time
t0 = time.perf_counter()
import torch, runtime
pipe = runtime.load(sys.argv[1], device=sys.argv[2])
t1 = time.perf_counter()
size, steps = int(sys.argv[3]), int(sys.argv[4])
pipe.text2img("a photograph of an astronaut riding a horse", steps=steps, height=size, width=size, seed=0)
t2 = time.perf_counter()
pipe.text2img("a photograph of an astronaut riding a horse", steps=steps, height=size, width=size, seed=0)
t3 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f}")
"""


def _cold_start(art: Path, args: argparse.Namespace, row: dict[str, Any]) -> dict[str, Any]:
    """Fresh process: import + load, first image, second image."""
    size_mb = sum(p.stat().st_size for p in art.rglob("*") if p.is_file()) / 2**20
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(art), args.device, str(args.size), str(args.steps)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"cold start of {art} failed:\n{proc.stderr[-3000:]}")
    load, first, second = map(float, proc.stdout.split()[-3:])
    print(f"{row['format']}: build {row['build_s']:.1f}s, load {load:.2f}s, first image {first:.2f}s, "
          f"next {second:.2f}s", file=sys.stderr)
    return {**row, "size_mib": size_mb, "import_load_s": load, "first_image_s": first, "next_image_s": second}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="", help="preset (demo, medium, sd15, ...) or checkpoint path")
    ap.add_argument("--existing", type=Path, default=None, help="time this built artifact's cold start, no build")
    ap.add_argument("--formats", default="pt2,torchscript,onnx,aoti")
    ap.add_argument("--kernels", default="native")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--half", action="store_true")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rows = []
    if args.existing is not None:
        rows.append(_cold_start(args.existing, args, {"format": args.existing.name, "build_s": float("nan")}))
    else:
        if not args.model:
            ap.error("give a MODEL to build, or --existing ARTIFACT")
        from sdexport.export.build import BuildOptions, build
        from sdexport.presets import open_model

        with tempfile.TemporaryDirectory() as tmp:
            for fmt in args.formats.split(","):
                sd = open_model(args.model)
                art = Path(tmp) / fmt
                t0 = time.perf_counter()
                build(sd, art, BuildOptions(format=fmt, kernels=args.kernels, device=args.device, half=args.half,
                                            max_batch=1, min_size=args.size, max_size=args.size, max_chunks=1))
                rows.append(_cold_start(art, args, {"format": fmt, "build_s": time.perf_counter() - t0}))
    what = f"artifact {args.existing}" if args.existing else f"{args.model}, kernels {args.kernels}"
    print(f"{what}, {args.size}px, {args.steps} steps, {args.device}, "
          f"torch {torch.__version__}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print("| format | build s | artifact MiB | import+load s | first image s | cold start s | next image s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cold = r["import_load_s"] + r["first_image_s"]
        print(f"| {r['format']} | {r['build_s']:.1f} | {r['size_mib']:.1f} | {r['import_load_s']:.2f} | "
              f"{r['first_image_s']:.2f} | {cold:.2f} | {r['next_image_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
