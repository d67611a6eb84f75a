"""Serving throughput: requests/s and p50/p95 latency of `python -m runtime.serve` with batching on and off.

    OMP_NUM_THREADS=1 python scripts/bench_serve.py ART --requests 120 --concurrency 8 --size 64 --steps 8
    python scripts/bench_serve.py --demo --requests 120 --concurrency 8     # builds the demo artifact first
    python scripts/bench_serve.py ART --kind img2img                         # a random init image per request

Each mode starts a fresh server subprocess on a free loopback port, warms it up, then sends `--requests`
txt2img requests (distinct prompts and seeds, one image each) from `--concurrency` client threads. The
server's RSS is read from /proc before and after the timed run. Prints a markdown table; --json writes it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _helpers() -> Any:
    """tests/serve_helpers.py: the demo artifact and the server subprocess, as the tests start them."""
    return importlib.import_module("serve_helpers")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _init_image(size: int, k: int) -> str:
    """A size x size PNG of random pixels (one per request), base64."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(k).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run_mode(art: Path, batching: bool, requests: int, concurrency: int, size: int, steps: int,
             warmup: int, kind: str = "txt2img") -> dict[str, Any]:
    import httpx

    srv = _helpers().start_server([art], batching=batching, max_queue=max(64, concurrency * 2))
    try:
        def one(k: int) -> tuple[int, float]:  # k < 0: warm-up requests (seeds from 1000000 up)
            seed = k if k >= 0 else 10**6 - k
            body: dict[str, Any] = {"prompt": f"a red fox number {k}", "seed": seed, "steps": steps, "width": size,
                                    "height": size, "sampler_name": "Euler", "cfg_scale": 5.0 + k % 3}
            if kind == "img2img":
                body.update(init_images=[_init_image(size, seed)], denoising_strength=0.75)
            t0 = time.perf_counter()
            r = httpx.post(f"{srv.url}/sdapi/v1/{'img2img' if kind == 'img2img' else 'txt2img'}", json=body,
                           timeout=600)
            if k < 0 and r.status_code != 200:
                raise RuntimeError(f"warm-up request failed: {r.status_code} {r.text}")
            return r.status_code, time.perf_counter() - t0

        with ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(one, range(-warmup, 0)))
            rss0 = rss_mb(srv.pid)
            before = httpx.get(f"{srv.url}/health").json()
            t0 = time.perf_counter()
            results = list(ex.map(one, range(requests)))
            wall = time.perf_counter() - t0
        after = httpx.get(f"{srv.url}/health").json()
        rss1 = rss_mb(srv.pid)
    finally:
        srv.stop()
    lat = sorted(t for _, t in results)
    codes = [c for c, _ in results]
    calls = after["pipeline_calls"] - before["pipeline_calls"]
    return {"batching": batching, "requests": requests, "ok": codes.count(200), "503": codes.count(503),
            "other": len(codes) - codes.count(200) - codes.count(503), "wall_s": wall, "req_per_s": requests / wall,
            "p50_s": statistics.median(lat), "p95_s": lat[max(0, round(0.95 * len(lat)) - 1)],
            "images_per_call": (after["units_run"] - before["units_run"]) / max(calls, 1),
            "worker_busy": (after["busy_s"] - before["busy_s"]) / wall,
            "s_per_call": (after["busy_s"] - before["busy_s"]) / max(calls, 1),
            "rss_mb_before": rss0, "rss_mb_after": rss1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", nargs="?", type=Path)
    p.add_argument("--demo", action="store_true", help="build the demo artifact (pt2, batch 1..4) and use it")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--kind", choices=("txt2img", "img2img"), default="txt2img",
                   help="img2img: a random init image per request, denoising strength 0.75")
    p.add_argument("--rounds", type=int, default=1, help="alternate off/on this many times; report medians")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    if a.demo:
        art = _helpers().build_demo_artifact(Path(tempfile.mkdtemp(prefix="bench-serve-")) / "demo")
    elif a.artifact is None:
        p.error("give ART or --demo")
    else:
        art = a.artifact
    # off, on, off, on, ...: a shared machine's load drifts; each mode's median round is reported
    rounds = [[run_mode(art, b, a.requests, a.concurrency, a.size, a.steps, a.warmup, a.kind) for b in (False, True)]
              for _ in range(a.rounds)]
    rows = [sorted((r[m] for r in rounds), key=lambda x: x["req_per_s"])[(a.rounds - 1) // 2] for m in (0, 1)]
    ratios = [r[1]["req_per_s"] / r[0]["req_per_s"] for r in rounds]
    print(f"{a.requests} {a.kind} requests, {a.concurrency} concurrent clients, {a.size}x{a.size}, {a.steps} Euler "
          f"steps, CFG on\n")
    print("| batching | req/s | p50 s | p95 s | images per call | 200 / 503 / other | server RSS MB (warm -> end) "
          "| worker busy | s per call |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['batching'] else 'off'} | {r['req_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
              f"{r['images_per_call']:.2f} | {r['ok']} / {r['503']} / {r['other']} | "
              f"{r['rss_mb_before']:.0f} -> {r['rss_mb_after']:.0f} | {r['worker_busy']:.0%} | {r['s_per_call']:.2f} |")
    print(f"\nbatching on / off: {rows[1]['req_per_s'] / rows[0]['req_per_s']:.2f}x requests/s (medians); "
          f"per round: {', '.join(f'{x:.2f}x' for x in ratios)}")
    if a.json is not None:
        a.json.write_text(json.dumps(rounds, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
