"""Attention modules: multi-head attention, the SD transformer block, the spatial transformer and the
VAE's single-head spatial self-attention. All attention math goes through :class:`AttentionOp`."""

from __future__ import annotations

import torch
from torch import nn

from .layers import GEGLU, AttentionOp, GroupNorm

__all__ = ["Attention", "BasicTransformerBlock", "FeedForward", "SpatialSelfAttention", "Transformer2D"]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, H*D) -> (B, H, L, D)``."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D) -> (B, L, H*D)``."""
    return x.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """Multi-head attention with ``to_q``/``to_k``/``to_v`` (no bias) and ``to_out.0`` (with bias).

    ``context_dim=None`` builds self-attention; otherwise keys and values are projected from a context
    of that width (cross-attention), and ``value_weights`` may scale the context tokens' values.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        kv_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Identity()])
        self.op = AttentionOp(upcast=upcast)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        value_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv = x if context is None else context
        q = _split_heads(self.to_q(x), self.heads)
        k = _split_heads(self.to_k(kv), self.heads)
        v = _split_heads(self.to_v(kv), self.heads)
        out = _merge_heads(self.op(q, k, v, self.scale, value_weights))
        return self.to_out[0](out)  # type: ignore[no-any-return]


class FeedForward(nn.Module):
    """``net.0`` = GEGLU projection to ``4*dim``, ``net.2`` = linear back to ``dim`` (``net.1`` is
    diffusers' dropout slot)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))  # type: ignore[no-any-return]


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, None, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, token_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, token_weights) + x
        x = self.ff(self.norm3(x)) + x
        return x


class Transformer2D(nn.Module):
    """Spatial transformer: GroupNorm, ``proj_in`` (1x1 conv or linear), ``depth`` transformer blocks over
    the ``H*W`` tokens (SD 1.x/2.x: 1, SDXL: up to 10), ``proj_out``, plus the input as residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        groups: int,
        use_linear_projection: bool,
        upcast: bool,
        depth: int = 1,
    ) -> None:
        super().__init__()
        head_dim = channels // heads
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in: nn.Module
        self.proj_out: nn.Module
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, head_dim, context_dim, upcast) for _ in range(depth)]
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, token_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.flatten(2).transpose(1, 2))
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context, token_weights)
        out: torch.Tensor
        if self.use_linear_projection:
            out = self.proj_out(h).transpose(1, 2).reshape(x.shape)
        else:
            out = self.proj_out(h.transpose(1, 2).reshape(x.shape))
        return out + x


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: one head over ``H*W`` tokens, all projections with bias, GroupNorm
    (``group_norm``) before and the input added after."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Identity()])
        self.scale = channels**-0.5
        self.op = AttentionOp(upcast=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.group_norm(x).flatten(2).transpose(1, 2)
        q = self.to_q(h)[:, None]
        k = self.to_k(h)[:, None]
        v = self.to_v(h)[:, None]
        out = self.to_out[0](self.op(q, k, v, self.scale)[:, 0])
        return out.transpose(1, 2).reshape(x.shape) + x  # type: ignore[no-any-return]
