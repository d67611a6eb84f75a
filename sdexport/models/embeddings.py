"""The UNet's conditioning embeddings: sinusoidal features of the timestep (diffusers ``Timesteps``), the
MLP that projects them (``TimestepEmbedding``) and SDXL's added "text_time" conditioning."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TimestepEmbedding", "text_time_features", "timestep_embedding"]


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of ``(N,)`` timesteps, float32 ``(N, dim)`` (DDPM, Ho et al. 2020).

    Frequencies are ``exp(-ln(max_period) * i / (dim/2 - freq_shift))``; the result is
    ``[sin, cos]`` or ``[cos, sin]`` when ``flip_sin_to_cos``; odd ``dim`` is zero padded.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps.float()[:, None] * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(x)))``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))  # type: ignore[no-any-return]


def text_time_features(
    text_embeds: torch.Tensor,
    time_ids: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool,
    freq_shift: float,
) -> torch.Tensor:
    """SDXL's added conditioning before ``add_embedding`` (SDXL paper, Podell et al. 2023, sec. 2.2):
    ``cat(text_embeds (B, P), sinusoids of each of the N time ids (B, N * dim))``, float32.

    The time ids are the size/crop numbers (base: original h, w, crop top, left, target h, w; refiner:
    original h, w, crop top, left, aesthetic score), each embedded like a timestep (``Timesteps(dim,
    flip_sin_to_cos, freq_shift)`` in diffusers).
    """
    feats = timestep_embedding(time_ids.reshape(-1), dim, flip_sin_to_cos, freq_shift)
    return torch.cat([text_embeds.float(), feats.reshape(text_embeds.shape[0], -1)], dim=-1)
