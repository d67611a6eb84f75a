"""text2img / img2img / inpaint on any `Backend`, with classifier-free guidance and prompt emphasis.

The loop follows diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline step for step so that the
same weights, noise and scheduler give the same images (tests/test_pipeline.py holds us to it).
Random draws happen on the CPU from one generator per image, in the order diffusers uses with a
list of generators: VAE-encoder sample, initial noise, masked-image sample, then sampler noise.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from runtime.backend import Backend
from runtime.png import Parameters, format_parameters
from runtime.prompt import encode_prompts
from runtime.samplers import Callback, ModelFn, get_scheduler, make_schedule, sample
from runtime.schedulers import Schedule, SchedulerConfig, add_noise, initial_latents

Output = Literal["pil", "tensor"]
ImageInput = Image.Image | Sequence[Image.Image] | Tensor
StepCallback = Callable[[int, int], None]  # (model calls done, total) after each model call
Shape = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Job:
    prompts: list[str]
    negatives: list[str]
    steps: int
    scale: float
    height: int
    width: int
    seeds: list[int]
    scheduler: str
    eta: float
    strength: float


@dataclass(frozen=True)
class _Conditioning:
    """What an init image (and mask) give the sampling loop; all None for text2img."""

    start: Tensor | None  # latents noised to the first step (img2img; inpaint below strength 1)
    blend: tuple[Tensor, Tensor] | None = None  # 4-channel inpaint: (image latents, latent mask 1 = repaint)
    unet_extra: Tensor | None = None  # 9-channel inpaint: (N, 5, h, w) mask and masked-image latents


class Pipeline:
    """Generates images with a backend. `low_ram` runs the two CFG halves one after the other."""

    def __init__(self, backend: Backend, low_ram: bool = False) -> None:
        self.backend = backend
        self.sequential_cfg = low_ram

    # ---- public API -------------------------------------------------------------------------
    def text2img(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        steps: int = 28,
        scale: float = 7.5,
        height: int = 512,
        width: int = 512,
        seed: int | Sequence[int] | None = None,
        scheduler: str = "ddim",
        eta: float = 0.0,
        batch_size: int = 1,
        latents: Tensor | None = None,
        output: Output = "pil",
        progress: StepCallback | None = None,
    ) -> list[Image.Image] | Tensor:
        job = self._job(prompt, negative_prompt, steps, scale, height, width, seed, scheduler, eta,
                        batch_size, 1.0)
        return self._generate(job, None, None, latents, output, progress)

    def img2img(
        self,
        image: ImageInput,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 0.8,
        steps: int = 28,
        scale: float = 7.5,
        seed: int | Sequence[int] | None = None,
        scheduler: str = "ddim",
        eta: float = 0.0,
        batch_size: int = 1,
        output: Output = "pil",
        progress: StepCallback | None = None,
    ) -> list[Image.Image] | Tensor:
        img = to_image_tensor(image, "image")
        batch_size = _batch_from(img, batch_size)
        job = self._job(prompt, negative_prompt, steps, scale, img.shape[2], img.shape[3], seed,
                        scheduler, eta, batch_size, strength)
        return self._generate(job, _repeat(img, batch_size), None, None, output, progress)

    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 1.0,
        steps: int = 28,
        scale: float = 7.5,
        seed: int | Sequence[int] | None = None,
        scheduler: str = "ddim",
        eta: float = 0.0,
        batch_size: int = 1,
        latents: Tensor | None = None,
        output: Output = "pil",
        progress: StepCallback | None = None,
    ) -> list[Image.Image] | Tensor:
        img = to_image_tensor(image, "image")
        msk = to_mask_tensor(mask)
        if msk.shape[2:] != img.shape[2:]:
            raise ValueError(f"mask size {tuple(msk.shape[2:])} (h, w) does not match image size "
                             f"{tuple(img.shape[2:])}")
        batch_size = _batch_from(img, batch_size)
        job = self._job(prompt, negative_prompt, steps, scale, img.shape[2], img.shape[3], seed,
                        scheduler, eta, batch_size, strength)
        return self._generate(job, _repeat(img, batch_size), _repeat(msk, batch_size), latents, output,
                              progress)

    # ---- validation -------------------------------------------------------------------------
    def _job(self, prompt: str | Sequence[str], negative: str | Sequence[str], steps: int, scale: float,
             height: int, width: int, seed: int | Sequence[int] | None, scheduler: str, eta: float,
             batch_size: int, strength: float) -> _Job:
        prompts, negatives = _prompt_lists(prompt, negative, batch_size)
        n = len(prompts)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ValueError(f"scale (CFG) must be a finite number, got {scale!r}")
        for name, px in (("height", height), ("width", width)):
            if isinstance(px, bool) or not isinstance(px, int) or px < 8 or px % 8:
                raise ValueError(f"{name} must be a positive multiple of 8 pixels, got {px!r}")
        if not isinstance(strength, int | float) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be within [0, 1], got {strength!r}")
        get_scheduler(scheduler)  # raises on an unknown name
        if not isinstance(eta, int | float) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        return _Job(prompts, negatives, steps, float(scale), height, width, _seeds(seed, n), scheduler,
                    float(eta), float(strength))

    # ---- the loop ---------------------------------------------------------------------------
    def _generate(self, job: _Job, image: Tensor | None, mask: Tensor | None, latents: Tensor | None,
                  output: Output, progress: StepCallback | None) -> list[Image.Image] | Tensor:
        if output not in ("pil", "tensor"):
            raise ValueError(f"output must be 'pil' or 'tensor', got {output!r}")
        guided = job.scale > 1.0  # as diffusers: guidance off for scale <= 1
        shape = self._check_request(job, mask, latents, guided)
        schedule = make_schedule(job.scheduler, SchedulerConfig.from_dict(self.backend.info.scheduler_config),
                                 job.steps, job.strength)
        gens = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
        context, weights = self._encode_prompts(job, guided)
        noise, cond = self._draw_latents(job, image, mask, latents, gens, shape)
        x = initial_latents(schedule, noise, cond.start)
        model = self._guided_model(job.scale if guided else None, context, weights, cond.unet_extra)
        blend = None if cond.blend is None else _inpaint_blend(schedule, cond.blend, noise)
        callback = _step_callback(schedule.num_steps, progress, blend)

        def noise_fn() -> Tensor:
            return _draw(gens, shape).to(self.backend.device)

        with torch.inference_mode():
            x = sample(schedule, model, x, noise_fn, job.eta, callback)
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

    def _guided_model(self, scale: float | None, context: Tensor, weights: Tensor,
                      extra: Tensor | None) -> ModelFn:
        """The UNet as the sampler calls it: extra input channels appended, classifier-free guidance
        (Ho & Salimans 2022) ``uncond + scale (cond - uncond)`` unless ``scale`` is None."""
        be = self.backend
        n = context.shape[0] // (1 if scale is None else 2)

        def model(x: Tensor, t: Tensor) -> Tensor:
            x_in = x if extra is None else torch.cat([x, extra], dim=1)
            t = t.to(be.device)
            x_in = x_in.to(be.dtype)
            if scale is None:
                return be.unet(x_in, t, context, weights).float()
            if self.sequential_cfg:
                uncond = be.unet(x_in, t, context[:n], weights[:n]).float()
                cond = be.unet(x_in, t, context[n:], weights[n:]).float()
            else:
                uncond, cond = be.unet(torch.cat([x_in, x_in]), t, context, weights).float().chunk(2)
            return uncond + scale * (cond - uncond)

        return model

    def _decode(self, x: Tensor, job: _Job, output: Output) -> list[Image.Image] | Tensor:
        be = self.backend
        with torch.inference_mode():
            images = be.decode(x.float() / be.info.scaling_factor)
        images = (images.float() / 2 + 0.5).clamp(0, 1).cpu()
        if output == "tensor":
            return images
        return [self._to_pil(img, job, i) for i, img in enumerate(images)]

    def _encode_prompts(self, job: _Job, guided: bool) -> tuple[Tensor, Tensor]:
        """-> context (N, 77k, D) and token weights (N, 77k): rows [negatives; prompts] if guided, else prompts."""
        be = self.backend
        encoded = encode_prompts(be.tokenizers[0], [*job.negatives, *job.prompts] if guided else job.prompts)
        ids = torch.stack([e.ids for e in encoded]).to(be.device)  # (N, 77k)
        weights = torch.stack([e.weights for e in encoded]).to(be.device, be.dtype)
        with torch.inference_mode():
            ctx, _ = be.encode_text([ids.reshape(-1, 77)])  # each 77-token chunk encoded on its own
        return ctx.reshape(ids.shape[0], ids.shape[1], -1), weights

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
        pil.info["parameters"] = format_parameters(Parameters(
            prompt=job.prompts[i], negative_prompt=job.negatives[i], steps=job.steps,
            sampler=job.scheduler, cfg_scale=job.scale, seed=job.seeds[i], width=job.width,
            height=job.height, model_hash=info.hash, model=info.name,
            strength=job.strength if job.strength < 1.0 else None))
        return pil


def _inpaint_blend(schedule: Schedule, blend: tuple[Tensor, Tensor], noise: Tensor) -> Callback:
    """Legacy inpainting with a 4-channel UNet (diffusers): after each step the kept region is reset to
    the image latents noised to the next step's level (the image itself after the last)."""
    image_latents, mask = blend

    def callback(i: int, x: Tensor) -> Tensor:
        return (1 - mask) * add_noise(schedule, image_latents, noise, i + 1) + mask * x

    return callback


