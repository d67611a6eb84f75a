"""The small protocol the sampling loop runs against.

Two implementations: eager modules (`sdexport.StableDiffusion`) and a loaded artifact
(`runtime.load`). Everything else (prompts, schedulers, CFG, image I/O) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from runtime.tokenizer import ClipTokenizer


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "sd1" | "sd2"
    unet_in_channels: int  # 4, or 9 for inpainting UNets
    latent_channels: int
    scaling_factor: float  # VAE latent scale (0.18215 for SD 1/2)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    name: str = "model"
    hash: str = ""  # short sha256 of the source weights (A1111 "Model hash")


class Backend(Protocol):
    """What a pipeline needs from a model. All tensors live on `device` in `dtype`."""

    info: ModelInfo
    tokenizer: ClipTokenizer

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def check_shape(self, batch: int, height: int, width: int) -> None:
        """Raise ValueError when (batch, height, width in px) is outside what the backend serves."""
        ...

    def encode_text(self, ids: Tensor) -> Tensor:
        """(N, 77) int64 token ids -> (N, 77, D) context."""
        ...

    def unet(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor) -> Tensor:
        """(B, Cin, h, w) latents, 0-d timestep, (B, L, D) context, (B, L) token weights -> (B, 4, h, w)."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """(B, 4, h, w) latents already divided by the scaling factor -> (B, 3, 8h, 8w) in [-1, 1]."""
        ...

    def encode(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2*latent_channels, H/8, W/8) Gaussian moments (mean, logvar)."""
        ...
