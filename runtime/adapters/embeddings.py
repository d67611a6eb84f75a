"""Textual-inversion embeddings: one name standing for one or more token vectors per text encoder.

Forms read:
- A1111 `.pt` / `.safetensors`: `{"string_to_param": {"*": (n, width)}, "name": ...}` (pickles read with
  `weights_only=True`), or `{"emb_params": (n, width)}`;
- SDXL: `{"clip_l": (n, 768), "clip_g": (n, 1280)}` -> text_encoder, text_encoder_2;
- diffusers `learned_embeds.safetensors` / `.bin`: `{token: (width,) or (n, width)}`.
The token defaults to the file's stem, as in A1111; for diffusers' form (one key, the trained token)
the key is the default, as diffusers' `load_textual_inversion` uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from runtime.adapters.files import AdapterError, FileInfo, file_info, read_file

__all__ = ["Embedding", "parse_embedding", "read_embedding"]

_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclass(frozen=True)
class Embedding:
    """`vectors`: text encoder component -> (n, width) float tensor. Single-encoder files give
    `{"text_encoder": ...}`; SDXL files both encoders."""

    token: str
    vectors: Mapping[str, Tensor] = field(repr=False)
    source: str = "<tensors>"
    info: FileInfo | None = None

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def a1111_hash(self) -> str:
        """`TI hashes` as A1111 writes them: sha256 of the whole file, first 12 hex."""
        if self.info is None:
            raise AdapterError(f"{self.source}: not read from a file, no hash")
        return self.info.sha256[:12]

    def token_names(self) -> list[str]:
        """diffusers' tokens for a multi-vector embedding: token, token_1, ..., token_{n-1}."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]

    def for_encoders(self, widths: Mapping[str, int]) -> dict[str, Tensor]:
        """The vectors for a model whose text encoders (component -> hidden size) are `widths`; an
        embedding for another model (wrong encoders or width) is an error."""
        if set(self.vectors) != set(widths):
            raise AdapterError(f"{self.source}: embedding {self.token!r} is for text encoders "
                               f"{sorted(self.vectors)}, the model has {sorted(widths)}")
        for comp, w in widths.items():
            have = int(self.vectors[comp].shape[1])
            if have != w:
                raise AdapterError(f"{self.source}: embedding {self.token!r} has width {have} for {comp}, "
                                   f"the model's is {w} (an embedding for another model family?)")
        return dict(self.vectors)


def _matrix(source: str, key: str, v: Any) -> Tensor:
    if not isinstance(v, Tensor) or not v.is_floating_point() or v.dim() not in (1, 2) or v.numel() == 0:
        what = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise AdapterError(f"{source}: {key!r} is not a (vectors, width) float tensor: {what}")
    m: Tensor = v.detach().to(torch.float32)
    if not bool(torch.isfinite(m).all()):
        raise AdapterError(f"{source}: {key!r} holds NaN or Inf values")
    return m.reshape(1, -1) if m.dim() == 1 else m


def parse_embedding(content: Mapping[str, Any], stem: str, token: str | None = None,
                    source: str = "<tensors>", info: FileInfo | None = None) -> Embedding:
    if "string_to_param" in content:
        params = content["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise AdapterError(f"{source}: `string_to_param` should hold one entry ('*')")
        (key, v), = params.items()
        vectors = {"text_encoder": _matrix(source, f"string_to_param.{key}", v)}
    elif "emb_params" in content:
        vectors = {"text_encoder": _matrix(source, "emb_params", content["emb_params"])}
    elif set(content) & set(_SDXL_KEYS):
        if set(content) != set(_SDXL_KEYS):
            raise AdapterError(f"{source}: an SDXL embedding needs both clip_l and clip_g, has {sorted(content)}")
        vectors = {comp: _matrix(source, k, content[k]) for k, comp in _SDXL_KEYS.items()}
        if vectors["text_encoder"].shape[0] != vectors["text_encoder_2"].shape[0]:
            raise AdapterError(f"{source}: clip_l and clip_g hold different numbers of vectors")
    elif len(content) == 1:  # diffusers: {token: vector(s)}
        (key, v), = content.items()
        vectors = {"text_encoder": _matrix(source, str(key), v)}
        stem = str(key)
    else:
        raise AdapterError(f"{source}: not a textual-inversion embedding (keys {sorted(map(str, content))[:6]})")
    name = token if token is not None else stem
    if not name or any(c.isspace() for c in name):
        raise AdapterError(f"{source}: {name!r} cannot be a token (empty or with spaces)")
    return Embedding(name, vectors, source, info)


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read an embedding file; `token` defaults to the file's stem (A1111)."""
    info = file_info(path)
    content, _ = read_file(info.path)
    return parse_embedding(content, info.path.stem, token, str(info.path), info)
