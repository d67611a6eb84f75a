"""``load_checkpoint``: diffusers folders and LDM single files -> configs + state dicts.

Output vocabulary: diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` config dicts and parameter
names, a transformers ``CLIPTextConfig`` dict and ``CLIPTextModel`` parameter names without the
``text_model.`` level of transformers 4 (the names of transformers 5 and of our ``TextEncoder``).
No network access, ever; no arbitrary unpickling (torch files are read with ``weights_only=True``).

Prediction type: single files do not record it. SD 1.x and SD 2.x "base" (512 px) checkpoints are
epsilon-prediction (the default); SD 2.0/2.1 768 px checkpoints are **v-prediction** and must be loaded
with ``prediction_type="v_prediction"`` (this also selects the published 768-v config: sample_size 96,
``upcast_attention=True``). Diffusers folders carry it in ``scheduler/scheduler_config.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import ldm, sgm
from .architecture import text_shapes, unet_shapes, vae_shapes
from .errors import CheckpointError, check_state_dict
from .files import TORCH_SUFFIXES, read_json, read_weights

__all__ = [
    "PAD_TOKEN",
    "PAD_TOKENS",
    "PREDICTION_TYPES",
    "Checkpoint",
    "family_defaults",
    "load_checkpoint",
    "pipeline_defaults",
    "published_configs",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
CONFIG_SECTIONS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
FAMILIES = ("sd1", "sd2", *sgm.FAMILIES)
DEFAULT_VAE_SCALING = 0.18215
# The pad token of each family's tokenizers, one per text encoder (CLIP's end-of-text; OpenCLIP pads with
# "!": SD2, SDXL's encoder 2), for the bundled vocabulary when a checkpoint brings no tokenizer folder.
PAD_TOKENS = {"sd1": ("<|endoftext|>",), "sd2": ("!",), "sdxl": ("<|endoftext|>", "!"), "sdxl-refiner": ("!",)}
PAD_TOKEN = {family: pads[0] for family, pads in PAD_TOKENS.items()}  # the first tokenizer's
_TEXT_CONFIG_DROP = {"architectures", "transformers_version", "torch_dtype", "dtype"}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded Stable Diffusion 1.x/2.x checkpoint in diffusers/transformers vocabulary."""

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


def _check_prediction_type(value: str | None) -> None:
    if value is not None and value not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction_type must be one of {PREDICTION_TYPES}, got {value!r}")


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
    - ``prediction_type``: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; overrides the folder's
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
    _check_prediction_type(prediction_type)
    if family is not None and family not in FAMILIES:
        raise CheckpointError(f"family must be one of {FAMILIES}, got {family!r}")
    overrides = _check_overrides(configs)
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    if root.is_dir():
        ckpt = _load_diffusers(root, prediction_type, overrides, variant)
    else:
        if variant is not None:
            raise CheckpointError(f"{root}: variant={variant!r} only applies to diffusers folders")
        ckpt = _load_single_file(root, prediction_type, overrides, family)
    if family is not None and ckpt.family != family:
        raise CheckpointError(f"{root}: {_family_mismatch(family, ckpt.family)}")
    if dtype is None:
        return ckpt
    return dataclasses.replace(
        ckpt,
        unet=_cast(ckpt.unet, dtype),
        vae=_cast(ckpt.vae, dtype),
        text_encoder=_cast(ckpt.text_encoder, dtype),
        text_encoder_2=None if ckpt.text_encoder_2 is None else _cast(ckpt.text_encoder_2, dtype),
    )


_FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "SDXL base (two text encoders)",
    "sdxl-refiner": "SDXL refiner (encoder 2 only, aesthetic-score conditioning)",
}


def _family_mismatch(expected: str, found: str) -> str:
    return (
        f"expected a {_FAMILY_NAMES[expected]} checkpoint ({expected!r}), "
        f"but this is a {_FAMILY_NAMES[found]} checkpoint ({found!r})"
    )


# --------------------------------------------------------------------------- single files


