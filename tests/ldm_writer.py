"""Write diffusers/transformers state dicts as an original LDM (CompVis / Stability AI) single file.

Test helper, deliberately independent of ``sdexport.loading``'s mapping tables: it rewrites each key with
its own rules (the reverse direction), so a round trip through ``load_checkpoint`` checks both; the
writer itself is cross-checked against diffusers' ``from_single_file`` in tests/test_loading.py.

    write_ldm_checkpoint(path, unet_sd, vae_sd, text_sd, family)

``family`` "sd1": HF CLIP text keys under ``cond_stage_model.transformer.text_model.`` (plus the
``position_ids`` buffer old checkpoints carry). "sd2": OpenCLIP keys under ``cond_stage_model.model.``
with q/k/v fused into ``attn.in_proj_*``, plus one extra random resblock, ``text_projection`` and
``logit_scale`` like the real files (SD2 conditions on the penultimate layer). The suffix picks the format:
``.safetensors``, or ``.ckpt``/``.pt`` (a ``{"state_dict": ..., "global_step": 0}`` torch pickle).

    write_sgm_checkpoint(path, unet_sd, vae_sd, text_sd, text_2_sd)    # SDXL; text_sd None: the refiner

SGM (Stability AI generative-models, SDXL): the UNet as above plus ``label_emb.0.{0,2}`` (diffusers'
``add_embedding``); encoder 1 (HF CLIP) under ``conditioner.embedders.0.transformer.text_model.``;
encoder 2 (a ``CLIPTextModelWithProjection`` state dict) as OpenCLIP under
``conditioner.embedders.1.model.`` (refiner: ``embedders.0``) with every layer, ``text_projection``
stored transposed and ``logit_scale``; the VAE under ``first_stage_model.``.
:func:`write_safetensors_streaming` writes real-size files tensor by tensor (random values from shapes).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "ldm_state_dict",
    "sgm_state_dict",
    "write_ldm_checkpoint",
    "write_safetensors_streaming",
    "write_sgm_checkpoint",
]

_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def _count(keys: list[str], pattern: str) -> int:
    found = {m.group(1) for k in keys if (m := re.match(pattern, k))}
    return len(found)


def _unet_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    keys = list(sd)
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    # Where each diffusers sub-module lives in the LDM input_blocks / output_blocks sequences.
    where: dict[str, str] = {}
    n = 1
    for i in range(levels):
        for j in range(_count(keys, rf"down_blocks\.{i}\.resnets\.(\d+)\.")):
            where[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            where[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
            n += 1
        if f"down_blocks.{i}.downsamplers.0.conv.weight" in sd:
            where[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{n}.0.op."
            n += 1
    n = 0
    for i in range(levels):
        count = _count(keys, rf"up_blocks\.{i}\.resnets\.(\d+)\.")
        for j in range(count):
            where[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n}.0."
            where[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
            n += 1
        if f"up_blocks.{i}.upsamplers.0.conv.weight" in sd:
            slot = 2 if f"up_blocks.{i}.attentions.0.norm.weight" in sd else 1
            where[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{n - 1}.{slot}.conv."
    where.update(
        {
            "conv_in.": "input_blocks.0.0.",
            "time_embedding.linear_1.": "time_embed.0.",
            "time_embedding.linear_2.": "time_embed.2.",
            "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL
            "add_embedding.linear_2.": "label_emb.0.2.",
            "mid_block.resnets.0.": "middle_block.0.",
            "mid_block.attentions.0.": "middle_block.1.",
            "mid_block.resnets.1.": "middle_block.2.",
            "conv_norm_out.": "out.0.",
            "conv_out.": "out.2.",
        }
    )
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        prefix = max((p for p in where if key.startswith(p)), key=len)
        rest = key[len(prefix) :]
        if ".resnets." in prefix:
            for new, old in _RESNET:
                if rest.startswith(new):
                    rest = old + rest[len(new) :]
                    break
        out["model.diffusion_model." + where[prefix] + rest] = value
    return out


def _vae_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    levels = _count(list(sd), r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: (
                f"decoder.up.{levels - 1 - int(m.group(1))}."
                + ("block." if m.group(2) == "resnets" else "upsample.")
            ),
            k,
        )
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v.")):
                k = k.replace(new, old)
            k = k.replace("to_out.0.", "proj_out.")
            if value.ndim == 2:  # the LDM VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + k] = value
    return out


def _text_sd1(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {
        "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in sd.items()
    }
    positions = out["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"].shape[0]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def _random_like(t: Tensor, gen: torch.Generator) -> Tensor:
    if t.is_meta:  # shape-only state dicts (real-size layout checks)
        return torch.empty_like(t)
    return torch.randn(t.shape, generator=gen, dtype=t.dtype)


def _open_clip(sd: Mapping[str, Tensor], p: str) -> dict[str, Tensor]:
    """A CLIPTextModel state dict as OpenCLIP's text tower under prefix ``p`` (q/k/v fused)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out: dict[str, Tensor] = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    for i in range(_count(list(sd), r"encoder\.layers\.(\d+)\.")):
        a = f"encoder.layers.{i}."
        b = f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{b}attn.in_proj_{leaf}"] = torch.cat(
                [sd[f"{a}self_attn.{n}_proj.{leaf}"] for n in ("q", "k", "v")], dim=0
            )
            out[f"{b}attn.out_proj.{leaf}"] = sd[f"{a}self_attn.out_proj.{leaf}"]
            out[f"{b}ln_1.{leaf}"] = sd[f"{a}layer_norm1.{leaf}"]
            out[f"{b}ln_2.{leaf}"] = sd[f"{a}layer_norm2.{leaf}"]
            out[f"{b}mlp.c_fc.{leaf}"] = sd[f"{a}mlp.fc1.{leaf}"]
            out[f"{b}mlp.c_proj.{leaf}"] = sd[f"{a}mlp.fc2.{leaf}"]
    return out


