"""`sdexport build`: export the four modules of a pipeline into a frozen, verifiable artifact."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.manifest import FORMATS, MANIFEST, Manifest, ShapeRange, hash_tree
from sdexport.export import formats
from sdexport.export.modules import ShapeSpec, TextEncode, UNetStep, VAEDecode, VAEMoments
from sdexport.models.layers import Backend
from sdexport.pipeline import StableDiffusion

Progress = Callable[[str], None]
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yields a hidden temporary sibling of `out` to fill; on success it replaces `out` (renamed into
    place), on any failure or interruption it is removed, so `out` is never half written. A directory
    left by a killed process is removed the next time."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Hashes every file under root into the manifest and writes it (last)."""
    manifest = replace(manifest, files=hash_tree(root))
    (root / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


@dataclass(frozen=True)
class BuildOptions:
    format: str = "aoti"
    half: bool = False
    device: str = "cpu"
    kernels: str = "fused"  # "fused": our custom ops as graph nodes; "native": plain torch ops
    max_batch: int = 4  # images per call (the UNet serves twice this for CFG)
    min_size: int = 256
    max_size: int = 1024
    max_chunks: int = 3  # 77-token prompt chunks (3 -> prompts up to 225 tokens)

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.kernels not in ("fused", "native"):
            raise ValueError(f"kernels must be 'fused' or 'native', got {self.kernels!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but this torch sees no CUDA device")
        if self.max_batch < 1 or self.max_chunks < 1:
            raise ValueError("max_batch and max_chunks must be >= 1")
        for name, px in (("min_size", self.min_size), ("max_size", self.max_size)):
            if px < 64 or px % 64:
                raise ValueError(f"{name} must be a multiple of 64 px (>= 64), got {px}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} exceeds max_size {self.max_size}")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32


@dataclass
class BuildReport:
    path: Path
    seconds: dict[str, float] = field(default_factory=dict)


def export_modules(sd: StableDiffusion) -> dict[str, nn.Module]:
    """The four exported functions of an artifact, sharing `sd`'s parameters; their state-dict names
    are the names of the artifact's weights."""
    return {"text_encoder": TextEncode(sd.text_encoder), "unet": UNetStep(sd.unet),
            "vae_decoder": VAEDecode(sd.vae), "vae_encoder": VAEMoments(sd.vae)}


def _modules(sd: StableDiffusion, spec: ShapeSpec, dtype: torch.dtype,
             device: torch.device) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], Any]]:
    unet_cfg = sd.unet.config
    examples = {
        "text_encoder": spec.text_encoder(device),
        "unet": spec.unet(unet_cfg.in_channels, unet_cfg.cross_attention_dim, dtype, device),
        "vae_decoder": spec.vae_decoder(sd.vae.config.latent_channels, dtype, device),
        "vae_encoder": spec.vae_encoder(dtype, device),
    }
    return {name: (module, *examples[name]) for name, module in export_modules(sd).items()}


def _unet_multiple(sd: StableDiffusion) -> int:
    return max(64, 8 * 2 ** (len(sd.unet.config.block_out_channels) - 1))  # type: ignore[no-any-return]


def build(sd: StableDiffusion, out: str | Path, options: BuildOptions | None = None, *,
          overwrite: bool = False, progress: Progress | None = None) -> BuildReport:
    """Export `sd` into the artifact directory `out`, atomically: a failed or interrupted build leaves
    no directory at `out` (the work happens in a hidden sibling directory renamed at the end)."""
    opts = options or BuildOptions()
    opts.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    if opts.kernels == "fused":
        from runtime import ops

        ops.load()
    multiple = _unet_multiple(sd)
    if opts.min_size % multiple or opts.max_size % multiple:
        raise ValueError(f"sizes must be multiples of {multiple} px for this UNet")
    device, dtype = torch.device(opts.device), opts.dtype
    sd.to(device, dtype).attention_backend(Backend.FUSED if opts.kernels == "fused" else Backend.SDPA)
    spec = ShapeSpec(opts.max_batch, opts.min_size, opts.max_size, opts.max_chunks, multiple)

    report = BuildReport(out)
    with atomic_directory(out) as tmp:
        entries: dict[str, dict[str, str]] = {}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, (module, args, dyn) in _modules(sd, spec, dtype, device).items():
                if progress:
                    progress(name)
                t0 = time.perf_counter()
                entries[name] = formats.write(opts.format, name, module.eval(), args, dyn, tmp)
                report.seconds[name] = time.perf_counter() - t0
        (tmp / "tokenizer.json").write_text(sd.tokenizer.to_json(), encoding="utf-8")
        manifest = _manifest(sd, opts, spec, entries)
        write_manifest(tmp, manifest)
    return report


def model_fields(sd: StableDiffusion) -> dict[str, Any]:
    """The manifest fields that describe the model (rather than the build)."""
    info = sd.info
    return dict(family=info.family, prediction_type=str(info.scheduler_config.get("prediction_type", "epsilon")),
                unet_in_channels=info.unet_in_channels, latent_channels=info.latent_channels,
                scaling_factor=info.scaling_factor, context_dim=sd.unet.config.cross_attention_dim,
                scheduler_config=dict(info.scheduler_config), model_name=info.name, model_hash=info.hash)


def _manifest(sd: StableDiffusion, opts: BuildOptions, spec: ShapeSpec,
              entries: dict[str, dict[str, str]]) -> Manifest:
    from runtime import ops

    return Manifest(
        format=opts.format, **model_fields(sd),
        shapes=ShapeRange(max_batch=spec.max_batch, min_size=spec.min_size, max_size=spec.max_size,
                          multiple=spec.multiple, max_chunks=spec.max_chunks),
        dtype=DTYPE_NAMES[opts.dtype], device=opts.device, torch_version=torch.__version__,
        op_library_version=ops.VERSION if opts.kernels == "fused" else "",
        kernels=opts.kernels, build_options=asdict(opts), modules=entries)
