"""The UNet step of every artifact: it takes the ControlNet residuals (runtime/control.py).

    unet(x, t, context, weights, [text_embeds, time_ids,] control: tuple of (B, C_k, h/f_k, w/f_k))

`control` holds one tensor per `Manifest.control_residuals` entry (the runtime passes zeros when no
ControlNet acts); ONNX programs take them as separate inputs, in order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sdexport.export.modules import ShapeSpec, XLInputs, _dim, _times
from sdexport.models.unet import UNet

__all__ = ["ControlUNetStep", "ControlUNetStepXL", "control_unet_example"]


class ControlUNetStep(nn.Module):
    """The UNet step with the ControlNet residuals as its last input (a tuple)."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, control: tuple[Tensor, ...]) -> Tensor:
        out: Tensor = self.unet(x, t, context, weights, control=list(control))
        return out


class ControlUNetStepXL(nn.Module):
    """SDXL's step: the added conditioning, then the residuals."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, text_embeds: Tensor,
                time_ids: Tensor, control: tuple[Tensor, ...]) -> Tensor:
        out: Tensor = self.unet(x, t, context, weights, text_embeds=text_embeds, time_ids=time_ids,
                                control=list(control))
        return out


def _residual_spec(residuals: tuple[tuple[int, int], ...], spec: ShapeSpec, batch: Any) -> list[dict[int, Any]]:
    lo, hi = spec.min_size // spec.multiple, spec.max_size // spec.multiple
    unit = spec.multiple // 8  # latent cells per size step
    out = []
    for _, f in residuals:
        k = unit // f
        h, w = _dim("h", lo, hi), _dim("w", lo, hi)
        out.append({0: batch, 2: h if k == 1 else _times(h, k), 3: w if k == 1 else _times(w, k)})
    return out


def control_unet_example(unet: UNet, spec: ShapeSpec, dtype: torch.dtype, device: torch.device,
                         xl: XLInputs | None) -> tuple[tuple[Any, ...], Any]:
    """`ShapeSpec.unet`'s example and dynamic shapes with the residual tuple appended."""
    cfg = unet.config
    args, dyn = spec.unet(cfg.in_channels, cfg.cross_attention_dim, dtype, device, xl)
    x = args[0]
    b, lat_h, lat_w = x.shape[0], x.shape[2], x.shape[3]
    control = tuple(torch.randn(b, c, lat_h // f, lat_w // f, dtype=dtype, device=device) for c, f in cfg.residuals)
    return (*args, control), {**dyn, "control": tuple(_residual_spec(cfg.residuals, spec, dyn["x"][0]))}
