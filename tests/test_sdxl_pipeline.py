"""Eager SDXL (base and refiner) parity with diffusers' SDXL pipelines on tiny random models, plus the
added conditioning's rules, fp16 with the VAE upcast, and errors. Tolerance: images in [0, 1] to 1e-3.

diffusers' SDXL default guidance is 5.0, ours 7.5 (unchanged API): calls without `scale` pass 7.5 to diffusers.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from test_pipeline import _diffusers_scheduler

from runtime.samplers import SCHEDULER_NAMES
from sdexport import StableDiffusion
from sdexport.loading import CheckpointError

TOL = 1e-3
H = W = 64
NEG = "blurry, low quality"


@functools.cache
def _diffusers(folder: Path, kind: str = "text2img") -> Any:
    import diffusers as d

    cls = {"text2img": d.StableDiffusionXLPipeline, "img2img": d.StableDiffusionXLImg2ImgPipeline,
           "inpaint": d.StableDiffusionXLInpaintPipeline}[kind]
    pipe = cls.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe._sdexport_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def _with_scheduler(pipe: Any, name: str) -> Any:
    pipe.scheduler = _diffusers_scheduler(name, dict(pipe._sdexport_scheduler_config))
    return pipe


@pytest.fixture(scope="module")
def sdxl(sdxl_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sdxl_folder)


@pytest.fixture(scope="module")
def refiner(sdxl_refiner_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sdxl_refiner_folder)


def _latents(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def _image(seed: int = 3) -> torch.Tensor:
    return torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _close(ours: Any, ref: torch.Tensor) -> None:
    assert isinstance(ours, torch.Tensor)
    assert (ours - ref).abs().max().item() <= TOL


def test_loads_family_and_flags(sdxl: StableDiffusion, refiner: StableDiffusion) -> None:
    assert (sdxl.info.family, sdxl.info.time_ids, sdxl.info.force_zeros_for_empty_prompt) == ("sdxl", 6, True)
    assert (refiner.info.family, refiner.info.time_ids, refiner.info.force_zeros_for_empty_prompt) == (
        "sdxl-refiner", 5, False)
    assert sdxl.info.force_upcast and refiner.info.force_upcast
    assert [t.pad_token for t in sdxl.tokenizers] == ["<|endoftext|>", "!"]
    assert [t.pad_token for t in refiner.tokenizers] == ["!"]
    assert refiner.text_encoder is None and refiner.text_encoder_2 is not None


# ---- text2img -----------------------------------------------------------------------------------
DETERMINISTIC = [s for s in SCHEDULER_NAMES if s != "euler_a"]


@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_text2img_matches_diffusers(sdxl_folder: Path, sdxl: StableDiffusion, scheduler: str) -> None:
    ref_pipe = _with_scheduler(_diffusers(sdxl_folder), scheduler)
    lat = _latents(1)
    ref = ref_pipe("a photo of a red fox", negative_prompt=NEG, num_inference_steps=3, guidance_scale=6.0,
                   height=H, width=W, latents=lat.clone(), output_type="pt").images
    ours = sdxl.text2img("a photo of a red fox", NEG, steps=3, scale=6.0, height=H, width=W,
                         scheduler=scheduler, latents=lat, output="tensor")
    _close(ours, ref)


def test_default_scheduler_and_empty_negative_are_diffusers_defaults(sdxl_folder: Path,
                                                                     sdxl: StableDiffusion) -> None:
    """No scheduler: the folder's Euler; negative "" = diffusers' None: zero context and pooled."""
    ref_pipe = _with_scheduler(_diffusers(sdxl_folder), "euler")  # the folder's EulerDiscreteScheduler
    lat = _latents(2, batch=2)
    prompts = ["an astronaut riding a horse", "a bowl of fruit"]
    ref = ref_pipe(prompts, num_inference_steps=3, guidance_scale=5.0, height=H, width=W,
                   latents=lat.clone(), output_type="pt").images
    ours = sdxl.text2img(prompts, steps=3, scale=5.0, height=H, width=W, latents=lat, output="tensor")
    _close(ours, ref)


def test_euler_ancestral_matches_diffusers_with_same_generator(sdxl_folder: Path, sdxl: StableDiffusion) -> None:
    ref_pipe = _with_scheduler(_diffusers(sdxl_folder), "euler_a")
    ref = ref_pipe("a cat", num_inference_steps=3, guidance_scale=7.5, height=H, width=W, output_type="pt",
                   generator=[torch.Generator().manual_seed(11)]).images
    ours = sdxl.text2img("a cat", steps=3, height=H, width=W, scheduler="euler_a", seed=11, output="tensor")
    _close(ours, ref)


SIZES: list[dict[str, Any]] = [
    {"original_size": (128, 96), "crops_coords_top_left": (8, 16), "target_size": (64, 48)},
    {"original_size": (128, 96), "crops_coords_top_left": (8, 16), "negative_original_size": (32, 40),
     "negative_crops_coords_top_left": (4, 0), "negative_target_size": (48, 56)},
]


@pytest.mark.parametrize("size", SIZES)
def test_size_conditioning_matches_diffusers(sdxl_folder: Path, sdxl: StableDiffusion, size: dict[str, Any]) -> None:
    ref_pipe = _with_scheduler(_diffusers(sdxl_folder), "euler")
    lat = _latents(3)
    ref = ref_pipe("a lighthouse", negative_prompt=NEG, num_inference_steps=3, guidance_scale=7.5, height=H, width=W,
                   latents=lat.clone(), output_type="pt", **size).images
    ours = sdxl.text2img("a lighthouse", NEG, steps=3, height=H, width=W, scheduler="euler", latents=lat,
                         output="tensor", **size)
    _close(ours, ref)
    plain = sdxl.text2img("a lighthouse", NEG, steps=3, height=H, width=W, scheduler="euler", latents=lat,
                          output="tensor")
    assert isinstance(plain, torch.Tensor) and not torch.equal(plain, ours)  # the conditioning does something


# ---- img2img / inpaint --------------------------------------------------------------------------
@pytest.mark.parametrize("negative", ["", NEG])
def test_img2img_matches_diffusers(sdxl_folder: Path, sdxl: StableDiffusion, negative: str) -> None:
    """With non-default sizes: the base img2img's negative ids take the positive crops (diffusers)."""
    ref_pipe = _with_scheduler(_diffusers(sdxl_folder, "img2img"), "euler")
    size = {"original_size": (96, 80), "crops_coords_top_left": (8, 4), "negative_original_size": (40, 40)}
    ref = ref_pipe("a watercolor landscape", image=_image(), negative_prompt=negative or None, strength=0.6,
                   num_inference_steps=5, guidance_scale=7.5, output_type="pt",
                   generator=torch.Generator().manual_seed(5), **size).images
    ours = sdxl.img2img(_image(), "a watercolor landscape", negative, strength=0.6, steps=5, scale=7.5, seed=5,
                        scheduler="euler", output="tensor", **size)
    _close(ours, ref)


