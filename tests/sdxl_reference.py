"""diffusers' side of the SDXL single-file comparisons (test helper): a diffusers SDXL pipeline folder of
configs only, and ``from_single_file`` reading a single file with it, offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_configs import scheduler_config

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network


def plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config without its ``_class_name``-style private keys."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def write_config_folder(root: Path, configs: Mapping[str, Mapping[str, Any]], refiner: bool) -> Path:
    """A diffusers SDXL pipeline folder of configs only (no weights): ``from_single_file``'s ``config``."""
    for name in ("unet", "vae"):
        (root / name).mkdir(parents=True)
        cls = "UNet2DConditionModel" if name == "unet" else "AutoencoderKL"
        (root / name / "config.json").write_text(json.dumps({"_class_name": cls, **configs[name]}))
    texts = ["text_encoder_2"] if refiner else ["text_encoder", "text_encoder_2"]
    for name in texts:
        arch = "CLIPTextModelWithProjection" if name == "text_encoder_2" else "CLIPTextModel"
        config = transformers.CLIPTextConfig(**configs[name])
        config.architectures = [arch]
        config.save_pretrained(root / name)
        tok = root / name.replace("text_encoder", "tokenizer")
        tok.mkdir()
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "a": 4}
        (tok / "vocab.json").write_text(json.dumps(vocab))
        (tok / "merges.txt").write_text("#version: 0.2\n")
        pad = "!" if name == "text_encoder_2" else "<|endoftext|>"
        (tok / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": 77, "pad_token": pad, "tokenizer_class": "CLIPTokenizer"})
        )
    (root / "scheduler").mkdir()
    sched = {**plain(scheduler_config("sdxl")), "_class_name": "EulerDiscreteScheduler"}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "force_zeros_for_empty_prompt": not refiner,
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def reference_pipeline(path: Path, config: Path, refiner: bool, dtype: torch.dtype | None = None,
                       **kwargs: Any) -> Any:
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if refiner:
        kwargs.update(text_encoder=None, tokenizer=None)
    return cls.from_single_file(str(path), config=str(config), local_files_only=True, **kwargs)
