"""`sdexport build`: export the modules of a pipeline (`runtime.manifest.modules_for` its family) into a
frozen, verifiable artifact."""

from __future__ import annotations

import copy
import importlib.util
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
from runtime.manifest import DTYPES, FORMAT_VERSION, FORMATS, MANIFEST, TEXT_ENCODERS, Manifest, ShapeRange, hash_tree
from runtime.openvino import MISSING as OPENVINO_MISSING
from runtime.tokenizer import ClipTokenizer
from sdexport.export import formats
from sdexport.export.control_unet import ControlUNetStep, ControlUNetStepXL, control_unet_example
from sdexport.export.mkl_linear import CPU_GEMMS, default_cpu_gemm
from sdexport.export.modules import (
    SIZE_STEP,
    ShapeSpec,
    TextEncode,
    TextEncodePooled,
    TextTokens,
    TextTokensPooled,
    VAEDecode,
    VAEMoments,
    XLInputs,
    artifact_multiple,
)
from sdexport.export.tokens import write_token_tables
from sdexport.models.layers import Kernels, set_backend
from sdexport.models.text_encoder import TextEncoder, TextEncoderWithProjection
from sdexport.models.unet import UNet
from sdexport.models.vae import VAE

KERNELS = ("fused", "native")  # our custom ops as graph nodes, or plain torch ops
DEVICES = ("cpu", "cuda")
StageCallback = Callable[[str], None]  # called with each module's name as its export starts
M = TypeVar("M", bound=nn.Module)
# Default pixel range of an artifact, by family (`--min-size` / `--max-size` override it).
DEFAULT_SIZES = {"sd1": (256, 1024), "sd2": (256, 1024), "sdxl": (512, 1536), "sdxl-refiner": (512, 1536)}
TOKENIZER_FILES = {"text_encoder": "tokenizer.json", "text_encoder_2": "tokenizer_2.json"}
# Text encoders fed token vectors, their token tables beside them (sdexport/export/tokens.py). False
# builds the ids-fed form of artifacts built before (tests check those still load).
TOKEN_TABLES = True


class Exportable(Protocol):
    """What `build` and `refit` read from a model (`sdexport.StableDiffusion` is one)."""

    @property
    def unet(self) -> UNet: ...
    @property
    def vae(self) -> VAE: ...
    @property
    def text_encoder(self) -> TextEncoder | None: ...  # None: the SDXL refiner
    @property
    def text_encoder_2(self) -> TextEncoderWithProjection | None: ...  # SDXL only
    @property
    def tokenizers(self) -> tuple[ClipTokenizer, ...]: ...  # one per text encoder, in order
    @property
    def info(self) -> ModelInfo: ...


