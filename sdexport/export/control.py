"""The control artifact: `sdexport build CONTROLNET -o DIR` (the UNet step that takes the residuals:
sdexport/export/control_unet.py).

Signature (what `runtime.control_artifact.ControlArtifact` calls):
    controlnet(x (B, C, h, w), t (B,), context (B, 77k, D), weights (B, 77k), image (B, Cc, 8h, 8w)
               [, text_embeds (B, P), time_ids (B, 6)]) -> tuple of unscaled residuals
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from runtime.control_artifact import CONTROL_PROGRAM, ControlManifest
from runtime.manifest import ShapeRange
from sdexport.export import formats
from sdexport.export.build import BuildOptions, atomic_directory, export_copy
from sdexport.export.modules import SIZE_STEP, ShapeSpec, XLInputs
from sdexport.models.controlnet import ControlNet as ControlNetModule

__all__ = ["ControlNetStep", "ControlNetStepXL", "build_control", "control_multiple"]


class ControlNetStep(nn.Module):
    """The ControlNet: latents, timestep, text, image (SDXL: added conditioning) -> raw residuals."""

    def __init__(self, controlnet: ControlNetModule) -> None:
        super().__init__()
        self.controlnet = controlnet

    def forward(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, image: Tensor) -> tuple[Tensor, ...]:
        out: tuple[Tensor, ...] = self.controlnet(x, t, context, weights, image)
        return out


class ControlNetStepXL(ControlNetStep):
    def forward(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, image: Tensor,  # type: ignore[override]
                text_embeds: Tensor, time_ids: Tensor) -> tuple[Tensor, ...]:
        out: tuple[Tensor, ...] = self.controlnet(x, t, context, weights, image, text_embeds=text_embeds,
                                                  time_ids=time_ids)
        return out


def control_multiple(module: ControlNetModule) -> int:
    """The size step of a control artifact: the image's downscale times one cell per UNet level, at
    least `SIZE_STEP`."""
    cfg = module.control_config
    return max(SIZE_STEP, cfg.image_downscale * int(2 ** (len(cfg.unet.block_out_channels) - 1)))


def _example(module: ControlNetModule, spec: ShapeSpec, xl: XLInputs | None, dtype: torch.dtype,
             device: torch.device) -> tuple[tuple[Tensor, ...], Any]:
    u = module.control_config.unet
    args, dyn = spec.unet(u.in_channels, u.cross_attention_dim, dtype, device, xl)
    size = spec.example_size
    image = torch.rand(args[0].shape[0], module.control_config.conditioning_channels, size, size, dtype=dtype,
                       device=device)
    h, w = spec._spatial(spec.multiple)
    args = (*args[:4], image, *args[4:])
    return args, {**{k: dyn[k] for k in ("x", "t", "context", "weights")}, "image": {0: dyn["x"][0], 2: h, 3: w},
                  **{k: dyn[k] for k in ("text_embeds", "time_ids") if k in dyn}}


def build_control(cn: Any, out: str | Path, options: BuildOptions | None = None, *, overwrite: bool = False) -> Path:
    """Export an eager `sdexport.ControlNet` into the control artifact directory `out` (atomically;
    `cn` unchanged)."""
    from runtime import ops

    out = Path(out)
    info, multiple = cn.info, control_multiple(cn.module)
    opts = (options or BuildOptions()).resolve(out, overwrite, info.family, multiple, "ControlNet")
    lo, hi = opts.sizes(info.family)
    device, dtype, kernels = torch.device(opts.device), opts.graph_dtype, opts.model_kernels
    module = export_copy(cn.module, device, dtype, kernels)
    spec = ShapeSpec(opts.max_batch, lo, hi, opts.max_chunks, multiple)
    xl = XLInputs(info.pooled_dim, info.time_ids) if info.time_ids else None
    step = ControlNetStepXL(module) if xl else ControlNetStep(module)
    args, dyn = _example(module, spec, xl, dtype, device)
    with atomic_directory(out) as tmp:
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entry = formats.write(opts.format, CONTROL_PROGRAM, step.eval(), args, dyn, tmp, opts.cpu_gemm_used)
        manifest = ControlManifest(
            format=opts.format, family=info.family, latent_channels=info.latent_channels,
            context_dim=info.context_dim, residuals=[list(r) for r in info.residuals],
            conditioning_channels=info.conditioning_channels, time_ids=info.time_ids, pooled_dim=info.pooled_dim,
            global_pool=info.global_pool,
            shapes=ShapeRange(max_batch=spec.max_batch, min_size=lo, max_size=hi, multiple=multiple,
                              max_chunks=spec.max_chunks),
            dtype=opts.dtype_name, device=opts.device, torch_version=torch.__version__,
            op_library_version=ops.VERSION if opts.kernels == "fused" else "", kernels=opts.kernels,
            model_name=info.name, build_options={**asdict(opts), "cpu_gemm": opts.cpu_gemm_used,
                                                 "seconds": round(time.perf_counter() - t0, 2)},
            modules={CONTROL_PROGRAM: entry})
        manifest.write(tmp)
    return out
