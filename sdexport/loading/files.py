"""Reading tensors from weight files: safetensors, and plain-tensor torch pickles (``weights_only``)."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .errors import CheckpointError

__all__ = ["TORCH_SUFFIXES", "read_json", "read_safetensors", "read_torch", "read_weights"]

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
KeyFilter = Callable[[str], bool]


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
    out: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if keep is None or keep(key):
                    out[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    return out


def read_torch(path: Path, keep: KeyFilter | None = None) -> dict[str, Tensor]:
    """The tensors of a torch pickle (``.ckpt``/``.bin``/...), loaded with ``weights_only=True``.

    A top-level ``"state_dict"`` entry (the PyTorch Lightning wrapper of LDM ``.ckpt`` files) is
    unwrapped; every other entry of the wrapper (``global_step``, ...) is ignored. Anything that is not a
    flat ``{name: tensor}`` mapping is refused: only plain-tensor checkpoints are supported.
    """
    _check_file(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: the pickle holds objects other than plain tensors; only plain-tensor checkpoints "
            f"are supported (no arbitrary code is unpickled). Convert it to .safetensors. ({first})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): {exc}"
        ) from exc
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
