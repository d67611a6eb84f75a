"""The textual-inversion embeddings of `--embeddings-dir`, as the server's models see them.

The worker's pipeline loads an embedding when a prompt names its file stem (runtime/adapters/session.py);
other words are plain text, as in A1111, and only files directly inside the folder can be named (no
paths). Here: A1111's /sdapi/v1/embeddings listing (`loaded`: fits the current model, `skipped`: not),
and the request side's token counting, which must count an embedding as its vectors (the chunk count
is part of the batching key and checked against the model's limit).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runtime.adapters.embeddings import Embedding, read_embedding
from runtime.adapters.files import AdapterError
from runtime.adapters.session import ADAPTER_SUFFIXES, named_in
from runtime.serve.errors import RequestError
from runtime.serve.models import Model
from runtime.tokenizer import ClipTokenizer


class Embeddings:
    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._read: dict[Path, tuple[tuple[int, int], Embedding | str]] = {}  # path -> (mtime, size), file
        self._lock = threading.RLock()  # the cache, and the counting tokenizers while tokens are added

    def files(self) -> dict[str, Path]:
        """Stem -> file, as the pipeline picks them (sorted; the first file of a stem)."""
        if self.folder is None:
            return {}
        out: dict[str, Path] = {}
        for p in sorted(self.folder.iterdir()):
            if p.suffix in ADAPTER_SUFFIXES and p.is_file():
                out.setdefault(p.stem, p)
        return out

    def listing(self, model: Model) -> dict[str, Any]:
        """A1111's /sdapi/v1/embeddings for `model`."""
        loaded: dict[str, Any] = {}
        skipped: dict[str, Any] = {}
        widths = model.manifest.encoder_widths
        for stem, path in self.files().items():
            emb = self._embedding(path)
            fits = isinstance(emb, Embedding) and _fits(emb, widths)
            entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                     "shape": int(next(iter(emb.vectors.values())).shape[1]) if isinstance(emb, Embedding) else None,
                     "vectors": emb.num_vectors if isinstance(emb, Embedding) else None}
            (loaded if fits else skipped)[stem] = entry
        return {"loaded": loaded, "skipped": skipped}

    @contextmanager
    def tokenizers(self, model: Model, texts: Sequence[str]) -> Iterator[tuple[ClipTokenizer, ...]]:
        """`model`'s tokenizers with the embeddings `texts` name added as tokens (for counting only); an
        embedding the pipeline would refuse is a 422 naming the prompt."""
        text = " ".join(texts)
        named = {s: p for s, p in self.files().items() if named_in(s, text)}
        with self._lock:
            for stem, path in named.items():
                emb = self._embedding(path)
                if isinstance(emb, str):
                    raise RequestError("prompt", f"embedding {stem!r}: {emb}")
                if not _fits(emb, model.manifest.encoder_widths):
                    raise RequestError("prompt", f"embedding {stem!r} is not for model {model.name!r} "
                                                 "(see /sdapi/v1/embeddings, `skipped`)")
                new = [tok for tok in model.tokenizers if tok.added.get(emb.token) is None]
                if any(tok.taken(emb.token, emb.num_vectors) for tok in new):  # every check before a change
                    raise RequestError("prompt", f"embedding {stem!r}: {emb.token!r} is a word of the tokenizer "
                                                 "already")
                for tok in new:
                    tok.add_tokens(emb.token, emb.num_vectors)
            yield model.tokenizers

    def _embedding(self, path: Path) -> Embedding | str:
        """The file read (weights only), cached while it is unchanged; a file that cannot be read: why."""
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._read.get(path)
            if hit is not None and hit[0] == stamp:
                return hit[1]
            try:
                got: Embedding | str = read_embedding(path)
            except AdapterError as e:
                got = str(e)
            self._read[path] = (stamp, got)
            return got


def _fits(emb: Embedding, widths: dict[str, int]) -> bool:
    try:
        emb.for_encoders(widths)
    except AdapterError:
        return False
    return True