@dataclass(frozen=True)
class _Copy:
    """The export copies of a model's modules (an `Exportable`)."""

    unet: UNet
    vae: VAE
    text_encoder: TextEncoder | None
    text_encoder_2: TextEncoderWithProjection | None
    tokenizers: tuple[ClipTokenizer, ...]
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
    half: bool = False  # 16-bit weights and compute: float16 on CUDA, bfloat16 on the CPU (fp16 is slow there)
    device: str = "cpu"
    kernels: str = "fused"  # "fused": our custom ops as graph nodes; "native": plain torch ops
    # the VAE's kernels; "": native on the CPU (Inductor lowers GroupNorm and plans its buffers: faster
    # there at SD 1.5 size, BENCHMARKS.md), `kernels` on CUDA
    vae_kernels: str = ""
    # float32 CPU aoti builds: the linear layers' engine, one of CPU_GEMMS ("": this CPU's faster one,
    # sdexport/export/mkl_linear.py)
    cpu_gemm: str = ""
    max_batch: int = 4  # images per call (the UNet serves twice this for CFG)
    min_size: int | None = None  # pixels; None: the family's `DEFAULT_SIZES`
    max_size: int | None = None
    max_chunks: int = 3  # 77-token prompt chunks (3 -> prompts up to 225 tokens)

    def validate(self) -> None:
        """Checks that need no model (`build` also checks the sizes against the UNet's multiple)."""
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.vae_kernels not in ("", *KERNELS):
            raise ValueError(f"vae_kernels must be one of {', '.join(KERNELS)} (or empty for the device's "
                             f"default), got {self.vae_kernels!r}")
        if self.cpu_gemm not in ("", *CPU_GEMMS):
            raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)} (or empty for this CPU's "
                             f"default), got {self.cpu_gemm!r}")
        if self.cpu_gemm and not self.cpu_linear_build:
            raise ValueError("cpu_gemm applies to float32 CPU aoti builds (--format aoti --device cpu, "
                             "without --half)")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.format == "openvino":
            if self.device != "cpu":
                raise ValueError("--format openvino builds CPU artifacts (OpenVINO's CPU plugin): use --device cpu")
            if importlib.util.find_spec("openvino") is None:
                raise ValueError(f"--format openvino needs OpenVINO: {OPENVINO_MISSING}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but this torch sees no CUDA device")
        if self.max_batch < 1 or self.max_chunks < 1:
            raise ValueError("max_batch and max_chunks must be >= 1")
        for name, px in (("min_size", self.min_size), ("max_size", self.max_size)):
            if px is not None and (px < SIZE_STEP or px % SIZE_STEP):
                raise ValueError(f"{name} must be a multiple of {SIZE_STEP} px (>= {SIZE_STEP}), got {px}")
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} exceeds max_size {self.max_size}")

    def sizes(self, family: str) -> tuple[int, int]:
        """(min_size, max_size) for a model of `family`: the options', else the family's defaults."""
        lo, hi = DEFAULT_SIZES[family]
        lo, hi = self.min_size or lo, self.max_size or hi
        if lo > hi:  # one side given, the other from the defaults
            raise ValueError(f"min_size {lo} exceeds max_size {hi} (the {family} default range is "
                             f"{DEFAULT_SIZES[family][0]}..{DEFAULT_SIZES[family][1]} px)")
        return lo, hi

    def resolve(self, out: Path, overwrite: bool, family: str, multiple: int, what: str) -> BuildOptions:
        """The shared start of every build: `out` free (or `overwrite`), the op library loaded for fused
        kernels, the sizes resolved for `family` and checked against the model's pixel `multiple`."""
        self.validate()
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite=True / --force to replace it)")
        if self.uses_op_library:
            from runtime import ops

            ops.load()
        lo, hi = self.sizes(family)
        if lo % multiple or hi % multiple:
            raise ValueError(f"sizes must be multiples of {multiple} px for this {what}")
        return replace(self, min_size=lo, max_size=hi)

    @property
    def model_kernels(self) -> Kernels:
        return Kernels.FUSED if self.kernels == "fused" else Kernels.SDPA

    @property
    def vae_kernels_used(self) -> str:
        return self.vae_kernels or ("native" if self.device == "cpu" else self.kernels)

    @property
    def vae_model_kernels(self) -> Kernels:
        return Kernels.FUSED if self.vae_kernels_used == "fused" else Kernels.SDPA

    @property
    def cpu_linear_build(self) -> bool:
        """Whether the build has float32 CPU aoti programs, whose linear layers `cpu_gemm` chooses for."""
        return self.format == "aoti" and self.device == "cpu" and not self.half

    @property
    def cpu_gemm_used(self) -> str:
        """`cpu_gemm` resolved for this CPU; "" for builds it does not apply to."""
        return (self.cpu_gemm or default_cpu_gemm()) if self.cpu_linear_build else ""

    @property
    def uses_op_library(self) -> bool:
        return "fused" in (self.kernels, self.vae_kernels_used)

    @property
    def dtype_name(self) -> str:
        if not self.half:
            return "float32"
        return "bfloat16" if self.device == "cpu" else "float16"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def graph_dtype(self) -> torch.dtype:
        """The dtype the programs are exported in: `dtype`, except openvino's float32 graphs, which the
        engine computes at the manifest dtype's precision (runtime/openvino.py)."""
        return torch.float32 if self.format == "openvino" else self.dtype


@dataclass
class BuildReport:
    path: Path
    seconds: dict[str, float] = field(default_factory=dict)


