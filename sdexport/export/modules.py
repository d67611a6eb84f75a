"""The exported functions, their example inputs and their dynamic-shape specs.

Signatures (what `runtime.artifact.ArtifactBackend` calls; `runtime.manifest.modules_for` lists each
family's):
    text_encoder(tokens (N, 77, D1)) -> (N, 77, D1)             # SD 1.x/2.x, SDXL base encoder 1
    text_encoder_2(tokens (N, 77, D2), ids (N, 77) int64) -> ((N, 77, D2), (N, P))  # SDXL: context, pooled
      tokens = token_embedding(ids), looked up by the runtime in the table stored beside the program
      (`<name>.tokens.safetensors`), so it can add textual-inversion rows; ids locate the pooled EOS.
      Artifacts built before (no table in the manifest) take `ids (N, 77) int64` alone.
    unet(x (B, Cin, h, w), t (B,) float32, context (B, 77k, D), weights (B, 77k)) -> (B, 4, h, w)
    unet(..., text_embeds (B, P), time_ids (B, n) float32)     # SDXL: the added conditioning
    vae_decoder(z (B, 4, h, w)) -> (B, 3, 8h, 8w)
    vae_encoder(image (B, 3, H, W)) -> (B, 8, H/8, W/8)   # mean and logvar, concatenated
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from sdexport.models.text_encoder import TextEncoder, TextEncoderWithProjection
from sdexport.models.unet import UNet
from sdexport.models.vae import VAE, VAEDecode, VAEMoments

__all__ = [
    "SIZE_STEP",
    "ShapeSpec",
    "TextEncode",
    "TextEncodePooled",
    "TextTokens",
    "TextTokensPooled",
    "UNetStep",
    "VAEDecode",
    "VAEMoments",
    "XLInputs",
    "artifact_multiple",
    "pixel_multiple",
]

# Artifact sizes step in at least this many pixels (8 latent cells of an SD VAE).
SIZE_STEP = 64


def pixel_multiple(unet: UNet, vae: VAE) -> int:
    """The pixel sizes the pair accepts are multiples of this: the VAE's cell times one latent cell per
    UNet downsampling (each halves the latent, and the up path must come back to the same size)."""
    return int(vae.config.downscale * 2 ** (len(unet.config.block_out_channels) - 1))


def artifact_multiple(unet: UNet, vae: VAE) -> int:
    """The size step of an artifact of this model: `pixel_multiple`, at least `SIZE_STEP`."""
    return max(SIZE_STEP, pixel_multiple(unet, vae))


class UNetStep(nn.Module):
    """The UNet step of artifacts built before ControlNet (no residual inputs); tests build such artifacts."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor) -> Tensor:
        out: Tensor = self.unet(x, t, context, weights)
        return out


class TextEncodePooled(nn.Module):
    """SDXL's `text_encoder_2`: ids -> (context, pooled projection)."""

    def __init__(self, text_encoder: TextEncoderWithProjection) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        context, pooled = self.text_encoder(ids)
        return context, pooled


class TextEncode(nn.Module):
    def __init__(self, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, ids: Tensor) -> Tensor:
        out: Tensor = self.text_encoder(ids)
        return out