def test_refiner_img2img_matches_diffusers(sdxl_refiner_folder: Path, refiner: StableDiffusion) -> None:
    ref_pipe = _with_scheduler(_diffusers(sdxl_refiner_folder, "img2img"), "ddim")
    size = {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0, "negative_crops_coords_top_left": (4, 8),
            "original_size": (80, 72)}
    ref = ref_pipe("a sharp photo", image=_image(4), strength=0.5, num_inference_steps=6, guidance_scale=7.5,
                   output_type="pt", generator=torch.Generator().manual_seed(6), **size).images
    ours = refiner.img2img(_image(4), "a sharp photo", strength=0.5, steps=6, seed=6, scheduler="ddim",
                           output="tensor", **size)
    _close(ours, ref)
    default = refiner.img2img(_image(4), "a sharp photo", strength=0.5, steps=6, seed=6, scheduler="ddim",
                              output="tensor")
    ref = ref_pipe("a sharp photo", image=_image(4), strength=0.5, num_inference_steps=6, guidance_scale=7.5,
                   output_type="pt", generator=torch.Generator().manual_seed(6)).images
    _close(default, ref)


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, H, W)
    mask[..., 16:48, 8:40] = 1.0
    return mask


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_matches_diffusers(sdxl_folder: Path, sdxl: StableDiffusion, strength: float) -> None:
    ref_pipe = _with_scheduler(_diffusers(sdxl_folder, "inpaint"), "euler")
    ref = ref_pipe("a red door", image=_image(4), mask_image=_mask(), height=H, width=W, strength=strength,
                   num_inference_steps=5, guidance_scale=7.5, output_type="pt",
                   generator=torch.Generator().manual_seed(9)).images
    ours = sdxl.inpaint(_image(4), _mask(), "a red door", strength=strength, steps=5, seed=9, scheduler="euler",
                        output="tensor")
    _close(ours, ref)