def xl_inputs(sd: Exportable) -> XLInputs | None:
    """The widths of the UNet's added SDXL inputs (None for SD 1.x/2.x), checked against each other."""
    cfg, info = sd.unet.config, sd.info
    if not cfg.text_time:
        if info.time_ids:
            raise ValueError(f"the model info says {info.time_ids} time ids, but the UNet takes none")
        return None
    if sd.text_encoder_2 is None or cfg.addition_time_embed_dim is None:
        raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs text_encoder_2")
    xl = XLInputs(pooled_dim=sd.text_encoder_2.config.projection_dim, time_ids=info.time_ids)
    width = xl.pooled_dim + xl.time_ids * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
        raise ValueError(f"text_encoder_2's pooled width {xl.pooled_dim} + {xl.time_ids} time ids x "
                         f"{cfg.addition_time_embed_dim} = {width}, but the UNet's "
                         f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}")
    return xl


def export_modules(sd: Exportable, tokens: bool = True) -> dict[str, nn.Module]:
    """The exported functions of an artifact (`runtime.manifest.modules_for` the family), sharing `sd`'s
    parameters; their state-dict names are the names of the artifact's weights. `tokens`: text encoders
    fed token vectors (sdexport/export/tokens.py); False: fed ids, as artifacts built before."""
    family = sd.info.family
    if family not in TEXT_ENCODERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(TEXT_ENCODERS)}")
    modules: dict[str, nn.Module] = {}
    for name in TEXT_ENCODERS[family]:
        if name == "text_encoder":
            if sd.text_encoder is None:
                raise ValueError(f"a {family} model needs a text_encoder")
            modules[name] = TextTokens(sd.text_encoder) if tokens else TextEncode(sd.text_encoder)
        else:
            if sd.text_encoder_2 is None:
                raise ValueError(f"a {family} model needs a text_encoder_2")
            modules[name] = TextTokensPooled(sd.text_encoder_2) if tokens else TextEncodePooled(sd.text_encoder_2)
    if len(sd.tokenizers) != len(TEXT_ENCODERS[family]):
        raise ValueError(f"a {family} model has {len(TEXT_ENCODERS[family])} text encoders, "
                         f"but {len(sd.tokenizers)} tokenizers were given")
    modules["unet"] = ControlUNetStepXL(sd.unet) if xl_inputs(sd) is not None else ControlUNetStep(sd.unet)
    modules["vae_decoder"] = VAEDecode(sd.vae)
    modules["vae_encoder"] = VAEMoments(sd.vae)
    return modules


def vae_dtype(info: ModelInfo, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype in a build of `dtype`: float32 where the VAE overflows in float16 (bfloat16 has
    float32's range)."""
    return torch.float32 if info.force_upcast and dtype == torch.float16 else dtype


def _modules(sd: Exportable, spec: ShapeSpec, dtype: torch.dtype,
             device: torch.device) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], Any]]:
    vae_dt = vae_dtype(sd.info, dtype)
    def widths(te: TextEncoder | TextEncoderWithProjection | None) -> int:
        return 0 if te is None or not TOKEN_TABLES else te.config.hidden_size

    examples = {
        "text_encoder": spec.text_encoder(device, widths(sd.text_encoder), dtype),
        "text_encoder_2": spec.text_encoder(device, widths(sd.text_encoder_2), dtype, pooled=True),
        "unet": control_unet_example(sd.unet, spec, dtype, device, xl_inputs(sd)),
        "vae_decoder": spec.vae_decoder(sd.vae.config.latent_channels, vae_dt, device),
        "vae_encoder": spec.vae_encoder(vae_dt, device),
    }
    return {name: (module, *examples[name]) for name, module in export_modules(sd, TOKEN_TABLES).items()}


def _copy(sd: Exportable, device: torch.device, dtype: torch.dtype, kernels: Kernels, vae_kernels: Kernels) -> _Copy:
    def cast(module: M | None, dt: torch.dtype = dtype, k: Kernels = kernels) -> M | None:
        return None if module is None else export_copy(module, device, dt, k)

    vae = cast(sd.vae, vae_dtype(sd.info, dtype), vae_kernels)
    unet = cast(sd.unet)
    assert vae is not None and unet is not None
    return _Copy(unet=unet, vae=vae, text_encoder=cast(sd.text_encoder), text_encoder_2=cast(sd.text_encoder_2),
                 tokenizers=sd.tokenizers, info=sd.info)


