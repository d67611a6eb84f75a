"""`runtime.load_control(path)`: a ControlNet artifact (built by `sdexport build CONTROLNET`) as a
`runtime.control.ControlModel`, paired at request time with any model artifact (or eager model) of its
family. The manifest is the model artifact's kind (same verification), with `kind: "controlnet"`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from runtime.control import CONTROL_FAMILIES, ControlInfo
from runtime.manifest import (
    DTYPES,
    FORMAT_VERSION,
    FORMATS,
    MANIFEST,
    ArtifactError,
    ShapeRange,
    hash_tree,
    sha256_file,
)

__all__ = ["CONTROL_KIND", "CONTROL_PROGRAM", "ControlArtifact", "ControlManifest", "load_control"]

CONTROL_KIND = "controlnet"
CONTROL_PROGRAM = "controlnet"


@dataclass(frozen=True)
class ControlManifest:
    format: str
    family: str
    latent_channels: int
    context_dim: int
    residuals: list[list[int]]  # (channels, downscale) per residual
    conditioning_channels: int
    time_ids: int
    pooled_dim: int
    global_pool: bool
    shapes: ShapeRange
    dtype: str
    device: str
    torch_version: str
    op_library_version: str
    kernels: str
    model_name: str
    build_options: dict[str, Any]
    modules: dict[str, dict[str, str]]
    kind: str = CONTROL_KIND
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def info(self) -> ControlInfo:
        return ControlInfo(family=self.family, latent_channels=self.latent_channels, context_dim=self.context_dim,
                           residuals=tuple((int(c), int(f)) for c, f in self.residuals),
                           conditioning_channels=self.conditioning_channels, time_ids=self.time_ids,
                           pooled_dim=self.pooled_dim, global_pool=self.global_pool, name=self.model_name)

    def write(self, root: Path) -> ControlManifest:
        """Hash every file under root into the manifest and write it (last)."""
        m = replace(self, files=hash_tree(root))
        (root / MANIFEST).write_text(json.dumps(asdict(m), indent=2, sort_keys=True), encoding="utf-8")
        return m

    @classmethod
    def read(cls, root: Path, verify: bool = True) -> ControlManifest:
        path = root / MANIFEST
        if not root.is_dir() or not path.is_file():
            raise ArtifactError(f"{root}: not an sdexport artifact (no {MANIFEST})")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{root}: manifest.json is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("kind") != CONTROL_KIND:
            raise ArtifactError(f"{root}: not a ControlNet artifact (a model artifact? load it with runtime.load); "
                                "build one with `sdexport build CONTROLNET_MODEL -o DIR`")
        if d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{root}: artifact format version {d.get('format_version')!r} is not supported by "
                                f"this runtime (expects {FORMAT_VERSION}); rebuild it with `sdexport build`")
        try:
            d["shapes"] = ShapeRange(**d["shapes"])
            m = cls(**d)
        except (TypeError, KeyError) as e:
            raise ArtifactError(f"{root}: manifest.json is incomplete or malformed ({e})") from None
        if m.format not in FORMATS or m.family not in CONTROL_FAMILIES or m.dtype not in DTYPES:
            raise ArtifactError(f"{root}: unknown format, family or dtype ({m.format}, {m.family}, {m.dtype})")
        if set(m.modules) != {CONTROL_PROGRAM}:
            raise ArtifactError(f"{root}: a ControlNet artifact holds one program '{CONTROL_PROGRAM}', "
                                f"this one lists {sorted(m.modules)}")
        if verify:
            problems = [f"missing file {rel}" if not (root / rel).is_file() else
                        f"checksum mismatch in {rel} (corrupt, truncated or modified)"
                        for rel, digest in sorted(m.files.items())
                        if not (root / rel).is_file() or sha256_file(root / rel) != digest]
            needed = {f for f in m.modules[CONTROL_PROGRAM].values() if f}
            problems += [f"manifest does not hash {rel}" for rel in sorted(needed - set(m.files))]
            if problems:
                raise ArtifactError(f"{root}: artifact failed verification: " + "; ".join(problems))
        return m


class ControlArtifact:
    """A `runtime.control.ControlModel` over a compiled ControlNet program."""

    def __init__(self, root: Path, m: ControlManifest, device: torch.device, threads: int | None = None) -> None:
        from runtime.artifact import _check_compatible, _load
        from runtime.cpu import use_threads

        _check_compatible(m, device, root)
        self.manifest = m
        self.info = m.info()
        self.root = root
        self._device = device
        self._dtype = DTYPES[m.dtype]
        self._program, _ = _load(m.format, root, m.modules[CONTROL_PROGRAM], device, use_threads(threads),
                                 m.dtype)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def check_shape(self, batch: int, height: int, width: int) -> None:
        try:
            self.manifest.shapes.check(batch, height, width)
        except ValueError as e:
            raise ValueError(f"ControlNet artifact {self.root.name}: {e}") from None

    def residuals(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, image: Tensor,
                  text_embeds: Tensor | None = None, time_ids: Tensor | None = None) -> tuple[Tensor, ...]:
        m = self.manifest
        if context.shape[2] != m.context_dim:
            raise ValueError(f"context width {context.shape[2]}, this ControlNet takes {m.context_dim}")
        chunks = m.shapes.max_chunks
        if context.shape[1] > 77 * chunks:
            raise ValueError(f"prompt too long for this ControlNet artifact: {context.shape[1] // 77} chunks, at "
                             f"most {chunks} (rebuild it with a larger --max-chunks)")
        dt = self._dtype
        t = t.to(device=self._device, dtype=torch.float32).reshape(-1).expand(x.shape[0]).contiguous()
        args = [x.to(dt).contiguous(), t, context.to(dt).contiguous(), weights.to(dt).contiguous(),
                image.to(dt).contiguous()]
        if m.time_ids:
            if text_embeds is None or time_ids is None:
                raise ValueError("this SDXL ControlNet artifact needs text_embeds and time_ids")
            args += [text_embeds.to(dt).contiguous(), time_ids.to(torch.float32).contiguous()]
        out = self._program(*args)
        return tuple(out)


def load_control(path: str | Path, device: str | torch.device | None = None, *, verify: bool = True,
                 threads: int | None = None) -> ControlArtifact:
    """Load a ControlNet artifact (checksums verified unless `verify=False`); pass it as `control=` to a
    pipeline's text2img / img2img / inpaint. `device` defaults to the one it was built for; `threads` as
    `runtime.load`."""
    root = Path(path)
    m = ControlManifest.read(root, verify=verify)
    dev = torch.device(device if device is not None else m.device)
    from runtime.artifact import load_kernels

    load_kernels(root, m.kernels)
    return ControlArtifact(root, m, dev, threads)
