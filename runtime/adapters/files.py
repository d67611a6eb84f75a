"""Reading adapter files (LoRA, LyCORIS, textual inversion) safely (runtime.tensor_files: a pickle that
would run code is an :class:`AdapterError`, never executed), and the hashes A1111 writes for them."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from runtime.tensor_files import TORCH_SUFFIXES, load_safetensors, load_torch

__all__ = ["AdapterError", "FileInfo", "a1111_lora_hash", "file_info", "read_file", "sha256_file"]

_BLOCK = 1 << 20


class AdapterError(ValueError):
    """An adapter file that cannot be used: unreadable, unsupported, inconsistent or not for this model."""


@dataclass(frozen=True)
class FileInfo:
    """What identifies a file's content for caches and PNG metadata."""

    path: Path
    size: int
    mtime_ns: int
    sha256: str  # of the whole file

    @property
    def name(self) -> str:
        return self.path.stem


def sha256_file(path: str | Path, offset: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def file_info(path: str | Path) -> FileInfo:
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise AdapterError(f"{p}: cannot read the file ({e.strerror})") from e
    return FileInfo(p, st.st_size, st.st_mtime_ns, sha256_file(p))


def a1111_lora_hash(path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """The 12-hex short hash A1111 writes in `Lora hashes` (extensions-builtin/Lora/network.py): the
    trainer's `sshs_model_hash` metadata if present, else for `.safetensors` the sd-webui-additional-networks
    hash (sha256 of the bytes after the JSON header), else the sha256 of the whole file; first 12 hex."""
    if metadata and metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"][:12]
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        return sha256_file(p)[:12]
    with open(p, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return sha256_file(p, 8 + header)[:12]


def read_file(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(content, safetensors metadata) of an adapter file. Content is a flat name -> tensor dict for
    safetensors; pickles may nest dicts (A1111 embeddings)."""
    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(p, AdapterError)
    if suffix in TORCH_SUFFIXES:
        obj = load_torch(p, AdapterError, "adapter file")
        if not isinstance(obj, dict):
            raise AdapterError(f"{p}: expected a dict of tensors, found {type(obj).__name__}")
        return obj, {}
    with open(p, "rb") as f:  # unknown suffix: sniff (safetensors starts with a little-endian header size)
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return load_safetensors(p, AdapterError)
    raise AdapterError(f"{p}: unknown adapter file type {suffix!r} (expected .safetensors, or {TORCH_SUFFIXES})")


def flat_tensors(path: Path, content: Mapping[str, Any]) -> dict[str, Tensor]:
    """The name -> tensor table of a LoRA file; anything else in it is an error naming the key."""
    out: dict[str, Tensor] = {}
    for k, v in content.items():
        if not isinstance(v, Tensor):
            raise AdapterError(f"{path}: {k!r} is a {type(v).__name__}, not a tensor (not a LoRA file?)")
        out[str(k)] = v
    return out


def json_metadata(meta: Mapping[str, str], key: str) -> dict[str, Any]:
    raw = meta.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def same_file(a: FileInfo, path: str | Path) -> bool:
    """Cheap check that `path` still is `a` (size and mtime), for caches keyed by sha256."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == a.size and st.st_mtime_ns == a.mtime_ns
