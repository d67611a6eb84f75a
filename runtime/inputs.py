"""Request inputs: prompt and seed lists, init images and masks as float32 tensors."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ImageInput = Image.Image | Sequence[Image.Image] | Tensor


def prompt_lists(prompt: str | Sequence[str], negative: str | Sequence[str],
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


def seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
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


def batch_from(img: Tensor, batch_size: int) -> int:
    if img.shape[0] > 1 and batch_size not in (1, img.shape[0]):
        raise ValueError(f"got {img.shape[0]} images but batch_size={batch_size}")
    return max(batch_size, img.shape[0])


def repeat(t: Tensor, n: int) -> Tensor:
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
