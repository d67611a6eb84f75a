"""Config-driven enumeration of the expected state-dict keys and shapes.

For the Stable Diffusion 1.x/2.x subset of diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` and
transformers' ``CLIPTextModel``, these functions list every parameter name (in diffusers/transformers
vocabulary) with its shape, computed from the config alone. The loader checks converted state dicts
against them, so a checkpoint that does not fit its config is refused before any model is built. The
tables are tested against the real diffusers/transformers modules (instantiated on the meta device).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from .errors import CheckpointError

__all__ = [
    "clip_text_prefix",
    "text_shapes",
    "unet_shapes",
    "vae_shapes",
]

Shapes = dict[str, tuple[int, ...]]

# UNet config options whose non-default values describe architectures this loader does not handle
# (SDXL, class-conditioned, LCM, ...). Values are the diffusers defaults.
_UNET_DEFAULTS: dict[str, Any] = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "resnet_time_scale_shift": "default",
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
_VAE_DEFAULTS: dict[str, Any] = {
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


@functools.cache
def clip_text_prefix() -> str:
    """The prefix of ``CLIPTextModel`` parameter names in the installed transformers.

    transformers 4.x names them ``text_model.embeddings...``; 5.x dropped the wrapper
    (``embeddings...``) and renames old checkpoints when loading. The loader always returns the
    installed version's names, so ``CLIPTextModel(config).load_state_dict(ckpt.text_encoder)`` works.
    """
    try:
        major = int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return ""
    return "text_model." if major < 5 else ""


def _per_level(value: Any, levels: int, name: str) -> list[Any]:
    if isinstance(value, list | tuple):
        if len(value) != levels:
            raise CheckpointError(f"unet config: {name} has {len(value)} entries for {levels} levels")
        return list(value)
    return [value] * levels


def _check_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> None:
    odd = sorted(
        f"{k}={config[k]!r}" for k, default in defaults.items() if k in config and config[k] != default
    )
    if odd:
        raise CheckpointError(
            f"{what} config uses options outside Stable Diffusion 1.x/2.x that are not supported: "
            + ", ".join(odd)
        )


def _conv(prefix: str, out_ch: int, in_ch: int, k: int, shapes: Shapes) -> None:
    shapes[prefix + "weight"] = (out_ch, in_ch, k, k)
    shapes[prefix + "bias"] = (out_ch,)


def _linear(prefix: str, out_f: int, in_f: int, shapes: Shapes, bias: bool = True) -> None:
    shapes[prefix + "weight"] = (out_f, in_f)
    if bias:
        shapes[prefix + "bias"] = (out_f,)


def _norm(prefix: str, ch: int, shapes: Shapes) -> None:
    shapes[prefix + "weight"] = (ch,)
    shapes[prefix + "bias"] = (ch,)


def _resnet(prefix: str, in_ch: int, out_ch: int, temb: int | None, shapes: Shapes) -> None:
    _norm(prefix + "norm1.", in_ch, shapes)
    _conv(prefix + "conv1.", out_ch, in_ch, 3, shapes)
    if temb is not None:
        _linear(prefix + "time_emb_proj.", out_ch, temb, shapes)
    _norm(prefix + "norm2.", out_ch, shapes)
    _conv(prefix + "conv2.", out_ch, out_ch, 3, shapes)
    if in_ch != out_ch:
        _conv(prefix + "conv_shortcut.", out_ch, in_ch, 1, shapes)


def _transformer(
    prefix: str, ch: int, heads: int, depth: int, cross_dim: int, linear_proj: bool, shapes: Shapes
) -> None:
    if heads <= 0 or ch // heads == 0:
        raise CheckpointError(f"unet config: {heads} attention heads do not fit {ch} channels")
    inner = heads * (ch // heads)
    _norm(prefix + "norm.", ch, shapes)
    if linear_proj:
        _linear(prefix + "proj_in.", inner, ch, shapes)
    else:
        _conv(prefix + "proj_in.", inner, ch, 1, shapes)
    for t in range(depth):
        p = f"{prefix}transformer_blocks.{t}."
        for n in (1, 2, 3):
            _norm(f"{p}norm{n}.", inner, shapes)
        for attn, kv_dim in (("attn1", inner), ("attn2", cross_dim)):
            _linear(f"{p}{attn}.to_q.", inner, inner, shapes, bias=False)
            _linear(f"{p}{attn}.to_k.", inner, kv_dim, shapes, bias=False)
            _linear(f"{p}{attn}.to_v.", inner, kv_dim, shapes, bias=False)
            _linear(f"{p}{attn}.to_out.0.", inner, inner, shapes)
        _linear(f"{p}ff.net.0.proj.", inner * 4 * 2, inner, shapes)
        _linear(f"{p}ff.net.2.", inner, inner * 4, shapes)
    if linear_proj:
        _linear(prefix + "proj_out.", ch, inner, shapes)
    else:
        _conv(prefix + "proj_out.", ch, inner, 1, shapes)


def unet_shapes(config: Mapping[str, Any]) -> Shapes:
    """Every ``UNet2DConditionModel`` parameter name -> shape for an SD 1.x/2.x style config."""
    _check_defaults(config, _UNET_DEFAULTS, "unet")
    boc: Sequence[int] = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    down_types: Sequence[str] = list(
        config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    )
    up_types: Sequence[str] = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    levels = len(boc)
    if len(down_types) != levels or len(up_types) != levels:
        raise CheckpointError(
            f"unet config: {len(down_types)} down / {len(up_types)} up block types for {levels} levels"
        )
    known_down = {"CrossAttnDownBlock2D", "DownBlock2D"}
    known_up = {"CrossAttnUpBlock2D", "UpBlock2D"}
    odd = [t for t in down_types if t not in known_down] + [t for t in up_types if t not in known_up]
    if odd:
        raise CheckpointError(f"unet config: unsupported block types {sorted(set(odd))}")
    lpb = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    heads_cfg = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _per_level(heads_cfg, levels, "attention heads")
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    cross = _per_level(config.get("cross_attention_dim", 1280), levels, "cross_attention_dim")
    linear_proj = bool(config.get("use_linear_projection", False))
    in_ch = int(config.get("in_channels", 4))
    out_ch = int(config.get("out_channels", 4))
    temb = boc[0] * 4

    s: Shapes = {}
    _conv("conv_in.", boc[0], in_ch, 3, s)
    _linear("time_embedding.linear_1.", temb, boc[0], s)
    _linear("time_embedding.linear_2.", temb, temb, s)

    out = boc[0]
    for i, kind in enumerate(down_types):
        prev, out = out, boc[i]
        for j in range(lpb[i]):
            _resnet(f"down_blocks.{i}.resnets.{j}.", prev if j == 0 else out, out, temb, s)
            if kind == "CrossAttnDownBlock2D":
                _transformer(
                    f"down_blocks.{i}.attentions.{j}.", out, heads[i], depth[i], cross[i], linear_proj, s
                )
        if i < levels - 1:
            _conv(f"down_blocks.{i}.downsamplers.0.conv.", out, out, 3, s)

    mid = boc[-1]
    _resnet("mid_block.resnets.0.", mid, mid, temb, s)
    _transformer("mid_block.attentions.0.", mid, heads[-1], depth[-1], cross[-1], linear_proj, s)
    _resnet("mid_block.resnets.1.", mid, mid, temb, s)

    rboc, rheads, rdepth, rcross, rlpb = boc[::-1], heads[::-1], depth[::-1], cross[::-1], lpb[::-1]
    out = rboc[0]
    for i, kind in enumerate(up_types):
        prev, out = out, rboc[i]
        skip_in = rboc[min(i + 1, levels - 1)]
        n = rlpb[i] + 1
        for j in range(n):
            res_skip = skip_in if j == n - 1 else out
            res_in = prev if j == 0 else out
            _resnet(f"up_blocks.{i}.resnets.{j}.", res_in + res_skip, out, temb, s)
            if kind == "CrossAttnUpBlock2D":
                _transformer(
                    f"up_blocks.{i}.attentions.{j}.", out, rheads[i], rdepth[i], rcross[i], linear_proj, s
                )
        if i < levels - 1:
            _conv(f"up_blocks.{i}.upsamplers.0.conv.", out, out, 3, s)

    _norm("conv_norm_out.", boc[0], s)
    _conv("conv_out.", out_ch, boc[0], 3, s)
    return s


def _vae_attention(prefix: str, ch: int, shapes: Shapes) -> None:
    _norm(prefix + "group_norm.", ch, shapes)
    for name in ("to_q.", "to_k.", "to_v.", "to_out.0."):
        _linear(prefix + name, ch, ch, shapes)


def vae_shapes(config: Mapping[str, Any]) -> Shapes:
    """Every ``AutoencoderKL`` parameter name -> shape for an SD style config."""
    _check_defaults(config, _VAE_DEFAULTS, "vae")
    boc: Sequence[int] = list(config.get("block_out_channels", (64,)))
    levels = len(boc)
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(key, [want] * levels))
        if len(types) != levels or any(t != want for t in types):
            raise CheckpointError(f"vae config: {key} must be {levels} x {want}, got {types}")
    lpb = int(config.get("layers_per_block", 1))
    latent = int(config.get("latent_channels", 4))
    in_ch = int(config.get("in_channels", 3))
    out_ch = int(config.get("out_channels", 3))

    s: Shapes = {}
    _conv("encoder.conv_in.", boc[0], in_ch, 3, s)
    out = boc[0]
    for i in range(levels):
        prev, out = out, boc[i]
        for j in range(lpb):
            _resnet(f"encoder.down_blocks.{i}.resnets.{j}.", prev if j == 0 else out, out, None, s)
        if i < levels - 1:
            _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv.", out, out, 3, s)
    for part in ("encoder", "decoder"):
        _resnet(f"{part}.mid_block.resnets.0.", boc[-1], boc[-1], None, s)
        _vae_attention(f"{part}.mid_block.attentions.0.", boc[-1], s)
        _resnet(f"{part}.mid_block.resnets.1.", boc[-1], boc[-1], None, s)
    _norm("encoder.conv_norm_out.", boc[-1], s)
    _conv("encoder.conv_out.", 2 * latent, boc[-1], 3, s)

    _conv("decoder.conv_in.", boc[-1], latent, 3, s)
    rboc = boc[::-1]
    out = rboc[0]
    for i in range(levels):
        prev, out = out, rboc[i]
        for j in range(lpb + 1):
            _resnet(f"decoder.up_blocks.{i}.resnets.{j}.", prev if j == 0 else out, out, None, s)
        if i < levels - 1:
            _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv.", out, out, 3, s)
    _norm("decoder.conv_norm_out.", boc[0], s)
    _conv("decoder.conv_out.", out_ch, boc[0], 3, s)

    _conv("quant_conv.", 2 * latent, 2 * latent, 1, s)
    _conv("post_quant_conv.", latent, latent, 1, s)
    return s


def text_shapes(config: Mapping[str, Any]) -> Shapes:
    """Every ``CLIPTextModel`` parameter name -> shape (installed transformers' naming)."""
    hidden = int(config.get("hidden_size", 512))
    inter = int(config.get("intermediate_size", 2048))
    layers = int(config.get("num_hidden_layers", 12))
    vocab = int(config.get("vocab_size", 49408))
    positions = int(config.get("max_position_embeddings", 77))
    p = clip_text_prefix()
    s: Shapes = {
        f"{p}embeddings.token_embedding.weight": (vocab, hidden),
        f"{p}embeddings.position_embedding.weight": (positions, hidden),
    }
    for i in range(layers):
        q = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(f"{q}self_attn.{proj}.", hidden, hidden, s)
        _norm(q + "layer_norm1.", hidden, s)
        _linear(q + "mlp.fc1.", inter, hidden, s)
        _linear(q + "mlp.fc2.", hidden, inter, s)
        _norm(q + "layer_norm2.", hidden, s)
    _norm(f"{p}final_layer_norm.", hidden, s)
    return s
