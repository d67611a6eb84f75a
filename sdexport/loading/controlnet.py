"""ControlNet checkpoints: diffusers ``ControlNetModel`` folders and lllyasviel's single files
(``control_model.*`` keys, the ``cldm`` layout; safetensors, or torch pickles read with ``weights_only``)
-> a diffusers config dict and a state dict in diffusers names, checked strictly against the config.

The single-file layout is the LDM UNet's input half (``input_blocks``, ``middle_block``, ``time_embed``,
SDXL's ``label_emb``) plus ``input_hint_block`` (the conditioning embedding: convs at 0, 2, 4, ...,
SiLUs between), ``zero_convs.{i}.0`` (one per skip) and ``middle_block_out.0``. Head counts are not in
the tensors: SD 1.x's are 8, SD 2.x's and SDXL's 64-channel heads (the published rule); ``config``
overrides them (or anything else) for models that differ.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdexport.models.controlnet import ControlNet, ControlNetConfig

from .checkpoint import family_defaults
from .errors import CheckpointError, check_state_dict
from .files import TORCH_SUFFIXES, read_json, read_weights
from .folder import _read_component_weights
from .keymap import Source, convert
from .ldm import UNET_PREFIX, _apply, _unet_modules

__all__ = ["CONTROL_PREFIX", "ControlCheckpoint", "controlnet_family", "controlnet_key_map", "controlnet_shapes",
           "infer_controlnet_config", "is_controlnet", "load_controlnet"]

CONTROL_PREFIX = "control_model."
_WEIGHTS = "diffusion_pytorch_model"
_SAME: dict[str, str] = {}


@dataclass(frozen=True)
class ControlCheckpoint:
    family: str  # "sd1" | "sd2" | "sdxl": the base models it pairs with
    config: dict[str, Any]  # diffusers ControlNetModel config
    state: dict[str, Tensor]  # diffusers ControlNetModel names
    source: Path


def controlnet_family(config: Mapping[str, Any]) -> str:
    """SDXL when the model takes "text_time" conditioning; SD 2.x for OpenCLIP-H width (1024) or linear
    transformer projections; else SD 1.x. The pipeline checks the pair's shapes besides."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    cad = config.get("cross_attention_dim", 1280)
    if cad == 1024 or config.get("use_linear_projection", False):
        return "sd2"
    return "sd1"


def _parse(config: Mapping[str, Any]) -> ControlNetConfig:
    try:  # head and group counts change no shape; values that always fit, so any model gets its key report
        return ControlNetConfig.from_diffusers({**config, "attention_head_dim": 1, "norm_num_groups": 1})
    except ValueError as exc:
        raise CheckpointError(f"controlnet config is not supported: {exc}") from None


