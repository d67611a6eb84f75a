"""``load_checkpoint``: diffusers folders and LDM / SGM single files -> configs + state dicts.

The result is a :class:`~sdexport.loading.checkpoint.Checkpoint` (its vocabulary: see ``checkpoint.py``).
No network access, ever; no arbitrary unpickling (torch files are read with ``weights_only=True``).

Prediction type: single files do not record it. SD 1.x and SD 2.x "base" (512 px) checkpoints are
epsilon-prediction (the default); SD 2.0/2.1 768 px checkpoints are **v-prediction** and must be loaded
with ``prediction_type="v_prediction"`` (this also selects the published 768-v config: sample_size 96,
``upcast_attention=True``). Diffusers folders carry it in ``scheduler/scheduler_config.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import FAMILIES, Checkpoint, check_prediction_type, family_mismatch
from .errors import CheckpointError
from .folder import load_folder
from .single_file import load_single_file

__all__ = ["CONFIG_SECTIONS", "load_checkpoint"]

CONFIG_SECTIONS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")


def _check_overrides(configs: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    if configs is None:
        return {}
    odd = sorted(set(configs) - set(CONFIG_SECTIONS))
    if odd:
        raise CheckpointError(f"configs: unknown sections {odd}; expected some of {list(CONFIG_SECTIONS)}")
    return {k: dict(v) for k, v in configs.items()}


def _cast(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_checkpoint(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    dtype: torch.dtype | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    variant: str | None = None,
    family: str | None = None,
) -> Checkpoint:
    """Load a Stable Diffusion 1.x/2.x/XL checkpoint (diffusers folder or LDM / SGM single file).

    - ``path``: a diffusers folder (``model_index.json``), or a ``.safetensors`` / ``.ckpt`` (also
      ``.pt``/``.pth``) single file with the original LDM key names (SDXL: Stability AI's SGM names).
    - ``prediction_type``: ``"epsilon"`` or ``"v_prediction"``; overrides the folder's
      scheduler config; for single files the default is ``"epsilon"`` (SD 2.x 768 px checkpoints need
      ``"v_prediction"``).
    - ``dtype``: cast floating-point tensors (default: keep the stored dtype).
    - ``configs``: ``{"unet"|"vae"|"text_encoder"|"text_encoder_2"|"scheduler": {...}}`` merged over the
      loaded or inferred configs, e.g. head counts of models that do not follow the published rule.
    - ``variant``: diffusers weight variant (``"fp16"`` reads ``*.fp16.safetensors``). Without it the
      regular file is preferred and the fp16 variant used when the regular one is absent.
    - ``family``: the family the caller expects (one of :data:`FAMILIES`); a checkpoint of another
      family (e.g. an SDXL refiner where a base is expected) raises :class:`CheckpointError`.

    Every converted state dict is checked against the key/shape table computed from its config; any
    problem raises :class:`CheckpointError` naming the file and listing the keys.
    """
    check_prediction_type(prediction_type)
    if family is not None and family not in FAMILIES:
        raise CheckpointError(f"family must be one of {FAMILIES}, got {family!r}")
    overrides = _check_overrides(configs)
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    if root.is_dir():
        ckpt = load_folder(root, prediction_type, overrides, variant)
    else:
        if variant is not None:
            raise CheckpointError(f"{root}: variant={variant!r} only applies to diffusers folders")
        ckpt = load_single_file(root, prediction_type, overrides, family)
    if family is not None and ckpt.family != family:
        raise CheckpointError(f"{root}: {family_mismatch(family, ckpt.family)}")
    if dtype is None:
        return ckpt
    return dataclasses.replace(
        ckpt,
        unet=_cast(ckpt.unet, dtype),
        vae=_cast(ckpt.vae, dtype),
        text_encoder=_cast(ckpt.text_encoder, dtype),
        text_encoder_2=None if ckpt.text_encoder_2 is None else _cast(ckpt.text_encoder_2, dtype),
    )
