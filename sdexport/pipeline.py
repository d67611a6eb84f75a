"""`StableDiffusion`: the eager pipeline, our typed modules plugged into the shared runtime loop."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from runtime.adapters import AdapterError, Embedding
from runtime.backend import ModelInfo
from runtime.pipeline import Pipeline
from runtime.tokenizer import ClipTokenizer
from sdexport.export.build import BuildOptions, build
from sdexport.export.modules import pixel_multiple
from sdexport.loading import PAD_TOKENS, Checkpoint, load_checkpoint, pipeline_defaults
from sdexport.loading.errors import load_strict
from sdexport.models.config import TextEncoderConfig, UNetConfig, VAEConfig
from sdexport.models.layers import Kernels, set_attention_chunks, set_backend
from sdexport.models.text_encoder import TextEncoder, TextEncoderWithProjection
from sdexport.models.unet import UNet
from sdexport.models.vae import VAE

TextModule = TextEncoder | TextEncoderWithProjection
XL_FAMILIES = ("sdxl", "sdxl-refiner")
_XL_TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}


@dataclass(frozen=True)
class SourceConfigs:
    """The diffusers / transformers config dicts the modules were built from (what a diffusers copy of
    the model needs, e.g. in `sdexport bench`)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None  # None: the SDXL refiner (encoder 2 only)
    text_encoder_2: dict[str, Any] | None = None  # SDXL only


class EagerBackend:
    """A `runtime.backend.Backend` over the eager modules: one tokenizer per text encoder; an encoder with
    projection (SDXL's encoder 2) gives the pooled embedding."""

    def __init__(self, unet: UNet, vae: VAE, text_encoders: tuple[TextModule, ...],
                 tokenizers: tuple[ClipTokenizer, ...], info: ModelInfo, configs: SourceConfigs) -> None:
        if len(text_encoders) != len(tokenizers):
            raise ValueError(f"{len(text_encoders)} text encoders but {len(tokenizers)} tokenizers")
        self.unet_module = unet
        self.vae = vae
        self.text_encoders = text_encoders
        self.tokenizers: tuple[ClipTokenizer, ...] = tokenizers
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
        if len(ids) != len(self.text_encoders):
            raise ValueError(f"encode_text: {len(ids)} id tensors for {len(self.text_encoders)} text encoders")
        contexts: list[Tensor] = []
        pooled: Tensor | None = None
        for encoder, chunk_ids in zip(self.text_encoders, ids, strict=True):
            if isinstance(encoder, TextEncoderWithProjection):
                context, pooled = encoder(chunk_ids)
            else:
                context = encoder(chunk_ids)
            contexts.append(context)
        return torch.cat(contexts, dim=-1), pooled

    def unet(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, text_embeds: Tensor | None = None,
             time_ids: Tensor | None = None, control: Sequence[Tensor] | None = None) -> Tensor:
        return self.unet_module(x, t, context, weights, text_embeds=text_embeds,  # type: ignore[no-any-return]
                                time_ids=time_ids, control=control)

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(self.vae.dtype)).float()

    def encode(self, image: Tensor) -> Tensor:
        mean, logvar = self.vae.moments(image.to(self.vae.dtype))
        return torch.cat([mean, logvar], dim=1).float()

    # ---- adapters (runtime/adapters/session.py) ----------------------------------------------
    def _components(self) -> dict[str, UNet | TextModule]:
        names = ["text_encoder_2" if isinstance(e, TextEncoderWithProjection) else "text_encoder"
                 for e in self.text_encoders]
        return {"unet": self.unet_module, **dict(zip(names, self.text_encoders, strict=True))}

    def adapter_weights(self) -> dict[str, Tensor]:
        return {f"{c}.{n}": p for c, m in self._components().items() for n, p in m.named_parameters()}

    def weights_changed(self, names: Collection[str]) -> None:
        pass  # the modules compute with the tensors themselves

    def add_embedding(self, emb: Embedding) -> None:
        encoders = [(c, e) for c, e in self._components().items() if not isinstance(e, UNet)]
        comps = [(c, _token_table(e), tok) for (c, e), tok in zip(encoders, self.tokenizers, strict=True)]
        vectors = emb.for_encoders({c: int(t.weight.shape[1]) for c, t, _ in comps})
        for c, table, tok in comps:  # everything checked before anything changes
            if tok.vocab_size != table.num_embeddings:
                raise AdapterError(f"{c}: the tokenizer has {tok.vocab_size} tokens, the token table "
                                   f"{table.num_embeddings} rows; cannot add {emb.token!r}")
            if emb.token in tok.added:
                raise AdapterError(f"{emb.token!r} is already a token of this model")
            if tok.taken(emb.token, emb.num_vectors):
                raise AdapterError(f"{emb.source}: {emb.token!r} is a word of the tokenizer already; load the "
                                   "embedding under another token (token=...)")
        for c, table, tok in comps:
            ids = tok.add_tokens(emb.token, emb.num_vectors)
            w = table.weight
            assert ids[0] == w.shape[0], (ids, w.shape)
            table.weight = torch.nn.Parameter(torch.cat([w.detach(), vectors[c].to(w)]), requires_grad=False)
            table.num_embeddings = int(table.weight.shape[0])


