"""Tiny diffusers / transformers config dicts with the SD 1.x / 2.x / XL architecture features.

Shared by the whole test suite; keep the function names and kinds stable:
``unet_config(kind)``, ``vae_config(kind)``, ``text_config(kind)``, ``text_config_2(kind)``,
``scheduler_config(kind)`` with ``kind`` in ``KINDS`` (SD 1.x/2.x) or ``XL_KINDS``. The UNet's
``cross_attention_dim`` equals the text encoder's ``hidden_size`` of the same kind (SDXL base: the sum
of both encoders', the refiner: encoder 2's); the VAE downsamples by 8 like SD's, and the text encoders
keep CLIP's vocabulary and 77 positions so the real tokenizer's ids fit.
"""

from __future__ import annotations

from typing import Any

KINDS = ("sd1", "sd2", "sd1-inpaint")
XL_KINDS = ("sdxl", "sdxl-refiner")

# SDXL's added conditioning at tiny width: pooled width (encoder 2's projection_dim) and the width of
# each time id's sinusoids; base 6 time ids, refiner 5.
XL_POOLED_DIM = 40
XL_TIME_EMBED_DIM = 8
XL_TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}


def _check(kind: str, kinds: tuple[str, ...] = KINDS + XL_KINDS) -> None:
    if kind not in kinds:
        raise ValueError(f"unknown kind {kind!r}; expected one of {kinds}")


def _xl_unet_config(kind: str) -> dict[str, Any]:
    """SDXL base-like: no attention at the first level, per-level transformer depth (the mid block takes
    the last level's), linear projections, "text_time" conditioning with 6 time ids. Refiner-like: no
    attention at the first and last levels, one int depth, context from encoder 2 alone, 5 time ids."""
    base = kind == "sdxl"
    common: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "attention_head_dim": [2, 4, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": XL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": XL_POOLED_DIM + XL_TIME_IDS[kind] * XL_TIME_EMBED_DIM,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
    }
    if base:
        return {
            **common,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 3],
            "cross_attention_dim": text_config("sdxl")["hidden_size"] + text_config_2("sdxl")["hidden_size"],
        }
    return {
        **common,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": 2,
        "cross_attention_dim": text_config_2("sdxl-refiner")["hidden_size"],
    }


def unet_config(kind: str) -> dict[str, Any]:
    """SD1: int heads, conv projections. SD2: per-level heads, linear projections, upcast attention.
    sd1-inpaint: SD1 with 9 input channels. sdxl / sdxl-refiner: see ``_xl_unet_config``."""
    _check(kind)
    if kind in XL_KINDS:
        return _xl_unet_config(kind)
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


def vae_config(kind: str = "sd1") -> dict[str, Any]:
    """KL-f8 autoencoder (three downsamplings), 4 latent channels, SD's scaling factor (SDXL: its own,
    and ``force_upcast``)."""
    _check(kind)
    if kind in XL_KINDS:
        return {**vae_config(), "scaling_factor": 0.13025, "force_upcast": True}
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
    (OpenCLIP-H-like). sdxl: encoder 1 (``CLIPTextModel``), SD1's with the legacy token ids of the
    published SDXL configs; the refiner has no encoder 1."""
    _check(kind)
    if kind == "sdxl-refiner":
        raise ValueError("the SDXL refiner has no text_encoder (only text_encoder_2)")
    if kind == "sdxl":
        return {**text_config("sd1"), "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
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


def text_config_2(kind: str) -> dict[str, Any]:
    """CLIPTextConfig kwargs of SDXL's ``text_encoder_2`` (``CLIPTextModelWithProjection``, OpenCLIP
    ViT-bigG-like: gelu, projection without bias to ``XL_POOLED_DIM``), base and refiner alike.
    ``eos_token_id=2`` as in the published config: the pooled token is the argmax of the ids."""
    _check(kind, XL_KINDS)
    return {
        "vocab_size": 49408,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": XL_POOLED_DIM,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def scheduler_config(kind: str) -> dict[str, Any]:
    """The SD scheduler config (scaled-linear betas); SD2 predicts v. SDXL (base and refiner):
    the published Euler discrete config."""
    _check(kind)
    if kind in XL_KINDS:
        return {
            "_class_name": "EulerDiscreteScheduler",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "clip_sample": False,
            "sample_max_value": 1.0,
            "timestep_spacing": "leading",
            "prediction_type": "epsilon",
        }
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