def _attempt(errors: list[str], step: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Run one conversion/check step; a :class:`CheckpointError` is collected instead of raised."""
    try:
        return step()
    except CheckpointError as exc:
        errors.append(str(exc))
        return {}


def _raise_collected(errors: list[str]) -> None:
    if len(errors) == 1:
        raise CheckpointError(errors[0])
    if errors:
        raise CheckpointError(f"{len(errors)} components do not load:\n" + "\n".join(errors))


def _check_conditioning(unet_config: Mapping[str, Any], text_config: Mapping[str, Any], name: str) -> None:
    cross, hidden = unet_config.get("cross_attention_dim"), text_config.get("hidden_size")
    if cross != hidden:
        raise CheckpointError(
            f"{name}: the UNet's cross_attention_dim ({cross}) differs from the text encoder's hidden_size "
            f"({hidden}); the components do not belong together"
        )


def _checked(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], what: str) -> dict[str, Tensor]:
    check_state_dict(state, expected, what)
    return state


def _single_file_keep(key: str) -> bool:
    return key.startswith(
        (ldm.UNET_PREFIX, ldm.VAE_PREFIX, ldm.SD1_TEXT_PREFIX, ldm.SD2_TEXT_PREFIX, sgm.CONDITIONER_PREFIX)
    ) and not key.startswith(ldm.VAE_PREFIX + "loss.")  # training-time discriminator / logvar


def _load_single_file(
    path: Path, prediction_type: str | None, overrides: dict[str, dict[str, Any]], family: str | None = None
) -> Checkpoint:
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected a .safetensors or .ckpt "
            "single-file checkpoint, or a diffusers folder (with model_index.json)"
        )
    return _from_ldm_state(read_weights(path, _single_file_keep), path, prediction_type, overrides, family)


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


def _from_ldm_state(
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
        raise CheckpointError(f"{name}: {_family_mismatch(expected_family, family)}")
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
        _check_conditioning(unet_config, text_config, name)
    else:
        sgm.check_conditioning(unet_config, text_config or None, text_config_2, name)
    errors: list[str] = []
    unet = _attempt(
        errors,
        lambda: ldm.convert(
            state, ldm.unet_key_map(unet_config), unet_shapes(unet_config), ldm.UNET_PREFIX, f"{name}: UNet"
        ),
    )
    vae = _attempt(
        errors,
        lambda: ldm.convert(
            state, ldm.vae_key_map(vae_config), vae_shapes(vae_config), ldm.VAE_PREFIX, f"{name}: VAE"
        ),
    )
    text: dict[str, Tensor] = {}
    if not xl:
        text = _attempt(errors, lambda: ldm.convert_text(state, text_config, family, f"{name}: text encoder"))
    elif text_config:
        text = _attempt(errors, lambda: sgm.convert_text(state, text_config, f"{name}: text encoder"))
    text_2: dict[str, Tensor] | None = None
    if text_config_2 is not None:
        config_2 = text_config_2
        text_2 = _attempt(errors, lambda: sgm.convert_text_2(state, config_2, family, f"{name}: text encoder 2"))
    _raise_collected(errors)
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


# --------------------------------------------------------------------------- diffusers folders


def _weight_candidates(base: str, bin_base: str, variant: str | None) -> list[str]:
    def names(tag: str) -> list[str]:
        return [
            f"{base}{tag}.safetensors",
            f"{base}.safetensors.index{tag}.json",
            f"{bin_base}{tag}.bin",
            f"{bin_base}.bin.index{tag}.json",
        ]

    if variant is not None:
        return names(f".{variant}")
    return names("") + names(".fp16")


def _read_component_weights(folder: Path, base: str, bin_base: str, variant: str | None) -> dict[str, Tensor]:
    candidates = _weight_candidates(base, bin_base, variant)
    for name in candidates:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".json"):
            return read_weights(file)
        index = read_json(file)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{file}: sharded-weights index without a 'weight_map'")
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / str(shard)
            if not shard_path.is_file():
                raise CheckpointError(f"{file}: shard {shard} is missing")
            state.update(read_weights(shard_path))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise CheckpointError(f"{file}: the shards lack {len(absent)} indexed tensors, e.g. {absent[:3]}")
        return state
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(candidates)})")


def _component(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise CheckpointError(f"{root}: missing component folder '{name}/'")
    return folder


def _diffusers_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder}: missing config.json")
    config = read_json(file)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _normalise_text_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers 4.x (``text_model.*``) or 5.x (bare) names -> bare names."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        bare = key.removeprefix("text_model.")
        if bare == "embeddings.position_ids":
            continue  # a buffer older transformers versions saved
        out[bare] = value
    return out


def _decide_family(unet_config: Mapping[str, Any], text_config: Mapping[str, Any]) -> str:
    cross = unet_config.get("cross_attention_dim")
    if cross == 768:
        return "sd1"
    if cross == 1024:
        return "sd2"
    # Non-published sizes (tiny test models): SD2 uses linear projections and GELU in OpenCLIP.
    if unet_config.get("use_linear_projection") or text_config.get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"


def _has_component(root: Path, index: Mapping[str, Any], name: str) -> bool:
    """Whether the pipeline has component `name`: the index's entry when present ([null, null] = none)."""
    if name in index:
        entry = index[name]
        return isinstance(entry, list) and bool(entry) and entry[0] is not None
    return (root / name).is_dir()


def _xl_family(root: Path, index: Mapping[str, Any], unet_config: Mapping[str, Any],
               text_config_2: Mapping[str, Any] | None) -> str:
    """SDXL base (6 time ids, both encoders) or refiner (5, encoder 2 only), from the UNet's text_time
    widths: projection_class_embeddings_input_dim = pooled width + n * addition_time_embed_dim."""
    if text_config_2 is None:
        raise CheckpointError(f"{root}: the UNet takes SDXL's text_time conditioning, but the folder has no "
                              "text_encoder_2/ (SDXL base and refiner need encoder 2)")
    extra = int(unet_config.get("projection_class_embeddings_input_dim") or 0) - int(text_config_2["projection_dim"])
    per_id = int(unet_config.get("addition_time_embed_dim") or 0)
    n = extra // per_id if per_id and extra % per_id == 0 else -1
    has_text_1 = _has_component(root, index, "text_encoder")
    if n == 6 and has_text_1:
        family = "sdxl"
    elif n == 5 and not has_text_1:
        family = "sdxl-refiner"
    else:
        raise CheckpointError(
            f"{root}: unsupported SDXL layout: the UNet takes {n} time ids (base: 6 with text_encoder/ and "
            f"text_encoder_2/, refiner: 5 with text_encoder_2/ only) and text_encoder/ is "
            f"{'present' if has_text_1 else 'absent'}")
    aesthetics = index.get("requires_aesthetics_score")
    if aesthetics is not None and bool(aesthetics) != (family == "sdxl-refiner"):
        raise CheckpointError(f"{root}: model_index.json says requires_aesthetics_score={aesthetics}, but the "
                              f"UNet takes {n} time ids")
    return family


def pipeline_defaults(family: str) -> dict[str, bool]:
    """The published pipeline flags of a family (force_zeros_for_empty_prompt, requires_aesthetics_score)."""
    if family not in sgm.FAMILIES:
        return {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": False}
    flags = family_defaults(family, "epsilon").get("pipeline", {})
    return {"force_zeros_for_empty_prompt": bool(flags.get("force_zeros_for_empty_prompt", False)),
            "requires_aesthetics_score": bool(flags.get("requires_aesthetics_score", False))}


def _text_config(folder: Path, override: Mapping[str, Any] | None) -> dict[str, Any]:
    config = {k: v for k, v in _diffusers_config(folder).items() if k not in _TEXT_CONFIG_DROP}
    config.update(override or {})
    return config


def _scheduler_config(root: Path, family: str, prediction_type: str | None,
                      override: Mapping[str, Any] | None) -> dict[str, Any]:
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if scheduler_file.exists():
        config = {k: v for k, v in read_json(scheduler_file).items() if not k.startswith("_")}
    else:
        config = family_defaults(family, prediction_type or "epsilon")["scheduler"]
    config.update(override or {})
    pred = prediction_type or config.get("prediction_type") or "epsilon"
    _check_prediction_type(pred)
    config["prediction_type"] = pred
    return config


def _text_encoder_2(root: Path, variant: str | None) -> dict[str, Tensor]:
    """Encoder 2 keeps transformers' names (``text_model.*``, ``text_projection.weight``)."""
    state = _read_component_weights(root / "text_encoder_2", "model", "pytorch_model", variant)
    return {k: v for k, v in state.items() if k != "text_model.embeddings.position_ids"}


def _load_diffusers(
    root: Path, prediction_type: str | None, overrides: dict[str, dict[str, Any]], variant: str | None
) -> Checkpoint:
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{root}: not a diffusers folder (no model_index.json)")
    index = read_json(index_path)
    if "unet" not in index and "transformer" in index:
        raise CheckpointError(f"{root}: only Stable Diffusion 1.x/2.x/XL UNet pipelines are supported (not DiT)")

    unet_dir, vae_dir = _component(root, "unet"), _component(root, "vae")
    unet_config = _diffusers_config(unet_dir)
    unet_config.update(overrides.get("unet", {}))
    vae_config = _diffusers_config(vae_dir)
    vae_config.setdefault("scaling_factor", DEFAULT_VAE_SCALING)
    vae_config.update(overrides.get("vae", {}))
    has_2 = _has_component(root, index, "text_encoder_2")
    text_config_2 = _text_config(_component(root, "text_encoder_2"), overrides.get("text_encoder_2")) if has_2 else None
    if unet_config.get("addition_embed_type") == "text_time":
        family = _xl_family(root, index, unet_config, text_config_2)
    elif has_2:
        raise CheckpointError(f"{root}: text_encoder_2/ present but the UNet has no addition_embed_type="
                              "'text_time' (SDXL); the components do not belong together")
    text_dir = _component(root, "text_encoder") if _has_component(root, index, "text_encoder") else None
    text_config = {} if text_dir is None else _text_config(text_dir, overrides.get("text_encoder"))
    if text_config_2 is None:
        family = _decide_family(unet_config, text_config)
        _check_conditioning(unet_config, text_config, str(root))
    else:
        sgm.check_conditioning(unet_config, text_config or None, text_config_2, str(root))
    scheduler_config = _scheduler_config(root, family, prediction_type, overrides.get("scheduler"))

    errors: list[str] = []
    base = "diffusion_pytorch_model"
    unet = _read_component_weights(unet_dir, base, base, variant)
    vae = _read_component_weights(vae_dir, base, base, variant)
    text: dict[str, Tensor] = {}
    if text_dir is not None:
        text = _normalise_text_keys(_read_component_weights(text_dir, "model", "pytorch_model", variant))
    text_2 = None if text_config_2 is None else _text_encoder_2(root, variant)
    # Config problems (unsupported options) and weight mismatches of all components in one error.
    _attempt(errors, lambda: _checked(unet, unet_shapes(unet_config), f"{unet_dir}: UNet"))
    _attempt(errors, lambda: _checked(vae, vae_shapes(vae_config), f"{vae_dir}: VAE"))
    if text_dir is not None:
        _attempt(errors, lambda: _checked(text, text_shapes(text_config), f"{text_dir}: text encoder"))
    if text_2 is not None and text_config_2 is not None:
        config_2, state_2 = text_config_2, text_2
        _attempt(errors, lambda: _checked(state_2, sgm.text_2_shapes(config_2),
                                          f"{root / 'text_encoder_2'}: text encoder 2"))
    _raise_collected(errors)

    flags = pipeline_defaults(family)
    tokenizer, tokenizer_2 = root / "tokenizer", root / "tokenizer_2"
    return Checkpoint(
        family=family,
        inpainting=int(unet_config.get("in_channels", 4)) == 9,
        unet_config=unet_config,
        vae_config=vae_config,
        text_config=text_config,
        scheduler_config=scheduler_config,
        tokenizer_dir=tokenizer if tokenizer.is_dir() and text_dir is not None else None,
        unet=unet,
        vae=vae,
        text_encoder=text,
        source=root,
        text_encoder_2=text_2,
        text_config_2=text_config_2,
        tokenizer_2_dir=tokenizer_2 if tokenizer_2.is_dir() and has_2 else None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt",
                                                    flags["force_zeros_for_empty_prompt"])),
    )
