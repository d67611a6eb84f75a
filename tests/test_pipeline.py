"""Eager pipeline parity with diffusers' pipelines on tiny random models, plus determinism and errors.

Tolerance: float32 images (in [0, 1]) match to <= 1e-3 max abs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.samplers import SCHEDULER_NAMES
from sdexport import StableDiffusion

TOL = 1e-3
H = W = 64
PROMPT = "a photo of a (red):1.2 fox, [snow]"
NEG = "blurry, low quality"


def _diffusers_scheduler(name: str, config: dict[str, Any]) -> Any:
    import diffusers as d

    classes = {
        "ddim": d.DDIMScheduler, "pndm": d.PNDMScheduler, "lms": d.LMSDiscreteScheduler,
        "euler": d.EulerDiscreteScheduler, "euler_a": d.EulerAncestralDiscreteScheduler,
        "heun": d.HeunDiscreteScheduler, "dpmpp_2m": d.DPMSolverMultistepScheduler,
        "dpmpp_2m_karras": d.DPMSolverMultistepScheduler, "unipc": d.UniPCMultistepScheduler,
    }
    extra = {"use_karras_sigmas": True} if name == "dpmpp_2m_karras" else {}
    return classes[name].from_config(config, **extra)


def _base_config(pipe: Any) -> dict[str, Any]:
    """The folder's scheduler config (the cached pipeline's current scheduler may be another one)."""
    return dict(pipe._sdexport_scheduler_config)


@functools.cache
def _diffusers(folder: Path, kind: str = "text2img") -> Any:
    import diffusers as d

    cls = {"text2img": d.StableDiffusionPipeline, "img2img": d.StableDiffusionImg2ImgPipeline,
           "inpaint": d.StableDiffusionInpaintPipeline}[kind]
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe._sdexport_scheduler_config = dict(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def sd1(sd1_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture(scope="module")
def sd2(sd2_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sd2_folder)


def _latents(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


DETERMINISTIC = [s for s in SCHEDULER_NAMES if s != "euler_a"]


@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_text2img_matches_diffusers_sd1(sd1_folder: Path, sd1: StableDiffusion, scheduler: str) -> None:
    ref_pipe = _diffusers(sd1_folder)
    ref_pipe.scheduler = _diffusers_scheduler(scheduler, _base_config(ref_pipe))
    lat = _latents(1)
    prompt = "a photo of a red fox in the snow"
    ref = ref_pipe(prompt, negative_prompt=NEG, num_inference_steps=5, guidance_scale=7.5, height=H, width=W,
                   latents=lat.clone(), output_type="pt").images
    ours = sd1.text2img(prompt, NEG, steps=5, scale=7.5, height=H, width=W, scheduler=scheduler,
                        latents=lat, output="tensor")
    assert isinstance(ours, torch.Tensor)
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_text2img_matches_diffusers_sd2_v_prediction(sd2_folder: Path, sd2: StableDiffusion,
                                                     scheduler: str) -> None:
    assert sd2.info.scheduler_config["prediction_type"] == "v_prediction"
    ref_pipe = _diffusers(sd2_folder)
    ref_pipe.scheduler = _diffusers_scheduler(scheduler, _base_config(ref_pipe))
    lat = _latents(2, batch=2)
    prompts = ["an astronaut riding a horse", "a bowl of fruit"]
    ref = ref_pipe(prompts, negative_prompt=["", "dark"], num_inference_steps=4, guidance_scale=5.0,
                   height=H, width=W, latents=lat.clone(), output_type="pt").images
    ours = sd2.text2img(prompts, ["", "dark"], steps=4, scale=5.0, height=H, width=W, scheduler=scheduler,
                        latents=lat, output="tensor")
    assert isinstance(ours, torch.Tensor)
    assert (ours - ref).abs().max().item() <= TOL


def test_euler_ancestral_matches_diffusers_with_same_generator(sd1_folder: Path, sd1: StableDiffusion) -> None:
    ref_pipe = _diffusers(sd1_folder)
    ref_pipe.scheduler = _diffusers_scheduler("euler_a", _base_config(ref_pipe))
    ref = ref_pipe("a cat", num_inference_steps=4, height=H, width=W, output_type="pt",
                   generator=[torch.Generator().manual_seed(11)]).images
    ours = sd1.text2img("a cat", steps=4, height=H, width=W, scheduler="euler_a", seed=11, output="tensor")
    assert isinstance(ours, torch.Tensor)
    assert (ours - ref).abs().max().item() <= TOL


def test_img2img_matches_diffusers(sd1_folder: Path, sd1: StableDiffusion) -> None:
    ref_pipe = _diffusers(sd1_folder, "img2img")
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    ref = ref_pipe("a watercolor landscape", image=image, strength=0.6, num_inference_steps=10,
                   guidance_scale=7.5, output_type="pt", generator=torch.Generator().manual_seed(5)).images
    ours = sd1.img2img(image, "a watercolor landscape", strength=0.6, steps=10, scale=7.5, seed=5,
                       output="tensor")
    assert isinstance(ours, torch.Tensor)
    assert (ours - ref).abs().max().item() <= TOL


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, H, W)
    mask[..., 16:48, 8:40] = 1.0
    return mask


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_9_channel_matches_diffusers(inpaint_folder: Path, strength: float) -> None:
    ref_pipe = _diffusers(inpaint_folder, "inpaint")
    ours_pipe = StableDiffusion.from_pretrained(inpaint_folder)
    assert ours_pipe.info.unet_in_channels == 9
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(4))
    ref = ref_pipe("a red door", image=image, mask_image=_mask(), height=H, width=W, strength=strength,
                   num_inference_steps=6, output_type="pt", generator=torch.Generator().manual_seed(9)).images
    ours = ours_pipe.inpaint(image, _mask(), "a red door", strength=strength, steps=6, seed=9, output="tensor")
    assert isinstance(ours, torch.Tensor)
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_inpaint_4_channel_matches_diffusers(sd1_folder: Path, sd1: StableDiffusion, scheduler: str) -> None:
    ref_pipe = _diffusers(sd1_folder, "inpaint")
    ref_pipe.scheduler = _diffusers_scheduler(scheduler, _base_config(ref_pipe))
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(4))
    ref = ref_pipe("a red door", image=image, mask_image=_mask(), height=H, width=W, num_inference_steps=6,
                   output_type="pt", generator=torch.Generator().manual_seed(9)).images
    ours = sd1.inpaint(image, _mask(), "a red door", steps=6, seed=9, scheduler=scheduler, output="tensor")
    assert isinstance(ours, torch.Tensor)
    assert (ours - ref).abs().max().item() <= TOL


# ---- emphasis ---------------------------------------------------------------------------------
def test_weight_one_equals_plain_prompt_bit_for_bit(sd1: StableDiffusion) -> None:
    lat = _latents(5)
    plain = sd1.text2img("a red fox", steps=3, height=H, width=W, latents=lat, output="tensor")
    weighted = sd1.text2img("a (red fox):1", steps=3, height=H, width=W, latents=lat, output="tensor")
    assert torch.equal(plain, weighted)


@pytest.mark.parametrize("weight", [0.0, -1.0, 1.5])
def test_token_weight_matches_scaled_value_rows(sd1: StableDiffusion, weight: float) -> None:
    """`(red):w` equals running the UNet with that token's value rows scaled by w in cross-attention
    (w = 0: removed, w < 0: negated)."""
    tok = sd1.tokenizer
    red = tok.tokenize("red")
    assert len(red) == 1
    ids = torch.tensor([[tok.bos_id, *tok.tokenize("a red fox"), tok.eos_id] + [tok.pad_id] * 72])
    ctx = sd1.text_encoder(ids)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(400.0)
    weights = torch.ones(1, 77)
    weights[0, 2] = weight  # BOS, "a", "red"
    ours = sd1.unet(x, t, ctx, weights)

    # Reference: patch every cross-attention so that the value row of token 2 is scaled by `weight`.
    from sdexport.models.attention import Attention

    originals: dict[Attention, Any] = {}

    def scale_v(mod: Attention) -> Any:
        lin = mod.to_v

        def forward(inp: torch.Tensor) -> torch.Tensor:
            out = torch.nn.functional.linear(inp, lin.weight, lin.bias)
            if inp.shape[1] == 77:
                out = out.clone()
                out[:, 2] *= weight
            return out

        return forward

    for name, m in sd1.unet.named_modules():
        if isinstance(m, Attention) and name.endswith("attn2"):  # attn2 = cross-attention
            originals[m] = m.to_v.forward
            m.to_v.forward = scale_v(m)  # type: ignore[method-assign]
    try:
        assert originals, "no cross-attention found"
        ref = sd1.unet(x, t, ctx, None)
    finally:
        for m, f in originals.items():
            m.to_v.forward = f  # type: ignore[method-assign]
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - sd1.unet(x, t, ctx, None)).abs().max().item() > 1e-4  # the weight does something
    # and through the prompt parser: "(red):w" puts weight w on exactly that token
    from runtime.prompt import encode_prompt

    enc = encode_prompt(tok, f"a (red):{weight:g} fox")
    assert enc.weights[:5].tolist() == [1.0, 1.0, weight, 1.0, 1.0]


def test_negative_weight_image_is_finite_and_differs(sd1: StableDiffusion) -> None:
    lat = _latents(6)
    base = sd1.text2img("a red fox", steps=3, height=H, width=W, latents=lat, output="tensor")
    neg = sd1.text2img("a (red):-1 fox", steps=3, height=H, width=W, latents=lat, output="tensor")
    assert isinstance(base, torch.Tensor) and isinstance(neg, torch.Tensor)
    assert torch.isfinite(neg).all()
    assert (base - neg).abs().max().item() > 1e-4


def _unet_contexts(sd: StableDiffusion, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Records the context shape of every UNet call of `sd`."""
    seen: list[tuple[int, ...]] = []
    unet = sd.backend.unet

    def spy(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(context.shape))
        assert weights.shape == context.shape[:2]
        return unet(x, t, context, weights)

    monkeypatch.setattr(sd.backend, "unet", spy)
    return seen


