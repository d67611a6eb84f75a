"""SDXL ControlNet img2img and inpaint, eager: parity with diffusers' StableDiffusionXLControlNetImg2ImgPipeline
and StableDiffusionXLControlNetInpaintPipeline on the tiny random SDXL model and a random SDXL ControlNet
(zero convolutions randomised: each case also checks that the ControlNet changes the image), with guidance
start/end and guess mode. Tolerance: float32 images in [0, 1] within 1e-3 max abs (as tests/test_controlnet.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from controlnet_reference import make_controlnet_folder, reference_pipeline
from test_controlnet import NEG, H, W, _close, _pil, _ref

from sdexport import ControlNet, StableDiffusion


@pytest.fixture(scope="module")
def xl(sdxl_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sdxl_folder)


@pytest.fixture(scope="module")
def cn_folder(model_root: Path) -> Path:
    return make_controlnet_folder("sdxl", model_root, 5)


@pytest.fixture(scope="module")
def cn(cn_folder: Path) -> ControlNet:
    net = ControlNet.from_pretrained(cn_folder)
    assert net.info.family == "sdxl" and net.info.time_ids == 6
    return net


def _image(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, H, W)
    mask[..., 16:48, 8:40] = 1.0
    return mask


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sdxl_img2img_matches_diffusers(sdxl_folder: Path, xl: StableDiffusion, cn_folder: Path, cn: ControlNet,
                                        guess_mode: bool) -> None:
    image, ctl = _image(3), _pil(7)
    ref = _ref(reference_pipeline(sdxl_folder, [cn_folder], "img2img", xl=True), "euler", "a watercolor",
               image=image, control_image=ctl, strength=0.6, num_inference_steps=6, guidance_scale=6.0, height=H,
               width=W, negative_prompt=NEG, controlnet_conditioning_scale=1.3, control_guidance_start=0.1,
               control_guidance_end=0.8, guess_mode=guess_mode, generator=torch.Generator().manual_seed(5))
    kw: dict[str, Any] = dict(strength=0.6, steps=6, scale=6.0, seed=5, scheduler="euler", output="tensor")
    ours = xl.img2img(image, "a watercolor", NEG, control=cn, control_image=ctl, control_scale=1.3,
                      control_start=0.1, control_end=0.8, guess_mode=guess_mode, **kw)
    _close(ours, ref, xl.img2img(image, "a watercolor", NEG, **kw))


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sdxl_inpaint_matches_diffusers(sdxl_folder: Path, xl: StableDiffusion, cn_folder: Path, cn: ControlNet,
                                        strength: float) -> None:
    image, ctl = _image(4), _pil(8)
    ref = _ref(reference_pipeline(sdxl_folder, [cn_folder], "inpaint", xl=True), "euler", "a red door",
               image=image, mask_image=_mask(), control_image=ctl, strength=strength, num_inference_steps=5,
               guidance_scale=7.5, height=H, width=W, negative_prompt=NEG, controlnet_conditioning_scale=0.9,
               control_guidance_end=0.6, generator=torch.Generator().manual_seed(9))
    kw: dict[str, Any] = dict(strength=strength, steps=5, scale=7.5, seed=9, scheduler="euler", output="tensor")
    ours = xl.inpaint(image, _mask(), "a red door", NEG, control=cn, control_image=ctl, control_scale=0.9,
                      control_end=0.6, **kw)
    _close(ours, ref, xl.inpaint(image, _mask(), "a red door", NEG, **kw))
