"""`sdexport refit`: another model's weights (a fine-tune, a merged LoRA) in an existing artifact, with no
recompile. `aoti` and `pt2` artifacts keep their weights in `.safetensors` beside the program (AOTInductor
folds constants at load time), so a refit copies the programs and writes new weight files (and token
tables: the model's textual-inversion tokens need not be the artifact's); `torchscript` and `onnx` freeze
weights into the program and need `sdexport build`."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from runtime.manifest import DTYPES, TOKEN_TABLE_KEY, Manifest, modules_for, read_manifest
from runtime.tokenizer import ClipTokenizer
from sdexport.export.build import (
    Exportable,
    StageCallback,
    atomic_directory,
    export_modules,
    model_fields,
    vae_dtype,
    write_manifest,
    write_tokenizers,
)
from sdexport.export.tokens import token_tables, write_token_tables

REFITTABLE = ("aoti", "pt2")
# Fields the compiled programs depend on: the new model must agree with the artifact on them.
ARCHITECTURE = ("family", "unet_in_channels", "latent_channels", "context_dim", "time_ids", "pooled_dim")


def _stored(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a .safetensors file, read from its header only."""
    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not iterable)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # Export lifts parameters and all buffers (persistent or not) under their module paths.
    found: dict[str, torch.Tensor] = dict(module.named_parameters())
    found.update(dict(module.named_buffers()))
    return found


def _check(name: str, stored: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> None:
    problems = [f"lacks {k}" for k in sorted(set(stored) - set(tensors))]
    problems += [f"has {k}, which the artifact does not" for k in sorted(set(tensors) - set(stored))]
    problems += [f"{k} is {tuple(tensors[k].shape)}, the artifact's is {shape}"
                 for k, shape in sorted(stored.items()) if k in tensors and tuple(tensors[k].shape) != shape]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"the new model's {name} does not fit the artifact: " + "; ".join(problems[:5]) + more)


def _check_tokens(src: Path, manifest: Manifest, sd: Exportable) -> None:
    """Artifacts whose encoders take ids (format 1): textual-inversion tokens grow the token table the
    programs were compiled for, so the model must have exactly the artifact's. Newer artifacts keep the
    tables beside the programs: any tokens, the same width."""
    if manifest.token_tables:
        for name, table in token_tables(sd, manifest.family).items():
            width = _stored(src / manifest.token_tables[name])[TOKEN_TABLE_KEY][1]
            if table.shape[1] != width:
                raise ValueError(f"the new model's {name} token vectors are {table.shape[1]} wide, the "
                                 f"artifact's {width}")
        return
    built = [ClipTokenizer.from_json((src / f).read_text(encoding="utf-8")).added for f in manifest.tokenizer_files]
    have = [t.added for t in sd.tokenizers]
    if built != have:
        names = sorted({n for a in built for n in a}), sorted({n for a in have for n in a})
        raise ValueError(f"the artifact was built with the embeddings {names[0]}, the model has {names[1]}: "
                         "embeddings change the compiled token table; rebuild with `sdexport build --embedding`")


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype if t.is_floating_point() else None).contiguous()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # artifacts are never modified in place, so sharing the file is safe
    except OSError:
        shutil.copy2(src, dst)


def refit(artifact: str | Path, sd: Exportable, out: str | Path, *, overwrite: bool = False,
          on_stage: StageCallback | None = None) -> Manifest:
    """Write to `out` a copy of `artifact` that runs `sd`'s weights; atomic, like `build`. `out` may be
    `artifact` itself with `overwrite=True`. Returns the new manifest."""
    src, out = Path(artifact), Path(out)
    manifest = read_manifest(src)  # verifies every checksum first
    if manifest.format not in REFITTABLE:
        raise ValueError(f"{src}: {manifest.format} artifacts keep their weights inside the program; only "
                         f"{' and '.join(REFITTABLE)} artifacts can be refitted (rebuild with `sdexport build`)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    fields = model_fields(sd)
    for key in ARCHITECTURE:
        if fields[key] != getattr(manifest, key):
            raise ValueError(f"the new model's {key} is {fields[key]!r}, the artifact was built for "
                             f"{getattr(manifest, key)!r}")
    _check_tokens(src, manifest, sd)
    names = modules_for(manifest.family)
    modules = export_modules(sd, tokens=bool(manifest.token_tables))
    stored = {name: _stored(src / manifest.modules[name]["weights"]) for name in names}
    for name in names:  # everything is checked before anything is written
        _check(name, stored[name], _tensors(modules[name]))

    # The build cast every floating-point tensor to the artifact's dtypes (`Module.to`).
    dtype, vae_dt = DTYPES[manifest.dtype], DTYPES[manifest.vae_dtype_name]
    if vae_dtype(sd.info, dtype) != vae_dt:
        raise ValueError(f"the new model's VAE would be {vae_dtype(sd.info, dtype)}, the artifact's is {vae_dt}")
    with atomic_directory(out) as tmp, torch.no_grad():
        for name in names:
            if on_stage:
                on_stage(name)
            entry = manifest.modules[name]
            for key in ("program", "prepack"):  # the program and its prepack recipes (CPU aoti) as they are
                if entry.get(key):
                    _link_or_copy(src / entry[key], tmp / entry[key])
            tensors = _tensors(modules[name])
            dt = vae_dt if name.startswith("vae_") else dtype
            weights = {k: _cast(tensors[k], dt) for k in stored[name]}
            save_file(weights, str(tmp / entry["weights"]))
        if manifest.token_tables:
            files = write_token_tables(tmp, sd, manifest.family, dtype)
            assert files == manifest.token_tables, (files, manifest.token_tables)
        tokenizers = write_tokenizers(tmp, sd)
        new = replace(manifest, tokenizer=tokenizers["tokenizer"], tokenizer_2=tokenizers["tokenizer_2"], **fields)
        return write_manifest(tmp, new)
