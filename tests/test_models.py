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
from tiny_configs import (
    KINDS,
    XL_KINDS,
    XL_POOLED_DIM,
    XL_TIME_IDS,
    scheduler_config,
    text_config,
    text_config_2,
    unet_config,
    vae_config,
)
from torch import nn
from torch.export import Dim

from sdexport.models import (
    VAE,
    AttentionOp,
    GroupNorm,
    Kernels,
    TextEncoder,
    TextEncoderConfig,
    TextEncoderWithProjection,
    UNet,
    UNetConfig,
    VAEConfig,
    VAEDecode,
    VAEMoments,
    set_attention_chunks,
    set_backend,
)
from sdexport.models.layers import GEGLU

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
REFERENCE_CONFIGS = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "model_configs.json"
PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "sdexport" / "data" / "model_configs.json"


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
    "sdxl": lambda: unet_config("sdxl"),
    "sdxl-refiner": lambda: unet_config("sdxl-refiner"),
    # SDXL-shaped in two levels: first level without attention, depths [1, 2] (mid block 2)
    "sdxl-export": lambda: _variant(
        "sdxl",
        block_out_channels=[32, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 2],
        transformer_layers_per_block=[1, 2],
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
    """Keyword arguments of our UNet; SDXL variants add ``text_embeds`` and ``time_ids``."""
    cfg = UNET_VARIANTS[name]()
    g = torch.Generator().manual_seed(1)
    inp = {
        "sample": torch.randn(batch, cfg["in_channels"], size, size, generator=g),
        "timestep": torch.tensor([999, 1, 500, 250][:batch]),
        "context": torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=g),
    }
    if cfg.get("addition_embed_type") == "text_time":
        n = (cfg["projection_class_embeddings_input_dim"] - XL_POOLED_DIM) // cfg["addition_time_embed_dim"]
        # base: original h, w, crop top, left, target h, w; refiner: original h, w, crop top, left, aesthetic
        ids = {6: [[1024, 768, 0, 0, 1024, 1024], [512, 512, 16, 32, 768, 1024]],
               5: [[1024, 768, 0, 0, 6.0], [512, 512, 16, 32, 2.5]]}[n]
        inp["text_embeds"] = torch.randn(batch, XL_POOLED_DIM, generator=g)
        inp["time_ids"] = torch.tensor(ids * batch, dtype=torch.float32)[:batch]  # float, as diffusers' SDXL
    return inp