def write_tokenizers(root: Path, sd: Exportable) -> dict[str, str]:
    """One tokenizer file per text encoder -> the manifest's tokenizer fields."""
    fields = {"tokenizer": "", "tokenizer_2": ""}
    for name, tokenizer in zip(TEXT_ENCODERS[sd.info.family], sd.tokenizers, strict=True):
        (root / TOKENIZER_FILES[name]).write_text(tokenizer.to_json(), encoding="utf-8")
        fields["tokenizer" if name == "text_encoder" else "tokenizer_2"] = TOKENIZER_FILES[name]
    return fields


def build(sd: Exportable, out: str | Path, options: BuildOptions | None = None, *,
          overwrite: bool = False, on_stage: StageCallback | None = None) -> BuildReport:
    """Export `sd` into the artifact directory `out`, atomically: a failed or interrupted build leaves
    no directory at `out` (the work happens in a hidden sibling directory renamed at the end).
    `sd` itself is not changed: the export runs on copies cast to the build's device and dtype."""
    out = Path(out)
    (options or BuildOptions()).validate()
    export_modules(sd)  # checks the model's parts against its family before any work
    multiple = artifact_multiple(sd.unet, sd.vae)
    opts = (options or BuildOptions()).resolve(out, overwrite, sd.info.family, multiple, "UNet")
    assert opts.min_size is not None and opts.max_size is not None
    device, dtype = torch.device(opts.device), opts.graph_dtype
    sd = _copy(sd, device, dtype, opts.model_kernels, opts.vae_model_kernels)
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
                entries[name] = formats.write(opts.format, name, module.eval(), args, dyn, tmp, opts.cpu_gemm_used)
                report.seconds[name] = time.perf_counter() - t0
        if TOKEN_TABLES:
            for name, file in write_token_tables(tmp, sd, sd.info.family, dtype).items():
                entries[name]["tokens"] = file
        tokenizers = write_tokenizers(tmp, sd)
        manifest = _manifest(sd, opts, spec, entries, tokenizers)
        write_manifest(tmp, manifest)
    return report


def model_fields(sd: Exportable) -> dict[str, Any]:
    """The manifest fields that describe the model (rather than the build)."""
    info, xl = sd.info, xl_inputs(sd)
    return dict(family=info.family, prediction_type=str(info.scheduler_config.get("prediction_type", "epsilon")),
                unet_in_channels=info.unet_in_channels, latent_channels=info.latent_channels,
                scaling_factor=info.scaling_factor, context_dim=sd.unet.config.cross_attention_dim,
                scheduler_config=dict(info.scheduler_config), model_name=info.name, model_hash=info.hash,
                time_ids=info.time_ids, pooled_dim=0 if xl is None else xl.pooled_dim,
                force_zeros_for_empty_prompt=info.force_zeros_for_empty_prompt,
                force_upcast=info.force_upcast, context_widths=list(info.context_widths),
                control_residuals=[list(r) for r in sd.unet.config.residuals])


def _manifest(sd: Exportable, opts: BuildOptions, spec: ShapeSpec, entries: dict[str, dict[str, str]],
              tokenizers: dict[str, str]) -> Manifest:
    from runtime import ops

    vae_dt = next(k for k, v in DTYPES.items() if v == vae_dtype(sd.info, opts.dtype))
    return Manifest(
        format=opts.format, **model_fields(sd), tokenizer=tokenizers["tokenizer"],
        tokenizer_2=tokenizers["tokenizer_2"], vae_dtype=vae_dt,
        shapes=ShapeRange(max_batch=spec.max_batch, min_size=spec.min_size, max_size=spec.max_size,
                          multiple=spec.multiple, max_chunks=spec.max_chunks),
        dtype=opts.dtype_name, device=opts.device, torch_version=torch.__version__,
        op_library_version=ops.VERSION if opts.uses_op_library else "",
        kernels=opts.kernels, vae_kernels=opts.vae_kernels_used, cpu_gemm=opts.cpu_gemm_used,
        build_options=asdict(opts), modules=entries,
        format_version=FORMAT_VERSION if TOKEN_TABLES else 1)
