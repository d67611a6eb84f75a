"""Original LDM / CompVis single-file checkpoints: architecture inference and the key mapping.

The mapping is one explicit table per component, built from the config: ``{diffusers_key: ldm_key}``
(:func:`unet_key_map`, :func:`vae_key_map`, :func:`text_key_map`). Every expected diffusers/transformers
parameter (see :mod:`.architecture`) gets exactly one source key, so converting is a lookup and anything
left over or absent is reported. Layout facts (block numbering, ResBlock layer indices, OpenCLIP's fused
``in_proj``) follow the original CompVis / Stability AI model code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .architecture import text_shapes, unet_shapes, vae_shapes
from .errors import CheckpointError
from .keymap import Source, convert

__all__ = [
    "SD1_TEXT_PREFIX",
    "SD2_TEXT_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "Source",
    "convert",
    "convert_text",
    "detect_family",
    "infer_clip_config",
    "infer_open_clip_config",
    "infer_text_config",
    "infer_unet_config",
    "infer_vae_config",
    "open_clip_key_map",
    "text_key_map",
    "unet_key_map",
    "vae_key_map",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."


# Sub-module renames inside one mapped module: diffusers name -> LDM name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_SAME: dict[str, str] = {}  # transformer blocks, convs: identical names below the module

ModuleMap = dict[str, tuple[str, dict[str, str]]]


def _levels(config: Mapping[str, Any]) -> tuple[int, list[int]]:
    levels = len(config["block_out_channels"])
    lpb = config.get("layers_per_block", 2)
    return levels, list(lpb) if isinstance(lpb, list | tuple) else [int(lpb)] * levels


def _unet_modules(config: Mapping[str, Any]) -> ModuleMap:
    levels, lpb = _levels(config)
    up_types = list(config["up_block_types"])
    m: ModuleMap = {
        "conv_in.": ("input_blocks.0.0.", _SAME),
        "time_embedding.linear_1.": ("time_embed.0.", _SAME),
        "time_embedding.linear_2.": ("time_embed.2.", _SAME),
        "add_embedding.linear_1.": ("label_emb.0.0.", _SAME),  # SDXL "text_time" (SGM's label_emb)
        "add_embedding.linear_2.": ("label_emb.0.2.", _SAME),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", _SAME),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
        "conv_norm_out.": ("out.0.", _SAME),
        "conv_out.": ("out.2.", _SAME),
    }
    idx = 1  # input_blocks.0 is conv_in
    for i in range(levels):
        for j in range(lpb[i]):
            m[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{idx}.0.", _UNET_RESNET)
            m[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{idx}.1.", _SAME)
            idx += 1
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{idx}.0.op.", _SAME)
            idx += 1
    idx = 0
    for i in range(levels):
        n = lpb[levels - 1 - i] + 1
        for j in range(n):
            m[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{idx}.0.", _UNET_RESNET)
            m[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{idx}.1.", _SAME)
            if j == n - 1 and i < levels - 1:
                # The upsampler follows the ResBlock (and the SpatialTransformer, when there is one).
                pos = 2 if up_types[i] == "CrossAttnUpBlock2D" else 1
                m[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{idx}.{pos}.conv.", _SAME)
            idx += 1
    return m


def _vae_modules(config: Mapping[str, Any]) -> ModuleMap:
    levels = len(config["block_out_channels"])
    lpb = int(config.get("layers_per_block", 1))
    m: ModuleMap = {
        "quant_conv.": ("quant_conv.", _SAME),
        "post_quant_conv.": ("post_quant_conv.", _SAME),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in."] = (f"{part}.conv_in.", _SAME)
        m[f"{part}.conv_out."] = (f"{part}.conv_out.", _SAME)
        m[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", _SAME)
        m[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET)
        m[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
        m[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET)
    for i in range(levels):
        for j in range(lpb):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", _SAME)
        # The LDM decoder numbers its levels from the lowest resolution up; diffusers from the top.
        ldm = levels - 1 - i
        for j in range(lpb + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{ldm}.block.{j}.", _VAE_RESNET)
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{ldm}.upsample.conv.", _SAME)
    return m


def _apply(modules: ModuleMap, keys: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for key in keys:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:n]) + "."
            if module in modules:
                break
        else:
            raise AssertionError(f"no LDM mapping rule for {key}")  # a bug in the tables, not the file
        ldm_module, renames = modules[module]
        rest = key[len(module) :]
        for new, old in renames.items():
            if rest.startswith(new + "."):
                rest = old + rest[len(new) :]
                break
        out[key] = Source(prefix + ldm_module + rest)
    return out


def unet_key_map(config: Mapping[str, Any]) -> dict[str, Source]:
    """``{diffusers UNet key: LDM key}`` for every parameter of the configured UNet."""
    return _apply(_unet_modules(config), unet_shapes(config), UNET_PREFIX)


def vae_key_map(config: Mapping[str, Any]) -> dict[str, Source]:
    """``{diffusers AutoencoderKL key: LDM key}`` for every parameter of the configured VAE."""
    return _apply(_vae_modules(config), vae_shapes(config), VAE_PREFIX)


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_key_map(config: Mapping[str, Any], prefix: str) -> dict[str, Source]:
    """``{CLIPTextModel key: OpenCLIP key under prefix}``: renamed modules, ``positional_embedding`` as a
    bare tensor, q/k/v fused in ``attn.in_proj_weight``/``in_proj_bias`` (rows q, k, v)."""
    out: dict[str, Source] = {}
    for key in text_shapes(config):
        if key == "embeddings.token_embedding.weight":
            out[key] = Source(prefix + "token_embedding.weight")
        elif key == "embeddings.position_embedding.weight":
            out[key] = Source(prefix + "positional_embedding")
        elif key.startswith("final_layer_norm."):
            out[key] = Source(prefix + "ln_final." + key.split(".")[-1])
        else:
            match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
            if match is None:
                raise AssertionError(f"no OpenCLIP mapping rule for {key}")
            layer, module, leaf = match.groups()
            block = f"{prefix}transformer.resblocks.{layer}."
            qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
            if module in qkv:
                out[key] = Source(f"{block}attn.in_proj_{leaf}", qkv[module])
            else:
                out[key] = Source(f"{block}{_OPENCLIP_LAYER[module]}.{leaf}")
    return out


def text_key_map(config: Mapping[str, Any], family: str, *, legacy_sd1: bool = False) -> dict[str, Source]:
    """``{text-encoder key: LDM key}`` (keys without transformers 4's ``text_model.`` level).

    SD1 stores a Hugging Face CLIP text model under ``cond_stage_model.transformer.text_model.``
    (``legacy_sd1``: very old files without the ``text_model.`` level). SD2 stores OpenCLIP under
    ``cond_stage_model.model.`` (:func:`open_clip_key_map`). Only the first ``num_hidden_layers`` of
    OpenCLIP's resblocks are used (SD2 conditions on the penultimate layer, then the final layer norm).
    """
    if family != "sd1":
        return open_clip_key_map(config, SD2_TEXT_PREFIX)
    root = SD1_TEXT_PREFIX + ("" if legacy_sd1 else "text_model.")
    return {key: Source(root + key) for key in text_shapes(config)}


def _ignorable_text_keys(state: Mapping[str, Tensor], family: str, layers: int) -> set[str]:
    """Source keys of the text encoder that are known and deliberately unused."""
    if family == "sd1":
        return {k for k in state if k.startswith(SD1_TEXT_PREFIX) and k.endswith("embeddings.position_ids")}
    ignored = {SD2_TEXT_PREFIX + n for n in ("text_projection", "logit_scale", "attn_mask")}
    pattern = re.compile(re.escape(SD2_TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    for k in state:
        match = pattern.match(k)
        if match is not None and int(match.group(1)) >= layers:
            ignored.add(k)  # the layers after the one SD2 conditions on
    return ignored & set(state)


def convert_text(
    state: Mapping[str, Tensor], config: Mapping[str, Any], family: str, what: str
) -> dict[str, Tensor]:
    """The text encoder of an LDM checkpoint in our ``TextEncoder``'s naming (see :func:`text_key_map`)."""
    legacy = (
        family == "sd1" and (SD1_TEXT_PREFIX + "text_model.embeddings.token_embedding.weight") not in state
    )
    key_map = text_key_map(config, family, legacy_sd1=legacy)
    prefix = SD1_TEXT_PREFIX if family == "sd1" else SD2_TEXT_PREFIX
    ignore = _ignorable_text_keys(state, family, int(config["num_hidden_layers"]))
    return convert(state, key_map, text_shapes(config), prefix, what, ignore=ignore)


# --------------------------------------------------------------------------- architecture inference


def detect_family(state: Mapping[str, Tensor], name: str) -> str:
    """``"sd1"`` (HF CLIP text encoder) or ``"sd2"`` (OpenCLIP), from the key names."""
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(
            f"{name}: not a Stable Diffusion LDM checkpoint: no '{UNET_PREFIX}*' keys "
            f"({len(state)} tensors read)"
        )
    if UNET_PREFIX + "label_emb.0.0.weight" in state:
        raise CheckpointError(
            f"{name}: a UNet with added embeddings (label_emb) but no SGM text encoders "
            "('conditioner.embedders.*'): class-conditioned / upscaler UNets are not supported"
        )
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in state):
        return "sd1"
    raise CheckpointError(
        f"{name}: no text encoder found (neither '{SD1_TEXT_PREFIX}*' nor '{SD2_TEXT_PREFIX}*' keys)"
    )


