"""Original single files: LDM (SD 1.x/2.x) and SGM (SDXL base/refiner) state dicts -> a :class:`Checkpoint`.

The family is recognised from the keys; configs start from the family's published ones, with the sizes
inferred from the tensors and the caller's overrides on top; every component is converted and checked
against the key/shape table of its config, all problems reported in one error.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from . import ldm, sgm
from .architecture import unet_shapes, vae_shapes
from .checkpoint import Checkpoint, attempt, check_conditioning, family_defaults, family_mismatch, raise_collected
from .errors import CheckpointError
from .files import TORCH_SUFFIXES, read_weights

__all__ = ["from_ldm_state", "load_single_file"]


def _single_file_keep(key: str) -> bool:
    return key.startswith(
        (ldm.UNET_PREFIX, ldm.VAE_PREFIX, ldm.SD1_TEXT_PREFIX, ldm.SD2_TEXT_PREFIX, sgm.CONDITIONER_PREFIX)
    ) and not key.startswith(ldm.VAE_PREFIX + "loss.")  # training-time discriminator / logvar


def load_single_file(
    path: Path, prediction_type: str | None, overrides: dict[str, dict[str, Any]], family: str | None = None
) -> Checkpoint:
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected a .safetensors or .ckpt "
            "single-file checkpoint, or a diffusers folder (with model_index.json)"
        )
    return from_ldm_state(read_weights(path, _single_file_keep), path, prediction_type, overrides, family)


def _section(
    defaults: dict[str, Any], inferred: dict[str, Any], override: Mapping[str, Any] | None
) -> dict[str, Any]:
    defaults.update(inferred)
    defaults.update(override or {})
    return defaults


def _heads_64(config: dict[str, Any], key: str, channels: list[int]) -> None:
    """The published rule of SD 2.x and SDXL (UNet and both text encoders): 64-channel heads."""
    heads = [max(1, c // 64) for c in channels]
    config[key] = heads if key == "attention_head_dim" else heads[0]


def from_ldm_state(
    state: dict[str, Tensor],
    path: Path,
    prediction_type: str | None,
    overrides: dict[str, dict[str, Any]],
    expected_family: str | None = None,
) -> Checkpoint:
    """Recognise, configure and convert an LDM / SGM state dict (works on meta tensors too)."""
    name = str(path)
    family = sgm.detect_family(state, name)
    if expected_family is not None and family != expected_family:
        raise CheckpointError(f"{name}: {family_mismatch(expected_family, family)}")
    xl = family in sgm.FAMILIES
    for section, absent in (("text_encoder", family == "sdxl-refiner"), ("text_encoder_2", not xl)):
        if absent and section in overrides:
            raise CheckpointError(f"{name}: configs[{section!r}] given, but a {family} checkpoint has no {section}")
    pred = prediction_type or "epsilon"
    defaults = family_defaults(family, pred)
    published = copy.deepcopy(defaults)

    text_config: dict[str, Any] = {}
    if family != "sdxl-refiner":
        inferred = sgm.infer_text_config(state, name) if xl else ldm.infer_text_config(state, family, name)
        _heads_64(inferred, "num_attention_heads", [inferred["hidden_size"]])
        text_config = _section(defaults["text_encoder"], inferred, overrides.get("text_encoder"))
    text_config_2: dict[str, Any] | None = None
    if xl:
        inferred = sgm.infer_text_2_config(state, family, name)
        _heads_64(inferred, "num_attention_heads", [inferred["hidden_size"]])
        text_config_2 = _section(defaults["text_encoder_2"], inferred, overrides.get("text_encoder_2"))

    inferred = ldm.infer_unet_config(state, name)
    if family != "sd1":  # SD 2.x (published: [5, 10, 20, 20]), SDXL ([5, 10, 20])
        _heads_64(inferred, "attention_head_dim", inferred["block_out_channels"])
    if text_config_2 is not None:
        inferred.update(sgm.infer_text_time(state, published, int(text_config_2["projection_dim"]), name))
    unet_config = _section(defaults["unet"], inferred, overrides.get("unet"))
    vae_config = _section(defaults["vae"], ldm.infer_vae_config(state, name), overrides.get("vae"))
    scheduler_config = _section(defaults["scheduler"], {}, overrides.get("scheduler"))
    scheduler_config["prediction_type"] = pred

    if text_config_2 is None:
        check_conditioning(unet_config, text_config, name)
    else:
        sgm.check_conditioning(unet_config, text_config or None, text_config_2, name)
    errors: list[str] = []
    unet = attempt(
        errors,
        lambda: ldm.convert(
            state, ldm.unet_key_map(unet_config), unet_shapes(unet_config), ldm.UNET_PREFIX, f"{name}: UNet"
        ),
    )
    vae = attempt(
        errors,
        lambda: ldm.convert(
            state, ldm.vae_key_map(vae_config), vae_shapes(vae_config), ldm.VAE_PREFIX, f"{name}: VAE"
        ),
    )
    text: dict[str, Tensor] = {}
    if not xl:
        text = attempt(errors, lambda: ldm.convert_text(state, text_config, family, f"{name}: text encoder"))
    elif text_config:
        text = attempt(errors, lambda: sgm.convert_text(state, text_config, f"{name}: text encoder"))
    text_2: dict[str, Tensor] | None = None
    if text_config_2 is not None:
        config_2 = text_config_2
        text_2 = attempt(errors, lambda: sgm.convert_text_2(state, config_2, family, f"{name}: text encoder 2"))
    raise_collected(errors)
    return Checkpoint(
        family=family,
        inpainting=int(unet_config["in_channels"]) == 9,
        unet_config=unet_config,
        vae_config=vae_config,
        text_config=text_config,
        scheduler_config=scheduler_config,
        tokenizer_dir=None,
        unet=unet,
        vae=vae,
        text_encoder=text,
        source=path,
        text_encoder_2=text_2,
        text_config_2=text_config_2,
    )
