"""SGM single files (Stability AI's ``generative-models``): the SDXL base and refiner.

Layout (the original SDXL code and diffusers' ``single_file_utils`` agree):

- ``model.diffusion_model.*``: the UNet in the LDM layout (:mod:`.ldm`), plus ``label_emb.0.0`` /
  ``label_emb.0.2``, diffusers' ``add_embedding.linear_1/2`` ("text_time" conditioning).
- ``conditioner.embedders.0.transformer.text_model.*``: encoder 1, a Hugging Face CLIP text model
  (base only; the refiner has none).
- ``conditioner.embedders.1.model.*`` (base) / ``conditioner.embedders.0.model.*`` (refiner): encoder 2,
  OpenCLIP ViT-bigG (:func:`.ldm.open_clip_key_map`, every resblock used) with ``text_projection``
  stored as ``(width, projection_dim)``, the transpose of ``CLIPTextModelWithProjection``'s weight;
  ``logit_scale`` is unused.
- ``first_stage_model.*``: the VAE, as in SD 1.x.

Encoder 2's converted names are ``TextEncoderWithProjection``'s: ``text_model.*`` and
``text_projection.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from . import ldm
from .architecture import Shapes, text_shapes
from .errors import CheckpointError, format_list, format_shape
from .keymap import Source, convert

__all__ = [
    "CONDITIONER_PREFIX",
    "FAMILIES",
    "TEXT_2_PREFIX",
    "TEXT_PREFIX",
    "check_conditioning",
    "convert_text",
    "convert_text_2",
    "detect_family",
    "infer_text_2_config",
    "infer_text_config",
    "infer_text_time",
    "text_2_shapes",
]

CONDITIONER_PREFIX = "conditioner.embedders."
TEXT_PREFIX = "conditioner.embedders.0.transformer."  # encoder 1 (base only)
TEXT_2_PREFIX = {"sdxl": "conditioner.embedders.1.model.", "sdxl-refiner": "conditioner.embedders.0.model."}
FAMILIES = tuple(TEXT_2_PREFIX)
_PROJECTION = "text_projection"


def _prefixes(family: str) -> tuple[str, ...]:
    return (TEXT_PREFIX, TEXT_2_PREFIX[family]) if family == "sdxl" else (TEXT_2_PREFIX[family],)


def detect_family(state: Mapping[str, Tensor], name: str) -> str:
    """``"sdxl"`` / ``"sdxl-refiner"`` for SGM files, else :func:`.ldm.detect_family` (``"sd1"``/``"sd2"``).

    Base: encoder 1 (``embedders.0.transformer``) and OpenCLIP at ``embedders.1.model``. Refiner: OpenCLIP
    at ``embedders.0.model`` and nothing else. Any other conditioner content is refused.
    """
    found = sorted({".".join(k.split(".")[:4]) for k in state if k.startswith(CONDITIONER_PREFIX)})
    if not found:
        return ldm.detect_family(state, name)
    if not any(k.startswith(ldm.UNET_PREFIX) for k in state):
        raise CheckpointError(f"{name}: SGM text encoders but no UNet ('{ldm.UNET_PREFIX}*' keys)")
    has = {p: any(k.startswith(p) for k in state) for p in (TEXT_PREFIX, *TEXT_2_PREFIX.values())}
    if has[TEXT_PREFIX] and has[TEXT_2_PREFIX["sdxl"]]:
        family = "sdxl"
    elif has[TEXT_2_PREFIX["sdxl-refiner"]] and not has[TEXT_PREFIX]:
        family = "sdxl-refiner"
    else:
        raise CheckpointError(
            f"{name}: unrecognised SGM conditioner {found}; expected the SDXL base "
            f"('{TEXT_PREFIX}*' and '{TEXT_2_PREFIX['sdxl']}*') or the SDXL refiner "
            f"('{TEXT_2_PREFIX['sdxl-refiner']}*' alone)"
        )
    unknown = sorted(k for k in state if k.startswith(CONDITIONER_PREFIX) and not k.startswith(_prefixes(family)))
    if unknown:
        raise CheckpointError(
            f"{name}: {family} checkpoint with unexpected conditioner keys ({len(unknown)}):\n"
            + format_list(unknown)
        )
    if ldm.UNET_PREFIX + "label_emb.0.0.weight" not in state:
        raise CheckpointError(
            f"{name}: {family} checkpoint without the UNet's added embedding: missing key "
            f"{ldm.UNET_PREFIX}label_emb.0.0.weight"
        )
    return family


# --------------------------------------------------------------------------- shapes and configs


def text_2_shapes(config: Mapping[str, Any]) -> Shapes:
    """``TextEncoderWithProjection`` names -> shapes: the CLIP text model under ``text_model.`` and the
    bias-free projection to ``projection_dim``."""
    shapes = {"text_model." + k: v for k, v in text_shapes(config).items()}
    shapes[_PROJECTION + ".weight"] = (int(config["projection_dim"]), int(config["hidden_size"]))
    return shapes


def infer_text_config(state: Mapping[str, Tensor], name: str) -> dict[str, Any]:
    """Encoder 1's shape-determined ``CLIPTextConfig`` fields (all layers: SDXL reads hidden_states[-2])."""
    return ldm.infer_clip_config(state, TEXT_PREFIX + "text_model.", name)


