"""`StableDiffusion`: the eager pipeline, our typed modules plugged into the shared runtime loop."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from runtime.backend import ModelInfo
from runtime.pipeline import Pipeline
from runtime.tokenizer import ClipTokenizer
from sdexport.export.build import BuildOptions, build
from sdexport.export.modules import pixel_multiple
from sdexport.loading import PAD_TOKEN, Checkpoint, load_checkpoint
from sdexport.loading.errors import load_strict
from sdexport.models.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdexport.models.layers import Kernels, set_attention_chunks, set_backend
from sdexport.models.text_encoder import TextEncoder, TextEncoderWithProjection
from sdexport.models.unet import UNet
from sdexport.models.vae import VAE


@dataclass(frozen=True)
class SourceConfigs:
    """The diffusers / transformers config dicts the modules were built from (what a diffusers copy of
    the model needs, e.g. in `sdexport bench`)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]


class EagerBackend:
    """A `runtime.backend.Backend` over the eager modules."""

    def __init__(self, unet: UNet, vae: VAE, text_encoder: TextEncoder, tokenizer: ClipTokenizer,
                 info: ModelInfo, configs: SourceConfigs) -> None:
        self.unet_module = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizers: tuple[ClipTokenizer, ...] = (tokenizer,)
        self.info = info
        self.configs = configs

    @property
    def device(self) -> torch.device:
        return self.unet_module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet_module.dtype

    def check_shape(self, batch: int, height: int, width: int) -> None:
        unit = pixel_multiple(self.unet_module, self.vae)
        for name, px in (("height", height), ("width", width)):
            if px % unit:
                raise ValueError(f"{name} must be a multiple of {unit} px for this UNet, got {px}")

    def encode_text(self, ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        (chunk_ids,) = ids
        return self.text_encoder(chunk_ids), None

    def unet(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, text_embeds: Tensor | None = None,
             time_ids: Tensor | None = None) -> Tensor:
        return self.unet_module(x, t, context, weights, text_embeds=text_embeds,  # type: ignore[no-any-return]
                                time_ids=time_ids)

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(self.vae.dtype)).float()

    def encode(self, image: Tensor) -> Tensor:
        mean, logvar = self.vae.moments(image.to(self.vae.dtype))
        return torch.cat([mean, logvar], dim=1).float()


