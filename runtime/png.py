"""PNG output with A1111-style `parameters` text, readable by other tools' "PNG info"."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from runtime.samplers import SCHEDULERS


@dataclass(frozen=True)
class Parameters:
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # our scheduler name; written as the A1111 sampler name
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_hash: str = ""
    model: str = ""
    strength: float | None = None  # img2img / inpaint "Denoising strength"
    syntax: str = "a1111"  # prompt syntax (runtime.prompt); written when not A1111's
    emphasis: str = "a1111"  # emphasis mode; written when not A1111's default ("Original")
    lora_hashes: str = ""  # A1111 `Lora hashes`: "name: hash, name: hash"
    ti_hashes: str = ""  # A1111 `TI hashes`: "name: hash, ..."


def format_parameters(p: Parameters) -> str:
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    fields = [
        f"Steps: {p.steps}",
        f"Sampler: {_a1111_sampler(p.sampler)}",
        f"CFG scale: {p.cfg_scale:g}",
        f"Seed: {p.seed}",
        f"Size: {p.width}x{p.height}",
    ]
    if p.model_hash:
        fields.append(f"Model hash: {p.model_hash}")
    if p.model:
        fields.append(f"Model: {p.model}")
    if p.strength is not None:
        fields.append(f"Denoising strength: {p.strength:g}")
    if p.lora_hashes:
        fields.append(f'Lora hashes: "{p.lora_hashes}"')
    if p.ti_hashes:
        fields.append(f'TI hashes: "{p.ti_hashes}"')
    fields += _prompt_fields(p.syntax, p.emphasis)
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _prompt_fields(syntax: str, emphasis: str) -> list[str]:
    """How the prompts were read, where not as A1111 reads them by default. Emphasis "none" is A1111's
    "Ignore" (its key and name); our "attention" mode has no A1111 name, so its key is our own."""
    fields = [] if syntax == "a1111" else [f"Prompt syntax: {syntax}"]
    if emphasis == "none":
        fields.append("Emphasis: Ignore")
    elif emphasis != "a1111":
        fields.append(f"Prompt emphasis: {emphasis}")
    return fields


def _a1111_sampler(name: str) -> str:
    return SCHEDULERS[name].a1111 if name in SCHEDULERS else name


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write `image` to `path` atomically with a `parameters` tEXt chunk (default: image.info's)."""
    path = Path(path)
    text = parameters if parameters is not None else image.info.get("parameters")
    meta = PngInfo()
    if isinstance(text, str):
        meta.add_text("parameters", text)
    tmp = path.parent / f".tmp-{secrets.token_hex(8)}.png"
    # os.open with mode 0o666 honours the umask, like a plain open(); mkstemp would leave the image 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
