"""The SD / SDXL variational autoencoder (diffusers ``AutoencoderKL``), with state-dict-compatible names.

Latent conventions: :meth:`VAE.encode_mean` / :meth:`VAE.encode` return *raw* latents (not multiplied
by ``scaling_factor``); :meth:`VAE.decode` takes raw latents, i.e. the diffusion latents divided by
``scaling_factor`` - exactly like diffusers' ``vae.encode(x).latent_dist`` and ``vae.decode(z)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import SpatialSelfAttention
from .config import VAEConfig
from .layers import GroupNorm
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

__all__ = ["VAE", "Decoder", "Encoder", "VAEDecode", "VAEMoments"]

_EPS = 1e-6


class _VAEMidBlock(nn.Module):
    """resnet, (single-head self-attention), resnet."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)]
        )
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, _EPS)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)  # type: ignore[no-any-return]


class _DownEncoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, _EPS) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class _UpDecoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, _EPS) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> moments ``(B, 2 * latent_channels, H/f, W/f)``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        n = len(boc)
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                _DownEncoderBlock(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g, downsample=i < n - 1)
                for i in range(n)
            ]
        )
        self.mid_block = _VAEMidBlock(boc[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, boc[-1], _EPS, silu=True)
        self.conv_out = nn.Conv2d(boc[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))  # type: ignore[no-any-return]


class Decoder(nn.Module):
    """Latent ``(B, latent_channels, h, w)`` -> image ``(B, out_channels, h*f, w*f)``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        rev, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        n = len(rev)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = _VAEMidBlock(rev[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [
                _UpDecoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, upsample=i < n - 1)
                for i in range(n)
            ]
        )
        self.conv_norm_out = GroupNorm(g, rev[-1], _EPS, silu=True)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(self.conv_norm_out(x))  # type: ignore[no-any-return]


def _moments(encoder: Encoder, quant_conv: nn.Conv2d | None,
             x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = encoder(x)
    if quant_conv is not None:
        h = quant_conv(h)
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def _decode(post_quant_conv: nn.Conv2d | None, decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    if post_quant_conv is not None:
        z = post_quant_conv(z)
    return decoder(z)  # type: ignore[no-any-return]


class VAE(nn.Module):
    """``AutoencoderKL``: ``encoder`` + ``quant_conv`` and ``post_quant_conv`` + ``decoder``."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        lc = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, logvar)`` of image ``x`` (in [-1, 1]); logvar clamped to [-30, 20]."""
        return _moments(self.encoder, self.quant_conv, x)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean (raw latents, not scaled)."""
        return self.moments(x)[0]

    def encode(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A posterior sample ``mean + std * noise`` (raw latents, not scaled); ``noise`` is standard
        normal with the latent shape."""
        mean, logvar = self.moments(x)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image in about [-1, 1] from raw latents (diffusion latents / ``scaling_factor``)."""
        return _decode(self.post_quant_conv, self.decoder, z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)


class VAEDecode(nn.Module):
    """Exportable ``forward(z) = vae.decode(z)``. Holds (shares) only the decoding half of ``vae``, so an
    exported decoder carries none of the encoder's weights."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _decode(self.post_quant_conv, self.decoder, z)


class VAEMoments(nn.Module):
    """Exportable ``forward(x) = cat(mean, logvar)`` (B, 2*latent, h, w): what an artifact's VAE encoder
    returns; the caller draws the posterior sample (so the noise comes from its own generators). Holds
    (shares) only the encoding half of ``vae``."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat(_moments(self.encoder, self.quant_conv, image), dim=1)