def test_long_prompt_uses_more_chunks(sd1: StableDiffusion, monkeypatch: pytest.MonkeyPatch) -> None:
    long_prompt = ", ".join(["a very detailed painting of a fox"] * 20)
    n_tokens = len(sd1.tokenizer.tokenize(long_prompt))
    assert 150 < n_tokens <= 225  # three 75-token chunks
    width = sd1.text_encoder(torch.zeros(1, 77, dtype=torch.int64)).shape[-1]
    seen = _unet_contexts(sd1, monkeypatch)
    img = sd1.text2img(long_prompt, "short", steps=2, height=H, width=W, seed=1, output="tensor")
    # CFG rows [negative; prompt], both padded to the long prompt's 3 chunks of 77 tokens
    assert seen == [(2, 3 * 77, width)] * 2
    seen.clear()
    short = sd1.text2img(long_prompt[:60], "short", steps=2, height=H, width=W, seed=1, output="tensor")
    assert seen == [(2, 77, width)] * 2
    assert isinstance(img, torch.Tensor) and torch.isfinite(img).all()
    assert not torch.equal(img, short)


# ---- determinism and options ------------------------------------------------------------------
def test_same_seed_same_image_different_seed_differs(sd1: StableDiffusion) -> None:
    a = sd1.text2img(PROMPT, steps=3, height=H, width=W, seed=42, scheduler="euler_a", output="tensor")
    b = sd1.text2img(PROMPT, steps=3, height=H, width=W, seed=42, scheduler="euler_a", output="tensor")
    c = sd1.text2img(PROMPT, steps=3, height=H, width=W, seed=43, scheduler="euler_a", output="tensor")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_seeds_are_per_image(sd1: StableDiffusion) -> None:
    batch = sd1.text2img(PROMPT, steps=3, height=H, width=W, seed=[7, 8], batch_size=2, output="tensor")
    single = sd1.text2img(PROMPT, steps=3, height=H, width=W, seed=8, output="tensor")
    assert isinstance(batch, torch.Tensor) and isinstance(single, torch.Tensor)
    assert (batch[1] - single[0]).abs().max().item() <= 1e-5


