"""The CLIP text encoder as SD uses it: token ids -> per-token hidden states.

The submodules are those of ``transformers.CLIPTextModel`` (``embeddings``, ``encoder.layers.*``,
``final_layer_norm``), so its state dict loads strictly. The forward pass is written out explicitly
(causal SDPA, no masks, no output containers) to be ``torch.export``-able and independent of the
transformers attention dispatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig

__all__ = ["TextEncoder", "strip_text_model_prefix"]


def strip_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map checkpoint keys ``text_model.X`` (transformers 4 / on-disk layout) to ``X``; drop the
    ``position_ids`` buffer that some checkpoints store."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        key = k.removeprefix("text_model.")
        if key.endswith("embeddings.position_ids"):
            continue
        out[key] = v
    return out


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class TextEncoder(nn.Module):
    """``forward(ids (B, L) int64) -> (B, L, hidden_size)``: the hidden state ``clip_skip`` layers from
    the top (1 = last layer), passed through the final layer norm."""

    def __init__(self, config: TextEncoderConfig, clip_model: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        if clip_model is None:
            from transformers import CLIPTextConfig, CLIPTextModel

            clip_model = CLIPTextModel(CLIPTextConfig(**config.to_transformers()))
        inner = getattr(clip_model, "text_model", clip_model)  # transformers 4 nests a text_model
        self.embeddings = cast(nn.Module, inner.embeddings)
        self.encoder = cast(nn.Module, inner.encoder)
        self.final_layer_norm = cast(nn.LayerNorm, inner.final_layer_norm)
        self.num_layers_used = config.num_hidden_layers - (config.clip_skip - 1)
        self.heads = config.num_attention_heads

    @classmethod
    def wrap(cls, clip_model: nn.Module, clip_skip: int = 1) -> TextEncoder:
        """Wrap an existing (e.g. ``from_pretrained``) ``CLIPTextModel``, sharing its parameters."""
        cfg: Any = clip_model.config
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        return cls(TextEncoderConfig.from_transformers(d, clip_skip), clip_model)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer_norm.weight.device

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def _layer(self, layer: Any, h: torch.Tensor) -> torch.Tensor:
        """One pre-norm CLIP encoder layer with causal self-attention."""
        attn, mlp = layer.self_attn, layer.mlp
        x: torch.Tensor = layer.layer_norm1(h)
        q, k, v = self._heads(attn.q_proj(x)), self._heads(attn.k_proj(x)), self._heads(attn.v_proj(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + attn.out_proj(a.transpose(1, 2).flatten(2))
        x = mlp.fc1(layer.layer_norm2(h))
        x = _quick_gelu(x) if self.config.hidden_act == "quick_gelu" else F.gelu(x)
        out: torch.Tensor = h + mlp.fc2(x)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb: Any = self.embeddings
        seq = ids.shape[1]
        h = emb.token_embedding(ids) + emb.position_embedding.weight[:seq][None]
        layers: Any = self.encoder.layers
        for layer in layers[: self.num_layers_used]:
            h = self._layer(layer, h)
        return self.final_layer_norm(h)  # type: ignore[no-any-return]
