"""`ControlNet`: an eager ControlNet for `StableDiffusion` (and any runtime `Pipeline`): pass it as
`control=` to text2img / img2img / inpaint (runtime/control.py), or `export` it to a control artifact."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from runtime.control import CONTROL_FAMILIES, ControlInfo
from sdexport.loading.controlnet import ControlCheckpoint, controlnet_family, load_controlnet
from sdexport.loading.errors import load_strict
from sdexport.models.controlnet import ControlNet as ControlNetModule
from sdexport.models.controlnet import ControlNetConfig
from sdexport.models.layers import Kernels, set_backend

__all__ = ["ControlNet", "control_info"]

_XL_TIME_IDS = 6  # SDXL base ControlNets (there are no refiner ones)
# the diffusers ControlNetModel config keys a UNet config shares (`ControlNet.from_unet_config`)
_UNET_KEYS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "block_out_channels",
              "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
              "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
              "use_linear_projection", "upcast_attention", "addition_embed_type", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim")


def control_info(module: ControlNetModule, family: str, name: str) -> ControlInfo:
    """The pairing facts of a ControlNet module (`runtime.control.check_pair`)."""
    cfg = module.control_config
    u = cfg.unet
    pooled = 0
    if u.text_time:
        assert u.projection_class_embeddings_input_dim is not None and u.addition_time_embed_dim is not None
        pooled = u.projection_class_embeddings_input_dim - _XL_TIME_IDS * u.addition_time_embed_dim
        if pooled <= 0:
            raise ValueError(f"an SDXL ControlNet's added embedding of width {u.projection_class_embeddings_input_dim} "
                             f"leaves no room for the pooled embedding beside {_XL_TIME_IDS} time ids")
    return ControlInfo(family=family, latent_channels=u.in_channels, context_dim=u.cross_attention_dim,
                       residuals=u.residuals, conditioning_channels=cfg.conditioning_channels,
                       time_ids=_XL_TIME_IDS if u.text_time else 0, pooled_dim=pooled,
                       global_pool=cfg.global_pool_conditions, name=name)


class ControlNet:
    """A `runtime.control.ControlModel` over the eager module (float32, CPU unless moved)."""

    def __init__(self, module: ControlNetModule, family: str, name: str = "controlnet",
                 config: Mapping[str, Any] | None = None) -> None:
        if family not in CONTROL_FAMILIES:
            raise ValueError(f"ControlNet family must be one of {CONTROL_FAMILIES}, got {family!r}")
        self.module = module.eval().requires_grad_(False)
        self.info = control_info(module, family, name)
        self.source_config: dict[str, Any] = dict(config or {})  # the diffusers config (bench, export)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, config: Mapping[str, Any] | None = None,
                        family: str | None = None, variant: str | None = None) -> ControlNet:
        """A diffusers `ControlNetModel` folder or a `control_model.*` single file (.safetensors, or
        .pth with weights_only). `config` overrides config keys (e.g. head counts of a single file),
        `family` the family read from the config (sd1 / sd2 / sdxl)."""
        return cls.from_checkpoint(load_controlnet(path, config=config, variant=variant), family=family)

    @classmethod
    def from_checkpoint(cls, ck: ControlCheckpoint, family: str | None = None) -> ControlNet:
        with torch.device("meta"):
            module = ControlNetModule(ControlNetConfig.from_diffusers(ck.config))
        load_strict(module, ck.state, f"{ck.source} (controlnet)")
        return cls(module, family or ck.family, ck.source.stem, ck.config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], family: str | None = None, name: str = "controlnet") -> ControlNet:
        """Random weights from a diffusers config dict."""
        return cls(ControlNetModule(ControlNetConfig.from_diffusers(config)), family or controlnet_family(config),
                   name, config)

    @classmethod
    def from_unet_config(cls, unet_config: Mapping[str, Any], name: str = "controlnet") -> ControlNet:
        """Random weights mirroring a UNet's diffusers config (diffusers' `ControlNetModel.from_unet` rule:
        the encoder half's keys; the first `layers_per_block` when it is a list)."""
        cfg = {k: unet_config[k] for k in _UNET_KEYS if k in unet_config}
        if isinstance(cfg.get("layers_per_block"), list):
            cfg["layers_per_block"] = cfg["layers_per_block"][0]
        return cls.from_config(cfg, name=name)

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @property
    def config(self) -> ControlNetConfig:
        return self.module.control_config

    def check_shape(self, batch: int, height: int, width: int) -> None:
        unit = self.config.image_downscale * 2 ** (len(self.config.unet.block_out_channels) - 1)
        for name, px in (("height", height), ("width", width)):
            if px % unit:
                raise ValueError(f"{name} must be a multiple of {unit} px for this ControlNet, got {px}")

    def residuals(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, image: Tensor,
                  text_embeds: Tensor | None = None, time_ids: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.info.time_ids:
            out: tuple[Tensor, ...] = self.module(x, t, context, weights, image, text_embeds=text_embeds,
                                                  time_ids=time_ids)
        else:
            out = self.module(x, t, context, weights, image)
        return out

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ControlNet:
        self.module.to(device=device, dtype=dtype)
        return self

    def half(self) -> ControlNet:
        return self.to(dtype=torch.float16)

    def float(self) -> ControlNet:
        return self.to(dtype=torch.float32)

    def attention_backend(self, backend: Kernels | str) -> ControlNet:
        """Select the kernels of the fused call sites: `reference`, `sdpa` or `fused`."""
        set_backend(self.module, backend if isinstance(backend, Kernels) else Kernels(backend))
        return self

    def export(self, out: str | Path, *, overwrite: bool = False, **options: Any) -> Path:
        """Build a control artifact (see `sdexport build`); options are `BuildOptions` fields."""
        from sdexport.export.build import BuildOptions
        from sdexport.export.control import build_control

        return build_control(self, out, BuildOptions(**options), overwrite=overwrite)