def _step_callback(total: int, progress: StepCallback | None, blend: Callback | None) -> Callback:
    def callback(i: int, x: Tensor) -> Tensor:
        if progress is not None:
            progress(i + 1, total)
        return x if blend is None else blend(i, x)

    return callback


def _prompt_lists(prompt: str | Sequence[str], negative: str | Sequence[str],
                  batch_size: int) -> tuple[list[str], list[str]]:
    """One prompt and one negative prompt per image."""
    if isinstance(prompt, str):
        prompts = [prompt] * batch_size
    else:
        prompts = list(prompt)
        if batch_size not in (1, len(prompts)):
            raise ValueError(f"got {len(prompts)} prompts but batch_size={batch_size}")
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    n = len(prompts)
    negatives = [negative] * n if isinstance(negative, str) else list(negative)
    if len(negatives) != n or not all(isinstance(p, str) for p in negatives):
        raise ValueError(f"negative_prompt must be a string or a list of {n} strings")
    return prompts, negatives


def _seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    if seed is None:
        base = secrets.randbelow(2**32)
        return [(base + i) % 2**64 for i in range(n)]
    if isinstance(seed, int):
        if isinstance(seed, bool):
            raise ValueError(f"seed must be an int or a list of {n} ints, got {seed!r}")
        return [seed + i for i in range(n)]  # A1111 convention: consecutive seeds in a batch
    seeds = list(seed)
    if len(seeds) != n or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be an int or a list of {n} ints, got {seed!r}")
    return seeds


