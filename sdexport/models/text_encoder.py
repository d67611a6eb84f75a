"""The CLIP text encoders as SD uses them: token ids -> per-token hidden states (and, for SDXL's second
encoder, the projected pooled embedding).

:class:`TextEncoder` has the submodules of transformers 5's ``CLIPTextModel`` (``embeddings``,
``encoder.layers.*``, ``final_layer_norm``); :class:`TextEncoderWithProjection` those of
``CLIPTextModelWithProjection`` (``text_model.*``, ``text_projection``), so their state dicts load
strictly. The forward pass is written out explicitly (causal SDPA, no masks, no output containers) to be
``torch.export``-able and independent of the transformers attention dispatch.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig

__all__ = ["TextEncoder", "TextEncoderWithProjection"]


def _config_of(clip_model: nn.Module, clip_skip: int, final_norm: bool) -> TextEncoderConfig:
    """Our config from a transformers CLIP text model's own."""
    cfg: Any = clip_model.config
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return TextEncoderConfig.from_transformers(d, clip_skip, final_norm)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class TextEncoder(nn.Module):
    """``forward(ids (B, L) int64) -> (B, L, hidden_size)``: the hidden state ``clip_skip`` layers from
    the top (1 = last layer), passed through the final layer norm when ``config.final_norm``."""

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
    def wrap(cls, clip_model: nn.Module, clip_skip: int = 1, final_norm: bool = True) -> TextEncoder:
        """Wrap an existing (e.g. ``from_pretrained``) ``CLIPTextModel``, sharing its parameters."""
        return cls(_config_of(clip_model, clip_skip, final_norm), clip_model)

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

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token table (vocab, hidden_size); textual inversion appends rows."""
        table: nn.Embedding = self.embeddings.token_embedding  # type: ignore[assignment]
        return table

    def token_free(self) -> TextEncoder:
        """A view of this encoder without its token table (same parameters and names otherwise), for
        exports that take token vectors: the runtime then owns the table and can add rows to it."""
        view = copy.copy(self)
        view._modules = dict(self._modules)
        view.embeddings = _Positions(cast(nn.Embedding, self.embeddings.position_embedding))
        return view

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden_size) token vectors plus the position embedding."""
        emb: Any = self.embeddings
        return tokens + emb.position_embedding.weight[: tokens.shape[1]][None]  # type: ignore[no-any-return]

    def _context(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(h) if self.config.final_norm else h

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.from_tokens(self.token_embedding(ids))

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on the token vectors ``token_embedding(ids)`` (B, L, hidden_size)."""
        h = self._embed(tokens)
        layers: Any = self.encoder.layers
        for layer in layers[: self.num_layers_used]:
            h = self._layer(layer, h)
        return self._context(h)

    def encode_pooled(self, ids: torch.Tensor, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context (B, L, hidden_size), pooled (B, hidden_size))``: the context as :meth:`forward`
        and CLIP's ``pooler_output``, the final-normed last hidden state at each sequence's EOS token.

        The EOS position follows transformers 5's ``CLIPTextTransformer``: ``eos_token_id == 2`` (configs
        written before transformers PR 24773, e.g. SDXL's) takes the highest id (``argmax(ids)``, the
        EOS in CLIP's vocabulary); any other id takes its first occurrence. ``tokens``: the token vectors
        of ``ids`` when the caller looked them up (:meth:`token_free` views have no table).
        """
        h = self._embed(self.token_embedding(ids) if tokens is None else tokens)
        context = h
        layers: Any = self.encoder.layers
        for i, layer in enumerate(layers):
            h = self._layer(layer, h)
            if i + 1 == self.num_layers_used:
                context = h
        eos = self.config.eos_token_id
        pos = ids.to(torch.int).argmax(dim=-1) if eos == 2 else (ids == eos).to(torch.int).argmax(dim=-1)
        last = self.final_layer_norm(h)
        pooled = last[torch.arange(last.shape[0], device=last.device), pos]
        return self._context(context), pooled


class TextEncoderWithProjection(nn.Module):
    """``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``, OpenCLIP ViT-bigG/14).

    ``forward(ids (B, L) int64) -> (context (B, L, hidden_size), text_embeds (B, projection_dim))``:
    the context as :class:`TextEncoder`'s, and ``text_projection`` (no bias) of the pooled EOS state
    (transformers' ``text_embeds``, SDXL's pooled prompt embedding).
    """

    def __init__(self, config: TextEncoderConfig, clip_model: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        if clip_model is None:
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            clip_model = CLIPTextModelWithProjection(CLIPTextConfig(**config.to_transformers()))
        self.text_model = TextEncoder(config, cast(nn.Module, clip_model.text_model))
        self.text_projection = cast(nn.Linear, clip_model.text_projection)

    @classmethod
    def wrap(cls, clip_model: nn.Module, clip_skip: int = 1, final_norm: bool = True) -> TextEncoderWithProjection:
        """Wrap an existing ``CLIPTextModelWithProjection``, sharing its parameters."""
        return cls(_config_of(clip_model, clip_skip, final_norm), clip_model)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_projection.weight.device

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_model.token_embedding

    def token_free(self) -> TextEncoderWithProjection:
        """As :meth:`TextEncoder.token_free`."""
        view = copy.copy(self)
        view._modules = dict(self._modules)
        view.text_model = self.text_model.token_free()
        return view

    def forward(self, ids: torch.Tensor, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens``: as :meth:`TextEncoder.encode_pooled`'s."""
        context, pooled = self.text_model.encode_pooled(ids, tokens)
        return context, self.text_projection(pooled)


class _Positions(nn.Module):
    """CLIP's embeddings without the token table (``TextEncoder.token_free``)."""

    def __init__(self, position_embedding: nn.Embedding) -> None:
        super().__init__()
        self.position_embedding = position_embedding
