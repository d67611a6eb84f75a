"""text2img / img2img / inpaint on any `Backend`, with classifier-free guidance and prompt emphasis.

The loop follows diffusers' StableDiffusion{,XL}{,Img2Img,Inpaint}Pipeline step for step so that the
same weights, noise and scheduler give the same images (tests/test_pipeline.py and
tests/test_sdxl_pipeline.py hold us to it). Random draws happen on the CPU from one generator per image,
in the order diffusers uses with a list of generators: VAE-encoder sample, initial noise, masked-image
sample, then sampler noise. SDXL's added conditioning: runtime/conditioning.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypedDict, Unpack

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from runtime.adapters.session import Active, AdapterMixin
from runtime.backend import Backend
from runtime.conditioning import Size, SizeConditioning, TextConditioning, default_scheduler, time_id_rows
from runtime.control import ControlArgs, ControlModel, ControlRequest, Rows
from runtime.inputs import ImageInput, batch_from, prompt_lists, repeat, seeds, to_image_tensor, to_mask_tensor
from runtime.png import Parameters, format_parameters
from runtime.prompt import Emphasis, Syntax
from runtime.prompt_steps import StepCursor, StepText, check_prompt_options, composable, encode_steps, guidance_scale
from runtime.samplers import Callback, ModelFn, get_scheduler, make_schedule, sample
from runtime.schedulers import Schedule, SchedulerConfig, add_noise, initial_latents

__all__ = ["ImageInput", "Options", "Output", "Pipeline", "StepCallback", "StopSampling", "to_image_tensor",
           "to_mask_tensor"]

Output = Literal["pil", "tensor"]
StepCallback = Callable[[int, int], None]  # (model calls done, total) after each model call
Shape = tuple[int, int, int, int]


class StopSampling(Exception):
    """Raised by a `progress` callback to end sampling early: the call returns the images of the latents
    as they are after that model call (A1111's interrupt; noisy when stopped early)."""


class _Stopped(Exception):
    def __init__(self, latents: Tensor) -> None:
        self.latents = latents


@dataclass(frozen=True)
class _Prompts:
    """A request's prompt options (runtime/prompt_steps.py)."""

    syntax: Syntax = "sdfused"
    emphasis: Emphasis = "attention"


class Options(TypedDict, total=False):
    """The keywords text2img / img2img / inpaint share beyond their own; defaults live in the dataclasses
    each group fills: SizeConditioning (SDXL), _Prompts, ControlArgs (ControlNet)."""

    original_size: Size | None
    crops_coords_top_left: Size | None
    target_size: Size | None
    negative_original_size: Size | None
    negative_crops_coords_top_left: Size | None
    negative_target_size: Size | None
    aesthetic_score: float | None
    negative_aesthetic_score: float | None
    syntax: Syntax
    emphasis: Emphasis
    control: ControlModel | Sequence[ControlModel] | None
    control_image: ImageInput | Sequence[ImageInput] | None
    control_scale: float | Sequence[float]
    control_start: float | Sequence[float]
    control_end: float | Sequence[float]
    guess_mode: bool


_GROUPS = (SizeConditioning, _Prompts, ControlArgs)


def _split(options: Options) -> tuple[SizeConditioning, _Prompts, ControlArgs]:
    """The keyword groups of a call, each with its dataclass's defaults; an unknown keyword is a TypeError
    as with a plain signature (a **kwargs call is not checked by Python itself)."""
    names = [{f.name for f in fields(group)} for group in _GROUPS]
    unknown = sorted(set(options) - set().union(*names))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    kw: dict[str, Any] = dict(options)
    return (SizeConditioning(**{k: v for k, v in kw.items() if k in names[0]}),
            _Prompts(**{k: v for k, v in kw.items() if k in names[1]}),
            ControlArgs(**{k: v for k, v in kw.items() if k in names[2]}))


@dataclass(frozen=True)
class _Job:
    prompts: list[str]  # as given (PNG metadata)
    negatives: list[str]
    texts: list[str]  # the positive prompts to encode (syntax "a1111": without the composable weight)
    guidance: list[float]  # composable-prompt guidance weight per image
    options: _Prompts
    steps: int
    scale: tuple[float, ...]  # CFG scale per image
    height: int
    width: int
    seeds: list[int]
    scheduler: str
    eta: float
    strength: float
    size: SizeConditioning  # SDXL added conditioning (checked against the model)
    text2img: bool
    loras: Active = ()  # the prompts' <lora:...> tags, resolved


@dataclass(frozen=True)
class _Conditioning:
    """What an init image (and mask) give the sampling loop; all None for text2img."""

    start: Tensor | None  # latents noised to the first step (img2img; inpaint below strength 1)
    blend: tuple[Tensor, Tensor] | None = None  # 4-channel inpaint: (image latents, latent mask 1 = repaint)
    unet_extra: Tensor | None = None  # 9-channel inpaint: (N, 5, h, w) mask and masked-image latents


class Pipeline(AdapterMixin):
    """Generates images with a backend. `low_ram` runs the two CFG halves one after the other.

    Prompts: `syntax` "sdfused" (default) or "a1111" (A1111's reading, its composable-prompt weights;
    AND refused), `emphasis` "attention" (default), "a1111" (A1111's "Original") or "none"; prompt
    editing and alternation switch the context per sampling step (runtime/prompt_steps.py).
    SDXL keyword arguments (None = the reference's default; SD 1.x/2.x models refuse them):
    original_size / target_size (h, w; default the image size), crops_coords_top_left (y, x; (0, 0)),
    their negative_* forms (base), aesthetic_score / negative_aesthetic_score (refiner; 6.0 / 2.5).
    `scheduler` None: the model's default (SDXL: euler; SD 1.x/2.x: ddim).
    LoRAs and embeddings (`load_lora`, `unload_loras`, `loras`, `load_embedding`, `set_adapter_dirs`,
    `<lora:NAME:SCALE>` prompt tags; a batch must carry one tag set): runtime/adapters/session.py.
    ControlNet (`control`, `control_image`, `control_scale`, `control_start`, `control_end`, `guess_mode`;
    eager `sdexport.ControlNet` or `runtime.load_control`): runtime/control.py.
    """

    def __init__(self, backend: Backend, low_ram: bool = False) -> None:
        self.backend = backend
        self.sequential_cfg = low_ram
        self._adapter_init()

    # ---- public API -------------------------------------------------------------------------
    def text2img(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        steps: int = 28,
        scale: float | Sequence[float] = 7.5,
        height: int = 512,
        width: int = 512,
        seed: int | Sequence[int] | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        batch_size: int = 1,
        latents: Tensor | None = None,
        output: Output = "pil",
        progress: StepCallback | None = None,
        **options: Unpack[Options],
    ) -> list[Image.Image] | Tensor:
        size, prompts, ctl = _split(options)
        job = self._job(prompt, negative_prompt, steps, scale, height, width, seed, scheduler, eta,
                        batch_size, 1.0, size, prompts, text2img=True)
        return self._generate(job, None, None, latents, output, progress, ctl)

    def img2img(
        self,
        image: ImageInput,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 0.8,
        steps: int = 28,
        scale: float | Sequence[float] = 7.5,
        seed: int | Sequence[int] | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        batch_size: int = 1,
        output: Output = "pil",
        progress: StepCallback | None = None,
        **options: Unpack[Options],
    ) -> list[Image.Image] | Tensor:
        size, prompts, ctl = _split(options)
        img = to_image_tensor(image, "image")
        batch_size = batch_from(img, batch_size)
        job = self._job(prompt, negative_prompt, steps, scale, img.shape[2], img.shape[3], seed,
                        scheduler, eta, batch_size, strength, size, prompts, text2img=False)
        return self._generate(job, repeat(img, batch_size), None, None, output, progress, ctl)

    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 1.0,
        steps: int = 28,
        scale: float | Sequence[float] = 7.5,
        seed: int | Sequence[int] | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        batch_size: int = 1,
        latents: Tensor | None = None,
        output: Output = "pil",
        progress: StepCallback | None = None,
        **options: Unpack[Options],
    ) -> list[Image.Image] | Tensor:
        size, prompts, ctl = _split(options)
        img = to_image_tensor(image, "image")
        msk = to_mask_tensor(mask)
        if msk.shape[2:] != img.shape[2:]:
            raise ValueError(f"mask size {tuple(msk.shape[2:])} (h, w) does not match image size "
                             f"{tuple(img.shape[2:])}")
        batch_size = batch_from(img, batch_size)
        job = self._job(prompt, negative_prompt, steps, scale, img.shape[2], img.shape[3], seed,
                        scheduler, eta, batch_size, strength, size, prompts, text2img=False)
        return self._generate(job, repeat(img, batch_size), repeat(msk, batch_size), latents, output,
                              progress, ctl)

    # ---- validation -------------------------------------------------------------------------
    def _job(self, prompt: str | Sequence[str], negative: str | Sequence[str], steps: int,
             scale: float | Sequence[float],
             height: int, width: int, seed: int | Sequence[int] | None, scheduler: str | None, eta: float,
             batch_size: int, strength: float, size: SizeConditioning, options: _Prompts, text2img: bool) -> _Job:
        prompts, negatives = prompt_lists(prompt, negative, batch_size)
        check_prompt_options(options.syntax, options.emphasis)
        untagged, loras = self._prompt_adapters(prompts, negatives)
        texts, guidance = composable(untagged, options.syntax)
        n = len(prompts)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        scales = _scales(scale, n)
        for name, px in (("height", height), ("width", width)):
            if isinstance(px, bool) or not isinstance(px, int) or px < 8 or px % 8:
                raise ValueError(f"{name} must be a positive multiple of 8 pixels, got {px!r}")
        if not isinstance(strength, int | float) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be within [0, 1], got {strength!r}")
        scheduler = default_scheduler(self.backend.info) if scheduler is None else scheduler
        get_scheduler(scheduler)  # raises on an unknown name
        if not isinstance(eta, int | float) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if scales[0] <= 1.0 and any(w != 1.0 for w in guidance):
            raise ValueError("a composable-prompt weight (a trailing ':w' under syntax='a1111') needs "
                             f"guidance (scale > 1), got scale={scale!r}")
        return _Job(prompts, negatives, texts, guidance, options, steps, scales, height, width,
                    seeds(seed, n), scheduler, float(eta), float(strength), size.checked(self.backend.info), text2img,
                    loras)

    # ---- the loop ---------------------------------------------------------------------------
    def _generate(self, job: _Job, image: Tensor | None, mask: Tensor | None, latents: Tensor | None,
                  output: Output, progress: StepCallback | None,
                  ctl: ControlArgs | None = None) -> list[Image.Image] | Tensor:
        if output not in ("pil", "tensor"):
            raise ValueError(f"output must be 'pil' or 'tensor', got {output!r}")
        guided = job.scale[0] > 1.0  # as diffusers: guidance off for scale <= 1 (_scales: all one side)
        shape = self._check_request(job, mask, latents, guided)
        control = None if ctl is None else ctl.request(self.backend.info, shape[0], job.height, job.width)
        if control is not None:
            batched = guided and not self.sequential_cfg and not control.guess_mode
            control.check_rows(2 * shape[0] if batched else shape[0], job.height, job.width)
        self._use_tags(job.loras)
        schedule = make_schedule(job.scheduler, SchedulerConfig.from_dict(self.backend.info.scheduler_config),
                                 job.steps, job.strength)
        gens = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
        cursor = StepCursor(self._encode_prompts(job, guided), schedule)
        noise, cond = self._draw_latents(job, image, mask, latents, gens, shape)
        x = initial_latents(schedule, noise, cond.start)
        scale = _guidance(job, self.backend.device) if guided else None
        model = self._guided_model(scale, cursor, cond.unet_extra, control, schedule.num_steps)
        blend = None if cond.blend is None else _inpaint_blend(schedule, cond.blend, noise)
        callback = _step_callback(schedule.num_steps, progress, blend, cursor)

        def noise_fn() -> Tensor:
            return _draw(gens, shape).to(self.backend.device)

        with torch.inference_mode():
            try:
                x = sample(schedule, model, x, noise_fn, job.eta, callback)
            except _Stopped as stop:
                x = stop.latents
        return self._decode(x, job, output)

    def _check_request(self, job: _Job, mask: Tensor | None, latents: Tensor | None, guided: bool) -> Shape:
        """Shape checks against the backend -> the latent shape (N, C, h, w)."""
        be, info = self.backend, self.backend.info
        n = len(job.prompts)
        be.check_shape(n if (self.sequential_cfg or not guided) else 2 * n, job.height, job.width)
        shape = (n, info.latent_channels, job.height // 8, job.width // 8)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        if mask is not None and info.unet_in_channels not in (4, 9):
            raise ValueError(f"inpainting needs a 4- or 9-channel UNet, this one has {info.unet_in_channels}")
        if mask is None and info.unet_in_channels != 4:
            raise ValueError("this is an inpainting model (9-channel UNet): use inpaint()")
        return shape

    def _draw_latents(self, job: _Job, image: Tensor | None, mask: Tensor | None, latents: Tensor | None,
                      gens: list[torch.Generator], shape: Shape) -> tuple[Tensor, _Conditioning]:
        """Initial noise and the image conditioning, drawn in diffusers' order (module docstring)."""
        be, info = self.backend, self.backend.info
        nine = info.unet_in_channels == 9
        full_strength = job.strength >= 1.0
        image_latents: Tensor | None = None
        if image is not None and (mask is None or not nine or not full_strength):
            image_latents = self._encode_image(image * 2 - 1, gens) * info.scaling_factor
        # Sampler state stays float32 whatever the model dtype; only UNet inputs are cast.
        noise = (_draw(gens, shape) if latents is None else latents.float()).to(be.device)
        start = image_latents if (mask is None or not full_strength) else None
        if mask is None:
            return noise, _Conditioning(start)
        assert image is not None
        binary = (mask >= 0.5).to(image.dtype)
        latent_mask = torch.nn.functional.interpolate(binary, size=shape[2:]).to(be.device)
        if not nine:  # diffusers encodes the masked image anyway; draw its sample so sampler noise stays aligned
            _draw(gens, shape)
            assert image_latents is not None
            return noise, _Conditioning(start, blend=(image_latents, latent_mask))
        masked = (image * 2 - 1) * (binary < 0.5)  # masked pixels -> 0 in [-1, 1], as diffusers
        masked_latents = self._encode_image(masked, gens) * info.scaling_factor
        return noise, _Conditioning(start, unet_extra=torch.cat([latent_mask, masked_latents], dim=1))

    def _guided_model(self, scale: float | Tensor | None, cursor: StepCursor, extra: Tensor | None,
                      control: ControlRequest | None = None, calls: int = 0) -> ModelFn:
        """The UNet as the sampler calls it, on the cursor's current text: extra input channels appended,
        ControlNet residuals added (runtime/control.py; `calls` model calls in all), classifier-free
        guidance (Ho & Salimans 2022) ``uncond + scale (cond - uncond)`` unless ``scale`` is None (a
        tensor: one scale per image)."""
        be = self.backend
        n = cursor.current.context.shape[0] // (1 if scale is None else 2)
        done = [0]  # model calls so far

        def unet(text: TextConditioning, x: Tensor, t: Tensor, rows: Rows) -> Tensor:
            res = None if control is None else control.residuals(done[0], calls, x, t, text, rows, be.dtype)
            x_in = x if extra is None else torch.cat([x, torch.cat([extra] * (x.shape[0] // n)).to(x.dtype)], dim=1)
            return text.unet(be, x_in, t, res).float()

        def model(x: Tensor, t: Tensor) -> Tensor:
            text = cursor.current
            t = t.to(be.device)
            x = x.to(be.dtype)
            try:
                if scale is None:
                    return unet(text, x, t, "all")
                if self.sequential_cfg:
                    uncond = unet(text.rows(slice(None, n)), x, t, "uncond")
                    cond = unet(text.rows(slice(n, None)), x, t, "cond")
                else:
                    uncond, cond = unet(text, torch.cat([x, x]), t, "batched").chunk(2)
                return uncond + scale * (cond - uncond)
            finally:
                done[0] += 1

        return model

    def _decode(self, x: Tensor, job: _Job, output: Output) -> list[Image.Image] | Tensor:
        be = self.backend
        with torch.inference_mode():
            images = be.decode(x.float() / be.info.scaling_factor)
        images = (images.float() / 2 + 0.5).clamp(0, 1).cpu()
        if output == "tensor":
            return images
        return [self._to_pil(img, job, i) for i, img in enumerate(images)]

    def _encode_prompts(self, job: _Job, guided: bool) -> StepText:
        """Rows [negatives; prompts] if guided, else prompts, scheduled and encoded once."""
        be = self.backend
        rows = [*job.negatives, *job.texts] if guided else job.texts
        negatives = len(job.negatives) if guided else 0
        ids = time_id_rows(be.info, job.size, job.height, job.width, job.text2img, negatives, len(rows), be.device)
        return encode_steps(be, rows, negatives, job.steps, job.options.syntax, job.options.emphasis, ids)

    def _encode_image(self, image: Tensor, gens: list[torch.Generator]) -> Tensor:
        """A posterior sample of `image` (in [-1, 1]), one draw per image from its generator."""
        be = self.backend
        with torch.inference_mode():
            moments = be.encode(image.to(be.device))
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = _draw(gens, tuple(mean.shape)).to(mean.device)
        return mean + std * eps

    def _to_pil(self, img: Tensor, job: _Job, i: int) -> Image.Image:
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        pil = Image.fromarray(arr)
        info = self.backend.info
        loras, tis = self._adapter_hashes(job.prompts[i], job.negatives[i])
        pil.info["parameters"] = format_parameters(Parameters(
            prompt=job.prompts[i], negative_prompt=job.negatives[i], steps=job.steps,
            sampler=job.scheduler, cfg_scale=job.scale[i], seed=job.seeds[i], width=job.width,
            height=job.height, model_hash=info.hash, model=info.name,
            strength=job.strength if job.strength < 1.0 else None, syntax=job.options.syntax,
            emphasis=job.options.emphasis, lora_hashes=loras, ti_hashes=tis))
        return pil


def _scales(scale: float | Sequence[float], n: int) -> tuple[float, ...]:
    """One CFG scale per image: a number, or a list of `n` (all > 1, or all <= 1: guidance is on or off
    for the whole batch)."""
    values = [scale] * n if isinstance(scale, int | float) else list(scale)
    if len(values) != n or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in values):
        raise ValueError(f"scale (CFG) must be a finite number or a list of {n}, got {scale!r}")
    if len({v > 1.0 for v in values}) > 1:
        raise ValueError(f"per-image scales must be all > 1 or all <= 1 (guidance on or off), got {scale!r}")
    return tuple(float(v) for v in values)


def _guidance(job: _Job, device: torch.device) -> float | Tensor:
    """The CFG scale of each image (runtime.prompt_steps.guidance_scale), per-image scales folded in."""
    if len(set(job.scale)) == 1:
        return guidance_scale(job.scale[0], job.guidance, device)
    return guidance_scale(1.0, [s * w for s, w in zip(job.scale, job.guidance, strict=True)], device)


def _inpaint_blend(schedule: Schedule, blend: tuple[Tensor, Tensor], noise: Tensor) -> Callback:
    """Legacy inpainting with a 4-channel UNet (diffusers): after each step the kept region is reset to
    the image latents noised to the next step's level (the image itself after the last)."""
    image_latents, mask = blend

    def callback(i: int, x: Tensor) -> Tensor:
        return (1 - mask) * add_noise(schedule, image_latents, noise, i + 1) + mask * x

    return callback


def _step_callback(total: int, progress: StepCallback | None, blend: Callback | None,
                   cursor: StepCursor) -> Callback:
    def callback(i: int, x: Tensor) -> Tensor:
        cursor.after_call(i)
        x = x if blend is None else blend(i, x)
        if progress is not None:
            try:
                progress(i + 1, total)
            except StopSampling:
                raise _Stopped(x) from None
        return x

    return callback


def _draw(gens: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    """One standard-normal draw per image from its own CPU generator, float32."""
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, dtype=torch.float32) for g in gens])
