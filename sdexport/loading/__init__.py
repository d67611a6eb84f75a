"""Checkpoint loading: diffusers folders and original LDM single files -> configs + state dicts."""

from .architecture import text_shapes, unet_shapes, vae_shapes
from .checkpoint import (
    PAD_TOKEN,
    PAD_TOKENS,
    PREDICTION_TYPES,
    Checkpoint,
    family_defaults,
    load_checkpoint,
    pipeline_defaults,
    published_configs,
)
from .errors import CheckpointError, check_state_dict, load_strict
from .ldm import text_key_map, unet_key_map, vae_key_map

__all__ = [
    "PAD_TOKEN",
    "PAD_TOKENS",
    "PREDICTION_TYPES",
    "Checkpoint",
    "CheckpointError",
    "check_state_dict",
    "family_defaults",
    "load_checkpoint",
    "load_strict",
    "pipeline_defaults",
    "published_configs",
    "text_key_map",
    "text_shapes",
    "unet_key_map",
    "unet_shapes",
    "vae_key_map",
    "vae_shapes",
]
