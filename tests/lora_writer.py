"""Writes LoRA-family and textual-inversion files in each layout from random tensors (test helper).

Modules are given per component as `{module name: weight shape}` with the model's own names (diffusers'
UNet names, transformers' CLIP names, `text_model.` included or not); every writer returns the tensor
dict it wrote, so tests can recompute the expected update.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

Modules = Mapping[str, Mapping[str, tuple[int, ...]]]  # component -> module name -> weight shape

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
KOHYA_PREFIX_XL = {**KOHYA_PREFIX, "text_encoder": "lora_te1_"}


def _rand(gen: torch.Generator, *shape: int, std: float = 0.1) -> Tensor:
    return torch.randn(*shape, generator=gen) * std


def _text(component: str, name: str) -> str:
    """Text-encoder modules as kohya and diffusers spell them: with `text_model.`."""
    if component != "unet" and not name.startswith(("text_model.", "text_projection")):
        return "text_model." + name
    return name


def lora_pair(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(down, up) for a weight: linear (r, in) / (out, r); conv: down a k×k conv, up 1×1 (LoCon)."""
    out, inp, *k = shape
    if k:
        return _rand(gen, rank, inp, *k), _rand(gen, out, rank, 1, 1)
    return _rand(gen, rank, inp), _rand(gen, out, rank)


def kohya(modules: Modules, rank: int = 4, alpha: float | None = 2.0, seed: int = 0, sdxl: bool = False,
          sgm: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """kohya / A1111 LoRA and LoCon: `lora_unet_*`, `lora_te_*` (SDXL `lora_te1_`, `lora_te2_`).
    `sgm` optionally renames UNet modules (diffusers name -> SGM name) as kohya's SDXL files do."""
    gen = torch.Generator().manual_seed(seed)
    prefixes = KOHYA_PREFIX_XL if sdxl else KOHYA_PREFIX
    out: dict[str, Tensor] = {}
    for comp, mods in modules.items():
        for name, shape in mods.items():
            spelled = (sgm or {}).get(name, name) if comp == "unet" else _text(comp, name)
            key = prefixes[comp] + spelled.replace(".", "_")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = lora_pair(shape, rank, gen)
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def peft(modules: Modules, rank: int = 4, seed: int = 0, form: str = "peft") -> dict[str, Tensor]:
    """diffusers / PEFT: `unet.<m>.lora_A.weight` / `lora_B.weight` (form "peft"), or the older
    diffusers spellings (form "old", see `_old`), no alphas (scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for comp, mods in modules.items():
        for name, shape in mods.items():
            key, down, up = f"{comp}.{_text(comp, name)}", "lora_A", "lora_B"
            if form == "old":
                key, down, up = _old(key, comp)
            out[f"{key}.{down}.weight"], out[f"{key}.{up}.weight"] = lora_pair(shape, rank, gen)
    return out


def _old(key: str, comp: str) -> tuple[str, str, str]:
    """Older diffusers spellings: attention processors' `attn1.processor.to_q_lora.down`, the UNet's
    `.lora.down`, the text encoder's `.lora_linear_layer.down`."""
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        if comp == "unet" and key.endswith(f".{proj}"):
            base = key[: -len(proj) - 1]
            p = proj.removesuffix(".0")
            return f"{base}.processor.{p}_lora", "down", "up"
    if comp == "unet":
        return key, "lora.down", "lora.up"
    return key, "lora_linear_layer.down", "lora_linear_layer.up"


def peft_metadata(alphas: Mapping[str, float], rank: int, modules: Modules) -> dict[str, str]:
    """The `lora_adapter_metadata` diffusers writes: per component PEFT's `r`, `lora_alpha` and
    `target_modules` (a LoraConfig)."""
    meta: dict[str, object] = {}
    for comp, a in alphas.items():
        meta[f"{comp}.r"] = rank
        meta[f"{comp}.lora_alpha"] = a
        meta[f"{comp}.target_modules"] = sorted(modules[comp])
    return {"format": "pt", "lora_adapter_metadata": json.dumps(meta)}


def loha(modules: Modules, rank: int = 4, alpha: float = 2.0, seed: int = 0, tucker: bool = False) -> dict[str, Tensor]:
    """LyCORIS LoHa: `hada_w{1,2}_a` (out, r), `hada_w{1,2}_b` (r, in·k·k); Tucker (conv only):
    `hada_t{1,2}` (r, r, k, k), `_a` (r, out), `_b` (r, in)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for comp, mods in modules.items():
        for name, shape in mods.items():
            key = KOHYA_PREFIX[comp] + _text(comp, name).replace(".", "_")
            o, i, *k = shape
            for n in ("1", "2"):
                if tucker and k:
                    out[f"{key}.hada_t{n}"] = _rand(gen, rank, rank, *k, std=0.5)
                    out[f"{key}.hada_w{n}_a"] = _rand(gen, rank, o, std=0.5)
                    out[f"{key}.hada_w{n}_b"] = _rand(gen, rank, i, std=0.5)
                else:
                    out[f"{key}.hada_w{n}_a"] = _rand(gen, o, rank, std=0.5)
                    out[f"{key}.hada_w{n}_b"] = _rand(gen, rank, i * (k[0] * k[1] if k else 1), std=0.5)
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def _factor(n: int) -> tuple[int, int]:
    """n = a·b with a the largest divisor ≤ √n (LyCORIS' factorization, small factor first)."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def lokr(modules: Modules, rank: int = 2, alpha: float = 2.0, seed: int = 0, decompose_w1: bool = False,
         decompose_w2: bool = True, tucker: bool = False) -> dict[str, Tensor]:
    """LyCORIS LoKr: ΔW = W1 ⊗ W2, out = a·c, in = b·d; W1 (a, b) full or `lokr_w1_a·b`, W2 (c, d[, k, k])
    full or `lokr_w2_a` (c, r) · `lokr_w2_b` (r, d·k·k), or Tucker `lokr_t2` with `_a` (r, c), `_b` (r, d)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for comp, mods in modules.items():
        for name, shape in mods.items():
            key = KOHYA_PREFIX[comp] + _text(comp, name).replace(".", "_")
            o, i, *k = shape
            (a, c), (b, d) = _factor(o), _factor(i)
            if decompose_w1:
                out[f"{key}.lokr_w1_a"], out[f"{key}.lokr_w1_b"] = _rand(gen, a, rank), _rand(gen, rank, b)
            else:
                out[f"{key}.lokr_w1"] = _rand(gen, a, b)
            if not decompose_w2:
                out[f"{key}.lokr_w2"] = _rand(gen, c, d, *k)
            elif tucker and k:
                out[f"{key}.lokr_t2"] = _rand(gen, rank, rank, *k)
                out[f"{key}.lokr_w2_a"], out[f"{key}.lokr_w2_b"] = _rand(gen, rank, c), _rand(gen, rank, d)
            else:
                kk = k[0] * k[1] if k else 1
                out[f"{key}.lokr_w2_a"], out[f"{key}.lokr_w2_b"] = _rand(gen, c, rank), _rand(gen, rank, d * kk)
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def save(tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """.safetensors, or a torch pickle for .pt / .bin."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    else:
        torch.save(dict(tensors), path)
    return path


def a1111_embedding(vectors: Tensor, path: Path, name: str = "emb") -> Path:
    """A1111's `.pt`: string_to_token / string_to_param with the '*' placeholder."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 100,
            "sd_checkpoint": "0" * 10, "sd_checkpoint_name": "model"}
    torch.save(data, path)
    return path