def _draw(gens: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    """One standard-normal draw per image from its own CPU generator, float32."""
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, dtype=torch.float32) for g in gens])


def _batch_from(img: Tensor, batch_size: int) -> int:
    if img.shape[0] > 1 and batch_size not in (1, img.shape[0]):
        raise ValueError(f"got {img.shape[0]} images but batch_size={batch_size}")
    return max(batch_size, img.shape[0])


def _repeat(t: Tensor, n: int) -> Tensor:
    return t if t.shape[0] == n else t.expand(n, *t.shape[1:]).contiguous()


def to_image_tensor(image: ImageInput, what: str) -> Tensor:
    """PIL image(s) or a tensor (B, 3, H, W) / (3, H, W) in [0, 1] -> float32 (B, 3, H, W)."""
    if isinstance(image, Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"{what} tensor must be (B, 3, H, W) or (3, H, W), got {tuple(image.shape)}")
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError(f"{what} tensor values must be finite and within [0, 1]")
    else:
        pics = [image] if isinstance(image, Image.Image) else list(image)
        if not pics or not all(isinstance(p, Image.Image) for p in pics):
            raise ValueError(f"{what} must be a PIL image, a list of them, or a tensor")
        if len({p.size for p in pics}) != 1:
            raise ValueError(f"all {what}s must have the same size")
        arrs = [np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0 for p in pics]
        t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    if t.shape[2] % 8 or t.shape[3] % 8:
        raise ValueError(f"{what} height and width must be multiples of 8, got {t.shape[2]}x{t.shape[3]}")
    return t


def to_mask_tensor(mask: ImageInput) -> Tensor:
    """PIL mask(s) (white = repaint) or a tensor (B, 1, H, W) / (H, W) in [0, 1] -> (B, 1, H, W)."""
    if isinstance(mask, Tensor):
        t = mask.detach().float().cpu()
        while t.dim() < 4:
            t = t.unsqueeze(0)
        if t.shape[1] != 1:
            raise ValueError(f"mask tensor must be (B, 1, H, W), (1, H, W) or (H, W), got {tuple(mask.shape)}")
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError("mask tensor values must be finite and within [0, 1]")
        return t
    pics = [mask] if isinstance(mask, Image.Image) else list(mask)
    if not pics or not all(isinstance(p, Image.Image) for p in pics):
        raise ValueError("mask must be a PIL image, a list of them, or a tensor")
    arrs = [np.asarray(p.convert("L"), dtype=np.float32) / 255.0 for p in pics]
    return torch.from_numpy(np.stack(arrs)).unsqueeze(1)
