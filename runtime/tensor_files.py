"""Reading tensor files without running code: `.safetensors`, and torch pickles only with
`torch.load(weights_only=True)`, which refuses any pickle that would run code (a class with `__reduce__`,
a global that is not a tensor type). One home for checkpoints (sdexport.loading) and adapters
(runtime.adapters); each passes its own error type and the name of what it reads."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["TORCH_SUFFIXES", "KeyFilter", "load_safetensors", "load_torch"]

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
KeyFilter = Callable[[str], bool]


def load_safetensors(path: Path, error: type[Exception], keep: KeyFilter | None = None,
                     ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors whose names pass `keep`, header metadata); an unreadable file is `error`."""
    from safetensors import safe_open

    out: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if keep is None or keep(key):
                    out[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own types (SafetensorError), plus OSError / ValueError
        raise error(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    return out, dict(meta)


def load_torch(path: Path, error: type[Exception], kind: str) -> Any:
    """The object in a torch pickle, read with `weights_only=True`; `kind` names what the caller
    accepts ("checkpoint", "adapter file") in the errors."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(
            f"{path}: refused: the pickle holds objects other than plain tensors and loading it could run "
            f"code; only plain-tensor {kind}s are supported (convert it to .safetensors): {first}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise error(f"{path}: not a readable torch {kind} (truncated or corrupt?): {exc}") from exc