def diffusers_forward(model: nn.Module, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    """diffusers' call for the inputs of :func:`unet_inputs` (SDXL's go in ``added_cond_kwargs``)."""
    added = {k: inp[k] for k in ("text_embeds", "time_ids") if k in inp}
    out = model(inp["sample"], inp["timestep"], inp["context"], added_cond_kwargs=added or None)
    return out.sample  # type: ignore[no-any-return]


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
    base, refiner = unet_config("sdxl"), unet_config("sdxl-refiner")
    assert base["cross_attention_dim"] == text_config("sdxl")["hidden_size"] + text_config_2("sdxl")["hidden_size"]
    assert refiner["cross_attention_dim"] == text_config_2("sdxl-refiner")["hidden_size"]
    for kind in XL_KINDS:
        cfg = unet_config(kind)
        width = text_config_2(kind)["projection_dim"] + XL_TIME_IDS[kind] * cfg["addition_time_embed_dim"]
        assert cfg["projection_class_embeddings_input_dim"] == width
        assert diffusers.EulerDiscreteScheduler.from_config(scheduler_config(kind)).config.timestep_spacing == "leading"
    with pytest.raises(ValueError):
        text_config("sdxl-refiner")
    with pytest.raises(ValueError):
        unet_config("sd3")


def test_unet_config_parsing() -> None:
    cfg = UNetConfig.from_diffusers(unet_config("sd2"))
    assert cfg.num_heads == (2, 4, 4)
    assert cfg.use_linear_projection and cfg.upcast_attention
    assert UNetConfig.from_diffusers(unet_config("sd1")).num_heads == (2, 2, 2)
    # unknown keys are ignored, defaults are diffusers'
    assert UNetConfig.from_diffusers({}) == UNetConfig.from_diffusers({"foo": 1})
    assert UNetConfig.from_diffusers({}).cross_attention_dim == 1280
    assert not UNetConfig.from_diffusers({}).text_time


def test_unet_config_parsing_sdxl() -> None:
    base = UNetConfig.from_diffusers(unet_config("sdxl"))
    assert base.text_time and base.addition_time_embed_dim == 8
    assert base.projection_class_embeddings_input_dim == XL_POOLED_DIM + 6 * 8
    assert base.transformer_layers_per_block == (1, 2, 3) and base.num_heads == (2, 4, 4)
    assert UNetConfig.from_diffusers(unet_config("sdxl-refiner")).transformer_layers_per_block == (2, 2, 2)
    # diffusers ignores the text_time dimensions without addition_embed_type
    plain = UNetConfig.from_diffusers(_variant("sd1", addition_time_embed_dim=256,
                                               projection_class_embeddings_input_dim=2816))
    assert not plain.text_time and plain == UNetConfig.from_diffusers(unet_config("sd1"))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("addition_embed_type", "text"),
        ("addition_embed_type", "image"),
        ("addition_embed_type", "text_time"),  # without its two dimensions
        ("class_embed_type", "timestep"),
        ("transformer_layers_per_block", [[1, 1], [2, 2], [1, 1]]),
        ("transformer_layers_per_block", [1, 2]),
        ("reverse_transformer_layers_per_block", [[1, 1, 1], [2, 2, 2], [1, 1, 1]]),
        ("num_attention_heads", [5, 10, 20]),
        ("only_cross_attention", True),
        ("cross_attention_dim", [32, 64, 64]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_cond_proj_dim", 256),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ],
)
def test_unet_rejects_unsupported(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        UNetConfig.from_diffusers(_variant("sd1", **{option: value}))


def test_real_configs_parse() -> None:
    if not REFERENCE_CONFIGS.exists():
        pytest.skip("shared reference configs missing")
    ref = json.loads(REFERENCE_CONFIGS.read_text())
    ours = json.loads(PACKAGE_CONFIGS.read_text())
    # Ours adds the published SDXL encoders' legacy token ids (bos 0, eos 2, pad 1: the pooled token is the
    # argmax of the ids, as in diffusers' SDXL encoders), which the shared reference leaves out.
    token_ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    for name in ("sd15", "sd21_base", "sd21_768_v", "sdxl_base"):
        entry = {k: v for k, v in ours[name].items() if k != "pipeline"}
        for section in ("text_encoder", "text_encoder_2"):
            if name.startswith("sdxl") and section in entry:
                assert {k: entry[section].get(k) for k in token_ids} == token_ids, (name, section)
                entry[section] = {k: v for k, v in entry[section].items() if k not in token_ids}
        assert entry == ref[name], name
    for section in ("text_encoder", "text_encoder_2"):
        assert TextEncoderConfig.from_transformers(ours["sdxl_base"][section]).eos_token_id == 2
    assert {k: ours["sdxl_refiner"]["text_encoder_2"][k] for k in token_ids} == token_ids
    for name in ("sd15", "sd21_base", "sd21_768_v", "sdxl_base", "sdxl_refiner"):
        UNetConfig.from_diffusers(ours[name]["unet"])
        VAEConfig.from_diffusers(ours[name]["vae"])
        for key in ("text_encoder", "text_encoder_2"):
            if key in ours[name]:
                TextEncoderConfig.from_transformers(ours[name][key])
    assert UNetConfig.from_diffusers(ref["sd21_768_v"]["unet"]).num_heads == (5, 10, 20, 20)
    xl = UNetConfig.from_diffusers(ref["sdxl_base"]["unet"])
    assert xl.transformer_layers_per_block == (1, 2, 10) and xl.num_heads == (5, 10, 20)
    assert xl.projection_class_embeddings_input_dim == 1280 + 6 * 256
    refiner = UNetConfig.from_diffusers(ours["sdxl_refiner"]["unet"])
    assert refiner.projection_class_embeddings_input_dim == 1280 + 5 * 256
    assert refiner.cross_attention_dim == ours["sdxl_refiner"]["text_encoder_2"]["hidden_size"]
    assert "text_encoder" not in ours["sdxl_refiner"]
    vae = VAEConfig.from_diffusers(ref["sdxl_base"]["vae"])
    assert vae.scaling_factor == 0.13025 and vae.force_upcast


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl_base", "sdxl_refiner"])
def test_real_size_sdxl_shapes_on_meta(name: str) -> None:
    """The published SDXL architectures, shapes only: our modules' state dicts equal the references'."""
    cfg = json.loads(PACKAGE_CONFIGS.read_text())[name]
    with torch.device("meta"):
        ref_unet = diffusers.UNet2DConditionModel(**cfg["unet"])
        unet = UNet(UNetConfig.from_diffusers(cfg["unet"]))
        ref_text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg["text_encoder_2"]))
        text = TextEncoderWithProjection(TextEncoderConfig.from_transformers(cfg["text_encoder_2"]))
    assert shapes(unet) == shapes(ref_unet)
    assert shapes(text) == shapes(ref_text)


