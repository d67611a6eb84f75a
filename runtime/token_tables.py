"""The token tables of an artifact's text encoders (format 2, `Manifest.token_tables`): the programs take
token vectors `(N, 77, D)`, looked up here from the ids, so textual-inversion embeddings become new rows
at run time, with no rebuild and no recompile (the lookup is the same gather the program did before)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.adapters.embeddings import Embedding
from runtime.adapters.files import AdapterError
from runtime.manifest import TOKEN_TABLE_KEY, ArtifactError
from runtime.tokenizer import ClipTokenizer

__all__ = ["TokenTables"]


class TokenTables:
    """encoder name -> (tokens, width) table on the device, in the artifact's dtype; each table has the
    rows of its encoder's tokenizer (added tokens included)."""

    def __init__(self, root: Path, files: Mapping[str, str], tokenizers: Mapping[str, ClipTokenizer],
                 widths: Mapping[str, int], device: torch.device) -> None:
        from safetensors.torch import load_file

        self.tokenizers = dict(tokenizers)
        self.tables: dict[str, Tensor] = {}
        for name, file in files.items():
            content = load_file(str(root / file), device=str(device))
            table = content.get(TOKEN_TABLE_KEY)
            tok = self.tokenizers[name]
            if set(content) != {TOKEN_TABLE_KEY} or table is None or table.dim() != 2:
                raise ArtifactError(f"{root / file}: a token table holds one 2-d tensor {TOKEN_TABLE_KEY!r}")
            if tuple(table.shape) != (tok.vocab_size, widths[name]):
                raise ArtifactError(f"{root / file}: token table {tuple(table.shape)}, expected "
                                    f"({tok.vocab_size} tokens, width {widths[name]})")
            self.tables[name] = table

    def __bool__(self) -> bool:
        return bool(self.tables)

    def lookup(self, name: str, ids: Tensor) -> Tensor:
        """(N, 77) ids -> (N, 77, width) token vectors of encoder `name`."""
        return F.embedding(ids, self.tables[name])

    def add(self, emb: Embedding) -> None:
        """The embedding's token(s) in every tokenizer and its vectors as rows of every table; a token the
        artifact already has (built in with `sdexport build --embedding`) gets the file's vectors. Every
        check comes before any change."""
        vectors = emb.for_encoders({name: int(t.shape[1]) for name, t in self.tables.items()})
        for name, tok in self.tokenizers.items():
            have = tok.added.get(emb.token)
            if have is not None and len(have) != emb.num_vectors:
                raise AdapterError(f"{emb.source}: {emb.token!r} is a token of this artifact with {len(have)} "
                                   f"vectors, the file has {emb.num_vectors}")
            taken = tok.taken(emb.token, emb.num_vectors) if have is None else []
            if taken:
                raise AdapterError(f"{emb.source}: {taken[0]!r} is a word of the tokenizer already; load the "
                                   "embedding under another token (token=...)")
            if tok.vocab_size != self.tables[name].shape[0]:
                raise AdapterError(f"{name}: the tokenizer has {tok.vocab_size} tokens, the token table "
                                   f"{self.tables[name].shape[0]} rows; cannot add {emb.token!r}")
        for name, tok in self.tokenizers.items():
            table, rows = self.tables[name], vectors[name].to(self.tables[name])
            ids = tok.added.get(emb.token)
            if ids is None:
                ids = tok.add_tokens(emb.token, emb.num_vectors)
                assert ids == list(range(table.shape[0], table.shape[0] + len(ids))), ids
                self.tables[name] = torch.cat([table, rows])
            else:
                table = table.clone()
                table[torch.tensor(ids, device=table.device)] = rows
                self.tables[name] = table
