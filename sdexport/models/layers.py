"""Fusion call sites shared by the UNet and the VAE.

Every operation that the runtime may replace with a fused kernel goes through exactly one small module
defined here:

* :class:`GroupNorm` - group normalisation, optionally followed by SiLU (``silu=True``),
* :class:`AttentionOp` - scaled dot-product attention on ``(B, H, L, D)`` tensors, with optional
  per-key value weights (prompt emphasis) and query chunking,
* :class:`GEGLU` - the gated-GELU projection of the transformer feed-forward.

Each carries a plain ``backend`` attribute (a :class:`Kernels`) that :func:`set_backend` rewrites; the
choice is resolved with ordinary Python ``if`` statements on that attribute, so it is a compile-time
constant for ``torch.export``. The FUSED branch imports ``runtime.ops`` lazily.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GEGLU",
    "AttentionOp",
    "GroupNorm",
    "Kernels",
    "reference_attention",
    "set_attention_chunks",
    "set_backend",
]


class Kernels(enum.Enum):
    """Implementation used by the fusion call sites."""

    REFERENCE = "reference"  # plain torch; attention materialises the softmax
    SDPA = "sdpa"  # torch.nn.functional.scaled_dot_product_attention
    FUSED = "fused"  # runtime.ops kernels


DEFAULT_BACKEND = Kernels.SDPA


def _ops() -> Any:
    # Imported lazily: only the FUSED kernels need runtime.ops (and its prebuilt extension).
    from runtime import ops

    return ops


class GroupNorm(nn.Module):
    """``GroupNorm(num_groups, num_channels, eps)`` with affine parameters, optionally fused with SiLU.

    The parameter names (``weight``, ``bias``) equal those of :class:`torch.nn.GroupNorm`, so diffusers
    state dicts load unchanged.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float, silu: bool = False) -> None:
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels {num_channels} is not divisible by num_groups {num_groups}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.silu = silu
        self.backend = DEFAULT_BACKEND
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is Kernels.FUSED:
            out: torch.Tensor = _ops().group_norm(
                x, self.num_groups, self.weight, self.bias, self.eps, self.silu
            )
            return out
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.silu else y

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, silu={self.silu}"


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    upcast: bool = False,
) -> torch.Tensor:
    """Attention with an explicit softmax: ``softmax(q k^T * scale) v`` on ``(B, H, L, D)`` tensors."""
    if upcast:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


class AttentionOp(nn.Module):
    """The attention call site: ``(B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D) -> (B, H, Lq, D)``.

    ``value_weights`` (``(B, Lk)`` or ``None``) scales the value row of each key token before the
    weighted sum (prompt emphasis): 1 leaves a token unchanged, 0 removes its contribution, negative
    values subtract it. ``upcast`` computes scores and softmax in float32 (SD 2.x ``upcast_attention``)
    in the REFERENCE backend; SDPA and FUSED kernels accumulate in float32 anyway.
    ``chunks > 1`` splits the queries into that many chunks and attends to each separately, bounding
    the size of the score matrix. Holds no parameters.
    """

    def __init__(self, upcast: bool = False) -> None:
        super().__init__()
        self.upcast = upcast
        self.backend = DEFAULT_BACKEND
        self.chunks = 1

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.backend is Kernels.REFERENCE:
            return reference_attention(q, k, v, scale, self.upcast)
        # SDPA's fused kernels keep scores and softmax in float32 internally, which is what upcasting
        # asks for (diffusers' SDPA processor likewise ignores the flag).
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        value_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.backend is Kernels.FUSED:
            out: torch.Tensor = _ops().attention(q, k, v, scale, value_weights)
            return out
        if value_weights is not None:
            v = v * value_weights[:, None, :, None].to(v.dtype)
        if self.chunks <= 1:
            return self._attend(q, k, v, scale)
        parts = [self._attend(qc, k, v, scale) for qc in q.chunk(self.chunks, dim=2)]
        return torch.cat(parts, dim=2)

    def extra_repr(self) -> str:
        return f"upcast={self.upcast}"


class GEGLU(nn.Module):
    """``proj`` followed by the gated GELU: ``h, g = proj(x).chunk(2, -1); h * gelu(g)``.

    The fused kernel receives the projection output (hidden half first, gate half second).
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)
        self.backend = DEFAULT_BACKEND

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.backend is Kernels.FUSED:
            out: torch.Tensor = _ops().geglu(x)
            return out
        hidden, gate = x.chunk(2, dim=-1)
        return hidden * F.gelu(gate)


def set_backend(model: nn.Module, backend: Kernels) -> None:
    """Select the implementation of every fusion call site in ``model``."""
    if not isinstance(backend, Kernels):
        raise TypeError(f"backend must be a Kernels member, got {backend!r}")
    for m in model.modules():
        if isinstance(m, GroupNorm | AttentionOp | GEGLU):
            m.backend = backend


def set_attention_chunks(model: nn.Module, chunks: int) -> None:
    """Compute every attention in ``model`` over ``chunks`` query chunks (1 = unchunked)."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    for m in model.modules():
        if isinstance(m, AttentionOp):
            m.chunks = chunks
