"""The small protocol the sampling loop runs against.

Two implementations: eager modules (`sdexport.StableDiffusion`) and a loaded artifact
(`runtime.load`). Everything else (prompts, schedulers, CFG, SDXL conditioning, image I/O) is shared.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from runtime.adapters.embeddings import Embedding
from runtime.tokenizer import ClipTokenizer

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")


@dataclass(frozen=True)
class ModelInfo:
    family: str  # one of FAMILIES
    unet_in_channels: int  # 4, or 9 for inpainting UNets
    latent_channels: int
    scaling_factor: float  # VAE latent scale (0.18215 for SD 1/2, 0.13025 for SDXL)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    name: str = "model"
    hash: str = ""  # short sha256 of the source weights (A1111 "Model hash")
    time_ids: int = 0  # SDXL "text_time" conditioning numbers: 0 (SD 1/2), 6 (SDXL base), 5 (refiner)
    force_zeros_for_empty_prompt: bool = False  # an empty negative prompt -> zero context and pooled
    force_upcast: bool = False  # the VAE runs in float32 when the model is float16 (the SDXL VAE overflows)
    context_widths: tuple[int, ...] = ()  # each text encoder's share of the context (SDXL base: 2); () = one
    context_dim: int = 0  # the UNet's context width
    # (channels, downscale) of each ControlNet residual the UNet takes (runtime/control.py); () = none
    control_residuals: tuple[tuple[int, int], ...] = ()


class Backend(Protocol):
    """What a pipeline needs from a model. Model inputs live on `device`; context, weights and text
    embeddings are in `dtype`; latents, images and time ids cross the protocol in float32."""

    info: ModelInfo
    tokenizers: tuple[ClipTokenizer, ...]  # one per text encoder (same vocabulary, own pad token)

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def check_shape(self, batch: int, height: int, width: int) -> None:
        """Raise ValueError when (batch, height, width in px) is outside what the backend serves."""
        ...

    def encode_text(self, ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """One (N, 77) int64 id tensor per text encoder -> context (N, 77, D) (the encoders' outputs
        concatenated on D) and the pooled embedding (N, P) of the last encoder, or None when the UNet
        takes none (SD 1/2)."""
        ...

    def unet(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, text_embeds: Tensor | None = None,
             time_ids: Tensor | None = None, control: Sequence[Tensor] | None = None) -> Tensor:
        """(B, Cin, h, w) latents, 0-d timestep, (B, L, D) context, (B, L) token weights, and for SDXL
        (B, P) pooled text embeddings and (B, info.time_ids) float32 time ids -> (B, 4, h, w).
        `control`: ControlNet residuals in `dtype`, one (B, C, h/f, w/f) per `info.control_residuals`
        entry, added to the UNet's skips and mid block (None: no ControlNet)."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """(B, 4, h, w) float32 latents already divided by the scaling factor -> (B, 3, 8h, 8w) float32
        in [-1, 1]; the backend casts to its VAE's own dtype."""
        ...

    def encode(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) float32 in [-1, 1] -> (B, 2*latent_channels, H/8, W/8) float32 Gaussian moments
        (mean, logvar); the backend casts to its VAE's own dtype."""
        ...


class AdapterBackend(Backend, Protocol):
    """A backend that takes LoRAs and embeddings (runtime/adapters/session.py)."""

    def adapter_weights(self) -> dict[str, Tensor]:
        """The live weight tensors LoRAs merge into (changed in place with `copy_`), named
        `unet.<diffusers name>`, `text_encoder.<transformers name>`, `text_encoder_2.<name>`."""
        ...

    def weights_changed(self, names: Collection[str]) -> None:
        """Called after the tensors `names` of `adapter_weights()` changed in place."""
        ...

    def add_embedding(self, emb: Embedding) -> None:
        """Add a textual-inversion token to the tokenizers and its vectors to the encoders' token tables."""
        ...
