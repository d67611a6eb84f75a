"""Adapters without model code: LoRA-family files (kohya / A1111 LoRA and LoCon, LyCORIS LoHa and LoKr,
diffusers / PEFT) and textual-inversion embeddings, as pure functions on name -> tensor tables.

    lora = read_lora("detail.safetensors")                      # parse + check (ranks, NaN, kinds)
    res = resolve(lora, {name: shape, ...}, {"unet": "unet.", "text_encoder": "text_encoder."})
    merger = LoraMerger(weights)                                # the live name -> tensor table
    merger.set([(res, 0.8)])                                    # merge; same set again: no work
    merger.unload()                                             # bit-identical originals back
    emb = read_embedding("style.pt")                            # token "style", vectors per encoder
"""

from runtime.adapters.delta import delta, fits
from runtime.adapters.embeddings import Embedding, parse_embedding, read_embedding
from runtime.adapters.files import AdapterError, FileInfo, a1111_lora_hash, file_info, read_file, same_file
from runtime.adapters.keys import DEFAULT_PREFIXES, Resolved, resolve, sgm_to_diffusers
from runtime.adapters.lora import COMPONENTS, Lora, LoraEntry, parse_lora, read_lora
from runtime.adapters.merge import LoraMerger, apply, deltas, restore, stacked

__all__ = [
    "COMPONENTS",
    "DEFAULT_PREFIXES",
    "AdapterError",
    "Embedding",
    "FileInfo",
    "Lora",
    "LoraEntry",
    "LoraMerger",
    "Resolved",
    "a1111_lora_hash",
    "apply",
    "delta",
    "deltas",
    "file_info",
    "fits",
    "parse_embedding",
    "parse_lora",
    "read_embedding",
    "read_file",
    "read_lora",
    "resolve",
    "restore",
    "same_file",
    "sgm_to_diffusers",
    "stacked",
]