def test_vae_and_text_config_rejects() -> None:
    with pytest.raises(ValueError, match="shift_factor"):
        VAEConfig.from_diffusers({**vae_config(), "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig.from_diffusers({**vae_config("sdxl"), "latents_mean": [0.0] * 4})
    xl = VAEConfig.from_diffusers(vae_config("sdxl"))
    assert xl.scaling_factor == 0.13025 and xl.force_upcast
    assert not VAEConfig.from_diffusers({**vae_config(), "force_upcast": False}).force_upcast
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
    assert shapes(model) == shapes(ref_model)
    inp = unet_inputs(name)
    with torch.no_grad():
        ref = diffusers_forward(ref_model, inp)
        out = model(**inp)
        out_ones = model(**inp, token_weights=torch.ones(2, 7))
    assert out.shape == ref.shape
    assert (ref - out).abs().max() <= TOL
    assert torch.equal(out, out_ones)


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_unet_text_time_conditioning(name: str) -> None:
    """The added conditioning reaches the output, in diffusers' way (each time id and the pooled
    embedding matter), and the UNet asks for what its config needs."""
    ref_model, model = diffusers_unet(name), our_unet(name)
    inp = unet_inputs(name)
    other = {**inp, "time_ids": inp["time_ids"] + torch.tensor([0, 0, 0, 8.0] + [0] * (inp["time_ids"].shape[1] - 4))}
    with torch.no_grad():
        base = model(**inp)
        moved = model(**other)
        assert (diffusers_forward(ref_model, other) - moved).abs().max() <= TOL
        assert rel_err(base, moved) > 1e-4
        assert rel_err(base, model(**{**inp, "text_embeds": torch.zeros_like(inp["text_embeds"])})) > 1e-4
        with pytest.raises(ValueError, match="text_embeds"):
            model(inp["sample"], inp["timestep"], inp["context"])
        with pytest.raises(ValueError, match="time_ids"):
            model(inp["sample"], inp["timestep"], inp["context"], text_embeds=inp["text_embeds"])
        with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
            model(**{**inp, "time_ids": inp["time_ids"][:, :3]})
        sd1 = unet_inputs("sd1")
        with pytest.raises(ValueError, match="text_time"):
            our_unet("sd1")(**sd1, text_embeds=inp["text_embeds"], time_ids=inp["time_ids"])


@pytest.mark.parametrize("timestep", [torch.tensor(321), torch.tensor(321.5), torch.tensor([321, 321])])
def test_unet_timestep_forms(timestep: torch.Tensor) -> None:
    ref_model, model = diffusers_unet("sd2"), our_unet("sd2")
    inp = unet_inputs("sd2")
    with torch.no_grad():
        ref = ref_model(inp["sample"], timestep, inp["context"]).sample
        out = model(inp["sample"], timestep, inp["context"])
    assert rel_err(ref, out) <= TOL


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_emphasis_matches_scaled_value_rows(name: str) -> None:
    ref_model, model = diffusers_unet(name), our_unet(name)
    inp = unet_inputs(name)
    w = torch.tensor([[1.0, 0.0, 1.3, 1.0, 0.0, 0.7, 1.0], [1.0, -0.5, 1.0, 2.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        out = model(**inp, token_weights=w)
        with scaled_value_rows(ref_model, w):
            ref = diffusers_forward(ref_model, inp)
        with scaled_value_rows(model, w):
            ours_hooked = model(**inp)
        plain = model(**inp)
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


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
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


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_fused_backend_agrees(name: str) -> None:
    _fused_ops_or_skip()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = our_unet(name)
    inp = {k: v.to(dev) for k, v in unet_inputs(name).items()}
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
@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_low_precision_runs(name: str, dtype: torch.dtype) -> None:
    model = copy.deepcopy(our_unet(name)).to(dtype)
    inp = unet_inputs(name)
    low = {k: v.to(dtype) if v.is_floating_point() and k not in ("timestep", "time_ids") else v for k, v in inp.items()}
    with torch.no_grad():
        ref = our_unet(name)(**inp)
        out = model(**low, token_weights=torch.ones(2, 7))
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
@pytest.mark.parametrize(("clip_skip", "final_norm"), [(1, True), (2, True), (2, False)])
def test_text_encoder_matches_transformers(kind: str, clip_skip: int, final_norm: bool) -> None:
    ref_model = hf_text(kind)
    cfg = TextEncoderConfig.from_transformers(text_config(kind), clip_skip=clip_skip, final_norm=final_norm)
    enc = TextEncoder(cfg).eval()
    assert shapes(enc) == shapes(ref_model)
    enc.load_state_dict(ref_model.state_dict(), strict=True)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = ref_model(ids, output_hidden_states=True)
        ref = out.hidden_states[-clip_skip]
        ref = ref_model.final_layer_norm(ref) if final_norm else ref
        got = enc(ids)
        wrapped = TextEncoder.wrap(ref_model, clip_skip=clip_skip, final_norm=final_norm)(ids)
    assert got.shape == (2, 77, text_config(kind)["hidden_size"])
    assert rel_err(ref, got) <= TOL
    assert torch.equal(got, wrapped)


@cache
def hf_text_2(eos: int) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(**{**text_config_2("sdxl"), "eos_token_id": eos})
    return transformers.CLIPTextModelWithProjection(cfg).eval()


def our_text_2(eos: int, clip_skip: int = 2, final_norm: bool = False) -> TextEncoderWithProjection:
    cfg = TextEncoderConfig.from_transformers({**text_config_2("sdxl"), "eos_token_id": eos}, clip_skip, final_norm)
    enc = TextEncoderWithProjection(cfg).eval()
    enc.load_state_dict(hf_text_2(eos).state_dict(), strict=True)
    return enc


def prompt_ids(pad: int, lengths: tuple[int, ...] = (5, 40)) -> torch.Tensor:
    """Tokenizer-shaped ids: BOS, random words, EOS, then ``pad`` (SDXL: tokenizer 1 pads with EOS,
    tokenizer 2 with "!" = 0)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.full((len(lengths), 77), pad)
    for row, n in enumerate(lengths):
        ids[row, 0] = 49406
        ids[row, 1 : n + 1] = torch.randint(1, 49406, (n,), generator=g)
        ids[row, n + 1] = 49407
    return ids


@pytest.mark.parametrize("eos", [2, 49407])
@pytest.mark.parametrize("pad", [0, 49407])
def test_text_encoder_2_matches_transformers(eos: int, pad: int) -> None:
    """``CLIPTextModelWithProjection``: the same state dict (``text_model.*``, ``text_projection``),
    SDXL's context ``hidden_states[-2]`` (no final norm) and the projected pooled output ``text_embeds``
    at the EOS token, under the legacy (``eos_token_id=2``: argmax) and current (first EOS) rules."""
    ref_model, enc = hf_text_2(eos), our_text_2(eos)
    assert shapes(enc) == shapes(ref_model)
    assert "text_projection.bias" not in shapes(enc)
    ids = prompt_ids(pad)
    with torch.no_grad():
        out = ref_model(ids, output_hidden_states=True)
        context, pooled = enc(ids)
        wrapped = TextEncoderWithProjection.wrap(ref_model, clip_skip=2, final_norm=False)(ids)
        last, pooled_last = our_text_2(eos, clip_skip=1, final_norm=True)(ids)
    assert context.shape == (2, 77, 48) and pooled.shape == (2, XL_POOLED_DIM)
    assert (out.hidden_states[-2] - context).abs().max() <= TOL
    assert (out.text_embeds - pooled).abs().max() <= TOL
    assert (out.last_hidden_state - last).abs().max() <= TOL
    assert torch.equal(pooled, pooled_last)
    assert torch.equal(wrapped[0], context) and torch.equal(wrapped[1], pooled)


def test_sdxl_conditioning_end_to_end() -> None:
    """diffusers' SDXL ``encode_prompt`` recipe (both encoders' ``hidden_states[-2]`` concatenated, encoder
    2's ``text_embeds`` pooled) from our encoders, into our UNet, against the references all the way."""
    ref1, ref2 = hf_text("sdxl"), hf_text_2(2)
    enc1 = TextEncoder(TextEncoderConfig.from_transformers(text_config("sdxl"), clip_skip=2, final_norm=False)).eval()
    enc1.load_state_dict(ref1.state_dict(), strict=True)
    enc2 = our_text_2(2)
    ids1, ids2 = prompt_ids(49407), prompt_ids(0)
    inp = unet_inputs("sdxl", tokens=77)
    with torch.no_grad():
        out2 = ref2(ids2, output_hidden_states=True)
        ref_ctx = torch.cat([ref1(ids1, output_hidden_states=True).hidden_states[-2], out2.hidden_states[-2]], -1)
        ctx2, pooled = enc2(ids2)
        ctx = torch.cat([enc1(ids1), ctx2], dim=-1)
        assert ctx.shape[-1] == unet_config("sdxl")["cross_attention_dim"]
        assert (ref_ctx - ctx).abs().max() <= TOL
        ref = diffusers_forward(diffusers_unet("sdxl"), {**inp, "context": ref_ctx, "text_embeds": out2.text_embeds})
        out = our_unet("sdxl")(**{**inp, "context": ctx, "text_embeds": pooled})
    assert (ref - out).abs().max() <= TOL


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


def test_export_sdxl_unet_dynamic_batch_and_size() -> None:
    model = our_unet("sdxl-export")
    inp = unet_inputs("sdxl-export")
    b, h, wd = Dim("batch", max=64), Dim("h8", min=1, max=32), Dim("w8", min=1, max=32)
    ep = torch.export.export(
        model,
        (inp["sample"], inp["timestep"], inp["context"], torch.ones(2, 7)),
        {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]},
        dynamic_shapes={
            "sample": {0: b, 2: 8 * h, 3: 8 * wd},
            "timestep": {0: b},
            "context": {0: b},
            "token_weights": {0: b},
            "text_embeds": {0: b},
            "time_ids": {0: b},
        },
    )
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 24, 40, generator=g)
    args = (x, torch.tensor([10, 20, 30]), torch.randn(3, 7, 80, generator=g), torch.rand(3, 7, generator=g))
    kw = {"text_embeds": torch.randn(3, XL_POOLED_DIM, generator=g),
          "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 512, 768]] * 3)}
    with torch.no_grad():
        assert rel_err(model(*args, **kw), ep.module()(*args, **kw)) <= 1e-5


def test_export_text_encoder_2() -> None:
    enc = our_text_2(2)
    ids = prompt_ids(0)
    ep = torch.export.export(enc, (ids,), dynamic_shapes=({0: Dim("batch", max=16)},))
    one = prompt_ids(0, lengths=(12,))
    with torch.no_grad():
        for a, b in zip(enc(one), ep.module()(one), strict=True):
            assert rel_err(a, b) <= 1e-5


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
