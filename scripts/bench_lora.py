"""LoRA load / swap / unload time on a pipeline with random weights (no download).

    python scripts/bench_lora.py sd15 --rank 32                      # eager, CPU, fp32
    python scripts/bench_lora.py sd15 --device cuda --half --artifact /tmp/sd15-aoti
    python scripts/bench_lora.py demo --build-artifact pt2           # also a small pt2 artifact built here

The LoRAs are kohya files of rank `--rank` over the modules a typical SD LoRA trains: every attention
projection, proj_in/out and feed-forward of the UNet, and every text-encoder q/k/v/out/fc1/fc2 (SD 1.5:
192 UNet + 72 text-encoder modules). Timed: the first `load_lora` (read + resolve + merge), a swap to a
second LoRA (`unload_loras` + `load_lora`, file parsed before), `unload_loras`, and a call with the same
prompt-tag set (no merge). Each figure is the median of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TARGETS = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|proj_in|proj_out|ff\.net\.(0\.proj|2)|"
                     r"self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def write_lora(weights: dict[str, torch.Tensor], rank: int, path: Path, seed: int) -> int:
    """A kohya LoRA (fp16, as trainers save them) for the matching weights; returns the module count."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        comp, _, inner = name.partition(".")
        if not TARGETS.search(inner) or w.dim() not in (2, 4):
            continue
        key = KOHYA[comp] + ("" if comp == "unet" else "text_model_") + inner[: -len(".weight")].replace(".", "_")
        o, i = w.shape[:2]
        out[f"{key}.lora_down.weight"] = (torch.randn(rank, i, generator=g) * 0.01).half().reshape(
            rank, i, *([1, 1] if w.dim() == 4 else []))
        out[f"{key}.lora_up.weight"] = (torch.randn(o, rank, generator=g) * 0.01).half().reshape(
            o, rank, *([1, 1] if w.dim() == 4 else []))
        out[f"{key}.alpha"] = torch.tensor(float(rank // 2))
    save_file(out, str(path))
    return len(out) // 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(pipe: Any, files: list[Path], repeat: int, device: torch.device) -> dict[str, float]:
    first, swap, unload, same = [], [], [], []
    a, b = files
    for _ in range(repeat):
        pipe._cache.clear()  # a cold read each time
        first.append(_time(lambda: pipe.load_lora(a, 0.8), device))
        swap.append(_time(lambda: (pipe.unload_loras(), pipe.load_lora(b, 0.8)), device))
        merges = pipe.lora_merges
        same.append(_time(lambda: pipe._use_tags(pipe._tags), device))
        assert pipe.lora_merges == merges
        unload.append(_time(pipe.unload_loras, device))
    return {"first_load_s": statistics.median(first), "swap_s": statistics.median(swap),
            "unload_s": statistics.median(unload), "same_set_s": statistics.median(same)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", default="sd15")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--half", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--artifact", type=Path, default=None, help="also time runtime.load(ARTIFACT)")
    ap.add_argument("--build-artifact", choices=["pt2", "aoti"], default=None,
                    help="build a small artifact of the preset (64 px, batch 1) and time it too")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import runtime
    from sdexport.presets import random_pipeline

    device = torch.device(args.device)
    t0 = time.perf_counter()
    sd = random_pipeline(args.preset).to(device, torch.float16 if args.half else None)
    made = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora-"))
    weights = sd.backend.adapter_weights()
    files = [tmp / "a.safetensors", tmp / "b.safetensors"]
    modules = [write_lora(weights, args.rank, f, seed) for seed, f in enumerate(files)]
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows: dict[str, Any] = {
        "preset": args.preset, "rank": args.rank, "modules": modules[0], "device": str(device),
        "dtype": "float16" if args.half else "float32", "file_mb": round(files[0].stat().st_size / 2**20, 1),
        "date": time.strftime("%Y-%m-%d"), "git": rev, "torch": torch.__version__, "model_s": round(made, 1),
        "eager": measure(sd, files, args.repeat, device),
    }
    art = args.artifact
    if args.build_artifact:
        art = sd.export(tmp / "art", format=args.build_artifact, kernels="native", device=device.type,
                        half=args.half, max_batch=1, min_size=64, max_size=64, max_chunks=1)
    if art is not None:
        rows["artifact"] = {"path": str(art), **measure(runtime.load(art, device=device), files, args.repeat,
                                                         device)}
    text = json.dumps(rows, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
