"""Typed SD 1.x / 2.x / XL model code: UNet, VAE and CLIP text encoders with diffusers-compatible names."""

from .config import UNET_UNSUPPORTED, TextEncoderConfig, UNetConfig, VAEConfig
from .layers import GEGLU, AttentionOp, GroupNorm, Kernels, set_attention_chunks, set_backend
from .text_encoder import TextEncoder, TextEncoderWithProjection
from .unet import UNet
from .vae import VAE, VAEDecode, VAEMoments

__all__ = [
    "GEGLU",
    "UNET_UNSUPPORTED",
    "VAE",
    "AttentionOp",
    "GroupNorm",
    "Kernels",
    "TextEncoder",
    "TextEncoderConfig",
    "TextEncoderWithProjection",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "VAEDecode",
    "VAEMoments",
    "set_attention_chunks",
    "set_backend",
]