def infer_text_2_config(state: Mapping[str, Tensor], family: str, name: str) -> dict[str, Any]:
    """Encoder 2's shape-determined fields, ``projection_dim`` included (every resblock is a layer)."""
    prefix = TEXT_2_PREFIX[family]
    config = ldm.infer_open_clip_config(state, prefix, name, skip=0)
    proj = state.get(prefix + _PROJECTION)
    if proj is None or proj.ndim != 2 or int(proj.shape[0]) != config["hidden_size"]:
        got = "missing" if proj is None else f"shape {format_shape(proj.shape)}"
        raise CheckpointError(
            f"{name}: cannot infer encoder 2's projection: {prefix}{_PROJECTION} is {got}, expected "
            f"({config['hidden_size']}, projection_dim)"
        )
    config["projection_dim"] = int(proj.shape[1])
    return config


def infer_text_time(
    state: Mapping[str, Tensor], published: Mapping[str, Any], pooled_dim: int, name: str
) -> dict[str, Any]:
    """The UNet's "text_time" fields. ``label_emb.0.0`` takes the pooled embedding (``pooled_dim``) plus
    the sinusoids of ``n`` time ids: ``n`` (base 6, refiner 5) from the published configs (``published``:
    a ``model_configs.json`` entry), the sinusoid width from the file."""
    key = ldm.UNET_PREFIX + "label_emb.0.0.weight"
    width = int(state[key].shape[1]) if key in state and state[key].ndim == 2 else -1
    unet = published["unet"]
    n_ids = (
        int(unet["projection_class_embeddings_input_dim"]) - int(published["text_encoder_2"]["projection_dim"])
    ) // int(unet["addition_time_embed_dim"])
    time_dim, rest = divmod(width - pooled_dim, n_ids)
    if width < 0 or rest or time_dim < 1:
        raise CheckpointError(
            f"{name}: {key} ({'missing' if width < 0 else f'{width} inputs'}) does not fit the pooled "
            f"embedding ({pooled_dim}, encoder 2's projection) plus {n_ids} time ids"
        )
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": width,
    }


def check_conditioning(
    unet_config: Mapping[str, Any],
    text_config: Mapping[str, Any] | None,
    text_config_2: Mapping[str, Any],
    name: str,
) -> None:
    """The UNet's context is both encoders' hidden states side by side (the refiner: encoder 2's)."""
    widths = [int(c["hidden_size"]) for c in (text_config, text_config_2) if c is not None]
    cross = unet_config.get("cross_attention_dim")
    if cross != sum(widths):
        raise CheckpointError(
            f"{name}: the UNet's cross_attention_dim ({cross}) differs from the text encoders' hidden sizes "
            f"({' + '.join(map(str, widths))}); the components do not belong together"
        )


# --------------------------------------------------------------------------- conversion


def convert_text(state: Mapping[str, Tensor], config: Mapping[str, Any], what: str) -> dict[str, Tensor]:
    """Encoder 1 in our ``TextEncoder``'s names (``position_ids``, a buffer, is ignored)."""
    root = TEXT_PREFIX + "text_model."
    key_map = {key: Source(root + key) for key in text_shapes(config)}
    ignore = {root + "embeddings.position_ids"} & set(state)
    return convert(state, key_map, text_shapes(config), TEXT_PREFIX, what, ignore=ignore)


def convert_text_2(
    state: Mapping[str, Tensor], config: Mapping[str, Any], family: str, what: str
) -> dict[str, Tensor]:
    """Encoder 2 in ``TextEncoderWithProjection``'s names: q/k/v split, ``text_projection`` transposed."""
    prefix = TEXT_2_PREFIX[family]
    key_map = {"text_model." + k: src for k, src in ldm.open_clip_key_map(config, prefix).items()}
    key_map[_PROJECTION + ".weight"] = Source(prefix + _PROJECTION, transpose=True)
    ignore = {prefix + "logit_scale", prefix + "attn_mask"} & set(state)
    return convert(state, key_map, text_2_shapes(config), prefix, what, ignore=ignore)
