"""Tiny random diffusers ControlNets for the tests, and diffusers' ControlNet pipelines over the tiny
model folders (conftest.py). The zero convolutions (and the hint embedding's last conv) get random
weights: zero-initialised ones give zero residuals, and a test with them would prove nothing."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import tiny_configs as tc
import torch

# Four embedding levels: the conditioning image is downscaled 8x, as the VAE does.
CONDITIONING_WIDTHS = (8, 8, 16, 16)


def controlnet_config(kind: str, **extra: Any) -> dict[str, Any]:
    """A diffusers ControlNetModel config mirroring the tiny UNet of `kind` (4 input channels)."""
    from diffusers import ControlNetModel

    params = set(inspect.signature(ControlNetModel.__init__).parameters)
    unet = tc.unet_config(kind)
    lpb = unet["layers_per_block"]
    cfg = {k: v for k, v in unet.items() if k in params}
    cfg.update(in_channels=4, layers_per_block=lpb if isinstance(lpb, int) else lpb[0],
               conditioning_embedding_out_channels=list(CONDITIONING_WIDTHS), **extra)
    return cfg


def randomise_zero_convs(cn: Any) -> Any:
    for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
        m.reset_parameters()
    return cn


def make_controlnet(kind: str, seed: int, **extra: Any) -> Any:
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return randomise_zero_convs(ControlNetModel(**controlnet_config(kind, **extra)))


def make_controlnet_folder(kind: str, root: Path, seed: int = 0, name: str | None = None, **extra: Any) -> Path:
    """A saved diffusers ControlNetModel folder (config.json + safetensors) at root/name."""
    folder = root / (name or f"cn-{kind}-{seed}")
    if not (folder / "config.json").exists():
        make_controlnet(kind, seed, **extra).save_pretrained(folder)
    return folder


def reference_pipeline(folder: Path, controlnets: list[Path], kind: str = "text2img", xl: bool = False) -> Any:
    """diffusers' (SDXL) ControlNet pipeline of `kind` over a tiny model folder; several ControlNets make
    a MultiControlNetModel."""
    import diffusers as d

    nets = [d.ControlNetModel.from_pretrained(p) for p in controlnets]
    if xl:
        cls = {"text2img": d.StableDiffusionXLControlNetPipeline,
               "img2img": d.StableDiffusionXLControlNetImg2ImgPipeline,
               "inpaint": d.StableDiffusionXLControlNetInpaintPipeline}[kind]
        pipe = cls.from_pretrained(folder, controlnet=nets if len(nets) > 1 else nets[0], add_watermarker=False)
    else:
        cls = {"text2img": d.StableDiffusionControlNetPipeline, "img2img": d.StableDiffusionControlNetImg2ImgPipeline,
               "inpaint": d.StableDiffusionControlNetInpaintPipeline}[kind]
        pipe = cls.from_pretrained(folder, controlnet=nets if len(nets) > 1 else nets[0], safety_checker=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
