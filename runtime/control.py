"""ControlNet in the sampling loop, the same for eager models and artifacts (diffusers'
StableDiffusion{,XL}ControlNet{,Img2Img,Inpaint}Pipeline semantics).

A request names ControlNets (``ControlModel``: `sdexport.ControlNet` or `runtime.load_control`), one
control image each (one image for the batch, or one per image), and per ControlNet a conditioning
scale and the fraction of the model calls it acts on ([start, end]). Control images are resized to the
output size as the reference does (PIL: Lanczos; tensors in [0, 1]: nearest) and never normalised.
At model call k of K a ControlNet acts unless ``k / K < start or (k + 1) / K > end``. Its residuals are
scaled (guess mode: by ``logspace(-1, 0)`` over the residuals, times the scale) and summed over the
ControlNets, then added to the UNet's skips and mid block. Under classifier-free guidance the ControlNet
sees both halves (the image twice), except in guess mode: the conditional half only, the unconditional
half getting no residuals. ``global_pool_conditions`` models imply guess mode (as diffusers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from runtime.backend import ModelInfo
from runtime.conditioning import TextConditioning

__all__ = ["ControlInfo", "ControlModel", "ControlRequest", "ControlUnit", "Residuals", "check_pair",
           "control_images", "control_request", "no_residuals", "residual_shapes", "scale_residuals"]

Residuals = tuple[tuple[int, int], ...]  # (channels, downscale) per residual: the skips, then the mid block
Rows = Literal["all", "batched", "uncond", "cond"]  # which UNet rows a call serves (see `ControlRequest`)
CONTROL_FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class ControlInfo:
    """What a ControlNet pairs with: the family, latent channels, context width, residual layout and,
    for SDXL, the added conditioning widths; plus its conditioning image's channels."""

    family: str  # one of CONTROL_FAMILIES
    latent_channels: int
    context_dim: int
    residuals: Residuals
    conditioning_channels: int = 3
    time_ids: int = 0  # 0, or the SDXL base's 6
    pooled_dim: int = 0
    global_pool: bool = False
    name: str = "controlnet"


class ControlModel(Protocol):
    """A ControlNet as the pipeline calls it (eager: `sdexport.ControlNet`; deployed: `runtime.load_control`)."""

    info: ControlInfo

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def check_shape(self, batch: int, height: int, width: int) -> None:
        """Raise ValueError when (rows, height, width in px) is outside what the model serves."""
        ...

    def residuals(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, image: Tensor,
                  text_embeds: Tensor | None = None, time_ids: Tensor | None = None) -> tuple[Tensor, ...]:
        """(B, C, h, w) latents, 0-d timestep, (B, L, D) context, (B, L) token weights, (B, Cc, 8h, 8w)
        image in [0, 1] (SDXL: pooled text embeddings and time ids) -> unscaled residuals, one per
        `info.residuals` entry ((B, C, 1, 1) each when `info.global_pool`)."""
        ...


def check_pair(control: ControlInfo, model: ModelInfo, index: int = 0) -> None:
    """Raise ValueError unless `control` fits `model`'s UNet (family, latent channels, context width,
    residual layout, SDXL conditioning)."""
    what = f"control[{index}] ({control.name})"
    if not model.control_residuals:
        raise ValueError(f"{what}: this model's UNet takes no ControlNet residuals: an artifact built before "
                         "ControlNet support; rebuild it with `sdexport build` to use ControlNet")
    if control.family != model.family:
        raise ValueError(f"{what} is a {control.family} ControlNet; this model is {model.family}: a ControlNet "
                         "pairs only with models of its own family")
    checks = (("latent channels", control.latent_channels, model.latent_channels),
              ("context width", control.context_dim, model.context_dim),
              ("SDXL time ids", control.time_ids, model.time_ids))
    for name, mine, theirs in checks:
        if mine != theirs:
            raise ValueError(f"{what} takes {name} {mine}; this model's UNet {theirs}")
    if tuple(map(tuple, control.residuals)) != tuple(map(tuple, model.control_residuals)):
        raise ValueError(f"{what} gives residuals {list(control.residuals)} (channels, downscale); this model's "
                         f"UNet takes {list(model.control_residuals)}")


