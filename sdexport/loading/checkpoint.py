"""The loaded checkpoint and the facts of its families: :class:`Checkpoint`, the published configs and
defaults per family, and the checks and error collection shared by the diffusers-folder loader
(``folder.py``) and the single-file loader (``single_file.py``); ``load.py`` dispatches between them.

Output vocabulary: diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` config dicts and parameter
names, a transformers ``CLIPTextConfig`` dict and ``CLIPTextModel`` parameter names without the
``text_model.`` level of transformers 4 (the names of transformers 5 and of our ``TextEncoder``).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from torch import Tensor

from runtime.schedulers import PREDICTION_TYPES

from . import sgm
from .errors import CheckpointError

__all__ = [
    "DEFAULT_VAE_SCALING",
    "FAMILIES",
    "PAD_TOKEN",
    "PAD_TOKENS",
    "PREDICTION_TYPES",
    "Checkpoint",
    "attempt",
    "check_conditioning",
    "check_prediction_type",
    "family_defaults",
    "family_mismatch",
    "pipeline_defaults",
    "published_configs",
    "raise_collected",
]

FAMILIES = ("sd1", "sd2", *sgm.FAMILIES)
DEFAULT_VAE_SCALING = 0.18215
# The pad token of each family's tokenizers, one per text encoder (CLIP's end-of-text; OpenCLIP pads with
# "!": SD2, SDXL's encoder 2), for the bundled vocabulary when a checkpoint brings no tokenizer folder.
PAD_TOKENS = {"sd1": ("<|endoftext|>",), "sd2": ("!",), "sdxl": ("<|endoftext|>", "!"), "sdxl-refiner": ("!",)}
PAD_TOKEN = {family: pads[0] for family, pads in PAD_TOKENS.items()}  # the first tokenizer's


@dataclass(frozen=True)
class Checkpoint:
    """A loaded Stable Diffusion 1.x/2.x/XL checkpoint in diffusers/transformers vocabulary."""

    family: str  # one of FAMILIES: "sd1" | "sd2" | "sdxl" | "sdxl-refiner"
    inpainting: bool  # UNet in_channels == 9
    unet_config: dict[str, Any]  # diffusers UNet2DConditionModel config
    vae_config: dict[str, Any]  # diffusers AutoencoderKL config (scaling_factor included)
    text_config: dict[str, Any]  # transformers CLIPTextConfig dict ({} for the SDXL refiner: no encoder 1)
    scheduler_config: dict[str, Any]  # diffusers scheduler config (prediction_type set)
    tokenizer_dir: Path | None  # the checkpoint's tokenizer/ folder; None -> bundled vocabulary
    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text_encoder: dict[str, Tensor]  # {} for the SDXL refiner
    source: Path
    # SDXL's encoder 2 (CLIPTextModelWithProjection: ``text_model.*``, ``text_projection.weight``)
    text_encoder_2: dict[str, Tensor] | None = None
    text_config_2: dict[str, Any] | None = None
    tokenizer_2_dir: Path | None = None  # a diffusers folder's tokenizer_2/; None -> bundled, pad "!"
    # SDXL pipeline flag (model_index.json); None -> the family's published default (pipeline_defaults)
    force_zeros_for_empty_prompt: bool | None = None

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config["prediction_type"])


@functools.cache
def _published() -> dict[str, Any]:
    text = resources.files("sdexport").joinpath("data/model_configs.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def published_configs(name: str) -> dict[str, Any]:
    """A deep copy of one entry of ``sdexport/data/model_configs.json`` (``sd15``, ``sd21_base``, ...)."""
    data = _published()
    if name not in data or name.startswith("_"):
        raise KeyError(
            f"no published config {name!r}; known: {sorted(k for k in data if not k.startswith('_'))}"
        )
    entry: dict[str, Any] = copy.deepcopy(data[name])
    return entry


def family_defaults(family: str, prediction_type: str) -> dict[str, Any]:
    """The published configs a single file of ``family`` starts from (before shape inference)."""
    if family == "sd1":
        return published_configs("sd15")
    if family == "sd2":
        return published_configs("sd21_768_v" if prediction_type == "v_prediction" else "sd21_base")
    if family in sgm.FAMILIES:
        return published_configs("sdxl_base" if family == "sdxl" else "sdxl_refiner")
    raise CheckpointError(f"unknown model family {family!r}")


def pipeline_defaults(family: str) -> dict[str, bool]:
    """The published pipeline flags of a family (force_zeros_for_empty_prompt, requires_aesthetics_score)."""
    if family not in sgm.FAMILIES:
        return {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": False}
    flags = family_defaults(family, "epsilon").get("pipeline", {})
    return {"force_zeros_for_empty_prompt": bool(flags.get("force_zeros_for_empty_prompt", False)),
            "requires_aesthetics_score": bool(flags.get("requires_aesthetics_score", False))}


def check_prediction_type(value: str | None) -> None:
    if value is not None and value not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction_type must be one of {PREDICTION_TYPES}, got {value!r}")


_FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "SDXL base (two text encoders)",
    "sdxl-refiner": "SDXL refiner (encoder 2 only, aesthetic-score conditioning)",
}


def family_mismatch(expected: str, found: str) -> str:
    return (
        f"expected a {_FAMILY_NAMES[expected]} checkpoint ({expected!r}), "
        f"but this is a {_FAMILY_NAMES[found]} checkpoint ({found!r})"
    )


# --------------------------------------------------------------------------- shared by both loaders


def attempt(errors: list[str], step: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Run one conversion/check step; a :class:`CheckpointError` is collected instead of raised."""
    try:
        return step()
    except CheckpointError as exc:
        errors.append(str(exc))
        return {}


def raise_collected(errors: list[str]) -> None:
    if len(errors) == 1:
        raise CheckpointError(errors[0])
    if errors:
        raise CheckpointError(f"{len(errors)} components do not load:\n" + "\n".join(errors))


def check_conditioning(unet_config: Mapping[str, Any], text_config: Mapping[str, Any], name: str) -> None:
    """One text encoder (SD 1.x/2.x) feeds the UNet's cross-attention (SDXL: ``sgm.check_conditioning``)."""
    cross, hidden = unet_config.get("cross_attention_dim"), text_config.get("hidden_size")
    if cross != hidden:
        raise CheckpointError(
            f"{name}: the UNet's cross_attention_dim ({cross}) differs from the text encoder's hidden_size "
            f"({hidden}); the components do not belong together"
        )
