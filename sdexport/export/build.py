"""`sdexport build`: export the four modules of a pipeline into a frozen, verifiable artifact."""

from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from runtime.backend import ModelInfo
from runtime.manifest import DTYPES, FORMATS, MANIFEST, Manifest, ShapeRange, hash_tree
from runtime.tokenizer import ClipTokenizer
from sdexport.export import formats
from sdexport.export.modules import (
    SIZE_STEP,
    ShapeSpec,
    TextEncode,
    UNetStep,
    VAEDecode,
    VAEMoments,
    artifact_multiple,
)
from sdexport.models.layers import Kernels, set_backend
from sdexport.models.text_encoder import TextEncoder
from sdexport.models.unet import UNet
from sdexport.models.vae import VAE

KERNELS = ("fused", "native")  # our custom ops as graph nodes, or plain torch ops
DEVICES = ("cpu", "cuda")
StageCallback = Callable[[str], None]  # called with each module's name as its export starts
M = TypeVar("M", bound=nn.Module)


class Exportable(Protocol):
    """What `build` and `refit` read from a model (`sdexport.StableDiffusion` is one)."""

    @property
    def unet(self) -> UNet: ...
    @property
    def vae(self) -> VAE: ...
    @property
    def text_encoder(self) -> TextEncoder: ...
    @property
    def tokenizer(self) -> ClipTokenizer: ...
    @property
    def info(self) -> ModelInfo: ...


@dataclass(frozen=True)
class _Copy:
    """The export copies of a model's modules (an `Exportable`)."""

    unet: UNet
    vae: VAE
    text_encoder: TextEncoder
    tokenizer: ClipTokenizer
    info: ModelInfo


def export_copy(module: M, device: torch.device, dtype: torch.dtype, kernels: Kernels) -> M:
    """A copy of `module` cast like `module.to(device, dtype)` and set to `kernels`, leaving `module`
    untouched. Tensors already on `device` in `dtype` are shared, not duplicated."""
    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        cast = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else None)
        memo[id(t)] = nn.Parameter(cast, requires_grad=False) if isinstance(t, nn.Parameter) else cast
    out = copy.deepcopy(module, memo)
    set_backend(out, kernels)
    return out


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
        """Checks that need no model (`build` also checks the sizes against the UNet's multiple)."""
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but this torch sees no CUDA device")
        if self.max_batch < 1 or self.max_chunks < 1:
            raise ValueError("max_batch and max_chunks must be >= 1")
        for name, px in (("min_size", self.min_size), ("max_size", self.max_size)):
            if px < SIZE_STEP or px % SIZE_STEP:
                raise ValueError(f"{name} must be a multiple of {SIZE_STEP} px (>= {SIZE_STEP}), got {px}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} exceeds max_size {self.max_size}")

    @property
    def dtype_name(self) -> str:
        return "float16" if self.half else "float32"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]


@dataclass
class BuildReport:
    path: Path
    seconds: dict[str, float] = field(default_factory=dict)


def export_modules(sd: Exportable) -> dict[str, nn.Module]:
    """The four exported functions of an artifact, sharing `sd`'s parameters; their state-dict names
    are the names of the artifact's weights."""
    return {"text_encoder": TextEncode(sd.text_encoder), "unet": UNetStep(sd.unet),
            "vae_decoder": VAEDecode(sd.vae), "vae_encoder": VAEMoments(sd.vae)}


def _modules(sd: Exportable, spec: ShapeSpec, dtype: torch.dtype,
             device: torch.device) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], Any]]:
    unet_cfg = sd.unet.config
    examples = {
        "text_encoder": spec.text_encoder(device),
        "unet": spec.unet(unet_cfg.in_channels, unet_cfg.cross_attention_dim, dtype, device),
        "vae_decoder": spec.vae_decoder(sd.vae.config.latent_channels, dtype, device),
        "vae_encoder": spec.vae_encoder(dtype, device),
    }
    return {name: (module, *examples[name]) for name, module in export_modules(sd).items()}


def build(sd: Exportable, out: str | Path, options: BuildOptions | None = None, *,
          overwrite: bool = False, on_stage: StageCallback | None = None) -> BuildReport:
    """Export `sd` into the artifact directory `out`, atomically: a failed or interrupted build leaves
    no directory at `out` (the work happens in a hidden sibling directory renamed at the end).
    `sd` itself is not changed: the export runs on copies cast to the build's device and dtype."""
    opts = options or BuildOptions()
    opts.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    if opts.kernels == "fused":
        from runtime import ops

        ops.load()
    multiple = artifact_multiple(sd.unet, sd.vae)
    if opts.min_size % multiple or opts.max_size % multiple:
        raise ValueError(f"sizes must be multiples of {multiple} px for this UNet")
    device, dtype = torch.device(opts.device), opts.dtype
    kernels = Kernels.FUSED if opts.kernels == "fused" else Kernels.SDPA
    sd = _Copy(unet=export_copy(sd.unet, device, dtype, kernels), vae=export_copy(sd.vae, device, dtype, kernels),
               text_encoder=export_copy(sd.text_encoder, device, dtype, kernels), tokenizer=sd.tokenizer,
               info=sd.info)
    spec = ShapeSpec(opts.max_batch, opts.min_size, opts.max_size, opts.max_chunks, multiple)

    report = BuildReport(out)
    with atomic_directory(out) as tmp:
        entries: dict[str, dict[str, str]] = {}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, (module, args, dyn) in _modules(sd, spec, dtype, device).items():
                if on_stage:
                    on_stage(name)
                t0 = time.perf_counter()
                entries[name] = formats.write(opts.format, name, module.eval(), args, dyn, tmp)
                report.seconds[name] = time.perf_counter() - t0
        (tmp / "tokenizer.json").write_text(sd.tokenizer.to_json(), encoding="utf-8")
        manifest = _manifest(sd, opts, spec, entries)
        write_manifest(tmp, manifest)
    return report


def model_fields(sd: Exportable) -> dict[str, Any]:
    """The manifest fields that describe the model (rather than the build)."""
    info = sd.info
    return dict(family=info.family, prediction_type=str(info.scheduler_config.get("prediction_type", "epsilon")),
                unet_in_channels=info.unet_in_channels, latent_channels=info.latent_channels,
                scaling_factor=info.scaling_factor, context_dim=sd.unet.config.cross_attention_dim,
                scheduler_config=dict(info.scheduler_config), model_name=info.name, model_hash=info.hash)


def _manifest(sd: Exportable, opts: BuildOptions, spec: ShapeSpec,
              entries: dict[str, dict[str, str]]) -> Manifest:
    from runtime import ops

    return Manifest(
        format=opts.format, **model_fields(sd),
        shapes=ShapeRange(max_batch=spec.max_batch, min_size=spec.min_size, max_size=spec.max_size,
                          multiple=spec.multiple, max_chunks=spec.max_chunks),
        dtype=opts.dtype_name, device=opts.device, torch_version=torch.__version__,
        op_library_version=ops.VERSION if opts.kernels == "fused" else "",
        kernels=opts.kernels, build_options=asdict(opts), modules=entries)
