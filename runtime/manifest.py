"""The artifact manifest: what was built, for which shapes and torch, and a sha256 of every file.

Written last by `sdexport build` (inside a temporary directory that is then renamed into place),
read and verified first by `runtime.load`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# 2: text encoders fed token vectors, token tables beside them (modules[name]["tokens"]); 1 still loads.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
TOKEN_TABLE_KEY = "weight"  # the one tensor of a token-table file: (tokens, width)
MANIFEST = "manifest.json"
FORMATS = ("aoti", "pt2", "torchscript", "onnx", "openvino")
# Formats whose UNet program takes the ControlNet residuals as separate inputs (graphs from ONNX), not one tuple.
FLAT_INPUT_FORMATS = ("onnx", "openvino")
# The text encoder programs of each family, in the order of the backend's tokenizers and ids.
TEXT_ENCODERS = {
    "sd1": ("text_encoder",),
    "sd2": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sdxl-refiner": ("text_encoder_2",),
}
FAMILIES = tuple(TEXT_ENCODERS)
# SD 1.x/2.x modules (what artifacts built before SDXL hold); `modules_for` gives every family's.
MODULES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# The artifact dtypes, by the names the manifest's `dtype` field holds.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def modules_for(family: str) -> tuple[str, ...]:
    """The programs of an artifact of `family`: its text encoders, the UNet step, the VAE halves."""
    return (*TEXT_ENCODERS[family], "unet", "vae_decoder", "vae_encoder")


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, tampered with, or unusable here; the message says which."""


@dataclass(frozen=True)
class ShapeRange:
    max_batch: int  # images per call; the UNet serves 2x this (classifier-free guidance)
    min_size: int  # pixels, both sides
    max_size: int
    multiple: int  # pixel sizes must be multiples of this
    max_chunks: int  # 77-token prompt chunks

    def check(self, batch: int, height: int, width: int) -> None:
        """`batch` counts UNet rows (2 per image with CFG)."""
        if not 1 <= batch <= 2 * self.max_batch:
            raise ValueError(f"batch of {batch} UNet rows is outside this artifact's range "
                             f"(max_batch={self.max_batch} images, i.e. {2 * self.max_batch} rows with CFG)")
        for name, px in (("height", height), ("width", width)):
            if not self.min_size <= px <= self.max_size or px % self.multiple:
                raise ValueError(f"{name} {px} px is outside this artifact's range: multiples of "
                                 f"{self.multiple} from {self.min_size} to {self.max_size} px")


