"""Diffusers folders (``model_index.json``, one folder per component) -> a :class:`Checkpoint`.

Component weights in safetensors or ``.bin`` files, sharded or not, in a chosen or the preferred
variant; configs from each ``config.json``; the family from the UNet (SDXL: its text_time widths and
which encoders the index lists) and every component checked against the key/shape table of its config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from . import sgm
from .architecture import text_shapes, unet_shapes, vae_shapes
from .checkpoint import (
    DEFAULT_VAE_SCALING,
    Checkpoint,
    attempt,
    check_conditioning,
    check_prediction_type,
    family_defaults,
    pipeline_defaults,
    raise_collected,
)
from .errors import CheckpointError, check_state_dict
from .files import read_json, read_weights

__all__ = ["load_folder"]

_TEXT_CONFIG_DROP = {"architectures", "transformers_version", "torch_dtype", "dtype"}


def _checked(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], what: str) -> dict[str, Tensor]:
    check_state_dict(state, expected, what)
    return state


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
    check_prediction_type(pred)
    config["prediction_type"] = pred
    return config


def _text_encoder_2(root: Path, variant: str | None) -> dict[str, Tensor]:
    """Encoder 2 keeps transformers' names (``text_model.*``, ``text_projection.weight``)."""
    state = _read_component_weights(root / "text_encoder_2", "model", "pytorch_model", variant)
    return {k: v for k, v in state.items() if k != "text_model.embeddings.position_ids"}


def load_folder(
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
        check_conditioning(unet_config, text_config, str(root))
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
    attempt(errors, lambda: _checked(unet, unet_shapes(unet_config), f"{unet_dir}: UNet"))
    attempt(errors, lambda: _checked(vae, vae_shapes(vae_config), f"{vae_dir}: VAE"))
    if text_dir is not None:
        attempt(errors, lambda: _checked(text, text_shapes(text_config), f"{text_dir}: text encoder"))
    if text_2 is not None and text_config_2 is not None:
        config_2, state_2 = text_config_2, text_2
        attempt(errors, lambda: _checked(state_2, sgm.text_2_shapes(config_2),
                                          f"{root / 'text_encoder_2'}: text encoder 2"))
    raise_collected(errors)

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
