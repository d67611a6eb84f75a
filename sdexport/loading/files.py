"""Reading tensors from weight files: safetensors, and plain-tensor torch pickles (``weights_only``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from runtime.tensor_files import TORCH_SUFFIXES, KeyFilter, load_safetensors, load_torch

from .errors import CheckpointError

__all__ = ["TORCH_SUFFIXES", "read_json", "read_safetensors", "read_torch", "read_weights"]

def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a :class:`CheckpointError` naming the file."""
    _check_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path, keep: KeyFilter | None = None) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file whose names pass ``keep`` (all when ``None``)."""
    _check_file(path)
    return load_safetensors(path, CheckpointError, keep)[0]


def read_torch(path: Path, keep: KeyFilter | None = None) -> dict[str, Tensor]:
    """The tensors of a torch pickle (``.ckpt``/``.bin``/...), loaded with ``weights_only=True``.

    A top-level ``"state_dict"`` entry (the PyTorch Lightning wrapper of LDM ``.ckpt`` files) is
    unwrapped; every other entry of the wrapper (``global_step``, ...) is ignored. Anything that is not a
    flat ``{name: tensor}`` mapping is refused: only plain-tensor checkpoints are supported.
    """
    _check_file(path)
    obj = load_torch(path, CheckpointError, "checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a mapping of tensor names to tensors, found {type(obj).__name__}; "
            "only plain-tensor checkpoints are supported"
        )
    bad = sorted(str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor)))
    if bad:
        shown = ", ".join(bad[:5]) + (f" ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{path}: entries that are not tensors ({shown}); only plain-tensor checkpoints are supported"
        )
    return {k: v for k, v in obj.items() if keep is None or keep(k)}


def read_weights(path: Path, keep: KeyFilter | None = None) -> dict[str, Tensor]:
    """Dispatch on the suffix: ``.safetensors`` or one of :data:`TORCH_SUFFIXES`."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path, keep)
    if suffix in TORCH_SUFFIXES:
        return read_torch(path, keep)
    raise CheckpointError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected .safetensors, "
        f"{', '.join(TORCH_SUFFIXES)} or a diffusers folder (with model_index.json)"
    )