@dataclass(frozen=True)
class Manifest:
    format: str
    family: str
    prediction_type: str
    unet_in_channels: int
    latent_channels: int
    scaling_factor: float
    context_dim: int
    scheduler_config: dict[str, Any]
    shapes: ShapeRange
    dtype: str  # a key of DTYPES
    device: str  # "cpu" | "cuda"
    torch_version: str
    op_library_version: str  # "" when built with --kernels native
    kernels: str  # "fused" | "native": the UNet's and text encoders'
    model_name: str
    model_hash: str
    build_options: dict[str, Any]
    modules: dict[str, dict[str, str]]  # module -> {"program": file, "weights": file or ""[, "tokens": file]}
    tokenizer: str = "tokenizer.json"  # text_encoder's tokenizer ("" for the SDXL refiner, which has none)
    tokenizer_2: str = ""  # text_encoder_2's (SDXL base and refiner)
    # SDXL fields; the defaults are SD 1.x/2.x's, so manifests written before SDXL read unchanged.
    time_ids: int = 0  # size/crop (/aesthetic) numbers the UNet takes: 6 (SDXL base), 5 (refiner)
    pooled_dim: int = 0  # width of the pooled text embedding the UNet takes (SDXL: encoder 2's projection)
    force_zeros_for_empty_prompt: bool = False
    force_upcast: bool = False  # the VAE programs stay float32 in a half-precision build
    vae_dtype: str = ""  # a key of DTYPES; "" (older artifacts): `dtype`
    vae_kernels: str = ""  # "fused" | "native"; "" (older artifacts): `kernels`
    # float32 CPU aoti builds: "mkl" | "onednn", the linear layers' engine; "" for other builds (and older
    # artifacts, whose CPU aoti linear layers are oneDNN's)
    cpu_gemm: str = ""
    context_widths: list[int] = field(default_factory=list)  # per text encoder when several (SDXL base)
    # (channels, downscale) of each ControlNet residual the UNet program takes; [] = built before ControlNet
    control_residuals: list[list[int]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    format_version: int = FORMAT_VERSION

    @property
    def vae_dtype_name(self) -> str:
        return self.vae_dtype or self.dtype

    @property
    def residuals(self) -> tuple[tuple[int, int], ...]:
        """`control_residuals` as (channels, downscale) pairs (runtime/control.py's `Residuals`)."""
        return tuple((int(c), int(f)) for c, f in self.control_residuals)

    @property
    def tokenizer_files(self) -> tuple[str, ...]:
        """One tokenizer file per text encoder, in `TEXT_ENCODERS` order."""
        by_encoder = {"text_encoder": self.tokenizer, "text_encoder_2": self.tokenizer_2}
        return tuple(by_encoder[name] for name in TEXT_ENCODERS[self.family])

    @property
    def encoder_widths(self) -> dict[str, int]:
        """Text encoder -> its hidden size (the width of its token vectors)."""
        return dict(zip(TEXT_ENCODERS[self.family], self.context_widths or [self.context_dim], strict=True))

    @property
    def token_tables(self) -> dict[str, str]:
        """Text encoder -> its token-table file; {} for artifacts whose encoders take ids (built before)."""
        return {name: self.modules[name]["tokens"] for name in TEXT_ENCODERS[self.family]
                if self.modules[name].get("tokens")}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{where}: manifest.json is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: manifest.json must hold a JSON object")
        if d.get("kind") == "controlnet":
            raise ArtifactError(f"{where}: a ControlNet artifact: load it with runtime.load_control and pass it "
                                "as control= to a model's text2img / img2img / inpaint")
        version = d.get("format_version")
        if version not in READ_VERSIONS:
            raise ArtifactError(f"{where}: artifact format version {version!r} is not supported by this "
                                f"runtime (reads {', '.join(map(str, READ_VERSIONS))}); rebuild it with "
                                "`sdexport build` or upgrade the runtime")
        try:
            d["shapes"] = ShapeRange(**d["shapes"])
            m = cls(**d)
        except (TypeError, KeyError) as e:
            raise ArtifactError(f"{where}: manifest.json is incomplete or malformed ({e})") from None
        if m.format not in FORMATS:
            raise ArtifactError(f"{where}: unknown artifact format {m.format!r}")
        if m.family not in TEXT_ENCODERS:
            raise ArtifactError(f"{where}: unknown model family {m.family!r} (this runtime knows "
                                f"{', '.join(FAMILIES)}); upgrade the runtime or rebuild the artifact")
        expected = modules_for(m.family)
        if set(m.modules) != set(expected):
            raise ArtifactError(f"{where}: manifest lists modules {sorted(m.modules)}, expected {list(expected)} "
                                f"for family {m.family}")
        for name in (m.dtype, m.vae_dtype_name):
            if name not in DTYPES:
                raise ArtifactError(f"{where}: unknown dtype {name!r} in manifest.json")
        if not all(m.tokenizer_files):
            raise ArtifactError(f"{where}: manifest names no tokenizer for one of {TEXT_ENCODERS[m.family]}")
        tables = m.token_tables
        want = list(TEXT_ENCODERS[m.family]) if m.format_version >= 2 else []
        if sorted(tables) != sorted(want):
            raise ArtifactError(f"{where}: format version {m.format_version} with token tables for "
                                f"{sorted(tables)}; expected them for {want}")
        return m


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by posix relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def read_manifest(root: Path, verify: bool = True) -> Manifest:
    """Read root/manifest.json; with verify, check that the files are exactly those hashed, unaltered."""
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root}: not an sdexport artifact (manifest.json is missing)")
    m = Manifest.from_json(path.read_text(encoding="utf-8"), root)
    if verify:
        verify_files(root, m)
    return m


def verify_files(root: Path, m: Manifest) -> None:
    problems: list[str] = []
    for rel, digest in sorted(m.files.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"missing file {rel}")
        elif sha256_file(p) != digest:
            problems.append(f"checksum mismatch in {rel} (corrupt, truncated or modified)")
    needed = set(m.tokenizer_files) | {f for mod in m.modules.values() for f in mod.values() if f}
    problems += [f"manifest does not hash {rel}" for rel in sorted(needed - set(m.files))]
    if problems:
        raise ArtifactError(f"{root}: artifact failed verification: " + "; ".join(problems))
