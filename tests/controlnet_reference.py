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


def controlnet_ldm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel state dict in lllyasviel's ``control_model.*`` layout (the cldm
    ``ControlNet``), by this helper's own rules: the UNet input half as tests/ldm_writer.py writes it,
    ``input_hint_block`` convs at 0, 2, 4, ..., ``zero_convs.{k}.0`` and ``middle_block_out.0``."""
    from ldm_writer import _unet_to_ldm

    encoder = {k: v for k, v in sd.items() if not k.startswith("controlnet_")}
    out = {"control_model." + k[len("model.diffusion_model."):]: v for k, v in _unet_to_ldm(encoder).items()}
    blocks = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
    for k, v in sd.items():
        parts = k.split(".")
        if k.startswith("controlnet_cond_embedding.conv_in."):
            out[f"control_model.input_hint_block.0.{parts[-1]}"] = v
        elif k.startswith("controlnet_cond_embedding.blocks."):
            out[f"control_model.input_hint_block.{2 * int(parts[2]) + 2}.{parts[-1]}"] = v
        elif k.startswith("controlnet_cond_embedding.conv_out."):
            out[f"control_model.input_hint_block.{2 * blocks + 2}.{parts[-1]}"] = v
        elif k.startswith("controlnet_down_blocks."):
            out[f"control_model.zero_convs.{parts[1]}.0.{parts[-1]}"] = v
        elif k.startswith("controlnet_mid_block."):
            out[f"control_model.middle_block_out.0.{parts[-1]}"] = v
    return out