@functools.cache
def _shapes(config: ControlNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = ControlNet(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def controlnet_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every ``ControlNetModel`` parameter name -> shape for a diffusers config."""
    return dict(_shapes(_parse(config)))


def controlnet_key_map(config: Mapping[str, Any]) -> dict[str, Source]:
    """``{diffusers ControlNetModel key: control_model.* key}`` for every parameter of the config."""
    parsed = _parse(config)
    unet_like = {**config, "up_block_types": list(parsed.unet.up_block_types),
                 "block_out_channels": list(parsed.unet.block_out_channels)}
    modules = _unet_modules(unet_like)
    blocks = 2 * (len(parsed.conditioning_embedding_out_channels) - 1)
    modules["controlnet_cond_embedding.conv_in."] = ("input_hint_block.0.", _SAME)
    for j in range(blocks):
        modules[f"controlnet_cond_embedding.blocks.{j}."] = (f"input_hint_block.{2 * (j + 1)}.", _SAME)
    modules["controlnet_cond_embedding.conv_out."] = (f"input_hint_block.{2 * (blocks + 1)}.", _SAME)
    for k in range(len(parsed.unet.residuals) - 1):
        modules[f"controlnet_down_blocks.{k}."] = (f"zero_convs.{k}.0.", _SAME)
    modules["controlnet_mid_block."] = ("middle_block_out.0.", _SAME)
    return _apply(modules, controlnet_shapes(config), CONTROL_PREFIX)


def _indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := regex.match(k)) is not None})


def _need(state: Mapping[str, Tensor], key: str, name: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{name}: cannot infer the ControlNet's architecture: missing key {key}")
    return state[key]


def _infer_encoder(state: Mapping[str, Tensor], name: str) -> dict[str, Any]:
    """The UNet input half's shape-determined config fields (as ``ldm.infer_unet_config``)."""
    P, p = CONTROL_PREFIX, re.escape(CONTROL_PREFIX)
    conv_in = _need(state, P + "input_blocks.0.0.weight", name)
    n_in = len(_indices(state, p + r"input_blocks\.(\d+)\."))
    downs = _indices(state, p + r"input_blocks\.(\d+)\.0\.op\.weight")
    lpb = downs[0] - 1 if downs else n_in - 1
    levels = len(downs) + 1
    if lpb <= 0 or n_in != levels * (lpb + 1) or downs != [(b + 1) * (lpb + 1) for b in range(levels - 1)]:
        raise CheckpointError(f"{name}: unrecognised ControlNet layout ({n_in} input blocks, downsamplers at {downs})")
    boc, types, depths = [], [], []
    for b in range(levels):
        first = 1 + b * (lpb + 1)
        boc.append(int(_need(state, f"{P}input_blocks.{first}.0.out_layers.3.weight", name).shape[0]))
        attn = f"{P}input_blocks.{first}.1.proj_in.weight" in state
        types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depths.append(len(_indices(state, p + rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")) or None)
    proj_in = _need(state, P + "middle_block.1.proj_in.weight", name)
    to_k = _need(state, P + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", name)
    depths[-1] = depths[-1] or len(_indices(state, p + r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    distinct = {d for d in depths if d is not None}
    return {
        "in_channels": int(conv_in.shape[1]),
        "block_out_channels": boc,
        "layers_per_block": lpb,
        "down_block_types": types,
        "cross_attention_dim": int(to_k.shape[1]),
        "use_linear_projection": proj_in.ndim == 2,
        "transformer_layers_per_block": distinct.pop() if len(distinct) == 1 else [d or 1 for d in depths],
    }


def infer_controlnet_config(state: Mapping[str, Tensor], name: str,
                            override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A diffusers config from ``control_model.*`` key shapes, the family's published defaults and
    ``override`` (last)."""
    p = re.escape(CONTROL_PREFIX)
    hint = _indices(state, p + r"input_hint_block\.(\d+)\.weight")
    if not hint or hint != list(range(0, 2 * len(hint), 2)):
        raise CheckpointError(f"{name}: unrecognised input_hint_block layout (convs at {hint})")
    inferred = _infer_encoder(state, name)
    label = state.get(CONTROL_PREFIX + "label_emb.0.0.weight")
    widths = [int(state[f"{CONTROL_PREFIX}input_hint_block.{i}.weight"].shape[0]) for i in hint[:-1:2]]
    first = state[CONTROL_PREFIX + "input_hint_block.0.weight"]
    config: dict[str, Any] = {
        **inferred,
        "conditioning_channels": int(first.shape[1]),
        "conditioning_embedding_out_channels": widths,
    }
    if label is not None:
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=int(label.shape[1]))
    family = controlnet_family({**config, **(override or {})})
    defaults = family_defaults(family, "epsilon")["unet"]
    keep = ("attention_head_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift",
            "downsample_padding", "mid_block_scale_factor", "addition_time_embed_dim", "upcast_attention")
    out = {k: defaults[k] for k in keep if k in defaults}
    if family != "sd1":
        out["attention_head_dim"] = [max(1, c // 64) for c in config["block_out_channels"]]
    out.update(config)
    out.update(override or {})
    return out


def _from_single_file(path: Path, override: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    state = read_weights(path)
    if not any(k.startswith(CONTROL_PREFIX) for k in state):
        if any(k.startswith("input_hint_block.") for k in state):  # saved without the wrapper's prefix
            state = {CONTROL_PREFIX + k: v for k, v in state.items()}
        elif any(k.startswith(UNET_PREFIX) for k in state):
            raise CheckpointError(f"{path}: this is a Stable Diffusion checkpoint, not a ControlNet "
                                  f"(no '{CONTROL_PREFIX}*' keys)")
        elif any(k.startswith("controlnet_cond_embedding.") for k in state):
            raise CheckpointError(f"{path}: a ControlNet in diffusers names: load the folder holding it "
                                  "and its config.json instead")
        else:
            raise CheckpointError(f"{path}: not a ControlNet checkpoint (no '{CONTROL_PREFIX}input_hint_block' "
                                  f"keys; {len(state)} tensors read)")
    config = infer_controlnet_config(state, str(path), override)
    converted = convert(state, controlnet_key_map(config), controlnet_shapes(config), CONTROL_PREFIX,
                        f"{path} (controlnet)")
    return config, converted


def _folder(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "controlnet" / "config.json").is_file():  # a pipeline folder's controlnet/
        return path / "controlnet"
    raise CheckpointError(f"{path}: not a ControlNet folder (no config.json; a diffusers ControlNetModel "
                          "folder holds config.json and diffusion_pytorch_model.safetensors)")


def _from_folder(path: Path, override: Mapping[str, Any] | None,
                 variant: str | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    folder = _folder(path)
    raw = read_json(folder / "config.json")
    cls = raw.get("_class_name")
    if cls != "ControlNetModel":
        raise CheckpointError(f"{folder}/config.json: a {cls or 'model without _class_name'}, not a "
                              "ControlNetModel")
    config = {k: v for k, v in raw.items() if not k.startswith("_")}
    config.update(override or {})
    state = _read_component_weights(folder, _WEIGHTS, _WEIGHTS, variant)
    check_state_dict(state, controlnet_shapes(config), f"{folder} (controlnet)")
    return config, state


def is_controlnet(path: str | Path) -> bool:
    """Whether `path` looks like a ControlNet (folder with a ControlNetModel config.json, or a single file
    with ``control_model.*`` / ``input_hint_block.*`` keys), read cheaply (the file's key names only)."""
    p = Path(path)
    if p.is_dir():
        try:
            config = p / "config.json"
            return config.is_file() and read_json(config).get("_class_name") == "ControlNetModel"
        except CheckpointError:
            return False
    marks = (CONTROL_PREFIX + "input_hint_block", "input_hint_block")
    if p.suffix.lower() in TORCH_SUFFIXES and p.is_file():
        try:  # memory-mapped: the key names without reading the tensors
            obj = torch.load(str(p), map_location="cpu", mmap=True, weights_only=True)
        except Exception:
            return False
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        return isinstance(obj, dict) and any(isinstance(k, str) and k.startswith(marks) for k in obj)
    if p.suffix.lower() == ".safetensors" and p.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                return any(k.startswith(marks) for k in f.keys())  # noqa: SIM118
        except Exception:
            return False
    return False


def load_controlnet(path: str | Path, *, config: Mapping[str, Any] | None = None, variant: str | None = None,
                    dtype: torch.dtype | None = None) -> ControlCheckpoint:
    """Read a ControlNet: a diffusers ``ControlNetModel`` folder (or a pipeline folder's ``controlnet/``)
    or a ``control_model.*`` single file (``.safetensors``, or ``.pth`` / ``.ckpt`` / ``.pt`` / ``.bin``
    read with ``weights_only=True``). ``config`` overrides config keys (head counts of single files).
    Offline; every problem raises a :class:`CheckpointError` naming the file."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    if root.is_dir():
        cfg, state = _from_folder(root, config, variant)
    else:
        suffix = root.suffix.lower()
        if suffix != ".safetensors" and suffix not in TORCH_SUFFIXES:
            raise CheckpointError(f"{root}: unsupported file type {suffix or '(no suffix)'!r}; expected a "
                                  ".safetensors / .pth ControlNet file or a diffusers ControlNetModel folder")
        if variant is not None:
            raise CheckpointError(f"{root}: variant={variant!r} only applies to diffusers folders")
        cfg, state = _from_single_file(root, config)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return ControlCheckpoint(controlnet_family(cfg), cfg, state, root)