def test_low_ram_and_split_attention_match(sd1: StableDiffusion) -> None:
    lat = _latents(8)
    ref = sd1.text2img(PROMPT, steps=3, height=H, width=W, latents=lat, output="tensor")
    try:
        sd1.low_ram().split_attention(4)
        other = sd1.text2img(PROMPT, steps=3, height=H, width=W, latents=lat, output="tensor")
    finally:
        sd1.low_ram(False).split_attention(1)
    assert (ref - other).abs().max().item() <= 1e-5


def test_pil_output_carries_parameters(sd1: StableDiffusion, tmp_path: Path) -> None:
    from runtime.png import save_png

    images = sd1.text2img("a fox", "ugly", steps=2, scale=6, height=H, width=W, seed=3, scheduler="euler")
    assert isinstance(images, list) and isinstance(images[0], Image.Image)
    assert images[0].size == (W, H)
    path = save_png(images[0], tmp_path / "x.png")
    text = Image.open(path).info["parameters"]
    assert text.splitlines()[0] == "a fox"
    assert "Negative prompt: ugly" in text
    assert "Steps: 2, Sampler: Euler, CFG scale: 6, Seed: 3, Size: 64x64" in text
    assert np.asarray(Image.open(path)).shape == (H, W, 3)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 60}, "height must be a positive multiple of 8"),
        ({"width": 0}, "width must be a positive multiple of 8"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"scale": float("nan")}, "scale (CFG) must be a finite number"),
        ({"scheduler": "nope"}, "unknown scheduler 'nope'"),
        ({"eta": -1.0}, "eta must be a finite number >= 0"),
        ({"latents": torch.zeros(1, 4, 4, 4)}, "latents must have shape"),
        ({"seed": [1, 2]}, "seed must be an int or a list of 1 ints"),
        ({"output": "jpeg"}, "output must be 'pil' or 'tensor'"),
    ],
)
def test_bad_text2img_arguments(sd1: StableDiffusion, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"steps": 2, "height": H, "width": W, **kwargs}
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        sd1.text2img("a fox", **args)


