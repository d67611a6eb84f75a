"""A1111 requests -> worker jobs, and the `info` of the response.

Everything a request asks for is either honoured or refused with the field's name (RequestError, 4xx):
fields sent at A1111's defaults pass; `restore_faces`, scripts, subseeds, latent upscalers and the like
are refused when set. Samplers: A1111's names (and k-diffusion aliases) of runtime.samplers.SCHEDULERS;
`sampler_name` wins over `sampler_index`; scheduler "automatic", or "karras" with DPM++ 2M. `eta` is
DDIM's (A1111's default 0 there); Euler a runs at eta 1 only (A1111's default for ancestral samplers).
The one always-on script read is the ControlNet extension's (runtime/serve/controlnet.py).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from runtime.adapters.session import ADAPTER_SUFFIXES, parse_tags
from runtime.prompt import encode_prompts, schedule_prompts
from runtime.prompt_steps import composable
from runtime.samplers import SCHEDULERS
from runtime.serve import controlnet as cn
from runtime.serve import images as imgs
from runtime.serve.embeddings import Embeddings
from runtime.serve.errors import RequestError
from runtime.serve.models import Model, Models
from runtime.serve.schemas import Img2ImgRequest, Txt2ImgRequest, _Request
from runtime.serve.settings import ServeSettings
from runtime.serve.worker import Images, Job, Unit

SAMPLERS: dict[str, str] = {s.a1111: name for name, s in SCHEDULERS.items()}  # A1111 name -> ours
ALIASES: dict[str, str] = {"k_euler_a": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun",
                           "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_ka": "DPM++ 2M Karras"}
SCHEDULE_TYPES = ("automatic", "karras")
HR_UPSCALERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
MAX_IMAGES = 64  # batch_size x n_iter of one request
MAX_STEPS = 1000
LORA_SUFFIXES: tuple[str, ...] = ADAPTER_SUFFIXES  # the files a <lora:NAME> tag may name
CLIP_SKIP = 1


def sampler_list() -> list[dict[str, Any]]:
    return [{"name": a, "aliases": [k for k, v in ALIASES.items() if v == a] + [ours], "options": {}}
            for a, ours in SAMPLERS.items()]


def scheduler_list() -> list[dict[str, Any]]:
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
             "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]


def sampler(name: str | None, schedule: str | None, field: str, schedule_field: str) -> str:
    """A1111 sampler name (+ schedule type) -> our scheduler name."""
    if name is None or name == "":
        name = "Euler"
    a1111 = ALIASES.get(name, name)
    ours = SAMPLERS.get(a1111) or next((v for k, v in SAMPLERS.items() if k.lower() == a1111.lower()), None)
    if ours is None and name in SCHEDULERS:
        ours = name
    if ours is None:
        raise RequestError(field, f"unknown sampler {name!r}; this server has {list(SAMPLERS)}")
    kind = (schedule or "automatic").lower()
    if kind not in SCHEDULE_TYPES:
        raise RequestError(schedule_field, f"schedule type {schedule!r} is not available; use one of "
                                           f"{list(SCHEDULE_TYPES)}")
    if kind == "karras" and ours != "dpmpp_2m_karras":
        if ours != "dpmpp_2m":
            raise RequestError(schedule_field, f"the Karras schedule is available with DPM++ 2M only, not {name!r}")
        ours = "dpmpp_2m_karras"
    return ours


@dataclass
class Plan:
    job: Job
    model: Model
    seeds: list[int]
    sampler: str
    prompt: str
    negative: str
    strength: float | None
    width: int
    height: int
    init_images: list[str]  # base64, echoed when include_init_images


class Context:
    """What request mapping needs from the server: models, settings, the current options."""

    def __init__(self, settings: ServeSettings, models: Models) -> None:
        self.settings = settings
        self.models = models
        self.checkpoint = models.default
        self.controlnets = cn.ControlNets(settings.control_dir, settings.device)
        self.embeddings = Embeddings(settings.embeddings_dir)

    def options(self) -> dict[str, Any]:
        m = self.models.models[self.checkpoint]
        return {"sd_model_checkpoint": m.title, "sd_checkpoint_hash": m.manifest.model_hash,
                "CLIP_stop_at_last_layers": CLIP_SKIP, "samples_format": "png", "eta_ddim": 0.0,
                "eta_ancestral": 1.0, "sd_vae": "Automatic"}

    def set_options(self, values: dict[str, Any]) -> None:
        current = self.options()
        model = None
        for key, value in values.items():
            if key == "sd_model_checkpoint":
                model = self.models.resolve(value, key)
            elif key not in current or value != current[key]:
                raise RequestError(key, f"option {key!r} cannot be set to {value!r} on this server")
        if model is not None:
            self.checkpoint = model.name


def _refuse(field: str, value: Any, ok: Callable[[Any], bool], why: str) -> None:
    if not ok(value):
        raise RequestError(field, f"{value!r} is not supported ({why})")


def _check_common(req: _Request) -> None:
    _refuse("styles", req.styles, lambda v: not v, "no prompt styles on this server")
    _refuse("subseed_strength", req.subseed_strength, lambda v: v == 0, "no variation seeds")
    for f in ("seed_resize_from_h", "seed_resize_from_w"):
        _refuse(f, getattr(req, f), lambda v: v in (-1, 0), "no seed resize")
    _refuse("restore_faces", req.restore_faces, lambda v: not v, "no face restoration")
    _refuse("tiling", req.tiling, lambda v: not v, "no tiling")
    _refuse("s_churn", req.s_churn, lambda v: not v, "no churn")
    _refuse("s_tmin", req.s_tmin, lambda v: not v, "no churn")
    _refuse("s_noise", req.s_noise, lambda v: v in (None, 1.0), "no churn noise")
    _refuse("s_min_uncond", req.s_min_uncond, lambda v: not v, "no negative-guidance minimum sigma")
    _refuse("refiner_checkpoint", req.refiner_checkpoint, lambda v: v in (None, "", "None"), "no refiner")
    _refuse("script_name", req.script_name, lambda v: v in (None, "", "None"), "no scripts")
    _refuse("script_args", req.script_args, lambda v: not v, "no scripts")
    _refuse("save_images", req.save_images, lambda v: not v, "the server keeps no images; they are returned")
    _refuse("infotext", req.infotext, lambda v: not v, "infotext overrides are not read")
    for name, script in req.alwayson_scripts.items():
        if name.lower() == cn.SCRIPT:
            continue  # runtime/serve/controlnet.py
        args = script.get("args") if isinstance(script, dict) else None
        if args not in (None, [], [False]):
            raise RequestError(f"alwayson_scripts.{name}", "no such script on this server")
    if not math.isfinite(req.cfg_scale) or req.cfg_scale < 0:
        raise RequestError("cfg_scale", f"must be a finite number >= 0, got {req.cfg_scale}")
    if not 1 <= req.steps <= MAX_STEPS:
        raise RequestError("steps", f"must be within 1..{MAX_STEPS}, got {req.steps}")
    if req.batch_size < 1 or req.n_iter < 1:
        raise RequestError("batch_size" if req.batch_size < 1 else "n_iter", "must be >= 1")
    if req.batch_size * req.n_iter > MAX_IMAGES:
        raise RequestError("batch_size", f"batch_size x n_iter = {req.batch_size * req.n_iter} images, "
                                         f"at most {MAX_IMAGES} per request")


def _model(req: _Request, ctx: Context) -> Model:
    settings = dict(req.override_settings or {})
    name = settings.pop("sd_model_checkpoint", None) or ctx.checkpoint
    current = ctx.options()
    for key, value in settings.items():
        if key not in current or value != current[key]:
            raise RequestError(f"override_settings.{key}", f"{value!r} cannot be honoured on this server")
    return ctx.models.resolve(name, "override_settings.sd_model_checkpoint")


def _size(model: Model, width: int, height: int, wfield: str = "width", hfield: str = "height") -> None:
    s = model.manifest.shapes
    for field, px in ((wfield, width), (hfield, height)):
        if not s.min_size <= px <= s.max_size or px % s.multiple:
            raise RequestError(field, f"{px} px is outside model {model.name!r}'s range: multiples of "
                                      f"{s.multiple} from {s.min_size} to {s.max_size} px")


def _eta(ours: str, eta: float | None) -> float:
    if ours == "euler_a":
        if eta not in (None, 1.0):
            raise RequestError("eta", f"Euler a runs fully ancestral (eta 1) here, got {eta}")
        return 0.0
    if eta is None:
        return 0.0  # A1111's eta_ddim default; the other samplers take no eta
    if not math.isfinite(eta) or eta < 0:
        raise RequestError("eta", f"must be a finite number >= 0, got {eta}")
    return float(eta) if ours == "ddim" else 0.0


def _seeds(req: _Request) -> list[int]:
    n = req.batch_size * req.n_iter
    seed = req.seed if req.seed != -1 else secrets.randbelow(2**32)
    if seed < 0:
        raise RequestError("seed", f"must be -1 (random) or >= 0, got {req.seed}")
    return [seed + i for i in range(n)]


def _prompt(req: _Request, ctx: Context) -> str:
    if req.disable_extra_networks:
        return parse_tags(req.prompt)[0]
    try:
        _, tags = parse_tags(req.prompt)
    except ValueError as e:
        raise RequestError("prompt", str(e)) from None
    if tags and ctx.settings.lora_dir is None:
        raise RequestError("prompt", "has <lora:...> tags, but this server was started without --lora-dir")
    for name, *_ in tags:  # parse_tags refused paths: NAME is a file stem directly inside lora_dir
        assert ctx.settings.lora_dir is not None
        if not any((ctx.settings.lora_dir / f"{name}{s}").is_file() for s in LORA_SUFFIXES):
            raise RequestError("prompt", f"no LoRA named {name!r} on this server (see /sdapi/v1/loras)")
    return req.prompt


def _chunks(ctx: Context, model: Model, prompt: str, negative: str, steps: int, syntax: str) -> tuple[int, Hashable]:
    """77-token chunk count of the request's texts (batched requests must share it: padding a prompt
    to more chunks changes its image; an embedding counts as its vectors) and its LoRA tag set."""
    try:
        text, tags = parse_tags(prompt)
        texts, _ = composable([text], syntax)  # type: ignore[arg-type]
        sched = schedule_prompts([negative, texts[0]], steps, decimal_fraction=syntax == "a1111")
        with ctx.embeddings.tokenizers(model, [text, negative]) as toks:
            n = max(encode_prompts(tok, list(sched.texts), syntax=syntax)[0].n_chunks  # type: ignore[arg-type]
                    for tok in toks)
    except ValueError as e:
        raise RequestError("prompt", str(e)) from None
    if n > model.manifest.shapes.max_chunks:
        raise RequestError("prompt", f"too long: {n} chunks of 75 tokens, model {model.name!r} takes at most "
                                     f"{model.manifest.shapes.max_chunks}")
    return n, tuple(tags)


def _key(kind: str, model: Model, width: int, height: int, scale: float, kwargs: dict[str, Any],
         text: Hashable) -> Hashable:
    """The batching key: units run in one call only when everything the call shares is equal: the kind,
    model, image size, the pipeline keywords (steps, sampler, eta, strength, prompt options), guidance on
    or off, and `text` (chunk count and LoRA tags, `_chunks`). Init images, masks, prompts, seeds and CFG
    scales are per image. Keywords that cannot be compared (not hashable) run alone."""
    key = (model.name, kind, width, height, scale > 1.0, text, tuple(sorted(kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _units(kind: str, model: Model, prompt: str, negative: str, seeds: list[int], scale: float,
           kwargs: dict[str, Any], batch_size: int, key: Hashable | None,
           images: list[Image.Image] | None = None, mask: Image.Image | None = None,
           post: Callable[[Images], Images] | None = None, control: cn.ControlCall | None = None) -> list[Unit]:
    """n_iter x batch_size images in calls of at most the model's max_batch (with `control`: its
    ControlNet keywords, and only batched with the same ControlNet setup)."""
    if control is not None:
        kwargs = {**kwargs, **control.kwargs}
        key = None if key is None else (key, control.key)
    step = min(batch_size, model.manifest.shapes.max_batch)
    out = []
    for start in range(0, len(seeds), batch_size):
        it = seeds[start:start + batch_size]
        for k in range(0, len(it), step):
            s = it[k:k + step]
            ims = None if images is None else [images[(start + k + i) % len(images)] for i in range(len(s))]
            out.append(Unit(kind, model.name, [prompt] * len(s), [negative] * len(s), s, scale, kwargs, ims,
                            mask, key, post))
    return out


def _common(req: Txt2ImgRequest | Img2ImgRequest, ctx: Context) -> tuple[Model, str, float, str]:
    """What txt2img and img2img read alike: the model, our sampler, its eta and the prompt (checked)."""
    _check_common(req)
    model = _model(req, ctx)
    _size(model, req.width, req.height)
    ours = sampler(req.sampler_name or req.sampler_index, req.scheduler,
                   "sampler_name" if req.sampler_name else "sampler_index", "scheduler")
    eta = _eta(ours, req.eta)
    prompt = _prompt(req, ctx)
    return model, ours, eta, prompt


def txt2img(req: Txt2ImgRequest, ctx: Context) -> Plan:
    model, ours, eta, prompt = _common(req, ctx)
    syntax, emphasis = ctx.settings.syntax, ctx.settings.emphasis
    text = _chunks(ctx, model, prompt, req.negative_prompt, req.steps, syntax)
    seeds = _seeds(req)
    kwargs = dict(steps=req.steps, height=req.height, width=req.width, scheduler=ours, eta=eta, syntax=syntax,
                  emphasis=emphasis)
    key = _key("txt2img", model, req.width, req.height, req.cfg_scale, kwargs, text)
    control = _control(req, ctx, model)
    if control is not None and req.enable_hr:
        raise RequestError("enable_hr", "hires fix with ControlNet is not supported on this server")
    units = _units("txt2img", model, prompt, req.negative_prompt, seeds, req.cfg_scale, kwargs, req.batch_size,
                   key, control=None if control is None else control.at(req.width, req.height))
    then = _hires(req, ctx, model, ours, prompt, seeds) if req.enable_hr else None
    strength = req.denoising_strength if req.enable_hr else None
    return Plan(Job(units, then), model, seeds, ours, req.prompt, req.negative_prompt, strength, req.width,
                req.height, [])


def _control(req: Txt2ImgRequest | Img2ImgRequest, ctx: Context, model: Model,
             fallback: Image.Image | None = None) -> cn.ControlPlan | None:
    rows = (2 if req.cfg_scale > 1.0 else 1) * min(req.batch_size, model.manifest.shapes.max_batch)
    return cn.plan(req.alwayson_scripts, ctx.controlnets, model.manifest, req.width, req.height,
                   ctx.settings.max_image_pixels, fallback, rows)


def _hires(req: Txt2ImgRequest, ctx: Context, model: Model, first: str, prompt: str,
           seeds: list[int]) -> Callable[[Images], list[Unit]]:
    """Hires fix: txt2img, then each image upscaled in pixels and run through img2img at
    denoising_strength (A1111's second pass, same seeds)."""
    if req.firstphase_width or req.firstphase_height:
        raise RequestError("firstphase_width", "the pre-1.0 hires fix fields are not supported; use hr_scale")
    if req.hr_upscaler not in HR_UPSCALERS:
        raise RequestError("hr_upscaler", f"{req.hr_upscaler!r} is not available; use one of {list(HR_UPSCALERS)}")
    _refuse("hr_checkpoint_name", req.hr_checkpoint_name, lambda v: v in (None, "", "Use same checkpoint"),
            "the second pass uses the same model")
    if req.hr_resize_x or req.hr_resize_y:
        w = req.hr_resize_x or req.width * req.hr_resize_y // req.height
        h = req.hr_resize_y or req.height * req.hr_resize_x // req.width
        fields = ("hr_resize_x", "hr_resize_y")
    else:
        if not math.isfinite(req.hr_scale) or req.hr_scale <= 0:
            raise RequestError("hr_scale", f"must be a positive number, got {req.hr_scale}")
        w, h = int(req.width * req.hr_scale), int(req.height * req.hr_scale)
        fields = ("hr_scale", "hr_scale")
    _size(model, w, h, *fields)
    strength = 0.7 if req.denoising_strength is None else req.denoising_strength
    if not 0 <= strength <= 1:
        raise RequestError("denoising_strength", f"must be within [0, 1], got {strength}")
    same = req.hr_sampler_name in (None, "", "Use same sampler")
    ours = first if same and req.hr_scheduler in (None, "", "Use same scheduler") else sampler(
        req.hr_sampler_name if not same else (req.sampler_name or req.sampler_index),
        None if req.hr_scheduler in (None, "", "Use same scheduler") else req.hr_scheduler,
        "hr_sampler_name", "hr_scheduler")
    eta = _eta(ours, req.eta)
    steps = req.hr_second_pass_steps or req.steps
    if not 1 <= steps <= MAX_STEPS:
        raise RequestError("hr_second_pass_steps", f"must be within 0..{MAX_STEPS}")
    hr_prompt = req.hr_prompt or prompt
    hr_negative = req.hr_negative_prompt or req.negative_prompt
    text = _chunks(ctx, model, hr_prompt, hr_negative, steps, ctx.settings.syntax)
    resample = HR_UPSCALERS[req.hr_upscaler]
    kwargs = dict(steps=steps, scheduler=ours, eta=eta, strength=strength, syntax=ctx.settings.syntax,
                  emphasis=ctx.settings.emphasis)
    key = _key("img2img", model, w, h, req.cfg_scale, kwargs, text)
    tag = f", Hires upscale: {req.hr_scale:g}, Hires upscaler: {req.hr_upscaler}"
    if req.hr_resize_x or req.hr_resize_y:
        tag = f", Hires resize: {w}x{h}, Hires upscaler: {req.hr_upscaler}"

    def mark(images: Images) -> Images:
        for im in images:
            im.info["parameters"] = str(im.info.get("parameters", "")) + tag
        return images

    def second(first_pass: Images) -> list[Unit]:
        up = [im.resize((w, h), resample=resample) for im in first_pass]
        return _units("img2img", model, hr_prompt, hr_negative, seeds, req.cfg_scale, kwargs, req.batch_size,
                      key, up, post=mark)

    return second


def img2img(req: Img2ImgRequest, ctx: Context) -> Plan:
    model, ours, eta, prompt = _common(req, ctx)
    syntax, emphasis = ctx.settings.syntax, ctx.settings.emphasis
    text = _chunks(ctx, model, prompt, req.negative_prompt, req.steps, syntax)
    if not req.init_images:
        raise RequestError("init_images", "give at least one image")
    _refuse("resize_mode", req.resize_mode, lambda v: v in (0, 1), "0 (just resize) or 1 (crop and resize)")
    _refuse("inpainting_fill", req.inpainting_fill, lambda v: v in (0, 1), "0 (fill) or 1 (original)")
    _refuse("inpainting_mask_invert", req.inpainting_mask_invert, lambda v: v in (0, 1), "0 or 1")
    _refuse("initial_noise_multiplier", req.initial_noise_multiplier, lambda v: v in (None, 1.0),
            "no initial noise multiplier")
    _refuse("latent_mask", req.latent_mask, lambda v: not v, "no separate latent mask")
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    if not 0 <= strength <= 1:
        raise RequestError("denoising_strength", f"must be within [0, 1], got {strength}")
    limit = ctx.settings.max_image_pixels
    originals = [imgs.decode_image(d, f"init_images[{i}]", limit).convert("RGB")
                 for i, d in enumerate(req.init_images)]
    seeds = _seeds(req)
    kwargs = dict(steps=req.steps, scheduler=ours, eta=eta, strength=strength, syntax=syntax, emphasis=emphasis)
    control = _control(req, ctx, model, originals[0])
    if req.mask is None:
        inits = [imgs.resize(im, req.width, req.height, req.resize_mode) for im in originals]
        key = _key("img2img", model, req.width, req.height, req.cfg_scale, kwargs, text)
        units = _units("img2img", model, prompt, req.negative_prompt, seeds, req.cfg_scale, kwargs,
                       req.batch_size, key, inits, control=None if control is None else control.at(req.width,
                                                                                                    req.height))
    else:
        key = _key("inpaint", model, req.width, req.height, req.cfg_scale, kwargs, text)
        units = _inpaint_units(req, ctx, model, prompt, seeds, kwargs, originals, key, control)
    return Plan(Job(units), model, seeds, ours, req.prompt, req.negative_prompt, strength, req.width, req.height,
                list(req.init_images) if req.include_init_images else [])


def _inpaint_units(req: Img2ImgRequest, ctx: Context, model: Model, prompt: str, seeds: list[int],
                   kwargs: dict[str, Any], originals: list[Image.Image], key: Hashable,
                   control: cn.ControlPlan | None = None) -> list[Unit]:
    """A1111's inpaint: blurred (and maybe inverted) mask; "only masked" crops the mask's box (plus
    padding) and scales it to width x height; "fill" paints the masked area first; the result is laid
    over the original through the blurred mask."""
    assert req.mask is not None
    raw = imgs.decode_image(req.mask, "mask", ctx.settings.max_image_pixels)
    if len({im.size for im in originals}) != 1:
        raise RequestError("init_images", "with a mask, all init images must have one size")
    blur_x = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    blur_y = req.mask_blur if req.mask_blur is not None else req.mask_blur_y
    size = originals[0].size
    box = None
    if req.inpaint_full_res:
        mask = imgs.prepare_mask(raw.resize(size) if raw.size != size else raw, bool(req.inpainting_mask_invert),
                                 blur_x, blur_y)
        box = imgs.crop_region(mask, req.inpaint_full_res_padding, req.width, req.height)
    if box is None:  # whole picture (or an empty mask)
        bases = [imgs.resize(im, req.width, req.height, req.resize_mode) for im in originals]
        mask = imgs.prepare_mask(imgs.resize(raw.convert("L"), req.width, req.height, req.resize_mode),
                                 bool(req.inpainting_mask_invert), blur_x, blur_y)
        crops, model_mask = bases, mask
    else:
        bases = originals
        crops = [im.crop(box).resize((req.width, req.height), resample=Image.Resampling.LANCZOS) for im in bases]
        model_mask = mask.crop(box).resize((req.width, req.height), resample=Image.Resampling.LANCZOS)
    if req.inpainting_fill == 0:
        crops = [imgs.fill(im, model_mask) for im in crops]
    base_of = {id(c): b for c, b in zip(crops, bases, strict=True)}
    call = None if control is None else control.at(req.width, req.height, box, size if box is not None else None)
    units = _units("inpaint", model, prompt, req.negative_prompt, seeds, req.cfg_scale, kwargs, req.batch_size,
                   key, crops, model_mask, control=call)
    for u in units:
        assert u.images is not None
        its_bases = [base_of[id(c)] for c in u.images]

        def post(out: Images, its_bases: list[Image.Image] = its_bases) -> Images:
            return [imgs.paste_back(b, o, mask, box) for b, o in zip(its_bases, out, strict=True)]

        u.post = post
    return units


def info(plan: Plan, req: _Request, images: Images, interrupted: bool) -> str:
    """A1111's `info` JSON string (modules/processing.py Processed.js)."""
    texts = [str(im.info.get("parameters", "")) for im in images]
    n = len(plan.seeds)
    m = plan.model
    return json.dumps({
        "prompt": plan.prompt, "all_prompts": [plan.prompt] * n,
        "negative_prompt": plan.negative, "all_negative_prompts": [plan.negative] * n,
        "seed": plan.seeds[0], "all_seeds": plan.seeds, "subseed": plan.seeds[0], "all_subseeds": plan.seeds,
        "subseed_strength": 0, "width": plan.width, "height": plan.height,
        "sampler_name": SCHEDULERS[plan.sampler].a1111, "cfg_scale": req.cfg_scale, "steps": req.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": m.name, "sd_model_hash": m.manifest.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": plan.strength,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": "", "clip_skip": CLIP_SKIP, "is_using_inpainting_conditioning":
            m.manifest.unet_in_channels == 9, "version": "sdexport", "interrupted": interrupted,
        "model_calls_run": plan.job.calls_run,
    })


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111 `parameters` text -> {"Prompt", "Negative prompt", key: value...} (values as written)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    out: dict[str, Any] = {}
    if len(lines) > 1 or (last.count(":") >= 3 and "Steps:" in last):
        body, fields = lines[:-1], last
    else:
        body, fields = lines, ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out["Prompt"] = "\n".join(prompt)
    out["Negative prompt"] = "\n".join(negative)
    key, i = "", 0
    while i < len(fields):  # key: value, key: "quoted, value", ...
        j = fields.find(":", i)
        if j < 0:
            break
        key = fields[i:j].strip()
        i = j + 1
        while i < len(fields) and fields[i] == " ":
            i += 1
        if i < len(fields) and fields[i] == '"':
            end = fields.find('"', i + 1)
            end = len(fields) if end < 0 else end
            out[key], i = fields[i + 1:end], end + 1
        else:
            end = fields.find(",", i)
            end = len(fields) if end < 0 else end
            out[key], i = fields[i:end].strip(), end
        while i < len(fields) and fields[i] in ", ":
            i += 1
    return out