def _token_table(encoder: TextModule) -> torch.nn.Embedding:
    return encoder.token_embedding


def _text_encoders(family: str, text_config: Mapping[str, Any] | None, text_config_2: Mapping[str, Any] | None,
                   clip_skip: int) -> tuple[TextModule, ...]:
    """SD 1.x/2.x: encoder 1 (final-normed, A1111 clip skip). SDXL: both encoders' un-normed hidden state
    `clip_skip` layers below the penultimate (diffusers' hidden_states[-(clip_skip + 1)]); refiner: encoder 2."""
    xl = family in XL_FAMILIES
    if family not in (*XL_FAMILIES, "sd1", "sd2"):
        raise ValueError(f"unknown model family {family!r}; expected sd1, sd2, sdxl or sdxl-refiner")
    if (text_config_2 is not None) != xl:
        raise ValueError(f"text_config_2 (SDXL's encoder 2) is {'required' if xl else 'not taken'} for {family}")
    if bool(text_config) != (family != "sdxl-refiner"):
        raise ValueError(f"text_config (encoder 1) is {'not taken' if text_config else 'required'} for {family}")
    skip, norm = (clip_skip + 1, False) if xl else (clip_skip, True)
    encoders: list[TextModule] = []
    if text_config:
        encoders.append(TextEncoder(TextEncoderConfig.from_transformers(text_config, skip, norm)))
    if text_config_2 is not None:
        encoders.append(TextEncoderWithProjection(TextEncoderConfig.from_transformers(text_config_2, skip, norm)))
    return tuple(encoders)


def _time_ids(family: str, unet: UNet, text_config_2: Mapping[str, Any] | None) -> int:
    """The number of SDXL time ids the UNet takes (checked against the family)."""
    cfg = unet.config
    if not cfg.text_time or text_config_2 is None:
        if family in XL_FAMILIES:
            raise ValueError(f"a {family} UNet needs addition_embed_type='text_time'")
        return 0
    assert cfg.projection_class_embeddings_input_dim is not None and cfg.addition_time_embed_dim is not None
    extra = cfg.projection_class_embeddings_input_dim - int(text_config_2.get("projection_dim", 512))
    n = extra // cfg.addition_time_embed_dim
    if n * cfg.addition_time_embed_dim != extra or n != _XL_TIME_IDS[family]:
        raise ValueError(f"the UNet's added embedding takes {extra / cfg.addition_time_embed_dim:g} time ids; "
                         f"{family} takes {_XL_TIME_IDS[family]}")
    return n


def _tokenizers(family: str, folders: tuple[Path | None, ...]) -> tuple[ClipTokenizer, ...]:
    return tuple(ClipTokenizer.from_folder(folder) if folder is not None else ClipTokenizer.bundled(pad=pad)
                 for folder, pad in zip(folders, PAD_TOKENS[family], strict=True))


