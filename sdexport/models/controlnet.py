"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a copy
of the UNet's input half (``UNetEncoder``) that also sees a conditioning image, with a zero-initialised
1x1 convolution on each of its skips and on the mid block; their outputs are added to the UNet's
(``UNet.forward(..., control=...)``).

Parameter names equal diffusers' ``ControlNetModel`` state-dict keys.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .unet import UNetEncoder

__all__ = ["ControlNet", "ControlNetConditioningEmbedding", "ControlNetConfig"]

# diffusers ``ControlNetModel`` options beyond the UNet's whose other values this package does not implement
_CONTROL_UNSUPPORTED: tuple[tuple[str, tuple[Any, ...], Any], ...] = (
    ("mid_block_type", ("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn"),
    ("controlnet_conditioning_channel_order", ("rgb", "bgr"), "rgb"),
)
_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclass(frozen=True)
class ControlNetConfig:
    """A ``ControlNetModel``: the UNet input half's ``unet`` config (its ``up_block_types`` mirror the
    down blocks and are unused), the conditioning image's channels and embedding widths (each
    embedding level but the first halves the image: 8x for SD's four), whether the image is BGR, and
    ``global_pool_conditions`` (residuals averaged over space; implies guess mode, as diffusers)."""

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False
    global_pool_conditions: bool = False

    def __post_init__(self) -> None:
        if not self.conditioning_embedding_out_channels:
            raise ValueError("ControlNet: conditioning_embedding_out_channels is empty")
        if self.conditioning_channels < 1:
            raise ValueError("ControlNet: conditioning_channels must be >= 1")

    @property
    def image_downscale(self) -> int:
        """Pixel size of one latent cell as the conditioning embedding sees it."""
        return int(2 ** (len(self.conditioning_embedding_out_channels) - 1))

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> ControlNetConfig:
        """Parse a diffusers ``ControlNetModel`` config dict (``ValueError`` names an unsupported option)."""
        m = "ControlNet"
        for key, allowed, default in _CONTROL_UNSUPPORTED:
            value = d.get(key, default)
            if value not in allowed:
                raise ValueError(f"{m}: unsupported config option {key}={value!r} "
                                 f"(supported: {', '.join(map(repr, allowed))})")
        lpb = d.get("layers_per_block", 2)
        if isinstance(lpb, bool) or not isinstance(lpb, int):
            raise ValueError(f"{m}: unsupported config option layers_per_block={lpb!r} (expected int)")
        down = tuple(d.get("down_block_types", UNetConfig.down_block_types))
        if any(t not in _UP for t in down):
            raise ValueError(f"{m}: unsupported config option down_block_types={list(down)!r}")
        unet_dict = {k: v for k, v in d.items() if k not in (
            "conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
            "controlnet_conditioning_channel_order", "addition_embed_type_num_heads", "mid_block_type")}
        unet = UNetConfig.from_diffusers({**unet_dict, "cross_attention_dim": d.get("cross_attention_dim", 1280),
                                          "up_block_types": [_UP[t] for t in reversed(down)]})
        emb = d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        if emb is None:
            raise ValueError(f"{m}: unsupported config option conditioning_embedding_out_channels=None")
        return cls(unet=unet, conditioning_channels=int(d.get("conditioning_channels", 3)),
                   conditioning_embedding_out_channels=tuple(int(c) for c in emb),
                   bgr=d.get("controlnet_conditioning_channel_order", "rgb") == "bgr",
                   global_pool_conditions=bool(d.get("global_pool_conditions", False)))


class ControlNetConditioningEmbedding(nn.Module):
    """Conditioning image (B, Cc, H, W) -> (B, C0, H / 8, W / 8): conv + SiLU, pairs of convs (the second
    strided), then a zero-initialised conv."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in itertools.pairwise(widths):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(image))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)  # type: ignore[no-any-return]


class ControlNet(UNetEncoder):
    """``forward(sample (B, C, h, w), timestep, context (B, L, D), token_weights (B, L) or None,
    image (B, Cc, 8h, 8w) in [0, 1], *, text_embeds, time_ids) -> residuals``: one tensor per
    ``config.residuals`` entry, unscaled (the pipeline applies the conditioning scale and guess mode;
    runtime/control.py). With ``global_pool_conditions`` each is averaged to (B, C, 1, 1)."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__(config.unet)
        self.control_config = config
        boc = config.unet.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            boc[0], config.conditioning_channels, config.conditioning_embedding_out_channels)
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c, _ in config.unet.residuals[:-1])
        self.controlnet_mid_block = nn.Conv2d(boc[-1], boc[-1], 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        token_weights: torch.Tensor | None,
        image: torch.Tensor,
        *,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        temb = self.embed(timestep, sample.shape[0], text_embeds, time_ids)
        if self.control_config.bgr:
            image = torch.flip(image, dims=[1])
        x = self.conv_in(sample) + self.controlnet_cond_embedding(image)
        x, skips = self.encode(x, temb, context, token_weights)
        out = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        out.append(self.controlnet_mid_block(x))
        if self.control_config.global_pool_conditions:
            out = [r.mean(dim=(2, 3), keepdim=True) for r in out]
        return tuple(out)