# ---- emphasis, long prompts ---------------------------------------------------------------------
def _scale_value_rows(unet: torch.nn.Module, token: int, weight: float) -> dict[Any, Any]:
    """Patch every cross-attention's to_v so that the CFG-positive row's value of `token` is scaled."""
    originals: dict[Any, Any] = {}
    for name, m in unet.named_modules():
        if name.endswith("attn2"):
            lin = m.to_v

            def forward(inp: torch.Tensor, lin: Any = lin) -> torch.Tensor:
                out = torch.nn.functional.linear(inp, lin.weight, lin.bias).clone()
                out[-1, token] *= weight  # rows [negative; prompt]
                return out

            originals[lin] = lin.forward
            lin.forward = forward
    assert originals, "no cross-attention found"
    return originals


@pytest.mark.parametrize("weight", [0.0, 1.5])
def test_emphasis_matches_scaled_value_rows_in_diffusers(sdxl_folder: Path, sdxl: StableDiffusion,
                                                         weight: float) -> None:
    assert [len(t.tokenize("red")) for t in sdxl.tokenizers] == [1, 1]
    ref_pipe = _with_scheduler(_diffusers(sdxl_folder), "euler")
    lat = _latents(4)
    originals = _scale_value_rows(ref_pipe.unet, 2, weight)  # BOS, "a", "red"
    try:
        ref = ref_pipe("a red fox", negative_prompt=NEG, num_inference_steps=3, guidance_scale=7.5, height=H, width=W,
                       latents=lat.clone(), output_type="pt").images
    finally:
        for lin, f in originals.items():
            lin.forward = f
    ours = sdxl.text2img(f"a (red):{weight:g} fox", NEG, steps=3, height=H, width=W, scheduler="euler",
                         latents=lat, output="tensor")
    _close(ours, ref)