def _fix_position_ids(encoder: TextModule) -> None:
    """transformers' CLIP keeps a non-persistent position_ids buffer, absent from state dicts."""
    inner = encoder.text_model if isinstance(encoder, TextEncoderWithProjection) else encoder
    emb: Any = inner.embeddings
    if getattr(emb, "position_ids", None) is not None and emb.position_ids.is_meta:
        positions = torch.arange(emb.position_ids.shape[-1]).expand(1, -1)
        emb.register_buffer("position_ids", positions, persistent=False)


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
    """Eager SD 1.x / 2.x / XL pipeline with fluent setters; `text2img`, `img2img`, `inpaint` as the runtime."""

    backend: EagerBackend

    def __init__(self, backend: EagerBackend, low_ram: bool = False) -> None:
        super().__init__(backend, low_ram=low_ram)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, prediction_type: str | None = None,
                        clip_skip: int = 1, configs: Mapping[str, Mapping[str, Any]] | None = None,
                        lora_dir: str | Path | None = None, embeddings_dir: str | Path | None = None
                        ) -> StableDiffusion:
        """Load a diffusers folder or a single-file `.safetensors` / `.ckpt` checkpoint (float32, CPU).
        lora_dir / embeddings_dir: see `set_adapter_dirs` (prompt tags, embeddings by name)."""
        ck = load_checkpoint(path, prediction_type=prediction_type, configs=configs)
        sd = cls.from_checkpoint(ck, clip_skip=clip_skip)
        sd.set_adapter_dirs(lora_dir, embeddings_dir)
        return sd

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, clip_skip: int = 1) -> StableDiffusion:
        sd = cls.from_configs(ck.family, ck.unet_config, ck.vae_config, ck.text_config or None, ck.scheduler_config,
                              text_config_2=ck.text_config_2, clip_skip=clip_skip, tokenizer_dir=ck.tokenizer_dir,
                              tokenizer_2_dir=ck.tokenizer_2_dir,
                              force_zeros_for_empty_prompt=ck.force_zeros_for_empty_prompt, name=ck.source.stem,
                              model_hash=_model_hash(ck.source), device="meta")
        load_strict(sd.unet, ck.unet, "unet")
        load_strict(sd.vae, ck.vae, "vae")
        states = {"text_encoder": ck.text_encoder, "text_encoder_2": ck.text_encoder_2}
        for name, encoder in (("text_encoder", sd.text_encoder), ("text_encoder_2", sd.text_encoder_2)):
            if encoder is not None:
                state = states[name]
                if state is None:
                    raise RuntimeError(f"the {ck.family} checkpoint has no {name} weights")
                load_strict(encoder, state, name)
                _fix_position_ids(encoder)
        left = [n for m in sd.modules() for n, t in (*m.named_parameters(), *m.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"tensors left unloaded: {left[:5]}")
        return sd

    @classmethod
    def from_configs(cls, family: str, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                     text_config: Mapping[str, Any] | None, scheduler_config: Mapping[str, Any], *,
                     text_config_2: Mapping[str, Any] | None = None, clip_skip: int = 1,
                     tokenizer_dir: Path | None = None, tokenizer_2_dir: Path | None = None,
                     force_zeros_for_empty_prompt: bool | None = None, name: str = "model",
                     model_hash: str = "", device: str = "cpu") -> StableDiffusion:
        """Modules from diffusers/transformers config dicts: random weights, or (device="meta") empty ones
        that `load_strict` then fills by assignment. SDXL: `text_config_2` is encoder 2's
        (CLIPTextModelWithProjection); the refiner has no `text_config` (None). Tokenizers: the folders,
        else the bundled vocabulary with the family's pad tokens. `force_zeros_for_empty_prompt` None:
        the family's published default."""
        with torch.device(device):
            unet = UNet(UNetConfig.from_diffusers(unet_config))
            vae = VAE(VAEConfig.from_diffusers(vae_config))
            encoders = _text_encoders(family, text_config, text_config_2, clip_skip)
        folders = (tokenizer_dir, tokenizer_2_dir)[:len(encoders)] if text_config else (tokenizer_2_dir,)
        tokenizers = _tokenizers(family, folders)
        xl = family in XL_FAMILIES
        zeros = pipeline_defaults(family)["force_zeros_for_empty_prompt"]
        info = ModelInfo(family=family, unet_in_channels=unet.config.in_channels,
                         latent_channels=vae.config.latent_channels, scaling_factor=vae.scaling_factor,
                         scheduler_config=dict(scheduler_config), name=name, hash=model_hash,
                         time_ids=_time_ids(family, unet, text_config_2),
                         force_zeros_for_empty_prompt=zeros if force_zeros_for_empty_prompt is None
                         else force_zeros_for_empty_prompt,
                         force_upcast=xl and vae.config.force_upcast,
                         context_widths=tuple(e.config.hidden_size for e in encoders) if len(encoders) > 1 else (),
                         context_dim=unet.config.cross_attention_dim, control_residuals=unet.config.residuals)
        for m in (unet, vae, *encoders):
            m.eval().requires_grad_(False)
        configs = SourceConfigs(dict(unet_config), dict(vae_config), dict(text_config) if text_config else None,
                                None if text_config_2 is None else dict(text_config_2))
        return cls(EagerBackend(unet, vae, encoders, tokenizers, info, configs))

    def export(self, out: str | Path, *, overwrite: bool = False, **options: Any) -> Path:
        """Build an artifact (see `sdexport build`); options are `BuildOptions` fields:
        format, half, device, kernels, vae_kernels, cpu_gemm, max_batch, min_size, max_size, max_chunks.
        `self` is unchanged."""
        return build(self, out, BuildOptions(**options), overwrite=overwrite).path

    # ---- modules ----------------------------------------------------------------------------
    @property
    def unet(self) -> UNet:
        return self.backend.unet_module

    @property
    def vae(self) -> VAE:
        return self.backend.vae

    @property
    def text_encoder(self) -> TextEncoder | None:
        """Encoder 1 (CLIP ViT-L for SD 1.x / SDXL, OpenCLIP ViT-H for SD 2.x); None for the SDXL refiner."""
        first = self.backend.text_encoders[0]
        return first if isinstance(first, TextEncoder) else None

    @property
    def text_encoder_2(self) -> TextEncoderWithProjection | None:
        """SDXL's encoder 2 (OpenCLIP bigG with projection); None for SD 1.x/2.x."""
        last = self.backend.text_encoders[-1]
        return last if isinstance(last, TextEncoderWithProjection) else None

    @property
    def text_encoders(self) -> tuple[TextModule, ...]:
        return self.backend.text_encoders

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
        return (self.unet, self.vae, *self.text_encoders)

    # ---- fluent setters ---------------------------------------------------------------------
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        """Move/cast every module; a `force_upcast` VAE (SDXL's overflows in fp16) stays float32 under float16."""
        for m in self.modules():
            keep_fp32 = m is self.vae and dtype == torch.float16 and self.info.force_upcast
            m.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
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
