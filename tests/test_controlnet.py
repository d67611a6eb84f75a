"""ControlNet, eager: parity with diffusers' StableDiffusion{,XL}ControlNet{,Img2Img,Inpaint}Pipeline and
MultiControlNetModel on tiny random models and random ControlNets (zero convolutions randomised: each
case also checks that the ControlNet changes the image), guidance start/end, guess mode, sequential CFG;
loading (diffusers folders, control_model.* single files, .pth with weights_only) and bad input.

Tolerance: float32 images in [0, 1] within 1e-3 max abs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from controlnet_reference import controlnet_ldm_state_dict, make_controlnet, make_controlnet_folder, reference_pipeline
from PIL import Image
from safetensors.torch import save_file
from test_pipeline import _diffusers_scheduler

from sdexport import ControlNet, StableDiffusion
from sdexport.loading import CheckpointError
from sdexport.loading.controlnet import is_controlnet

TOL = 1e-3
H = W = 64
NEG = "blurry, low quality"


def _pil(seed: int, size: tuple[int, int] = (80, 48)) -> Image.Image:
    """A control image of another size than the output (resized by both pipelines)."""
    arr = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    return Image.fromarray(arr)


def _latents(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def _ref(pipe: Any, scheduler: str, prompt: Any, **kw: Any) -> torch.Tensor:
    pipe.scheduler = _diffusers_scheduler(scheduler, dict(pipe.scheduler.config))
    if "latents" in kw:
        kw["latents"] = kw["latents"].clone()
    out: torch.Tensor = pipe(prompt, output_type="pt", **kw).images
    return out.float()


def _close(ours: Any, ref: torch.Tensor, plain: Any = None) -> None:
    assert isinstance(ours, torch.Tensor) and ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= TOL, err
    if plain is not None:  # the ControlNet did something
        assert (ours - plain).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def sd1(sd1_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture(scope="module")
def cn_folders(model_root: Path) -> list[Path]:
    return [make_controlnet_folder("sd1", model_root, seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def cns(cn_folders: list[Path]) -> list[ControlNet]:
    return [ControlNet.from_pretrained(f) for f in cn_folders]


@pytest.mark.parametrize("scheduler", ["ddim", "heun"])
def test_text2img_matches_diffusers(sd1_folder: Path, sd1: StableDiffusion, cn_folders: list[Path],
                                    cns: list[ControlNet], scheduler: str) -> None:
    lat, img = _latents(1), _pil(0)
    ref = _ref(reference_pipeline(sd1_folder, cn_folders[:1]), scheduler, "a red fox", image=img,
               negative_prompt=NEG, num_inference_steps=4, guidance_scale=7.5, height=H, width=W, latents=lat,
               controlnet_conditioning_scale=0.8)
    kw: dict[str, Any] = dict(steps=4, scale=7.5, height=H, width=W, latents=lat, scheduler=scheduler,
                              output="tensor")
    ours = sd1.text2img("a red fox", NEG, control=cns[0], control_image=img, control_scale=0.8, **kw)
    _close(ours, ref, sd1.text2img("a red fox", NEG, **kw))


def test_multi_controlnet_start_end_matches_diffusers(sd1_folder: Path, sd1: StableDiffusion,
                                                      cn_folders: list[Path], cns: list[ControlNet]) -> None:
    """Two ControlNets summed (MultiControlNetModel), each with its own scale and [start, end]; two
    prompts, the second ControlNet with one image per prompt (tensors, resized by nearest)."""
    lat = _latents(2, batch=2)
    first = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    second = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    prompts = ["a lighthouse", "a bowl of fruit"]
    ctl: dict[str, Any] = dict(control_scale=[0.6, 1.3], control_start=[0.0, 0.3], control_end=[0.5, 1.0])
    ref = _ref(reference_pipeline(sd1_folder, cn_folders), "euler", prompts, image=[first, second],
               negative_prompt=[NEG, ""], num_inference_steps=5, guidance_scale=6.0, height=H, width=W,
               latents=lat, controlnet_conditioning_scale=ctl["control_scale"],
               control_guidance_start=ctl["control_start"], control_guidance_end=ctl["control_end"])
    ours = sd1.text2img(prompts, [NEG, ""], steps=5, scale=6.0, height=H, width=W, latents=lat, scheduler="euler",
                        output="tensor", control=cns, control_image=[first, second], **ctl)
    _close(ours, ref)
    alone = sd1.text2img(prompts, [NEG, ""], steps=5, scale=6.0, height=H, width=W, latents=lat, scheduler="euler",
                         output="tensor", control=cns[:1], control_image=[first], control_scale=0.6, control_end=0.5)
    assert (ours - alone).abs().max().item() > 1e-2  # the second ControlNet counts


@pytest.mark.parametrize("low_ram", [False, True])
def test_guess_mode_matches_diffusers(sd1_folder: Path, sd1: StableDiffusion, cn_folders: list[Path],
                                      cns: list[ControlNet], low_ram: bool) -> None:
    """Guess mode: the ControlNet sees the conditional half only, residuals scaled 0.1 .. 1; the same
    with the CFG halves run one after the other."""
    lat, img = _latents(3), _pil(1, (64, 64))
    ref = _ref(reference_pipeline(sd1_folder, cn_folders[:1]), "ddim", "a castle", image=img, negative_prompt=NEG,
               num_inference_steps=4, guidance_scale=5.0, height=H, width=W, latents=lat, guess_mode=True,
               control_guidance_start=0.2)
    try:
        sd1.low_ram(low_ram)
        ours = sd1.text2img("a castle", NEG, steps=4, scale=5.0, height=H, width=W, latents=lat, scheduler="ddim",
                            output="tensor", control=cns[0], control_image=img, guess_mode=True, control_start=0.2)
    finally:
        sd1.low_ram(False)
    _close(ours, ref)


def test_without_guidance_matches_diffusers(sd1_folder: Path, sd1: StableDiffusion, cn_folders: list[Path],
                                            cns: list[ControlNet]) -> None:
    lat, img = _latents(4), _pil(2)
    ref = _ref(reference_pipeline(sd1_folder, cn_folders[:1]), "euler", "a tree", image=img,
               num_inference_steps=3, guidance_scale=1.0, height=H, width=W, latents=lat)
    ours = sd1.text2img("a tree", steps=3, scale=1.0, height=H, width=W, latents=lat, scheduler="euler",
                        output="tensor", control=cns[0], control_image=img)
    _close(ours, ref)


def test_img2img_matches_diffusers(sd1_folder: Path, sd1: StableDiffusion, cn_folders: list[Path],
                                   cns: list[ControlNet]) -> None:
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    ctl = _pil(3)
    ref = _ref(reference_pipeline(sd1_folder, cn_folders[:1], "img2img"), "ddim", "a watercolor", image=image,
               control_image=ctl, strength=0.6, num_inference_steps=10, guidance_scale=7.5, height=H, width=W,
               negative_prompt=NEG, controlnet_conditioning_scale=1.5, control_guidance_end=0.7,
               generator=torch.Generator().manual_seed(5))
    kw: dict[str, Any] = dict(strength=0.6, steps=10, scale=7.5, seed=5, scheduler="ddim", output="tensor")
    ours = sd1.img2img(image, "a watercolor", NEG, control=cns[0], control_image=ctl, control_scale=1.5,
                       control_end=0.7, **kw)
    _close(ours, ref, sd1.img2img(image, "a watercolor", NEG, **kw))


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, H, W)
    mask[..., 16:48, 8:40] = 1.0
    return mask


@pytest.mark.parametrize("kind", ["sd1-inpaint", "sd1"])
def test_inpaint_matches_diffusers(kind: str, sd1_folder: Path, inpaint_folder: Path, model_root: Path,
                                   sd1: StableDiffusion, cn_folders: list[Path], cns: list[ControlNet]) -> None:
    """A 9-channel inpainting UNet (the ControlNet sees the 4 latent channels only) and legacy 4-channel
    inpainting."""
    if kind == "sd1":
        folder, pipe, cn_folder, cn = sd1_folder, sd1, cn_folders[0], cns[0]
    else:
        folder, pipe = inpaint_folder, StableDiffusion.from_pretrained(inpaint_folder)
        cn_folder = make_controlnet_folder("sd1-inpaint", model_root, 3)
        cn = ControlNet.from_pretrained(cn_folder)
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(4))
    ctl = _pil(4)
    ref = _ref(reference_pipeline(folder, [cn_folder], "inpaint"), "ddim", "a red door", image=image,
               mask_image=_mask(), control_image=ctl, strength=1.0, num_inference_steps=5, guidance_scale=7.5,
               height=H, width=W, generator=torch.Generator().manual_seed(9), controlnet_conditioning_scale=0.9)
    kw: dict[str, Any] = dict(steps=5, scale=7.5, seed=9, scheduler="ddim", output="tensor")
    ours = pipe.inpaint(image, _mask(), "a red door", control=cn, control_image=ctl, control_scale=0.9, **kw)
    _close(ours, ref, pipe.inpaint(image, _mask(), "a red door", **kw))


def test_sdxl_text2img_matches_diffusers(sdxl_folder: Path, model_root: Path) -> None:
    """SDXL: the ControlNet takes the pooled embedding and time ids (its own add_embedding)."""
    cn_folder = make_controlnet_folder("sdxl", model_root, 5)
    cn = ControlNet.from_pretrained(cn_folder)
    assert cn.info.family == "sdxl" and cn.info.time_ids == 6
    xl = StableDiffusion.from_pretrained(sdxl_folder)
    lat, img = _latents(6), _pil(6)
    ref = _ref(reference_pipeline(sdxl_folder, [cn_folder], xl=True), "euler", "a fox in the snow", image=img,
               negative_prompt=NEG, num_inference_steps=4, guidance_scale=6.0, height=H, width=W, latents=lat,
               controlnet_conditioning_scale=0.7, control_guidance_start=0.25)
    kw: dict[str, Any] = dict(steps=4, scale=6.0, height=H, width=W, latents=lat, scheduler="euler", output="tensor")
    ours = xl.text2img("a fox in the snow", NEG, control=cn, control_image=img, control_scale=0.7,
                       control_start=0.25, **kw)
    _close(ours, ref, xl.text2img("a fox in the snow", NEG, **kw))


# ---- loading ------------------------------------------------------------------------------------------
def _residuals(cn: ControlNet) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cn.info.context_dim, generator=g)
    with torch.no_grad():
        return cn.residuals(x, torch.tensor(500.0), ctx, torch.ones(1, 77), torch.rand(1, 3, 64, 64, generator=g))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_single_file_matches_folder(tmp_path: Path, cn_folders: list[Path], cns: list[ControlNet],
                                    suffix: str) -> None:
    """lllyasviel's control_model.* layout (written by the test's own rules) loads to the same model;
    .pth files are read with weights_only=True."""
    from diffusers import ControlNetModel

    state = controlnet_ldm_state_dict(ControlNetModel.from_pretrained(cn_folders[0]).state_dict())
    path = tmp_path / f"control_tiny{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert is_controlnet(path) and is_controlnet(cn_folders[0])  # what `sdexport build` recognises
    assert not is_controlnet(cn_folders[0].parent / "sd1") and not is_controlnet(cn_folders[0] / "config.json")
    loaded = ControlNet.from_pretrained(path, config={"attention_head_dim": 2, "norm_num_groups": 8})
    assert loaded.info == cns[0].info.__class__(**{**cns[0].info.__dict__, "name": path.stem})
    for a, b in zip(_residuals(loaded), _residuals(cns[0]), strict=True):
        assert (a - b).abs().max().item() <= 1e-5  # same weights (the memory layout may pick other kernels)


def test_bad_files(tmp_path: Path, sd1_folder: Path, cn_folders: list[Path]) -> None:
    with pytest.raises(CheckpointError, match="not a ControlNetModel"):
        ControlNet.from_pretrained(sd1_folder / "unet")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        ControlNet.from_pretrained(sd1_folder)
    state = controlnet_ldm_state_dict(make_controlnet("sd1", 1).state_dict())
    del state["control_model.zero_convs.3.0.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"zero_convs\.3\.0\.weight"):
        ControlNet.from_pretrained(tmp_path / "broken.safetensors", config={"norm_num_groups": 8})
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(CheckpointError, match="Stable Diffusion checkpoint, not a ControlNet"):
        ControlNet.from_pretrained(tmp_path / "sd.safetensors")
    torch.save({"state_dict": {"control_model.a": torch.zeros(1)}, "obj": object()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="plain tensors"):
        ControlNet.from_pretrained(tmp_path / "evil.pth")


# ---- bad requests -------------------------------------------------------------------------------------
def test_bad_requests(sd1: StableDiffusion, cns: list[ControlNet], model_root: Path) -> None:
    kw: dict[str, Any] = dict(steps=2, height=H, width=W, output="tensor")
    img = _pil(0)
    sd2_cn = ControlNet.from_pretrained(make_controlnet_folder("sd2", model_root, 7))
    with pytest.raises(ValueError, match="is a sd2 ControlNet; this model is sd1"):
        sd1.text2img("a", control=sd2_cn, control_image=img, **kw)
    with pytest.raises(ValueError, match="2 ControlNets, 1 images"):
        sd1.text2img("a", control=cns, control_image=[img], **kw)
    with pytest.raises(ValueError, match="3 images for 2 generated images"):
        sd1.text2img(["a", "b"], control=cns[0], control_image=torch.rand(3, 3, 64, 64), **kw)
    with pytest.raises(ValueError, match=r"tensor must be \(B, 3, H, W\)"):
        sd1.text2img("a", control=cns[0], control_image=torch.rand(1, 1, 64, 64), **kw)
    with pytest.raises(ValueError, match="control_image is required"):
        sd1.text2img("a", control=cns[0], **kw)
    with pytest.raises(ValueError, match="without control"):
        sd1.text2img("a", control_image=img, **kw)
    with pytest.raises(ValueError, match="control_scale: 3 values for 2 ControlNets"):
        sd1.text2img("a", control=cns, control_image=[img, img], control_scale=[1, 1, 1], **kw)
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        sd1.text2img("a", control=cns[0], control_image=img, control_start=0.6, control_end=0.5, **kw)
    with pytest.raises(ValueError, match="not a ControlNet"):
        sd1.text2img("a", control="canny", control_image=img, **kw)  # type: ignore[arg-type]


# ---- Canny preprocessor -----------------------------------------------------------------------------------
def test_canny_is_opencv_with_reference_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    cv2 = pytest.importorskip("cv2")
    from runtime.canny import canny

    img = _pil(8, (96, 64))
    edges = canny(img)
    want = cv2.Canny(np.asarray(img), 100, 200)
    got = np.asarray(edges)
    assert edges.size == img.size and got.shape == (64, 96, 3) and want.any()
    assert all(np.array_equal(got[..., c], want) for c in range(3))
    with pytest.raises(ValueError, match="low <= high"):
        canny(img, 200, 100)
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)
    with pytest.raises(ImportError, match=r"sdexport\[canny\]"):
        canny(img)
