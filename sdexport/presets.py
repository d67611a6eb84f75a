"""Random-weight models of known architectures: the built-in demo, medium CPU benchmark sizes (SD 1.x- and
SDXL-shaped), and the published SD / SDXL configs (sdexport/data/model_configs.json), built with no download."""

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
        "native_size": 128,
    }


def _small_xl(channels: list[int], depth: list[int], widths: tuple[int, int], text_layers: int,
              vae: list[int]) -> dict[str, Any]:
    """A scaled-down SDXL base architecture: no attention at the first level, per-level transformer depth,
    two CLIP encoders (context = both widths concatenated, pooled = encoder 2's projection), 6 time ids;
    64-wide attention heads as SDXL's."""
    w1, w2 = widths
    time_dim = 64
    clip = {"vocab_size": 49408, "num_hidden_layers": text_layers, "max_position_embeddings": 77}
    return {
        "family": "sdxl",
        "unet": {
            "in_channels": 4, "out_channels": 4, "block_out_channels": channels,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2, "attention_head_dim": [c // 64 for c in channels],
            "transformer_layers_per_block": depth, "cross_attention_dim": w1 + w2, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": w2 + 6 * time_dim, "norm_num_groups": 32,
        },
        "vae": {
            "block_out_channels": vae, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 1,
            "norm_num_groups": 8, "scaling_factor": 0.13025, "force_upcast": True,
        },
        "text_encoder": {**clip, "hidden_size": w1, "intermediate_size": 4 * w1, "num_attention_heads": w1 // 64,
                         "hidden_act": "quick_gelu", "projection_dim": w1},
        "text_encoder_2": {**clip, "hidden_size": w2, "intermediate_size": 4 * w2,
                           "num_attention_heads": w2 // 64, "hidden_act": "gelu", "projection_dim": w2},
        "scheduler": _SD_SCHEDULER,
        "pipeline": {"force_zeros_for_empty_prompt": True},
        "native_size": 256,
    }


SMALL = {
    # The README's demo: seconds to build and run on two CPU cores.
    "demo": _small([32, 64, 64], 2, 32, 2, [16, 32, 32, 32]),
    # A CPU benchmark size: about 1/20 of SD 1.5's UNet work per step.
    "medium": _small([128, 256, 256], 4, 256, 4, [32, 64, 128, 128]),
    # An SDXL-shaped CPU benchmark size (at 256 px: about 1/100 of SDXL's UNet work per step at 1024 px).
    "sdxl-medium": _small_xl([128, 256, 512], [1, 2, 4], (256, 384), 4, [32, 64, 128, 128]),
}
# Published architectures, by CLI name -> key in model_configs.json.
PUBLISHED = {"sd15": "sd15", "sd21-768": "sd21_768_v", "sd21-base": "sd21_base", "sdxl": "sdxl_base",
             "sdxl-refiner": "sdxl_refiner"}
PRESETS = (*SMALL, *PUBLISHED)


def _family(cfg: dict[str, Any]) -> str:
    if "text_encoder_2" in cfg:
        return "sdxl" if "text_encoder" in cfg else "sdxl-refiner"
    return "sd2" if cfg["unet"]["cross_attention_dim"] == 1024 else "sd1"


def preset_config(name: str) -> dict[str, Any]:
    if name in SMALL:
        return SMALL[name]
    if name not in PUBLISHED:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("sdexport").joinpath("data/model_configs.json").read_text(encoding="utf-8")
    cfg: dict[str, Any] = json.loads(text)[PUBLISHED[name]]
    return {**cfg, "family": _family(cfg)}


def random_pipeline(name: str, seed: int = 0) -> StableDiffusion:
    """A float32 CPU pipeline of preset `name` with seeded random weights."""
    cfg = preset_config(name)
    torch.manual_seed(seed)
    pipeline = cfg.get("pipeline", {})
    return StableDiffusion.from_configs(cfg["family"], cfg["unet"], cfg["vae"], cfg.get("text_encoder"),
                                        cfg["scheduler"], text_config_2=cfg.get("text_encoder_2"),
                                        force_zeros_for_empty_prompt=pipeline.get("force_zeros_for_empty_prompt"),
                                        name=f"{name}-random")


def open_model(model: str, prediction_type: str | None = None) -> StableDiffusion:
    """A preset name (demo, medium, sd15, ...; unless a file of that name exists) with random weights, or
    a checkpoint path (diffusers folder, .safetensors / .ckpt)."""
    if model in PRESETS and not Path(model).exists():
        return random_pipeline(model)
    return StableDiffusion.from_pretrained(model, prediction_type=prediction_type)
