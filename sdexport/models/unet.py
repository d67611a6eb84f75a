"""The SD 1.x / 2.x denoising UNet (diffusers ``UNet2DConditionModel`` with SD block types).

Parameter names equal diffusers' state-dict keys, so ``UNet(cfg).load_state_dict(diffusers_unet
.state_dict(), strict=True)`` works.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Transformer2D
from .config import UNetConfig
from .layers import GroupNorm, timestep_embedding
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

__all__ = ["DownBlock", "MidBlock", "TimestepEmbedding", "UNet", "UpBlock"]


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(x)))``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))  # type: ignore[no-any-return]


def _transformers(cfg: UNetConfig, channels: int, heads: int, num_layers: int) -> nn.ModuleList:
    """One cross-attention transformer per resnet of a block level."""
    return nn.ModuleList(
        Transformer2D(channels, heads, cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection,
                      cfg.upcast_attention)
        for _ in range(num_layers)
    )


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (``cross_attention=True``) or ``DownBlock2D``.

    Returns the block output and the skip tensors it produced (one per layer, plus the downsampled one).
    """

    def __init__(
        self,
        cfg: UNetConfig,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        heads: int,
        cross_attention: bool,
        downsample: bool,
    ) -> None:
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels, out_channels, cfg.time_embed_dim, g, eps
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = _transformers(cfg, out_channels, heads, num_layers) if cross_attention else None
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, cfg.downsample_padding)]) if downsample else None
        )

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        token_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips: list[torch.Tensor] = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, token_weights)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (``cross_attention=True``) or ``UpBlock2D``: each layer concatenates the
    latest unused skip tensor along channels before its residual block."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_channels: int,
        prev_channels: int,
        out_channels: int,
        num_layers: int,
        heads: int,
        cross_attention: bool,
        upsample: bool,
    ) -> None:
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        resnets = []
        for i in range(num_layers):
            skip_ch = in_channels if i == num_layers - 1 else out_channels
            res_in = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(res_in + skip_ch, out_channels, cfg.time_embed_dim, g, eps))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = _transformers(cfg, out_channels, heads, num_layers) if cross_attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        token_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """``skips`` holds exactly this block's skip tensors, oldest first; they are used newest first."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, token_weights)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    def __init__(self, cfg: UNetConfig, channels: int, heads: int) -> None:
        super().__init__()
        g, eps, s = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, cfg.time_embed_dim, g, eps, s) for _ in range(2)]
        )
        self.attentions = nn.ModuleList(
            [
                Transformer2D(
                    channels,
                    heads,
                    cfg.cross_attention_dim,
                    g,
                    cfg.use_linear_projection,
                    cfg.upcast_attention,
                )
            ]
        )

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        token_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, token_weights)
        return self.resnets[1](x, temb)  # type: ignore[no-any-return]


class UNet(nn.Module):
    """Predicts noise (or v, or whatever the checkpoint was trained on) for ``sample`` at ``timestep``
    conditioned on ``context``.

    ``forward(sample (B, C, H, W), timestep (0-d or (B,), int or float), context (B, L, D),
    token_weights (B, L) or None) -> (B, out_channels, H, W)``; ``H`` and ``W`` must be multiples of
    ``2 ** (levels - 1)`` (8 for SD). ``token_weights`` scales each context token's value rows in every
    cross-attention (prompt emphasis); ``None`` and all-ones give identical results.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        boc = cfg.block_out_channels
        n = len(boc)
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(boc[0], cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        ch = boc[0]
        for i in range(n):
            self.down_blocks.append(
                DownBlock(
                    cfg,
                    ch,
                    boc[i],
                    cfg.layers_per_block[i],
                    cfg.num_heads[i],
                    cfg.down_block_types[i] == "CrossAttnDownBlock2D",
                    downsample=i < n - 1,
                )
            )
            ch = boc[i]

        self.mid_block = MidBlock(cfg, boc[-1], cfg.num_heads[-1])

        rev_ch = boc[::-1]
        rev_heads = cfg.num_heads[::-1]
        rev_layers = cfg.layers_per_block[::-1]
        self.up_blocks = nn.ModuleList()
        out_ch = rev_ch[0]
        for i in range(n):
            prev_ch = out_ch
            out_ch = rev_ch[i]
            in_ch = rev_ch[min(i + 1, n - 1)]
            self.up_blocks.append(
                UpBlock(
                    cfg,
                    in_ch,
                    prev_ch,
                    out_ch,
                    rev_layers[i] + 1,
                    rev_heads[i],
                    cfg.up_block_types[i] == "CrossAttnUpBlock2D",
                    upsample=i < n - 1,
                )
            )

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, boc[0], cfg.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(boc[0], cfg.out_channels, 3, padding=1)

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> UNet:
        return cls(UNetConfig.from_diffusers(d))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def time_embed(self, timestep: torch.Tensor, batch: int | torch.SymInt) -> torch.Tensor:
        """Time embedding ``(batch, 4 * C0)``: sinusoids in float32, cast to the weights' dtype."""
        t = timestep.reshape(-1).expand(batch)
        cfg = self.config
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        return self.time_embedding(emb.to(self.time_embedding.linear_1.weight.dtype))  # type: ignore[no-any-return]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        temb = self.time_embed(timestep, sample.shape[0])
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)
        skips = [x]
        for down in self.down_blocks:
            x, s = down(x, temb, context, token_weights)
            skips.extend(s)
        x = self.mid_block(x, temb, context, token_weights)
        for module in self.up_blocks:
            up = cast(UpBlock, module)
            k = len(up.resnets)
            x = up(x, skips[-k:], temb, context, token_weights)
            skips = skips[:-k]
        return self.conv_out(self.conv_norm_out(x))  # type: ignore[no-any-return]
