"""The text encoders' token tables, stored beside their programs (`<name>.tokens.safetensors`, one
tensor `weight` (vocab + added tokens, width)): the exported encoders take token vectors, and the runtime
looks them up in these tables, so textual inversion adds rows at run time with no rebuild
(runtime/artifact.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from runtime.manifest import TEXT_ENCODERS, TOKEN_TABLE_KEY
from runtime.tokenizer import ClipTokenizer

__all__ = ["table_file", "token_tables", "write_token_tables"]


class _Encoders(Protocol):
    @property
    def text_encoder(self) -> nn.Module | None: ...
    @property
    def text_encoder_2(self) -> nn.Module | None: ...
    @property
    def tokenizers(self) -> tuple[ClipTokenizer, ...]: ...


def table_file(name: str) -> str:
    return f"{name}.tokens.safetensors"


def token_tables(sd: _Encoders, family: str) -> dict[str, torch.Tensor]:
    """Each text encoder's token table, checked against its tokenizer (same number of tokens)."""
    out: dict[str, torch.Tensor] = {}
    for name, tok in zip(TEXT_ENCODERS[family], sd.tokenizers, strict=True):
        encoder = getattr(sd, name)
        table: torch.Tensor = encoder.token_embedding.weight
        if table.shape[0] != tok.vocab_size:
            raise ValueError(f"{name}: the token table has {table.shape[0]} rows, its tokenizer "
                             f"{tok.vocab_size} tokens")
        out[name] = table
    return out


def write_token_tables(root: Path, sd: _Encoders, family: str, dtype: torch.dtype) -> dict[str, str]:
    """Writes each text encoder's table in `dtype` -> {encoder name: file name}."""
    files: dict[str, str] = {}
    for name, table in token_tables(sd, family).items():
        files[name] = table_file(name)
        weight = table.detach().to("cpu", dtype).contiguous()
        save_file({TOKEN_TABLE_KEY: weight}, str(root / files[name]))
    return files