def test_bad_img2img_and_inpaint_arguments(sd1: StableDiffusion) -> None:
    image = torch.rand(1, 3, H, W)
    with pytest.raises(ValueError, match=r"strength must be within \[0, 1\]"):
        sd1.img2img(image, "a fox", strength=1.5, steps=2)
    with pytest.raises(ValueError, match="mask size"):
        sd1.inpaint(image, torch.ones(1, 1, 32, 32), "a fox", steps=2)
    with pytest.raises(ValueError, match="values must be finite and within"):
        sd1.img2img(image * 3, "a fox", steps=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        sd1.img2img(torch.rand(1, 3, 60, 64), "a fox", steps=2)


def test_unknown_keyword_is_a_type_error(sd1: StableDiffusion) -> None:
    """The shared keywords arrive as **options (Pipeline.Options): a misspelt one still fails like a plain
    signature would, on every method, before any work."""
    image = torch.rand(1, 3, H, W)
    calls = (lambda: sd1.text2img("a fox", steps=2, guess_mod=True),  # type: ignore[call-arg]
             lambda: sd1.img2img(image, "a fox", steps=2, control_scales=0.5),  # type: ignore[call-arg]
             lambda: sd1.inpaint(image, torch.ones(1, 1, H, W), "a fox", steps=2, emphasys="none"))  # type: ignore[call-arg]
    for call, name in zip(calls, ("guess_mod", "control_scales", "emphasys"), strict=True):
        with pytest.raises(TypeError, match=f"unexpected keyword argument.*{name}"):
            call()