def _text_sd2(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    p = "cond_stage_model.model."
    out = _open_clip(sd, p)
    # The final OpenCLIP layer, which SD2 skips: random weights, right shapes.
    gen = torch.Generator().manual_seed(0)
    layers = _count(list(out), re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
    last = f"{p}transformer.resblocks.{layers - 1}."
    for k in [k for k in out if k.startswith(last)]:
        out[f"{p}transformer.resblocks.{layers}." + k[len(last) :]] = _random_like(out[k], gen)
    norm = out[p + "ln_final.weight"]
    width = norm.shape[0]
    out[p + "text_projection"] = _random_like(norm.new_empty(width, width), gen)
    out[p + "logit_scale"] = torch.tensor(4.6052)
    return out


def ldm_state_dict(
    unet_sd: Mapping[str, Tensor], vae_sd: Mapping[str, Tensor], text_sd: Mapping[str, Tensor], family: str
) -> dict[str, Tensor]:
    """The combined LDM state dict (see the module docstring)."""
    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be 'sd1' or 'sd2', got {family!r}")
    out = _unet_to_ldm(unet_sd)
    out.update(_vae_to_ldm(vae_sd))
    out.update(_text_sd1(text_sd) if family == "sd1" else _text_sd2(text_sd))
    # Non-model entries real checkpoints carry (diffusion schedule buffers, EMA bookkeeping).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    out["betas"] = betas.float()
    out["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return out


def write_ldm_checkpoint(
    path: str | Path,
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    text_sd: Mapping[str, Tensor],
    family: str,
) -> Path:
    """Write an LDM single file; ``.safetensors`` or ``.ckpt``/``.pt`` by suffix. Returns the path."""
    return _save(Path(path), ldm_state_dict(unet_sd, vae_sd, text_sd, family))


def sgm_state_dict(
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    text_sd: Mapping[str, Tensor] | None,
    text_2_sd: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """The combined SGM state dict of an SDXL base (``text_sd`` given) or refiner (``text_sd=None``)."""
    out = _unet_to_ldm(unet_sd)
    out.update(_vae_to_ldm(vae_sd))
    text_2_sd = dict(text_2_sd)
    projection = text_2_sd.pop("text_projection.weight")
    if text_sd is not None:
        p1 = "conditioner.embedders.0.transformer.text_model."
        out.update({p1 + k.removeprefix("text_model."): v for k, v in text_sd.items()})
        positions = text_sd[next(k for k in text_sd if k.endswith("position_embedding.weight"))].shape[0]
        out[p1 + "embeddings.position_ids"] = torch.arange(positions)[None]
    p2 = "conditioner.embedders.1.model." if text_sd is not None else "conditioner.embedders.0.model."
    out.update(_open_clip(text_2_sd, p2))
    out[p2 + "text_projection"] = projection.T  # OpenCLIP: pooled @ text_projection
    out[p2 + "logit_scale"] = torch.tensor(4.6052, device=projection.device)
    return out


def write_sgm_checkpoint(
    path: str | Path,
    unet_sd: Mapping[str, Tensor],
    vae_sd: Mapping[str, Tensor],
    text_sd: Mapping[str, Tensor] | None,
    text_2_sd: Mapping[str, Tensor],
) -> Path:
    """Write an SGM (SDXL) single file; ``.safetensors`` or ``.ckpt``/``.pt`` by suffix."""
    return _save(Path(path), sgm_state_dict(unet_sd, vae_sd, text_sd, text_2_sd))


def _save(path: Path, state: Mapping[str, Tensor]) -> Path:
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix in (".ckpt", ".pt"):
        torch.save({"state_dict": state, "global_step": 0}, str(path))
    else:
        raise ValueError(f"unsupported suffix {path.suffix!r}; use .safetensors or .ckpt")
    return path


_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64",
              torch.int32: "I32"}


def write_safetensors_streaming(
    path: str | Path, layout: Mapping[str, Tensor], make: Callable[[str, Tensor], Tensor]
) -> Path:
    """Write ``{key: make(key, layout[key])}`` as safetensors one tensor at a time (``layout`` may hold
    meta tensors: only shapes and dtypes are read), so real-size files never sit in memory whole."""
    path = Path(path)
    header: dict[str, object] = {}
    offset = 0
    for key, t in layout.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, t in layout.items():
            value = make(key, t).detach().to(t.dtype).contiguous()
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"{key}: made {tuple(value.shape)}, layout {tuple(t.shape)}")
            f.write(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return path