def _model_hash(path: Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the weights file's sha256."""
    target = path
    if path.is_dir():
        candidates = sorted((path / "unet").glob("diffusion_pytorch_model*"))
        if not candidates:
            return ""
        target = candidates[0]
    h = hashlib.sha256()
    with target.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


class StableDiffusion(Pipeline):
    """Eager SD 1.x / 2.x pipeline with fluent setters; `text2img`, `img2img`, `inpaint` as the runtime."""

    backend: EagerBackend

    def __init__(self, backend: EagerBackend, low_ram: bool = False) -> None:
        super().__init__(backend, low_ram=low_ram)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, prediction_type: str | None = None,
                        clip_skip: int = 1, configs: Mapping[str, Mapping[str, Any]] | None = None
                        ) -> StableDiffusion:
        """Load a diffusers folder or a single-file `.safetensors` / `.ckpt` checkpoint (float32, CPU)."""
        ck = load_checkpoint(path, prediction_type=prediction_type, configs=configs)
        return cls.from_checkpoint(ck, clip_skip=clip_skip)

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, clip_skip: int = 1) -> StableDiffusion:
        sd = cls.from_configs(ck.family, ck.unet_config, ck.vae_config, ck.text_config, ck.scheduler_config,
                              clip_skip=clip_skip, tokenizer_dir=ck.tokenizer_dir, name=ck.source.stem,
                              model_hash=_model_hash(ck.source), device="meta")
        load_strict(sd.unet, ck.unet, "unet")
        load_strict(sd.vae, ck.vae, "vae")
        load_strict(sd.text_encoder, ck.text_encoder, "text_encoder")
        # transformers' CLIP keeps a non-persistent position_ids buffer, absent from state dicts
        emb: Any = sd.text_encoder.embeddings
        if getattr(emb, "position_ids", None) is not None and emb.position_ids.is_meta:
            positions = torch.arange(emb.position_ids.shape[-1]).expand(1, -1)
            emb.register_buffer("position_ids", positions, persistent=False)
        left = [n for m in sd.modules() for n, t in (*m.named_parameters(), *m.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"tensors left unloaded: {left[:5]}")
        return sd

    @classmethod
    def from_configs(cls, family: str, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                     text_config: Mapping[str, Any], scheduler_config: Mapping[str, Any], *,
                     clip_skip: int = 1, tokenizer_dir: Path | None = None, name: str = "model",
                     model_hash: str = "", device: str = "cpu") -> StableDiffusion:
        """Modules from diffusers/transformers config dicts: random weights, or (device="meta")
        empty ones that `load_strict` then fills by assignment."""
        with torch.device(device):
            unet = UNet(UNetConfig.from_diffusers(unet_config))
            vae = VAE(VAEConfig.from_diffusers(vae_config))
            text = TextEncoder(TextEncoderConfig.from_transformers(text_config, clip_skip))
        if tokenizer_dir is not None:
            tokenizer = ClipTokenizer.from_folder(tokenizer_dir)
        else:
            tokenizer = ClipTokenizer.bundled(pad=PAD_TOKEN[family])
        info = ModelInfo(family=family, unet_in_channels=unet.config.in_channels,
                         latent_channels=vae.config.latent_channels, scaling_factor=vae.scaling_factor,
                         scheduler_config=dict(scheduler_config), name=name, hash=model_hash)
        for m in (unet, vae, text):
            m.eval().requires_grad_(False)
        configs = SourceConfigs(dict(unet_config), dict(vae_config), dict(text_config))
        return cls(EagerBackend(unet, vae, text, tokenizer, info, configs))

    def export(self, out: str | Path, *, overwrite: bool = False, **options: Any) -> Path:
        """Build an artifact (see `sdexport build`); options are `BuildOptions` fields:
        format, half, device, kernels, max_batch, min_size, max_size, max_chunks. `self` is unchanged."""
        return build(self, out, BuildOptions(**options), overwrite=overwrite).path

    # ---- modules ----------------------------------------------------------------------------
    @property
    def unet(self) -> UNet:
        return self.backend.unet_module

    @property
    def vae(self) -> VAE:
        return self.backend.vae

    @property
    def text_encoder(self) -> TextEncoder:
        return self.backend.text_encoder

    @property
    def text_encoder_2(self) -> TextEncoderWithProjection | None:
        """SDXL's second encoder (OpenCLIP bigG with projection); None for SD 1.x/2.x."""
        return None

    @property
    def tokenizers(self) -> tuple[ClipTokenizer, ...]:
        """One tokenizer per text encoder, in order."""
        return self.backend.tokenizers

    @property
    def tokenizer(self) -> ClipTokenizer:
        """The first tokenizer (SD 1.x/2.x: the only one)."""
        return self.backend.tokenizers[0]

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def configs(self) -> SourceConfigs:
        return self.backend.configs

    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.unet, self.vae, self.text_encoder)

    # ---- fluent setters ---------------------------------------------------------------------
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        return self

    def half(self) -> StableDiffusion:
        return self.to(dtype=torch.float16)

    def bfloat16(self) -> StableDiffusion:
        return self.to(dtype=torch.bfloat16)

    def float(self) -> StableDiffusion:
        return self.to(dtype=torch.float32)

    def cuda(self) -> StableDiffusion:
        return self.to("cuda")

    def cpu(self) -> StableDiffusion:
        return self.to("cpu")

    def half_weights(self) -> StableDiffusion:
        """fp16 weights and compute on CUDA (half the memory); on the CPU, where fp16 is slow, bfloat16."""
        return self.half() if self.backend.device.type == "cuda" else self.bfloat16()

    def low_ram(self, enabled: bool = True) -> StableDiffusion:
        """Run the two classifier-free-guidance halves one after the other instead of as one batch."""
        self.sequential_cfg = enabled
        return self

    def split_attention(self, chunks: int = 2) -> StableDiffusion:
        """Compute attention in `chunks` query chunks to cut peak memory (1 = off)."""
        if chunks < 1:
            raise ValueError(f"split_attention chunks must be >= 1, got {chunks}")
        for m in self.modules():
            set_attention_chunks(m, chunks)
        return self

    def attention_backend(self, backend: Kernels | str) -> StableDiffusion:
        """Select the kernels of the fused call sites: `reference`, `sdpa` or `fused`."""
        b = backend if isinstance(backend, Kernels) else Kernels(backend)
        for m in self.modules():
            set_backend(m, b)
        return self
