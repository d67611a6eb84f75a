"""The SD 1.x / 2.x / XL denoising UNet (diffusers ``UNet2DConditionModel`` with SD block types).

Parameter names equal diffusers' state-dict keys, so ``UNet(cfg).load_state_dict(diffusers_unet
.state_dict(), strict=True)`` works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from .attention import Transformer2D
from .config import UNetConfig
from .embeddings import TimestepEmbedding, text_time_features, timestep_embedding
from .layers import GroupNorm
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

__all__ = ["DownBlock", "MidBlock", "UNet", "UNetEncoder", "UpBlock"]


def _transformer(cfg: UNetConfig, channels: int, heads: int, depth: int) -> Transformer2D:
    return Transformer2D(channels, heads, cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection,
                         cfg.upcast_attention, depth)


def _transformers(cfg: UNetConfig, channels: int, heads: int, depth: int, num_layers: int) -> nn.ModuleList:
    """One cross-attention transformer (``depth`` blocks deep) per resnet of a block level."""
    return nn.ModuleList(_transformer(cfg, channels, heads, depth) for _ in range(num_layers))


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
        depth: int,
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
        self.attentions = _transformers(cfg, out_channels, heads, depth, num_layers) if cross_attention else None
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
        depth: int,
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
        self.attentions = _transformers(cfg, out_channels, heads, depth, num_layers) if cross_attention else None
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
    """``UNetMidBlock2DCrossAttn``: resnet, transformer (``depth`` blocks deep), resnet."""

    def __init__(self, cfg: UNetConfig, channels: int, heads: int, depth: int) -> None:
        super().__init__()
        g, eps, s = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, cfg.time_embed_dim, g, eps, s) for _ in range(2)]
        )
        self.attentions = nn.ModuleList([_transformer(cfg, channels, heads, depth)])

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


class UNetEncoder(nn.Module):
    """The UNet's input half: ``conv_in``, the time (and SDXL added) embedding, the down blocks and the
    mid block. ``UNet`` adds the up half; ``ControlNet`` (models/controlnet.py) the zero convolutions.
    Parameter names are diffusers' in both (``UNet2DConditionModel`` and ``ControlNetModel``)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        boc = cfg.block_out_channels
        n = len(boc)
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(boc[0], cfg.time_embed_dim)
        # SDXL's added conditioning; diffusers' ``add_time_proj`` (the time ids' sinusoids) has no weights
        self.add_embedding = (
            TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
            if cfg.projection_class_embeddings_input_dim is not None
            else None
        )

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
                    cfg.transformer_layers_per_block[i],
                    cfg.down_block_types[i] == "CrossAttnDownBlock2D",
                    downsample=i < n - 1,
                )
            )
            ch = boc[i]

        # diffusers: the mid block takes the last level's heads and transformer depth
        self.mid_block = MidBlock(cfg, boc[-1], cfg.num_heads[-1], cfg.transformer_layers_per_block[-1])

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

    def added_embed(self, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SDXL's "text_time" embedding ``(B, 4 * C0)``, added to the time embedding."""
        cfg, what = self.config, type(self).__name__
        if self.add_embedding is None or cfg.addition_time_embed_dim is None:
            raise ValueError(f"{what}: text_embeds / time_ids given, but the config has no "
                             "addition_embed_type='text_time' (SD 1.x/2.x take neither)")
        if text_embeds.ndim != 2 or time_ids.ndim != 2:
            raise ValueError(f"{what}: text_embeds must be (B, P) and time_ids (B, N), got "
                             f"{tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
        width = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"{what}: text_embeds width {text_embeds.shape[1]} + {time_ids.shape[1]} time ids x "
                f"{cfg.addition_time_embed_dim} = {width}, but projection_class_embeddings_input_dim is "
                f"{cfg.projection_class_embeddings_input_dim}"
            )
        feats = text_time_features(text_embeds, time_ids, cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                   cfg.freq_shift)
        return self.add_embedding(feats.to(self.add_embedding.linear_1.weight.dtype))  # type: ignore[no-any-return]

    def embed(self, timestep: torch.Tensor, batch: int | torch.SymInt, text_embeds: torch.Tensor | None,
              time_ids: torch.Tensor | None) -> torch.Tensor:
        """The time embedding, plus SDXL's added embedding exactly when the config takes it."""
        temb = self.time_embed(timestep, batch)
        what = type(self).__name__
        if self.config.text_time:
            if text_embeds is None or time_ids is None:
                raise ValueError(f"{what}: this config (addition_embed_type='text_time', SDXL) needs both "
                                 "text_embeds (the pooled prompt embedding) and time_ids")
            temb = temb + self.added_embed(text_embeds, time_ids)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError(f"{what}: text_embeds / time_ids given, but the config has no "
                             "addition_embed_type='text_time' (SD 1.x/2.x take neither)")
        return temb

    def encode(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
               token_weights: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``conv_in``'s output (plus the ControlNet's hint) through the down blocks and the mid block ->
        (mid block output, the skips: ``config.residuals`` without the last)."""
        skips = [x]
        for down in self.down_blocks:
            x, s = down(x, temb, context, token_weights)
            skips.extend(s)
        return self.mid_block(x, temb, context, token_weights), skips


class UNet(UNetEncoder):
    """Predicts noise (or v, or whatever the checkpoint was trained on) for ``sample`` at ``timestep``
    conditioned on ``context``.

    ``forward(sample (B, C, H, W), timestep (0-d or (B,), int or float), context (B, L, D),
    token_weights (B, L) or None, *, text_embeds (B, P) or None, time_ids (B, N) or None,
    control: sequence of tensors or None) -> (B, out_channels, H, W)``; ``H`` and ``W`` must be multiples
    of ``2 ** (levels - 1)`` (8 for SD). ``token_weights`` scales each context token's value rows in every
    cross-attention (prompt emphasis); ``None`` and all-ones give identical results. ``text_embeds`` (the
    pooled prompt embedding) and ``time_ids`` (the size/crop/aesthetic numbers) are required exactly when
    ``config.text_time`` (SDXL: ``P + N * addition_time_embed_dim == projection_class_embeddings_input_dim``).
    ``control``: ControlNet residuals, one per ``config.residuals`` entry (the skips, then the mid block),
    added as diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)
        cfg = config
        boc = cfg.block_out_channels
        n = len(boc)
        rev_ch = boc[::-1]
        rev_heads = cfg.num_heads[::-1]
        rev_layers = cfg.layers_per_block[::-1]
        rev_depth = cfg.transformer_layers_per_block[::-1]
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
                    rev_depth[i],
                    cfg.up_block_types[i] == "CrossAttnUpBlock2D",
                    upsample=i < n - 1,
                )
            )

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, boc[0], cfg.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(boc[0], cfg.out_channels, 3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        token_weights: torch.Tensor | None = None,
        *,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        temb = self.embed(timestep, sample.shape[0], text_embeds, time_ids)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        x, skips = self.encode(self.conv_in(sample), temb, context, token_weights)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"UNet: control takes {len(skips) + 1} residuals (the skips and the mid "
                                 f"block), got {len(control)}")
            skips = [s + r for s, r in zip(skips, control, strict=False)]
            x = x + control[-1]
        for module in self.up_blocks:
            up = cast(UpBlock, module)
            k = len(up.resnets)
            x = up(x, skips[-k:], temb, context, token_weights)
            skips = skips[:-k]
        return self.conv_out(self.conv_norm_out(x))  # type: ignore[no-any-return]
