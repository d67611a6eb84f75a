"""Frozen configurations of the SD 1.x / 2.x / XL models, parsed from diffusers / transformers ``config.json``.

Keys that do not change the computation (``_class_name``, ``sample_size``, ``dropout`` ...) are ignored;
keys whose value would select an architecture this package does not implement raise ``ValueError``
naming the option. Missing keys take diffusers' defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["UNET_UNSUPPORTED", "TextEncoderConfig", "UNetConfig", "VAEConfig"]

UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def _require(d: Mapping[str, Any], key: str, allowed: Sequence[Any], default: Any, model: str) -> None:
    value = d.get(key, default)
    if isinstance(value, list):
        value = tuple(value)
    if value not in allowed:
        raise ValueError(
            f"{model}: unsupported config option {key}={value!r} (supported: {', '.join(map(repr, allowed))})"
        )


def _per_level(value: Any, n: int, key: str, model: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        if len(value) != n:
            raise ValueError(f"{model}: {key} has {len(value)} entries, expected {n} (one per level)")
        return tuple(value)
    raise ValueError(f"{model}: unsupported config option {key}={value!r} (expected int or list of int)")


# diffusers ``UNet2DConditionModel`` options whose other values select architectures this package does not
# implement: (key, supported values, diffusers' default). The one list: loading validates through
# ``UNetConfig.from_diffusers``. ``transformer_layers_per_block``, ``cross_attention_dim``,
# ``only_cross_attention`` and the "text_time" keys are checked beside their parsing below.
UNET_UNSUPPORTED: tuple[tuple[str, tuple[Any, ...], Any], ...] = (
    ("mid_block_type", ("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn"),
    ("act_fn", ("silu",), "silu"),
    ("reverse_transformer_layers_per_block", (None,), None),
    ("encoder_hid_dim", (None,), None),
    ("encoder_hid_dim_type", (None,), None),
    ("num_attention_heads", (None,), None),  # diffusers itself refuses it (its issue 2011)
    ("dual_cross_attention", (False, None), False),
    ("class_embed_type", (None,), None),
    ("addition_embed_type", (None, "text_time"), None),
    ("num_class_embeds", (None,), None),
    ("resnet_time_scale_shift", ("default",), "default"),
    ("resnet_skip_time_act", (False,), False),
    ("resnet_out_scale_factor", (1.0,), 1.0),
    ("time_embedding_type", ("positional",), "positional"),
    ("time_embedding_dim", (None,), None),
    ("time_embedding_act_fn", (None,), None),
    ("timestep_post_act", (None,), None),
    ("time_cond_proj_dim", (None,), None),
    ("conv_in_kernel", (3,), 3),
    ("conv_out_kernel", (3,), 3),
    ("attention_type", ("default",), "default"),
    ("class_embeddings_concat", (False,), False),
    ("mid_block_only_cross_attention", (None, False), None),
    ("cross_attention_norm", (None,), None),
)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of an SD 1.x / 2.x / XL ``UNet2DConditionModel``.

    ``num_heads`` holds the attention head count of each down level (diffusers stores it under the
    misleading name ``attention_head_dim``); the up path uses it reversed and the mid block the last one.
    ``transformer_layers_per_block`` is the transformer depth of each level's spatial transformers, with
    the same reversal and the mid block taking the last level's. ``addition_time_embed_dim`` not None
    adds SDXL's "text_time" conditioning: ``add_embedding`` maps the pooled text embedding and the
    sinusoids of the time ids (``projection_class_embeddings_input_dim`` wide in all) into the time
    embedding.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("UNet: block_out_channels is empty")
        for key in ("down_block_types", "up_block_types", "layers_per_block", "num_heads",
                    "transformer_layers_per_block"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"UNet: {key} must have one entry per level ({n})")
        for t in self.down_block_types:
            if t not in UNET_DOWN_BLOCKS:
                raise ValueError(f"UNet: unsupported config option down_block_types entry {t!r}")
        for t in self.up_block_types:
            if t not in UNET_UP_BLOCKS:
                raise ValueError(f"UNet: unsupported config option up_block_types entry {t!r}")
        for i, t in enumerate(self.down_block_types):
            if t == "CrossAttnDownBlock2D" and self.block_out_channels[i] % self.num_heads[i]:
                raise ValueError(f"UNet: block_out_channels[{i}] not divisible by its head count")
        if self.block_out_channels[-1] % self.num_heads[-1]:
            raise ValueError("UNet: the mid block's channels are not divisible by its head count")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"UNet: block_out_channels {c} not divisible by norm_num_groups")
        if min(self.transformer_layers_per_block) < 1:
            raise ValueError("UNet: transformer_layers_per_block entries must be >= 1")
        if (self.addition_time_embed_dim is None) != (self.projection_class_embeddings_input_dim is None):
            raise ValueError(
                "UNet: addition_time_embed_dim and projection_class_embeddings_input_dim go together"
            )

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def text_time(self) -> bool:
        """Whether the UNet takes SDXL's ``text_embeds`` and ``time_ids``."""
        return self.addition_time_embed_dim is not None

    @property
    def residuals(self) -> tuple[tuple[int, int], ...]:
        """(channels, downscale) of every ControlNet residual: ``conv_in``'s output, each down layer's
        and downsampler's output (the UNet's skips), then the mid block's."""
        boc, n = self.block_out_channels, len(self.block_out_channels)
        out = [(boc[0], 1)]
        for i in range(n):
            out += [(boc[i], 2**i)] * self.layers_per_block[i]
            if i < n - 1:
                out.append((boc[i], 2 ** (i + 1)))
        return (*out, (boc[-1], 2 ** (n - 1)))

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Parse a diffusers ``UNet2DConditionModel`` config dict; ``ValueError`` names any option
        outside what this package implements."""
        m = "UNet"
        for key, allowed, default in UNET_UNSUPPORTED:
            _require(d, key, allowed, default, m)
        if d.get("norm_num_groups", 32) is None:
            raise ValueError(f"{m}: unsupported config option norm_num_groups=None")
        oca = d.get("only_cross_attention", False)
        if oca not in (False, None) and not (isinstance(oca, list | tuple) and not any(oca)):
            raise ValueError(f"{m}: unsupported config option only_cross_attention={oca!r} (supported: False)")
        cad = d.get("cross_attention_dim", 1280)
        if isinstance(cad, list | tuple):
            if len(set(cad)) != 1:
                raise ValueError(f"{m}: unsupported config option cross_attention_dim={cad!r} (per level)")
            cad = cad[0]
        boc = tuple(int(c) for c in d.get("block_out_channels", (320, 640, 1280, 1280)))
        n = len(boc)
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        if len(down) != n or len(up) != n:
            raise ValueError(f"{m}: down_block_types / up_block_types must have one entry per block_out_channels")
        # "text_time" (SDXL): both dimensions are required; with no addition_embed_type diffusers ignores them.
        time_dim = proj_dim = None
        if d.get("addition_embed_type") == "text_time":
            time_dim, proj_dim = d.get("addition_time_embed_dim"), d.get("projection_class_embeddings_input_dim")
            if not isinstance(time_dim, int) or not isinstance(proj_dim, int):
                raise ValueError(
                    f"{m}: addition_embed_type='text_time' needs integer addition_time_embed_dim and "
                    f"projection_class_embeddings_input_dim, got {time_dim!r} and {proj_dim!r}"
                )
        return cls(
            in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)),
            block_out_channels=boc,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=_per_level(d.get("layers_per_block", 2), n, "layers_per_block", m),
            num_heads=_per_level(d.get("attention_head_dim", 8), n, "attention_head_dim", m),
            transformer_layers_per_block=_per_level(
                d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block", m
            ),
            cross_attention_dim=int(cad),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            upcast_attention=bool(d.get("upcast_attention", False)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=float(d.get("freq_shift", 0)),
            downsample_padding=int(d.get("downsample_padding", 1)),
            mid_block_scale_factor=float(d.get("mid_block_scale_factor", 1.0)),
            center_input_sample=bool(d.get("center_input_sample", False)),
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=proj_dim,
        )


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of an SD ``AutoencoderKL`` (KL-f8 style), plus two facts about its latents.

    ``scaling_factor`` maps raw latents to diffusion latents (SD 1.x/2.x 0.18215, SDXL 0.13025);
    ``force_upcast`` says the decoder overflows in fp16 (SDXL's VAE), so a half-precision pipeline runs
    the VAE in float32 (diffusers' default ``True`` when the key is absent).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("VAE: block_out_channels is empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAE: block_out_channels {c} not divisible by norm_num_groups")

    @property
    def downscale(self) -> int:
        """Pixel size of one latent cell."""
        return int(2 ** (len(self.block_out_channels) - 1))

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> VAEConfig:
        """Parse a diffusers ``AutoencoderKL`` config dict."""
        m = "VAE"
        _require(d, "act_fn", ("silu",), "silu", m)
        _require(d, "shift_factor", (None,), None, m)
        # per-channel latent statistics (Playground v2.5) change how the pipeline scales latents
        _require(d, "latents_mean", (None,), None, m)
        _require(d, "latents_std", (None,), None, m)
        boc = tuple(int(c) for c in d.get("block_out_channels", (64,)))
        n = len(boc)
        down = tuple(d.get("down_block_types", ("DownEncoderBlock2D",) * n))
        up = tuple(d.get("up_block_types", ("UpDecoderBlock2D",) * n))
        if len(down) != n or len(up) != n:
            raise ValueError(
                "VAE: down_block_types / up_block_types must have one entry per block_out_channels"
            )
        for t in down:
            if t != "DownEncoderBlock2D":
                raise ValueError(f"VAE: unsupported config option down_block_types entry {t!r}")
        for t in up:
            if t != "UpDecoderBlock2D":
                raise ValueError(f"VAE: unsupported config option up_block_types entry {t!r}")
        lpb = d.get("layers_per_block", 1)
        if not isinstance(lpb, int):
            raise ValueError(f"VAE: unsupported config option layers_per_block={lpb!r}")
        return cls(
            in_channels=int(d.get("in_channels", 3)),
            out_channels=int(d.get("out_channels", 3)),
            latent_channels=int(d.get("latent_channels", 4)),
            block_out_channels=boc,
            layers_per_block=lpb,
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
            force_upcast=bool(d.get("force_upcast", True)),
        )


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer (``transformers.CLIPTextConfig`` vocabulary) plus the layer SD reads.

    The context is the hidden state ``clip_skip`` layers from the top (1 = the last layer, 2 = the
    penultimate, ...), passed through ``final_layer_norm`` when ``final_norm``. SD 1.x/2.x: ``final_norm``
    (A1111's and diffusers' clip skip); SDXL, both encoders: ``clip_skip=2, final_norm=False`` (diffusers'
    ``hidden_states[-2]``; its ``clip_skip=k`` is ``clip_skip=k+2`` here). ``eos_token_id`` locates the
    pooled token, ``projection_dim`` is the width of ``CLIPTextModelWithProjection``'s projection.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407
    clip_skip: int = 1
    final_norm: bool = True

    def __post_init__(self) -> None:
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"TextEncoder: unsupported config option hidden_act={self.hidden_act!r}")
        if not 1 <= self.clip_skip <= self.num_hidden_layers:
            raise ValueError(
                f"TextEncoder: clip_skip must be in [1, {self.num_hidden_layers}], got {self.clip_skip}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("TextEncoder: hidden_size not divisible by num_attention_heads")

    @classmethod
    def from_transformers(
        cls, d: Mapping[str, Any], clip_skip: int = 1, final_norm: bool = True
    ) -> TextEncoderConfig:
        """Parse a ``CLIPTextConfig`` dict (``text_encoder/config.json``); ``clip_skip`` and
        ``final_norm`` choose the context layer (see the class)."""
        if "text_config" in d and "hidden_size" not in d:  # a full CLIPConfig
            d = d["text_config"]
        return cls(
            vocab_size=int(d.get("vocab_size", 49408)),
            hidden_size=int(d.get("hidden_size", 512)),
            intermediate_size=int(d.get("intermediate_size", 2048)),
            num_hidden_layers=int(d.get("num_hidden_layers", 12)),
            num_attention_heads=int(d.get("num_attention_heads", 8)),
            max_position_embeddings=int(d.get("max_position_embeddings", 77)),
            hidden_act=str(d.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            projection_dim=int(d.get("projection_dim", 512)),
            eos_token_id=int(d.get("eos_token_id", 49407)),
            clip_skip=clip_skip,
            final_norm=final_norm,
        )

    def to_transformers(self) -> dict[str, Any]:
        """The ``CLIPTextConfig`` keyword arguments of this architecture."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "projection_dim": self.projection_dim,
            "eos_token_id": self.eos_token_id,
        }
