"""Convolutional building blocks: residual block, 2x down- and up-sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GroupNorm

__all__ = ["Downsample2D", "ResnetBlock2D", "Upsample2D"]


class ResnetBlock2D(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))``, divided by ``output_scale``.

    ``temb_channels=None`` builds the VAE variant without a time embedding. A 1x1 ``conv_shortcut``
    adapts the residual when the channel count changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this residual block needs a time embedding")
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.norm2(h))
        skip: torch.Tensor = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out: torch.Tensor = skip + h
        if self.output_scale != 1.0:
            out = out / self.output_scale
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution. ``padding=0`` pads one zero row/column at the bottom/right first
    (the VAE encoder's asymmetric padding)."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        out: torch.Tensor = self.conv(x)
        return out


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        out: torch.Tensor = self.conv(x)
        return out