def _need(state: Mapping[str, Tensor], key: str, name: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{name}: cannot infer the architecture: missing key {key}")
    return state[key]


def _indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := regex.match(k)) is not None}
    return sorted(found)


def infer_unet_config(state: Mapping[str, Tensor], name: str) -> dict[str, Any]:
    """The UNet's shape-determined config fields from LDM key shapes (heads/norms come from defaults)."""
    p = re.escape(UNET_PREFIX)
    conv_in = _need(state, UNET_PREFIX + "input_blocks.0.0.weight", name)
    conv_out = _need(state, UNET_PREFIX + "out.2.weight", name)
    n_in = len(_indices(state, p + r"input_blocks\.(\d+)\."))
    n_out = len(_indices(state, p + r"output_blocks\.(\d+)\."))
    downs = _indices(state, p + r"input_blocks\.(\d+)\.0\.op\.weight")
    lpb = downs[0] - 1 if downs else n_in - 1
    levels = n_out // (lpb + 1) if lpb > 0 else 0
    if lpb <= 0 or n_in != levels * (lpb + 1) or n_out != levels * (lpb + 1) or len(downs) != levels - 1:
        raise CheckpointError(
            f"{name}: unrecognised UNet layout ({n_in} input blocks, {n_out} output blocks, "
            f"downsamplers at {downs})"
        )
    boc: list[int] = []
    down_types: list[str] = []
    up_types: list[str] = []
    for b in range(levels):
        first = 1 + b * (lpb + 1)
        boc.append(
            int(_need(state, f"{UNET_PREFIX}input_blocks.{first}.0.out_layers.3.weight", name).shape[0])
        )
        has_attn = f"{UNET_PREFIX}input_blocks.{first}.1.proj_in.weight" in state
        down_types.append("CrossAttnDownBlock2D" if has_attn else "DownBlock2D")
        has_attn = f"{UNET_PREFIX}output_blocks.{b * (lpb + 1)}.1.proj_in.weight" in state
        up_types.append("CrossAttnUpBlock2D" if has_attn else "UpBlock2D")
    proj_in = _need(state, UNET_PREFIX + "middle_block.1.proj_in.weight", name)
    to_k = _need(state, UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", name)
    # Transformer depth per level (SDXL: 1, 2, 10); diffusers' mid block takes the last level's.
    mid = len(_indices(state, p + r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    depths: list[int | None] = [
        len(_indices(state, p + rf"input_blocks\.{1 + b * (lpb + 1)}\.1\.transformer_blocks\.(\d+)\."))
        if down_types[b] == "CrossAttnDownBlock2D"
        else None
        for b in range(levels)
    ]
    depths[-1] = depths[-1] or mid
    config: dict[str, Any] = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_out.shape[0]),
        "block_out_channels": boc,
        "layers_per_block": lpb,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "cross_attention_dim": int(to_k.shape[1]),
        "use_linear_projection": proj_in.ndim == 2,
    }
    distinct = {d for d in depths if d is not None}
    config["transformer_layers_per_block"] = distinct.pop() if len(distinct) == 1 else [d or 1 for d in depths]
    return config


def infer_vae_config(state: Mapping[str, Tensor], name: str) -> dict[str, Any]:
    """The VAE's shape-determined config fields from LDM key shapes."""
    p = re.escape(VAE_PREFIX)
    levels = len(_indices(state, p + r"encoder\.down\.(\d+)\."))
    lpb = len(_indices(state, p + r"encoder\.down\.0\.block\.(\d+)\."))
    if levels == 0 or lpb == 0:
        raise CheckpointError(f"{name}: no VAE found (no '{VAE_PREFIX}encoder.down.*' keys)")
    boc = [
        int(_need(state, f"{VAE_PREFIX}encoder.down.{i}.block.0.conv1.weight", name).shape[0])
        for i in range(levels)
    ]
    return {
        "in_channels": int(_need(state, VAE_PREFIX + "encoder.conv_in.weight", name).shape[1]),
        "out_channels": int(_need(state, VAE_PREFIX + "decoder.conv_out.weight", name).shape[0]),
        "latent_channels": int(_need(state, VAE_PREFIX + "decoder.conv_in.weight", name).shape[1]),
        "block_out_channels": boc,
        "layers_per_block": lpb,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def infer_clip_config(state: Mapping[str, Tensor], root: str, name: str) -> dict[str, Any]:
    """Shape-determined ``CLIPTextConfig`` fields of a Hugging Face CLIP text model under ``root``."""
    token = _need(state, root + "embeddings.token_embedding.weight", name)
    pos = _need(state, root + "embeddings.position_embedding.weight", name)
    fc1 = _need(state, root + "encoder.layers.0.mlp.fc1.weight", name)
    layers = len(_indices(state, re.escape(root) + r"encoder\.layers\.(\d+)\."))
    return _text_fields(token, pos, fc1, layers)


def infer_open_clip_config(state: Mapping[str, Tensor], prefix: str, name: str, *, skip: int) -> dict[str, Any]:
    """Shape-determined ``CLIPTextConfig`` fields of an OpenCLIP text tower under ``prefix``; the last
    ``skip`` resblocks are left out (SD2: 1, the penultimate-layer convention; SDXL: 0)."""
    token = _need(state, prefix + "token_embedding.weight", name)
    pos = _need(state, prefix + "positional_embedding", name)
    fc1 = _need(state, prefix + "transformer.resblocks.0.mlp.c_fc.weight", name)
    blocks = len(_indices(state, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    if blocks - skip < 1:
        raise CheckpointError(
            f"{name}: OpenCLIP text encoder with {blocks} resblocks; at least {skip + 1} are needed"
        )
    return _text_fields(token, pos, fc1, blocks - skip)


def _text_fields(token: Tensor, pos: Tensor, fc1: Tensor, layers: int) -> dict[str, Any]:
    return {
        "vocab_size": int(token.shape[0]),
        "hidden_size": int(token.shape[1]),
        "max_position_embeddings": int(pos.shape[0]),
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": layers,
    }


def infer_text_config(state: Mapping[str, Tensor], family: str, name: str) -> dict[str, Any]:
    """The text encoder's shape-determined ``CLIPTextConfig`` fields from LDM key shapes.

    For SD2 the layer count is one less than OpenCLIP's resblocks (the penultimate-layer convention).
    """
    if family != "sd1":
        return infer_open_clip_config(state, SD2_TEXT_PREFIX, name, skip=1)
    root = SD1_TEXT_PREFIX + "text_model."
    if root + "embeddings.token_embedding.weight" not in state:
        root = SD1_TEXT_PREFIX
    return infer_clip_config(state, root, name)
