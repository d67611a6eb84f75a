"""LoRA-family files -> a normalized list of per-module entries.

Layouts read (one file may mix kinds per module, not within a module):
- kohya / A1111 / LyCORIS: `lora_unet_<module_with_underscores>.<role>`, `lora_te_` (SD 1/2, SDXL
  encoder 1), `lora_te1_` / `lora_te2_` (SDXL); roles `lora_down.weight`, `lora_up.weight`,
  `lora_mid.weight` (LoCon CP), `hada_w{1,2}_{a,b}`, `hada_t{1,2}` (LoHa), `lokr_w1[_a|_b]`,
  `lokr_w2[_a|_b]`, `lokr_t2` (LoKr), `diff` / `diff_b` (full), `alpha`.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.`, `text_encoder_2.`,
  the older `.lora.down/up.weight`, `.lora_linear_layer.down/up.weight` and
  `.processor.to_q_lora.down.weight`; alphas from `<module>.alpha` or the `lora_adapter_metadata` that
  diffusers writes (PEFT `lora_alpha`, `alpha_pattern`, `use_rslora`).
Kinds we do not merge (DoRA, IA3, OFT/BOFT, GLoRA, norm layers) are errors that name them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from runtime.adapters.files import (
    AdapterError,
    FileInfo,
    a1111_lora_hash,
    file_info,
    flat_tensors,
    json_metadata,
    read_file,
)

__all__ = ["COMPONENTS", "Lora", "LoraEntry", "parse_lora", "read_lora"]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# role suffix -> (kind, role); longest suffixes first so `.lora.down.weight` wins over `.down.weight`.
_ROLES: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"), "lora_mid.weight": ("lora", "mid"),
    "lora_A.weight": ("lora", "down"), "lora_B.weight": ("lora", "up"),
    "lora.down.weight": ("lora", "down"), "lora.up.weight": ("lora", "up"),
    "lora_linear_layer.down.weight": ("lora", "down"), "lora_linear_layer.up.weight": ("lora", "up"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"), "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"), "diff_b": ("full", "diff_b"),
    "alpha": ("", "alpha"),
}
_SUFFIXES = sorted(_ROLES, key=len, reverse=True)
# Markers of kinds we refuse, with the name the error gives.
_UNSUPPORTED = {
    "dora_scale": "DoRA (`dora_scale`)", "lora_magnitude_vector": "DoRA (`lora_magnitude_vector`)",
    "on_input": "IA3 (`on_input`)", "oft_blocks": "OFT (`oft_blocks`)", "oft_diag": "OFT (`oft_diag`)",
    "oft_R": "BOFT (`oft_R`)", "a1.weight": "GLoRA (`a1.weight`)", "b1.weight": "GLoRA (`b1.weight`)",
    "w_norm": "norm-layer LyCORIS (`w_norm`)", "b_norm": "norm-layer LyCORIS (`b_norm`)",
    "lora_embedding_A": "embedding-layer LoRA (`lora_embedding_A`)",
}
_ATTN_PROCESSOR = re.compile(r"^(.*?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_REQUIRED = {"lora": ({"down", "up"},), "loha": ({"w1a", "w1b", "w2a", "w2b"},), "full": ({"diff"},),
             "lokr": ({"w1"}, {"w1a", "w1b"})}


@dataclass(frozen=True)
class LoraEntry:
    """One adapted weight. `module` is the name inside `component`: dotted (PEFT) or, when `flat`, the
    kohya spelling with every `.` turned into `_` (resolved against the model's names by `keys`)."""

    key: str  # the module's key prefix in the file, for reports
    component: str | None  # unet / text_encoder / text_encoder_2, None when the prefix is unknown
    module: str
    flat: bool
    kind: str  # lora | loha | lokr | full
    tensors: Mapping[str, Tensor] = field(repr=False)
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        """The rank the alpha is divided by (LyCORIS: LoHa's and LoKr's `_b` factors' first dim)."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["w1b"].shape[0])
        if self.kind == "lokr":
            for role in ("w1b", "w2b"):
                if role in t:
                    return int(t[role].shape[0])
        return None

    @property
    def scale(self) -> float:
        """alpha / rank (kohya, LyCORIS); 1 without an alpha, and for LoKr with two full factors."""
        r = self.rank
        return 1.0 if self.alpha is None or not r else self.alpha / r


@dataclass(frozen=True)
class Lora:
    """A parsed LoRA file. `info` identifies the content (sha256) for caches and PNG metadata."""

    entries: tuple[LoraEntry, ...]
    source: str
    info: FileInfo | None = None
    metadata: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return Path(self.source).stem

    @property
    def a1111_hash(self) -> str:
        if self.info is None:
            raise AdapterError(f"{self.source}: not read from a file, no hash")
        return a1111_lora_hash(self.info.path, self.metadata)

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.kind] = out.get(e.kind, 0) + 1
        return out


def _component(module_key: str) -> tuple[str | None, str, bool]:
    """(component, name inside it, flat) of a module key."""
    for prefix, comp in (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"),
                         ("lora_te_", "text_encoder")):
        if module_key.startswith(prefix):
            return comp, module_key[len(prefix):], True
    for comp in ("text_encoder_2", "text_encoder", "unet"):
        if module_key.startswith(comp + "."):
            return comp, module_key[len(comp) + 1:], False
    if "." in module_key:  # diffusers also accepts a bare UNet state dict
        return "unet", module_key, False
    return None, module_key, "_" in module_key


def _split(key: str) -> tuple[str, str, str]:
    """(module key, kind, role) of a tensor key."""
    m = _ATTN_PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m[2] == "to_out" else m[2]
        return f"{m[1]}.{proj}", "lora", m[3]
    for marker, what in _UNSUPPORTED.items():
        if key.endswith("." + marker) or f".{marker}." in key:
            raise AdapterError(f"{what} is not supported (key {key!r})")
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            kind, role = _ROLES[suffix]
            return key[: -len(suffix) - 1], kind, role
    raise AdapterError(f"unknown adapter key {key!r}: not a LoRA / LoCon / LoHa / LoKr / full-diff tensor")


def _peft_alpha(meta: dict[str, Any], component: str | None, module: str, rank: int) -> float | None:
    """The alpha of a PEFT module from diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": ...});
    `alpha_pattern` keys match a module name's dotted suffix as in PEFT; rsLoRA's alpha/sqrt(r) is
    returned as an alpha over r."""
    if not meta or component is None:
        return None
    get = (lambda k: meta.get(f"{component}.{k}")) if any(k.startswith(component + ".") for k in meta) else None
    if get is None:
        return None
    if get("use_dora"):
        raise AdapterError(f"DoRA (`use_dora` in the {component} adapter metadata) is not supported")
    alpha = get("lora_alpha")
    for pattern, value in (get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
    if alpha is None:
        return None
    return float(alpha) * math.sqrt(rank) if get("use_rslora") else float(alpha)


def _check_entry(source: str, e: LoraEntry) -> None:
    t, key = e.tensors, e.key
    if not any(req <= set(t) for req in _REQUIRED[e.kind]):
        raise AdapterError(f"{source}: {key}: incomplete {e.kind} module, has only {sorted(t)}")
    if e.kind == "lokr" and not ({"w2"} <= set(t) or {"w2a", "w2b"} <= set(t)):
        raise AdapterError(f"{source}: {key}: incomplete lokr module, has only {sorted(t)}")

    def inner(a: str, b: str) -> None:  # a's second dim must equal b's first (the rank)
        if a in t and b in t and (t[a].dim() < 2 or t[a].shape[1] != t[b].shape[0]):
            raise AdapterError(f"{source}: {key}: mismatched ranks: {a} {tuple(t[a].shape)} and {b} "
                               f"{tuple(t[b].shape)}")

    if e.kind == "lora":
        if "mid" in t:
            inner("up", "mid")
            if t["mid"].shape[1] != t["down"].shape[0]:
                raise AdapterError(f"{source}: {key}: mismatched ranks: mid {tuple(t['mid'].shape)} and down "
                                   f"{tuple(t['down'].shape)}")
        else:
            inner("up", "down")
    elif e.kind == "loha":
        for w in ("w1", "w2"):
            if f"t{w[1]}" not in t:
                inner(w + "a", w + "b")
            elif not (t[w + "a"].shape[0] == t[w + "b"].shape[0] == t[f"t{w[1]}"].shape[0]):
                raise AdapterError(f"{source}: {key}: mismatched ranks in the Tucker factors of {w}")
    elif e.kind == "lokr":
        inner("w1a", "w1b")
        if "t2" not in t:
            inner("w2a", "w2b")


def parse_lora(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
               source: str = "<tensors>", info: FileInfo | None = None) -> Lora:
    """Group a LoRA state dict by module and check it: every key understood, ranks consistent, finite."""
    meta = dict(metadata or {})
    peft_meta = json_metadata(meta, "lora_adapter_metadata")
    groups: dict[str, dict[str, Tensor]] = {}
    kinds: dict[str, set[str]] = {}
    for key, value in tensors.items():
        try:
            module, kind, role = _split(key)
        except AdapterError as e:
            raise AdapterError(f"{source}: {e}") from None
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterError(f"{source}: {key} holds NaN or Inf values")
        groups.setdefault(module, {})[role] = value
        if kind:
            kinds.setdefault(module, set()).add(kind)
    entries = []
    for module, roles in groups.items():
        ks = kinds.get(module, set())
        if len(ks) != 1:
            what = f"mixes {sorted(ks)}" if ks else "has an alpha but no weights"
            raise AdapterError(f"{source}: {module}: {what}")
        kind = ks.pop()
        alpha_t = roles.pop("alpha", None)
        comp, name, flat = _component(module)
        entry = LoraEntry(module, comp, name, flat, kind, roles)
        _check_entry(source, entry)
        alpha = float(alpha_t.float().item()) if alpha_t is not None else None
        if alpha is None and not flat and entry.rank:
            alpha = _peft_alpha(peft_meta, comp, name, entry.rank)
        entries.append(LoraEntry(module, comp, name, flat, kind, roles, alpha))
    if not entries:
        raise AdapterError(f"{source}: no LoRA tensors in the file")
    return Lora(tuple(entries), source, info, meta)


def read_lora(path: str | Path) -> Lora:
    """Read and check a LoRA / LyCORIS file (.safetensors, or a weights-only .pt/.bin)."""
    info = file_info(path)
    content, meta = read_file(info.path)
    return parse_lora(flat_tensors(info.path, content), meta, str(info.path), info)