def control_images(image: object, n: int, height: int, width: int, channels: int, what: str) -> Tensor:
    """One ControlNet's image(s) -> float32 (n, channels, height, width) in [0, 1]: PIL image(s) resized
    with Lanczos, or a (B, C, H, W) / (C, H, W) tensor in [0, 1] resized by nearest neighbour; B is 1
    (repeated for every image) or n."""
    if isinstance(image, Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4 or t.shape[1] != channels or t.shape[2] < 1 or t.shape[3] < 1:
            raise ValueError(f"{what} tensor must be (B, {channels}, H, W) or ({channels}, H, W), got "
                             f"{tuple(image.shape)}")
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError(f"{what} tensor values must be finite and within [0, 1]")
        t = torch.nn.functional.interpolate(t, size=(height, width))
    else:
        pics = [image] if isinstance(image, Image.Image) else list(image) if isinstance(image, list | tuple) else []
        if not pics or not all(isinstance(p, Image.Image) for p in pics):
            raise ValueError(f"{what} must be a PIL image, a list of them, or a tensor")
        if channels != 3:
            raise ValueError(f"{what}: this ControlNet takes {channels}-channel images; pass a tensor")
        resized = [p.resize((width, height), resample=Image.Resampling.LANCZOS).convert("RGB") for p in pics]
        arrs = [np.asarray(p, dtype=np.float32) / 255.0 for p in resized]
        t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    if t.shape[0] not in (1, n):
        raise ValueError(f"{what}: {t.shape[0]} images for {n} generated images (give 1 or {n})")
    return t.repeat_interleave(n, dim=0) if t.shape[0] == 1 and n > 1 else t


def scale_residuals(res: Sequence[Tensor], scale: float, guess_mode: bool) -> list[Tensor]:
    """diffusers' ControlNetModel scaling: `scale` each, or in guess mode `logspace(-1, 0)` (0.1 for the
    first skip up to 1 for the mid block) times `scale`."""
    if not guess_mode:
        return [r * scale for r in res]
    scales = torch.logspace(-1, 0, len(res), device=res[0].device) * scale
    return [r * s for r, s in zip(res, scales, strict=True)]


def residual_shapes(layout: Residuals, x_shape: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """The (B, C, h/f, w/f) shape of each residual a UNet of `layout` takes with (B, C, h, w) latents."""
    b, _, h, w = x_shape
    return [(b, c, h // f, w // f) for c, f in layout]


def no_residuals(layout: Residuals, x_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device) -> tuple[Tensor, ...]:
    """What a UNet program with residual inputs is fed when no ControlNet acts: zeros (adding them is a no-op)."""
    return tuple(torch.zeros(s, dtype=dtype, device=device) for s in residual_shapes(layout, x_shape))


def _per_net(value: float | Sequence[float], n: int, name: str) -> list[float]:
    values = [value] * n if isinstance(value, int | float) else list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} ControlNets (give one, or one per ControlNet)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name} must be finite numbers, got {value!r}")
    return [float(v) for v in values]


@dataclass(frozen=True)
class ControlUnit:
    model: ControlModel
    image: Tensor  # (n, Cc, H, W) on the model's device, in its dtype
    scale: float
    start: float
    end: float

    def keep(self, k: int, total: int) -> bool:
        """Whether the ControlNet acts at model call k of `total` (diffusers' controlnet_keep)."""
        return not (k / total < self.start or (k + 1) / total > self.end)


@dataclass(frozen=True)
class ControlRequest:
    """The validated ControlNets of a request; `residuals` runs them for one UNet call."""

    units: tuple[ControlUnit, ...]
    guess_mode: bool

    def check_rows(self, rows: int, height: int, width: int) -> None:
        for unit in self.units:
            unit.model.check_shape(rows, height, width)

    def residuals(self, k: int, total: int, x: Tensor, t: Tensor, text: TextConditioning, rows: Rows,
                  dtype: torch.dtype) -> list[Tensor] | None:
        """The summed, scaled residuals for UNet call k of `total` on latents `x` and `text` (the call's
        rows: "all" without guidance, "batched" [uncond; cond], or one CFG half); None when no
        ControlNet acts (the UNet adds nothing)."""
        if rows == "uncond" and self.guess_mode:
            return None
        n = x.shape[0] // 2 if rows == "batched" else x.shape[0]
        guess_half = rows == "batched" and self.guess_mode
        if guess_half:
            x, text = x[n:], text.rows(slice(n, None))
        total_res: list[Tensor] | None = None
        for unit in self.units:
            if not unit.keep(k, total):
                continue
            m = unit.model
            image = torch.cat([unit.image, unit.image]) if rows == "batched" and not self.guess_mode else unit.image
            cast = [None if a is None else a.to(m.device, m.dtype)
                    for a in (x, text.context, text.weights, text.text_embeds)]
            assert cast[0] is not None and cast[1] is not None and cast[2] is not None
            res = m.residuals(cast[0], t.to(m.device), cast[1], cast[2], image, cast[3],
                              None if text.time_ids is None else text.time_ids.to(m.device))
            scaled = scale_residuals(res, unit.scale, self.guess_mode)
            total_res = scaled if total_res is None else [a + b for a, b in zip(total_res, scaled, strict=True)]
        if total_res is None:
            return None
        h, w = x.shape[2], x.shape[3]
        layout = self.units[0].model.info.residuals
        out = [r.expand(r.shape[0], c, h // f, w // f).to(dtype) for r, (c, f) in zip(total_res, layout, strict=True)]
        if guess_half:
            out = [torch.cat([torch.zeros_like(r), r]) for r in out]
        return out


def control_request(control: ControlModel | Sequence[ControlModel] | None, control_image: object,
                    scale: float | Sequence[float], start: float | Sequence[float], end: float | Sequence[float],
                    guess_mode: bool, model: ModelInfo, n: int, height: int, width: int) -> ControlRequest | None:
    """Validate a request's ControlNet arguments against the model -> the request (None: no ControlNet)."""
    if control is None:
        if control_image is not None:
            raise ValueError("control_image was given without control (the ControlNets it is for)")
        return None
    single = not isinstance(control, list | tuple)
    nets: list[ControlModel] = list(control) if isinstance(control, list | tuple) else [control]  # type: ignore[list-item]
    if not nets:
        raise ValueError("control is an empty list")
    for i, net in enumerate(nets):
        if not isinstance(getattr(net, "info", None), ControlInfo):
            raise ValueError(f"control[{i}] is not a ControlNet (sdexport.ControlNet or runtime.load_control), "
                             f"got {type(net).__name__}")
        check_pair(net.info, model, i)
    if control_image is None:
        raise ValueError(f"control_image is required with control: one image per ControlNet ({len(nets)})")
    images = [control_image] if single else control_image
    if not isinstance(images, list | tuple) or len(images) != len(nets):
        got = len(images) if isinstance(images, list | tuple) else "not a list"
        raise ValueError(f"control_image must be a list of one image (or image batch) per ControlNet: "
                         f"{len(nets)} ControlNets, {got} images")
    scales = _per_net(scale, len(nets), "control_scale")
    starts = _per_net(start, len(nets), "control_start")
    ends = _per_net(end, len(nets), "control_end")
    for s, e in zip(starts, ends, strict=True):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"control_start / control_end must satisfy 0 <= start < end <= 1, got {s} and {e}")
    if not isinstance(guess_mode, bool):
        raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
    units = []
    for i, (net, img) in enumerate(zip(nets, images, strict=True)):
        what = "control_image" if single else f"control_image[{i}]"
        t = control_images(img, n, height, width, net.info.conditioning_channels, what)
        units.append(ControlUnit(net, t.to(net.device, net.dtype), scales[i], starts[i], ends[i]))
    return ControlRequest(tuple(units), guess_mode or nets[0].info.global_pool)


@dataclass(frozen=True)
class ControlArgs:
    """A request's ControlNet keyword arguments as given (`Pipeline.text2img` / `img2img` / `inpaint`)."""

    control: ControlModel | Sequence[ControlModel] | None = None
    control_image: object = None
    control_scale: float | Sequence[float] = 1.0
    control_start: float | Sequence[float] = 0.0
    control_end: float | Sequence[float] = 1.0
    guess_mode: bool = False

    def request(self, model: ModelInfo, n: int, height: int, width: int) -> ControlRequest | None:
        return control_request(self.control, self.control_image, self.control_scale, self.control_start,
                               self.control_end, self.guess_mode, model, n, height, width)
