"""Cost of one ControlNet in the UNet step: the step (CFG batch 2) without and with one ControlNet, eager
and compiled (AOTInductor artifacts of the model and of the ControlNet), plus the FLOP ratio of the
ControlNet to the UNet. Random weights (a preset's architecture; the ControlNet mirrors its UNet).

    OMP_NUM_THREADS=1 python scripts/bench_controlnet.py --model medium --size 256 --work /tmp/cn-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import runtime
from runtime import ops
from runtime.control import scale_residuals
from sdexport.bench import time_call
from sdexport.controlnet import ControlNet
from sdexport.presets import open_model

# diffusers ControlNetModel keys that a UNet config shares
_SHARED = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "block_out_channels", "layers_per_block",
           "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
           "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "use_linear_projection",
           "upcast_attention", "addition_embed_type", "addition_time_embed_dim",
           "projection_class_embeddings_input_dim")


def controlnet_for(unet_config: dict[str, Any]) -> ControlNet:
    """A random ControlNet mirroring a UNet config (diffusers' ControlNetModel.from_unet rule)."""
    cfg = {k: unet_config[k] for k in _SHARED if k in unet_config}
    if isinstance(cfg.get("layers_per_block"), list):
        cfg["layers_per_block"] = cfg["layers_per_block"][0]
    torch.manual_seed(0)
    return ControlNet.from_config(cfg, name="bench-controlnet")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="medium")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cn-bench"))
    ap.add_argument("--format", default="aoti")
    args = ap.parse_args()
    device = torch.device("cpu")
    sd = open_model(args.model).attention_backend("sdpa")
    cn = controlnet_for(dict(sd.configs.unet))
    b, lat = 2, args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, lat, lat, generator=g)
    t = torch.tensor(500.0)
    ctx = torch.randn(b, 77, sd.unet.config.cross_attention_dim, generator=g)
    w = torch.ones(b, 77)
    image = torch.rand(b, 3, args.size, args.size, generator=g)

    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            sd.unet(x, t, ctx, w)
        unet_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            cn.module(x, t, ctx, w, image)
        cn_flops = fc.get_total_flops()

    def eager_plain() -> Any:
        return sd.backend.unet(x, t, ctx, w)

    def eager_control() -> Any:
        res = scale_residuals(cn.residuals(x, t, ctx, w, image), 1.0, False)
        return sd.backend.unet(x, t, ctx, w, control=res)

    rows: dict[str, float] = {}
    with torch.inference_mode():
        rows["eager"] = time_call(eager_plain, device, args.repeat)
        rows["eager + ControlNet"] = time_call(eager_control, device, args.repeat)

    opts = dict(format=args.format, max_batch=1, min_size=args.size, max_size=args.size, max_chunks=1,
                kernels="fused" if ops.available() else "native")
    model_art = args.work / f"{args.model}-{args.format}"
    cn_art = args.work / f"{args.model}-cn-{args.format}"
    if not (model_art / "manifest.json").is_file():
        sd.export(model_art, overwrite=True, **opts)
    if not (cn_art / "manifest.json").is_file():
        cn.export(cn_art, overwrite=True, **opts)
    pipe, control = runtime.load(model_art), runtime.load_control(cn_art)
    be = pipe.backend

    def art_plain() -> Any:
        return be.unet(x, t, ctx, w)

    def art_control() -> Any:
        res = scale_residuals(control.residuals(x, t, ctx, w, image), 1.0, False)
        return be.unet(x, t, ctx, w, control=res)

    with torch.inference_mode():
        rows[f"{args.format} artifact"] = time_call(art_plain, device, args.repeat)
        rows[f"{args.format} artifact + ControlNet artifact"] = time_call(art_control, device, args.repeat)
        err = (art_control() - eager_control()).abs().max().item()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"model": args.model, "size": args.size, "batch": b, "revision": rev, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "kernels": opts["kernels"], "flops_unet": unet_flops,
           "flops_controlnet": cn_flops, "flop_ratio": cn_flops / unet_flops, "ms": rows,
           "max_abs_diff_artifact_vs_eager": err}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