def test_long_prompt_chunks_and_first_chunk_pooled(sdxl: StableDiffusion, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[tuple[int, ...], torch.Tensor]] = []
    unet = sdxl.backend.unet

    def spy(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, weights: torch.Tensor,
            text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        assert text_embeds is not None and time_ids is not None
        seen.append((tuple(context.shape), text_embeds))
        return unet(x, t, context, weights, text_embeds, time_ids)

    monkeypatch.setattr(sdxl.backend, "unet", spy)
    words = ", ".join(["a very detailed painting of a fox"] * 12)
    assert 75 < len(sdxl.tokenizers[0].tokenize(words)) <= 150
    img = sdxl.text2img(words, "short", steps=1, height=H, width=W, seed=1, output="tensor")
    assert isinstance(img, torch.Tensor) and torch.isfinite(img).all()
    width = sum(e.config.hidden_size for e in sdxl.text_encoders)
    assert seen[0][0] == (2, 2 * 77, width)
    first = sdxl.tokenizers[1].decode(sdxl.tokenizers[1].tokenize(words)[:75])
    seen.clear()
    sdxl.text2img(first, "short", steps=1, height=H, width=W, seed=1, output="tensor")
    assert seen[0][0] == (2, 77, width)
    pooled_long = _pooled(sdxl, words)
    assert (pooled_long - _pooled(sdxl, first)).abs().max().item() <= 1e-5


def _pooled(sd: StableDiffusion, text: str) -> torch.Tensor:
    from runtime.conditioning import encode_text

    pooled = encode_text(sd.backend, [text], [False]).text_embeds
    assert pooled is not None
    return pooled


# ---- precision, metadata ------------------------------------------------------------------------
def test_half_keeps_the_vae_float32_and_gives_finite_images(sdxl_folder: Path) -> None:
    sd = StableDiffusion.from_pretrained(sdxl_folder).half()
    assert sd.unet.dtype == torch.float16 and sd.vae.dtype == torch.float32
    img = sd.text2img("a fox", steps=2, height=H, width=W, seed=1, output="tensor")
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32 and torch.isfinite(img).all()
    out = sd.img2img(_image(), "a fox", strength=0.5, steps=2, seed=1, output="tensor")
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    sd.bfloat16()
    assert sd.vae.dtype == torch.bfloat16  # diffusers upcasts for float16 only


def test_pil_output_carries_parameters(sdxl: StableDiffusion) -> None:
    images = sdxl.text2img("a fox", "ugly", steps=2, scale=6, height=H, width=W, seed=3)
    assert isinstance(images, list) and isinstance(images[0], Image.Image)
    text = images[0].info["parameters"]
    assert text.splitlines()[0] == "a fox" and "Negative prompt: ugly" in text
    assert "Steps: 2, Sampler: Euler, CFG scale: 6, Seed: 3, Size: 64x64" in text


# ---- bad input ----------------------------------------------------------------------------------
def test_sdxl_arguments_refused_where_they_do_not_apply(sd1_folder: Path, sdxl: StableDiffusion,
                                                        refiner: StableDiffusion) -> None:
    sd1 = StableDiffusion.from_pretrained(sd1_folder)
    with pytest.raises(ValueError, match="original_size is SDXL conditioning; this sd1 model takes none"):
        sd1.text2img("a fox", steps=1, height=H, width=W, original_size=(64, 64))
    with pytest.raises(ValueError, match="aesthetic_score applies to the SDXL refiner only"):
        sdxl.img2img(_image(), "a fox", steps=1, aesthetic_score=6.0)
    with pytest.raises(ValueError, match="negative_target_size applies to the SDXL base only"):
        refiner.img2img(_image(), "a fox", steps=1, negative_target_size=(64, 64))
    with pytest.raises(ValueError, match=re.escape("crops_coords_top_left must be a pair of integers")):
        sdxl.text2img("a fox", steps=1, height=H, width=W, crops_coords_top_left=(1.5, 0))  # type: ignore[arg-type]


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def test_missing_tensor_is_named(sdxl_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(sdxl_folder, tmp_path)
    file = folder / "text_encoder_2" / "model.safetensors"
    state = load_file(str(file))
    del state["text_projection.weight"]
    state["text_model.final_layer_norm.weight"] = torch.ones(3)
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match=r"text_projection\.weight[\s\S]*final_layer_norm\.weight"):
        StableDiffusion.from_pretrained(folder)


def test_refiner_without_text_encoder_2_is_refused(sdxl_refiner_folder: Path, tmp_path: Path) -> None:
    folder = _copy(sdxl_refiner_folder, tmp_path)
    shutil.rmtree(folder / "text_encoder_2")
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no text_encoder_2/"):
        StableDiffusion.from_pretrained(folder)
