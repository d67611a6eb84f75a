"""Tiny diffusers / transformers config dicts with the SD 1.x / 2.x architecture features.

Shared by the whole test suite; keep the function names and kinds stable:
``unet_config(kind)``, ``vae_config()``, ``text_config(kind)``, ``scheduler_config(kind)`` with
``kind`` in ``KINDS``. The UNet's ``cross_attention_dim`` equals the text encoder's ``hidden_size`` of
the same kind; the VAE downsamples by 8 like SD's, and the text encoder keeps CLIP's vocabulary and
77 positions so the real tokenizer's ids fit.
"""

from __future__ import annotations

from typing import Any

KINDS = ("sd1", "sd2", "sd1-inpaint")


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def unet_config(kind: str) -> dict[str, Any]:
    """SD1: int heads, conv projections. SD2: per-level heads, linear projections, upcast attention.
    sd1-inpaint: SD1 with 9 input channels."""
    _check(kind)
    common: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
    }
    if kind == "sd2":
        return {
            **common,
            "in_channels": 4,
            "layers_per_block": 1,
            "attention_head_dim": [2, 4, 4],
            "cross_attention_dim": 48,
            "use_linear_projection": True,
            "upcast_attention": True,
        }
    return {
        **common,
        "in_channels": 9 if kind == "sd1-inpaint" else 4,
        "layers_per_block": 2 if kind == "sd1" else 1,
        "attention_head_dim": 2,
        "cross_attention_dim": 32,
    }


def vae_config() -> dict[str, Any]:
    """KL-f8 autoencoder (three downsamplings), 4 latent channels, SD's scaling factor."""
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [16, 32, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def text_config(kind: str) -> dict[str, Any]:
    """CLIPTextConfig kwargs. SD1: quick_gelu, width 32 (CLIP-L-like). SD2: gelu, width 48
    (OpenCLIP-H-like)."""
    _check(kind)
    sd2 = kind == "sd2"
    return {
        "vocab_size": 49408,
        "hidden_size": 48 if sd2 else 32,
        "intermediate_size": 96 if sd2 else 64,
        "num_hidden_layers": 3 if sd2 else 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": 48 if sd2 else 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0 if sd2 else 1,
    }


def scheduler_config(kind: str) -> dict[str, Any]:
    """The SD scheduler config (scaled-linear betas); SD2 predicts v."""
    _check(kind)
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "timestep_spacing": "leading",
        "prediction_type": "v_prediction" if kind == "sd2" else "epsilon",
    }
