"""Random-weight models of known architectures: the built-in demo, a medium CPU benchmark size, and the
published SD configs (sdexport/data/model_configs.json), built with no download."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from sdexport.pipeline import StableDiffusion

_SD_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "timestep_spacing": "leading", "prediction_type": "epsilon",
}


def _small(channels: list[int], heads: int, context: int, text_layers: int, vae: list[int]) -> dict[str, Any]:
    """A scaled-down SD 1 architecture (same block types, CLIP vocabulary and 77 positions)."""
    n = len(channels)
    return {
        "family": "sd1",
        "unet": {
            "in_channels": 4, "out_channels": 4, "block_out_channels": channels,
            "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
            "layers_per_block": 1, "attention_head_dim": heads, "cross_attention_dim": context,
            "norm_num_groups": 8,
        },
        "vae": {
            "block_out_channels": vae, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 1,
            "norm_num_groups": 8, "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "vocab_size": 49408, "hidden_size": context, "intermediate_size": 2 * context,
            "num_hidden_layers": text_layers, "num_attention_heads": heads, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
        },
        "scheduler": _SD_SCHEDULER,
    }


SMALL = {
    # The README's demo: seconds to build and run on two CPU cores.
    "demo": _small([32, 64, 64], 2, 32, 2, [16, 32, 32, 32]),
    # A CPU benchmark size: about 1/20 of SD 1.5's UNet work per step.
    "medium": _small([128, 256, 256], 4, 256, 4, [32, 64, 128, 128]),
}
# Published architectures, by CLI name -> key in model_configs.json.
PUBLISHED = {"sd15": "sd15", "sd21-768": "sd21_768_v", "sd21-base": "sd21_base"}
PRESETS = (*SMALL, *PUBLISHED)


def preset_config(name: str) -> dict[str, Any]:
    if name in SMALL:
        return SMALL[name]
    if name not in PUBLISHED:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("sdexport").joinpath("data/model_configs.json").read_text(encoding="utf-8")
    cfg: dict[str, Any] = json.loads(text)[PUBLISHED[name]]
    family = "sd2" if cfg["unet"]["cross_attention_dim"] == 1024 else "sd1"
    return {**cfg, "family": family}


def random_pipeline(name: str, seed: int = 0) -> StableDiffusion:
    """A float32 CPU pipeline of preset `name` with seeded random weights."""
    cfg = preset_config(name)
    torch.manual_seed(seed)
    return StableDiffusion.from_configs(cfg["family"], cfg["unet"], cfg["vae"], cfg["text_encoder"],
                                        cfg["scheduler"], name=f"{name}-random")


def open_model(model: str, prediction_type: str | None = None) -> StableDiffusion:
    """A preset name (demo, medium, sd15, ...; unless a file of that name exists) with random weights, or
    a checkpoint path (diffusers folder, .safetensors / .ckpt)."""
    if model in PRESETS and not Path(model).exists():
        return random_pipeline(model)
    return StableDiffusion.from_pretrained(model, prediction_type=prediction_type)