class TextTokens(nn.Module):
    """`text_encoder` fed token vectors; the token table is not part of the program."""

    def __init__(self, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.text_encoder = text_encoder.token_free()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.text_encoder.from_tokens(tokens)


class TextTokensPooled(nn.Module):
    """`text_encoder_2` fed token vectors (and the ids, which locate the pooled EOS token)."""

    def __init__(self, text_encoder: TextEncoderWithProjection) -> None:
        super().__init__()
        self.text_encoder = text_encoder.token_free()

    def forward(self, tokens: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        context, pooled = self.text_encoder(ids, tokens)
        return context, pooled


def _dim(name: str, lo: int, hi: int) -> Any:
    """A dynamic dimension, or a static one when the range holds one value."""
    return Dim.STATIC if lo == hi else Dim(name, min=lo, max=hi)


def _times(d: Any, k: int) -> Any:
    return d if d is Dim.STATIC else d * k


@dataclass(frozen=True)
class XLInputs:
    """The widths of SDXL's added UNet inputs."""

    pooled_dim: int  # text_embeds (B, pooled_dim): encoder 2's projection
    time_ids: int  # time_ids (B, time_ids): 6 (base) or 5 (refiner)


@dataclass(frozen=True)
class ShapeSpec:
    """Example inputs for tracing and torch.export dynamic-shape specs for each module.

    Examples avoid sizes 0 and 1 on dynamic axes, which torch.export would specialise.
    """

    max_batch: int
    min_size: int
    max_size: int
    max_chunks: int
    multiple: int  # see artifact_multiple

    @property
    def example_size(self) -> int:
        return min(max(self.min_size, 2 * self.multiple), self.max_size)

    def _batch(self, hi: int) -> tuple[int, Any]:
        return min(2, hi), _dim("batch", 1, hi)

    def _spatial(self, unit: int) -> tuple[Any, Any]:
        lo, hi = self.min_size // self.multiple, self.max_size // self.multiple
        return _times(_dim("h", lo, hi), unit), _times(_dim("w", lo, hi), unit)

    def text_encoder(self, device: torch.device, width: int = 0, dtype: torch.dtype = torch.float32,
                     pooled: bool = False) -> tuple[tuple[Tensor, ...], Any]:
        """`TextTokens(Pooled)`'s inputs when `width` (the token vectors' width), else ids alone."""
        rows, dim = self._batch(2 * self.max_batch * self.max_chunks)
        ids = torch.zeros(rows, 77, dtype=torch.long, device=device)
        if not width:
            return (ids,), {"ids": {0: dim}}
        tokens = torch.randn(rows, 77, width, dtype=dtype, device=device)
        if not pooled:
            return (tokens,), {"tokens": {0: dim}}
        ids[:, 5] = 7  # an EOS-like highest id (argmax), not at position 0
        return (tokens, ids), {"tokens": {0: dim}, "ids": {0: dim}}

    def unet(self, in_channels: int, context_dim: int, dtype: torch.dtype, device: torch.device,
             xl: XLInputs | None = None) -> tuple[tuple[Tensor, ...], Any]:
        lat = self.example_size // 8
        b, batch = self._batch(2 * self.max_batch)
        chunks = min(2, self.max_chunks)
        args: tuple[Tensor, ...] = (torch.randn(b, in_channels, lat, lat, dtype=dtype, device=device),
                torch.full((b,), 500.0, device=device),
                torch.randn(b, 77 * chunks, context_dim, dtype=dtype, device=device),
                torch.ones(b, 77 * chunks, dtype=dtype, device=device))
        h, w = self._spatial(self.multiple // 8)
        tokens = _times(_dim("chunks", 1, self.max_chunks), 77)
        spec = {"x": {0: batch, 2: h, 3: w}, "t": {0: batch}, "context": {0: batch, 1: tokens},
                "weights": {0: batch, 1: tokens}}
        if xl is None:
            return args, spec
        size = float(self.example_size)
        time_ids = torch.tensor([size, size, 0.0, 0.0, size, size][:xl.time_ids], device=device)
        args += (torch.randn(b, xl.pooled_dim, dtype=dtype, device=device),
                 time_ids.expand(b, -1).contiguous())
        return args, {**spec, "text_embeds": {0: batch}, "time_ids": {0: batch}}

    def vae_decoder(self, latent_channels: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[tuple[Tensor, ...], Any]:
        lat = self.example_size // 8
        b, batch = self._batch(self.max_batch)
        z = torch.randn(b, latent_channels, lat, lat, dtype=dtype, device=device)
        h, w = self._spatial(self.multiple // 8)
        return (z,), {"z": {0: batch, 2: h, 3: w}}

    def vae_encoder(self, dtype: torch.dtype, device: torch.device) -> tuple[tuple[Tensor, ...], Any]:
        size = self.example_size
        b, batch = self._batch(self.max_batch)
        image = torch.rand(b, 3, size, size, dtype=dtype, device=device) * 2 - 1
        h, w = self._spatial(self.multiple)
        return (image,), {"image": {0: batch, 2: h, 3: w}}
