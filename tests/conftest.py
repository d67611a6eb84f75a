"""Shared fixtures: tiny random-weight SD pipelines saved as diffusers folders (never downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny_configs
from serve_helpers import demo_artifact, demo_control_artifact  # noqa: F401  (session fixtures, shared)

# Tiny models on a shared 2-core machine: OpenMP threads cost more than they bring.
torch.set_num_threads(1)


def make_diffusers_folder(kind: str, root: Path, seed: int = 0) -> Path:
    """Write a diffusers StableDiffusion(Inpaint)Pipeline folder of tiny random models to root/kind."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from runtime.tokenizer import ClipTokenizer

    folder = root / kind
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_configs.unet_config(kind))
    vae = AutoencoderKL(**tiny_configs.vae_config())
    text = CLIPTextModel(CLIPTextConfig(**tiny_configs.text_config(kind)))
    sched = DDIMScheduler.from_config(tiny_configs.scheduler_config(kind))
    folder.mkdir(parents=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    sched.save_pretrained(folder / "scheduler")
    ClipTokenizer.bundled(pad="!" if kind == "sd2" else "<|endoftext|>").save_folder(folder / "tokenizer")
    pipeline = "StableDiffusionInpaintPipeline" if "inpaint" in kind else "StableDiffusionPipeline"
    index: dict[str, Any] = {
        "_class_name": pipeline,
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    import json

    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="session")
def tok() -> Any:
    """The bundled CLIP tokenizer with SD 1 padding (end token)."""
    from runtime.tokenizer import ClipTokenizer

    return ClipTokenizer.bundled()


@pytest.fixture(scope="session")
def tok_sd2() -> Any:
    """The bundled CLIP tokenizer with SD 2 padding ("!" = id 0)."""
    from runtime.tokenizer import ClipTokenizer

    return ClipTokenizer.bundled(pad="!")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def sd1_folder(model_root: Path) -> Path:
    return make_diffusers_folder("sd1", model_root)


@pytest.fixture(scope="session")
def sd2_folder(model_root: Path) -> Path:
    return make_diffusers_folder("sd2", model_root)


@pytest.fixture(scope="session")
def inpaint_folder(model_root: Path) -> Path:
    return make_diffusers_folder("sd1-inpaint", model_root)


def make_sdxl_folder(kind: str, root: Path, seed: int = 0) -> Path:
    """Write a diffusers SDXL folder of tiny random models to root/kind: "sdxl" (StableDiffusionXLPipeline,
    both encoders) or "sdxl-refiner" (StableDiffusionXLImg2ImgPipeline, encoder 2 only, aesthetic score)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from runtime.tokenizer import ClipTokenizer

    folder = root / kind
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**tiny_configs.unet_config(kind))
    vae = diffusers.AutoencoderKL(**tiny_configs.vae_config(kind))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_configs.text_config_2(kind)))
    sched = diffusers.EulerDiscreteScheduler.from_config(tiny_configs.scheduler_config(kind))
    tokenizers = root / f"{kind}-tokenizers"
    ClipTokenizer.bundled().save_folder(tokenizers / "1")
    ClipTokenizer.bundled(pad="!").save_folder(tokenizers / "2")
    tok_2 = CLIPTokenizer.from_pretrained(tokenizers / "2")
    pipe: Any
    if kind == "sdxl":
        text = CLIPTextModel(CLIPTextConfig(**tiny_configs.text_config(kind)))
        tok = CLIPTokenizer.from_pretrained(tokenizers / "1")
        pipe = diffusers.StableDiffusionXLPipeline(vae, text, text_2, tok, tok_2, unet, sched, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae, None, text_2, None, tok_2, unet, sched, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sdxl_folder(model_root: Path) -> Path:
    return make_sdxl_folder("sdxl", model_root)


@pytest.fixture(scope="session")
def sdxl_refiner_folder(model_root: Path) -> Path:
    return make_sdxl_folder("sdxl-refiner", model_root)
