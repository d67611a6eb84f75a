"""The expected state-dict keys and shapes of a config, read off our modules built on the meta device.

The loader checks converted state dicts against these tables, so a checkpoint that does not fit its
config is refused before any model is built. The names are diffusers' ``UNet2DConditionModel`` /
``AutoencoderKL`` names and the ``CLIPTextModel`` names of transformers 5 (no ``text_model.`` level),
which are also the names of our ``UNet``, ``VAE`` and ``TextEncoder``. Which options are supported is
the config parsers' decision (``UNetConfig.from_diffusers`` ...): the loader asks them and turns their
``ValueError`` into a :class:`CheckpointError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from sdexport.models.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdexport.models.text_encoder import TextEncoder
from sdexport.models.unet import UNet
from sdexport.models.vae import VAE

from .errors import CheckpointError

__all__ = ["Shapes", "text_shapes", "unet_shapes", "vae_shapes"]

Shapes = dict[str, tuple[int, ...]]
C = TypeVar("C")

# Options that change no parameter shape but that the config classes check against the channel counts;
# tables are computed with values that always fit, so that e.g. a tiny model whose group count comes
# from a published default still gets its key report (the model built later checks the real values).
_SHAPE_NEUTRAL_UNET = {"norm_num_groups": 1, "attention_head_dim": 1}
_SHAPE_NEUTRAL_VAE = {"norm_num_groups": 1}
_SHAPE_NEUTRAL_TEXT = {"num_attention_heads": 1}


def _parse(parser: Callable[[Mapping[str, Any]], C], config: Mapping[str, Any], neutral: Mapping[str, Any],
           what: str) -> C:
    try:
        return parser({**config, **neutral})
    except ValueError as exc:
        raise CheckpointError(f"{what} config is not supported: {exc}") from None


def _meta_shapes(build: Callable[[], nn.Module]) -> Shapes:
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# Cached per (frozen, hashable) config: building a real-size module, even on meta, takes a moment.
@functools.cache
def _unet(config: UNetConfig) -> Shapes:
    return _meta_shapes(lambda: UNet(config))


@functools.cache
def _vae(config: VAEConfig) -> Shapes:
    return _meta_shapes(lambda: VAE(config))


@functools.cache
def _text(config: TextEncoderConfig) -> Shapes:
    return _meta_shapes(lambda: TextEncoder(config))


def unet_shapes(config: Mapping[str, Any]) -> Shapes:
    """Every UNet parameter name -> shape for a diffusers ``UNet2DConditionModel`` config."""
    return dict(_unet(_parse(UNetConfig.from_diffusers, config, _SHAPE_NEUTRAL_UNET, "unet")))


def vae_shapes(config: Mapping[str, Any]) -> Shapes:
    """Every VAE parameter name -> shape for a diffusers ``AutoencoderKL`` config."""
    return dict(_vae(_parse(VAEConfig.from_diffusers, config, _SHAPE_NEUTRAL_VAE, "vae")))


def text_shapes(config: Mapping[str, Any]) -> Shapes:
    """Every text-encoder parameter name -> shape for a transformers ``CLIPTextConfig`` dict."""
    return dict(_text(_parse(TextEncoderConfig.from_transformers, config, _SHAPE_NEUTRAL_TEXT, "text encoder")))
