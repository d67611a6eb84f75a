"""Checkpoint loading: diffusers folders and original LDM / SGM single files -> configs + state dicts.

Modules: ``load`` (``load_checkpoint``: dispatch, overrides, dtype) over ``folder`` (diffusers folders) and
``single_file`` (LDM / SGM files), both on ``checkpoint`` (the ``Checkpoint`` type, family facts, shared checks).
"""

from .architecture import text_shapes, unet_shapes, vae_shapes
from .checkpoint import (
    PAD_TOKEN,
    PAD_TOKENS,
    PREDICTION_TYPES,
    Checkpoint,
    family_defaults,
    pipeline_defaults,
    published_configs,
)
from .errors import CheckpointError, check_state_dict, load_strict
from .ldm import text_key_map, unet_key_map, vae_key_map
from .load import load_checkpoint

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
