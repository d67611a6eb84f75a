"""sdexport.models against diffusers / transformers: strict state-dict loading, numerics, emphasis,
backends, dtypes and torch.export."""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_configs import KINDS, scheduler_config, text_config, unet_config, vae_config
from torch import nn
from torch.export import Dim

from sdexport.models import (
    VAE,
    AttentionOp,
    GroupNorm,
    Kernels,
    TextEncoder,
    TextEncoderConfig,
    UNet,
    UNetConfig,
    VAEConfig,
    VAEDecode,
    VAEMoments,
    set_attention_chunks,
    set_backend,
    strip_text_model_prefix,
)
from sdexport.models.layers import GEGLU

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
REFERENCE_CONFIGS = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "model_configs.json"


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny models on a shared, loaded CPU: one intra-op thread is far faster than spinning OpenMP
    threads fighting over the cores (seconds vs tens of ms per forward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |ref - out| / max(1, max |ref|)."""
    ref, out = ref.double(), out.double()
    return float((ref - out).abs().max() / max(1.0, float(ref.abs().max())))


def _variant(kind: str, **overrides: Any) -> dict[str, Any]:
    return {**unet_config(kind), **overrides}


UNET_VARIANTS: dict[str, Callable[[], dict[str, Any]]] = {
    "sd1": lambda: unet_config("sd1"),
    "sd2": lambda: unet_config("sd2"),
    "sd1-inpaint": lambda: unet_config("sd1-inpaint"),
    # less common options still inside the SD block vocabulary
    "odd": lambda: _variant(
        "sd1",
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        center_input_sample=True,
        mid_block_scale_factor=2.0,
        layers_per_block=[1, 2, 1],
        attention_head_dim=[4, 2, 2],
        norm_eps=1e-6,
        unknown_future_key="ignored",
    ),
    # two levels only: keeps torch.export tracing quick
    "export": lambda: _variant(
        "sd2",
        block_out_channels=[32, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=[2, 2],
    ),
}


@cache
def diffusers_unet(name: str) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel.from_config(UNET_VARIANTS[name]()).eval()


@cache
def our_unet(name: str) -> UNet:
    model = UNet(UNetConfig.from_diffusers(UNET_VARIANTS[name]())).eval()
    model.load_state_dict(diffusers_unet(name).state_dict(), strict=True)
    return model


@cache
def diffusers_vae() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL.from_config(vae_config()).eval()


@cache
def our_vae() -> VAE:
    model = VAE(VAEConfig.from_diffusers(vae_config())).eval()
    model.load_state_dict(diffusers_vae().state_dict(), strict=True)
    return model


@cache
def hf_text(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config(kind))).eval()


def unet_inputs(name: str, batch: int = 2, size: int = 16, tokens: int = 7) -> dict[str, torch.Tensor]:
    cfg = UNET_VARIANTS[name]()
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(batch, cfg["in_channels"], size, size, generator=g),
        "timestep": torch.tensor([999, 1, 500, 250][:batch]),
        "context": torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=g),
    }


@contextmanager
def scaled_value_rows(model: nn.Module, weights: torch.Tensor) -> Iterator[None]:
    """Independent emphasis reference: multiply the output of every cross-attention ``to_v`` (B, L, C)
    by ``weights[:, :, None]`` with forward hooks (works on diffusers' and our modules alike)."""
    handles = [
        m.to_v.register_forward_hook(lambda _m, _i, out: out * weights[:, :, None])
        for name, m in model.named_modules()
        if name.endswith("attn2")
    ]
    assert handles, "no cross-attention found"
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------
# configs


def test_tiny_configs_are_consistent() -> None:
    for kind in KINDS:
        assert unet_config(kind)["cross_attention_dim"] == text_config(kind)["hidden_size"]
        diffusers.DDIMScheduler.from_config(scheduler_config(kind))
    assert scheduler_config("sd2")["prediction_type"] == "v_prediction"
    assert unet_config("sd1-inpaint")["in_channels"] == 9
    with pytest.raises(ValueError):
        unet_config("sdxl")


def test_unet_config_parsing() -> None:
    cfg = UNetConfig.from_diffusers(unet_config("sd2"))
    assert cfg.num_heads == (2, 4, 4)
    assert cfg.use_linear_projection and cfg.upcast_attention
    assert UNetConfig.from_diffusers(unet_config("sd1")).num_heads == (2, 2, 2)
    # unknown keys are ignored, defaults are diffusers'
    assert UNetConfig.from_diffusers({}) == UNetConfig.from_diffusers({"foo": 1})
    assert UNetConfig.from_diffusers({}).cross_attention_dim == 1280


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("addition_embed_type", "text_time"),
        ("class_embed_type", "timestep"),
        ("transformer_layers_per_block", [1, 2, 10]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_cond_proj_dim", 256),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ],
)
def test_unet_rejects_unsupported(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        UNetConfig.from_diffusers(_variant("sd1", **{option: value}))


def test_real_configs_parse_or_reject() -> None:
    if not REFERENCE_CONFIGS.exists():
        pytest.skip("shared reference configs missing")
    ref = json.loads(REFERENCE_CONFIGS.read_text())
    for name in ("sd15", "sd21_base", "sd21_768_v"):
        UNetConfig.from_diffusers(ref[name]["unet"])
        VAEConfig.from_diffusers(ref[name]["vae"])
        TextEncoderConfig.from_transformers(ref[name]["text_encoder"])
    assert UNetConfig.from_diffusers(ref["sd21_768_v"]["unet"]).num_heads == (5, 10, 20, 20)
    with pytest.raises(ValueError, match="unsupported config option"):
        UNetConfig.from_diffusers(ref["sdxl_base"]["unet"])


def test_vae_and_text_config_rejects() -> None:
    with pytest.raises(ValueError, match="shift_factor"):
        VAEConfig.from_diffusers({**vae_config(), "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_diffusers({**vae_config(), "up_block_types": ["UpDecoderBlock2D"] * 3 + ["X"]})
    with pytest.raises(ValueError, match="hidden_act"):
        TextEncoderConfig.from_transformers({**text_config("sd1"), "hidden_act": "relu"})
    with pytest.raises(ValueError, match="clip_skip"):
        TextEncoderConfig.from_transformers(text_config("sd1"), clip_skip=3)


# ---------------------------------------------------------------------------------------------------
# UNet numerics


@pytest.mark.parametrize("name", list(UNET_VARIANTS))
def test_unet_matches_diffusers(name: str) -> None:
    ref_model, model = diffusers_unet(name), our_unet(name)
    assert set(model.state_dict()) == set(ref_model.state_dict())
    inp = unet_inputs(name)
    with torch.no_grad():
        ref = ref_model(inp["sample"], inp["timestep"], inp["context"]).sample
        out = model(inp["sample"], inp["timestep"], inp["context"])
        out_ones = model(inp["sample"], inp["timestep"], inp["context"], torch.ones(2, 7))
    assert out.shape == ref.shape
    assert rel_err(ref, out) <= TOL
    assert torch.equal(out, out_ones)


@pytest.mark.parametrize("timestep", [torch.tensor(321), torch.tensor(321.5), torch.tensor([321, 321])])
def test_unet_timestep_forms(timestep: torch.Tensor) -> None:
    ref_model, model = diffusers_unet("sd2"), our_unet("sd2")
    inp = unet_inputs("sd2")
    with torch.no_grad():
        ref = ref_model(inp["sample"], timestep, inp["context"]).sample
        out = model(inp["sample"], timestep, inp["context"])
    assert rel_err(ref, out) <= TOL


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_emphasis_matches_scaled_value_rows(name: str) -> None:
    ref_model, model = diffusers_unet(name), our_unet(name)
    inp = unet_inputs(name)
    w = torch.tensor([[1.0, 0.0, 1.3, 1.0, 0.0, 0.7, 1.0], [1.0, -0.5, 1.0, 2.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        out = model(inp["sample"], inp["timestep"], inp["context"], w)
        with scaled_value_rows(ref_model, w):
            ref = ref_model(inp["sample"], inp["timestep"], inp["context"]).sample
        with scaled_value_rows(model, w):
            ours_hooked = model(inp["sample"], inp["timestep"], inp["context"])
        plain = model(inp["sample"], inp["timestep"], inp["context"])
    assert rel_err(ref, out) <= TOL
    assert rel_err(ours_hooked, out) <= 1e-5
    assert rel_err(plain, out) > 1e-3


def test_emphasis_zero_weight_removes_token_and_negative_changes_output() -> None:
    model = our_unet("sd1")
    inp = unet_inputs("sd1", batch=1)
    ctx = inp["context"]
    ones = torch.ones(1, 7)
    with torch.no_grad():
        zero_w = ones.clone()
        zero_w[0, 3] = 0.0
        out_zero = model(inp["sample"], inp["timestep"], ctx, zero_w)
        out_one = model(inp["sample"], inp["timestep"], ctx, ones)
        neg_w = ones.clone()
        neg_w[0, 3] = -1.0
        out_neg = model(inp["sample"], inp["timestep"], ctx, neg_w)
    # removing or negating token 3's values changes the result
    assert rel_err(out_one, out_zero) > 1e-4
    assert rel_err(out_zero, out_neg) > 1e-4
    assert rel_err(out_one, out_neg) > 1e-4
    # zero weight == reference with that token's value rows zeroed
    with torch.no_grad(), scaled_value_rows(model, zero_w):
        ref_zero = model(inp["sample"], inp["timestep"], ctx)
    assert rel_err(ref_zero, out_zero) <= 1e-5


def test_self_attention_ignores_token_weights() -> None:
    model = our_unet("sd1")
    seen: list[bool] = []

    def spy(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        vw = args[4] if len(args) > 4 else kwargs.get("value_weights")
        seen.append(vw is not None)

    handles = [
        m.op.register_forward_pre_hook(spy, with_kwargs=True)
        for name, m in model.named_modules()
        if name.endswith("attn1")
    ]
    inp = unet_inputs("sd1")
    with torch.no_grad():
        model(**inp, token_weights=torch.ones(2, 7))
    for h in handles:
        h.remove()
    assert seen and not any(seen)


# ---------------------------------------------------------------------------------------------------
# backends


def _with_backend(model: nn.Module, backend: Kernels, chunks: int = 1) -> nn.Module:
    m = copy.deepcopy(model)
    set_backend(m, backend)
    set_attention_chunks(m, chunks)
    return m


def test_set_backend_reaches_every_call_site() -> None:
    m = _with_backend(our_unet("sd1"), Kernels.REFERENCE, chunks=3)
    sites = [x for x in m.modules() if isinstance(x, GroupNorm | AttentionOp | GEGLU)]
    assert sites and all(x.backend is Kernels.REFERENCE for x in sites)
    assert all(x.chunks == 3 for x in sites if isinstance(x, AttentionOp))
    assert all(x.backend is Kernels.SDPA for x in our_unet("sd1").modules() if isinstance(x, GroupNorm))
    with pytest.raises(ValueError):
        set_attention_chunks(m, 0)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_backends_agree_unet(name: str) -> None:
    model = our_unet(name)
    inp = unet_inputs(name)
    w = torch.rand(2, 7) * 2 - 0.5
    with torch.no_grad():
        sdpa = model(**inp, token_weights=w)
        ref = _with_backend(model, Kernels.REFERENCE)(**inp, token_weights=w)
        chunked = _with_backend(model, Kernels.SDPA, chunks=3)(**inp, token_weights=w)
        ref_chunked = _with_backend(model, Kernels.REFERENCE, chunks=5)(**inp, token_weights=w)
    for other in (ref, chunked, ref_chunked):
        assert rel_err(sdpa, other) <= 1e-5


def test_backends_agree_vae() -> None:
    vae = our_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = vae.decode(z)
        b = _with_backend(vae, Kernels.REFERENCE, chunks=4).decode(z)  # type: ignore[operator]
    assert rel_err(a, b) <= 1e-5


def _fused_ops_or_skip() -> Any:
    try:
        ops = importlib.import_module("runtime.ops")
    except ImportError:
        pytest.skip("runtime.ops missing")
    if not ops.available():
        pytest.skip("runtime.ops not built")
    return ops


def test_fused_backend_agrees() -> None:
    _fused_ops_or_skip()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = our_unet("sd2")
    inp = {k: v.to(dev) for k, v in unet_inputs("sd2").items()}
    w = (torch.rand(2, 7) * 2 - 0.5).to(dev)
    vae = our_vae()
    z = torch.randn(1, 4, 8, 8).to(dev)
    with torch.no_grad():
        sdpa = copy.deepcopy(model).to(dev)(**inp, token_weights=w)
        fused = _with_backend(model, Kernels.FUSED).to(dev)(**inp, token_weights=w)
        dec = copy.deepcopy(vae).to(dev).decode(z)
        dec_fused = _with_backend(vae, Kernels.FUSED).to(dev).decode(z)  # type: ignore[operator]
    assert rel_err(sdpa, fused) <= TOL
    assert rel_err(dec, dec_fused) <= TOL


def test_fused_backend_exports_as_custom_ops() -> None:
    _fused_ops_or_skip()
    model = _with_backend(our_unet("export"), Kernels.FUSED)
    inp = unet_inputs("export")
    args = (inp["sample"], inp["timestep"], inp["context"], torch.rand(2, 7) * 2 - 0.5)
    ep = torch.export.export(model, args)
    targets = {str(n.target) for n in ep.graph.nodes}
    for op in ("group_norm", "attention", "geglu"):
        assert f"sdfused.{op}.default" in targets
    with torch.no_grad():
        assert rel_err(our_unet("export")(*args), ep.module()(*args)) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_runs(dtype: torch.dtype) -> None:
    model = copy.deepcopy(our_unet("sd2")).to(dtype)
    inp = unet_inputs("sd2")
    with torch.no_grad():
        ref = our_unet("sd2")(**inp)
        out = model(inp["sample"].to(dtype), inp["timestep"], inp["context"].to(dtype), torch.ones(2, 7))
    assert out.dtype == dtype and model.dtype == dtype
    assert rel_err(ref, out.float()) < 0.1


# ---------------------------------------------------------------------------------------------------
# VAE and text encoder numerics


def test_vae_matches_diffusers() -> None:
    ref_model, vae = diffusers_vae(), our_vae()
    assert set(vae.state_dict()) == set(ref_model.state_dict())
    assert vae.scaling_factor == pytest.approx(0.18215)
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    noise = torch.randn(2, 4, 8, 8, generator=g)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        dist = ref_model.encode(img).latent_dist
        mean = vae.encode_mean(img)
        sample = vae.encode(img, noise)
        ref_dec = ref_model.decode(z).sample
        dec = vae.decode(z)
    assert mean.shape == (2, 4, 8, 8) and dec.shape == (2, 3, 64, 64)
    assert rel_err(dist.mean, mean) <= TOL
    assert rel_err(dist.mean + dist.std * noise, sample) <= TOL
    assert rel_err(ref_dec, dec) <= TOL


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_text_encoder_matches_transformers(kind: str, clip_skip: int) -> None:
    ref_model = hf_text(kind)
    enc = TextEncoder(TextEncoderConfig.from_transformers(text_config(kind), clip_skip=clip_skip)).eval()
    enc.load_state_dict(ref_model.state_dict(), strict=True)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = ref_model(ids, output_hidden_states=True)
        ref = out.last_hidden_state if clip_skip == 1 else ref_model.final_layer_norm(out.hidden_states[-2])
        got = enc(ids)
        wrapped = TextEncoder.wrap(ref_model, clip_skip=clip_skip)(ids)
    assert got.shape == (2, 77, text_config(kind)["hidden_size"])
    assert rel_err(ref, got) <= TOL
    assert torch.equal(got, wrapped)


def test_strip_text_model_prefix() -> None:
    sd = {
        "text_model.final_layer_norm.weight": torch.ones(2),
        "text_model.embeddings.position_ids": torch.ones(2),
    }
    assert list(strip_text_model_prefix(sd)) == ["final_layer_norm.weight"]


# ---------------------------------------------------------------------------------------------------
# torch.export


def test_export_unet_dynamic_batch_and_size() -> None:
    model = our_unet("export")
    inp = unet_inputs("export")
    w = torch.ones(2, 7)
    b, h, wd = Dim("batch", max=64), Dim("h8", min=1, max=32), Dim("w8", min=1, max=32)
    ep = torch.export.export(
        model,
        (inp["sample"], inp["timestep"], inp["context"], w),
        dynamic_shapes=({0: b, 2: 8 * h, 3: 8 * wd}, {0: b}, {0: b}, {0: b}),
    )
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 24, 32, generator=g)
    t = torch.tensor([10, 20, 30])
    ctx = torch.randn(3, 7, 48, generator=g)
    tw = torch.rand(3, 7, generator=g)
    with torch.no_grad():
        assert rel_err(model(x, t, ctx, tw), ep.module()(x, t, ctx, tw)) <= 1e-5


def test_export_vae_and_text_encoder() -> None:
    torch.manual_seed(0)
    # two levels (downscale 2) to keep tracing quick
    vae = VAE(
        VAEConfig.from_diffusers(
            {
                **vae_config(),
                "block_out_channels": [16, 32],
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2,
            }
        )
    ).eval()
    g = torch.Generator().manual_seed(6)
    b = Dim("batch", max=16)
    z = torch.randn(2, 4, 8, 8, generator=g)
    img = torch.rand(2, 3, 16, 16, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    dec = torch.export.export(VAEDecode(vae), (z,), dynamic_shapes=({0: b},))
    enc = torch.export.export(VAEMoments(vae), (img,), dynamic_shapes=({0: b},))
    text = TextEncoder(TextEncoderConfig.from_transformers(text_config("sd1"), clip_skip=2)).eval()
    text.load_state_dict(hf_text("sd1").state_dict(), strict=True)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    text_ep = torch.export.export(text, (ids,), dynamic_shapes=({0: b},))
    with torch.no_grad():
        assert rel_err(vae.decode(z[:1]), dec.module()(z[:1])) <= 1e-5
        mean, logvar = enc.module()(img).chunk(2, dim=1)
        assert rel_err(vae.encode_mean(img), mean) <= 1e-5
        assert rel_err(vae.encode(img, noise), mean + torch.exp(0.5 * logvar) * noise) <= 1e-5
        assert rel_err(text(ids[:1]), text_ep.module()(ids[:1])) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# real size


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21_768_v"])
def test_real_size_unet_matches_diffusers(name: str) -> None:
    if not REFERENCE_CONFIGS.exists():
        pytest.skip("shared reference configs missing")
    d = json.loads(REFERENCE_CONFIGS.read_text())[name]["unet"]
    torch.manual_seed(0)
    ref_model = diffusers.UNet2DConditionModel(**d).eval()
    with torch.device("meta"):
        model = UNet(UNetConfig.from_diffusers(d))
    model.load_state_dict(ref_model.state_dict(), strict=True, assign=True)
    model.eval()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, d["cross_attention_dim"], generator=g)
    t = torch.tensor(500)
    with torch.no_grad():
        ref = ref_model(x, t, ctx).sample
        out = model(x, t, ctx)
    assert rel_err(ref, out) <= TOL
