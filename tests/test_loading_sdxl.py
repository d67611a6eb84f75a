"""SDXL base and refiner single files (SGM layout): round trips through ``load_checkpoint``, parity with
diffusers' ``from_single_file``, the published layouts at real size (on meta), and clear errors.

The real-size base against ``from_single_file`` (slow, ~7 GB written) is in test_loading_sdxl_slow.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from ldm_writer import sgm_state_dict, write_sgm_checkpoint
from safetensors.torch import save_file
from sdxl_reference import diffusers, plain, reference_pipeline, transformers, write_config_folder
from tiny_configs import XL_KINDS, text_config, text_config_2, unet_config, vae_config
from torch import Tensor, nn

from sdexport.loading import CheckpointError, load_checkpoint, load_strict, published_configs
from sdexport.loading.sgm import convert_text_2
from sdexport.loading.single_file import from_ldm_state
from sdexport.models.config import TextEncoderConfig, UNetConfig
from sdexport.models.text_encoder import TextEncoderWithProjection
from sdexport.models.unet import UNet


def _inner(text: nn.Module) -> nn.Module:
    """transformers' ``CLIPTextModel`` may nest its modules under ``text_model`` (our names do not)."""
    inner: nn.Module = getattr(text, "text_model", text)
    return inner


class XLTiny:
    """Random tiny diffusers/transformers SDXL base or refiner models."""

    def __init__(self, kind: str) -> None:
        torch.manual_seed({"sdxl": 10, "sdxl-refiner": 11}[kind])
        self.kind = kind
        self.unet = diffusers.UNet2DConditionModel(**plain(unet_config(kind))).eval()
        self.vae = diffusers.AutoencoderKL(**plain(vae_config(kind))).eval()
        self.text = (
            None
            if kind == "sdxl-refiner"
            else transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config(kind))).eval()
        )
        self.text_2 = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**text_config_2(kind))
        ).eval()
        with torch.no_grad():  # non-zero everywhere, so every key matters
            for module in self.modules().values():
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.05)

    def modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"unet": self.unet, "vae": self.vae, "text_encoder_2": self.text_2}
        if self.text is not None:
            out["text_encoder"] = self.text
        return out

    def write(self, path: Path) -> Path:
        text = None if self.text is None else self.text.state_dict()
        return write_sgm_checkpoint(
            path, self.unet.state_dict(), self.vae.state_dict(), text, self.text_2.state_dict()
        )

    def sgm(self) -> dict[str, Tensor]:
        text = None if self.text is None else self.text.state_dict()
        return sgm_state_dict(self.unet.state_dict(), self.vae.state_dict(), text, self.text_2.state_dict())

    def overrides(self) -> dict[str, dict[str, Any]]:
        """What a single file cannot say about tiny models (the published 64-channel heads don't fit)."""
        out: dict[str, dict[str, Any]] = {
            "unet": {"attention_head_dim": unet_config(self.kind)["attention_head_dim"], "norm_num_groups": 8},
            "vae": {"norm_num_groups": 8},
            "text_encoder_2": {"num_attention_heads": text_config_2(self.kind)["num_attention_heads"]},
        }
        if self.text is not None:
            out["text_encoder"] = {"num_attention_heads": text_config(self.kind)["num_attention_heads"]}
        return out


@pytest.fixture(scope="module")
def xl() -> dict[str, XLTiny]:
    return {kind: XLTiny(kind) for kind in XL_KINDS}


def ckpt_states(ckpt: Any) -> dict[str, dict[str, Tensor]]:
    out = {"unet": ckpt.unet, "vae": ckpt.vae, "text_encoder_2": ckpt.text_encoder_2}
    if ckpt.text_encoder:
        out["text_encoder"] = ckpt.text_encoder
    return out


def assert_same_state(got: Mapping[str, Tensor], module: nn.Module, what: str) -> None:
    want = _inner(module).state_dict() if what == "text_encoder" else module.state_dict()
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:5])
    for k, v in want.items():
        assert torch.equal(got[k], v), (what, k)



# --------------------------------------------------------------------------- tiny round trips


@pytest.mark.parametrize(("kind", "suffix"), [("sdxl", ".safetensors"), ("sdxl-refiner", ".safetensors"),
                                              ("sdxl", ".ckpt")])
def test_sgm_round_trip(tmp_path: Path, xl: dict[str, XLTiny], kind: str, suffix: str) -> None:
    t = xl[kind]
    path = t.write(tmp_path / f"model{suffix}")
    ckpt = load_checkpoint(path, configs=t.overrides(), family=kind)
    assert ckpt.family == kind and not ckpt.inpainting and ckpt.prediction_type == "epsilon"
    ucfg = unet_config(kind)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "transformer_layers_per_block", "use_linear_projection",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        assert ckpt.unet_config[key] == ucfg[key], key
    assert ckpt.vae_config["scaling_factor"] == 0.13025 and ckpt.vae_config["force_upcast"] is True
    assert ckpt.text_config_2 is not None
    # the published legacy token ids (as diffusers' SDXL encoders): the pooled token is the ids' argmax
    token_ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "projection_dim", "hidden_act", *token_ids):
        assert ckpt.text_config_2[key] == text_config_2(kind)[key], key
    if kind == "sdxl-refiner":
        assert ckpt.text_encoder == {} and ckpt.text_config == {}
    else:
        assert ckpt.text_config["num_hidden_layers"] == text_config(kind)["num_hidden_layers"]
        assert {k: ckpt.text_config[k] for k in token_ids} == token_ids
    states = ckpt_states(ckpt)
    assert set(states) == set(t.modules())
    for name, module in t.modules().items():
        assert_same_state(states[name], module, name)


def test_sgm_models_run_like_the_originals(tmp_path: Path, xl: dict[str, XLTiny]) -> None:
    """Our models built from the loaded configs: UNet with text_time, encoder 2's projected pooled output."""
    for kind, t in xl.items():
        ckpt = load_checkpoint(t.write(tmp_path / f"{kind}.safetensors"), configs=t.overrides())
        unet = UNet(UNetConfig.from_diffusers(ckpt.unet_config)).eval()
        load_strict(unet, ckpt.unet, "unet")
        assert ckpt.text_config_2 is not None and ckpt.text_encoder_2 is not None
        text_2 = TextEncoderWithProjection(TextEncoderConfig.from_transformers(ckpt.text_config_2)).eval()
        load_strict(text_2, ckpt.text_encoder_2, "text_encoder_2")
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(1, 4, 16, 16, generator=gen)
        context = torch.randn(1, 7, ckpt.unet_config["cross_attention_dim"], generator=gen)
        pooled = torch.randn(1, text_config_2(kind)["projection_dim"], generator=gen)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0][: 6 if kind == "sdxl" else 5]])
        ids = torch.randint(0, 49406, (1, 77), generator=gen)
        ids[0, 0], ids[0, 9], ids[0, 10:] = 49406, 49407, 0  # BOS, EOS ("!" padding): pooled at 9
        with torch.no_grad():
            got = unet(x, torch.tensor(17), context, text_embeds=pooled, time_ids=time_ids)
            want = t.unet(x, torch.tensor([17]), context,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            _, embeds = text_2(ids)
            torch.testing.assert_close(embeds, t.text_2(ids).text_embeds, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", XL_KINDS)
def test_sgm_agrees_with_diffusers_from_single_file(tmp_path: Path, xl: dict[str, XLTiny], kind: str) -> None:
    """diffusers' own SGM converter reads our writer's files into the same tensors as our loader."""
    t = xl[kind]
    path = t.write(tmp_path / "m.safetensors")
    configs = {"unet": plain(unet_config(kind)), "vae": plain(vae_config(kind))}
    configs["text_encoder_2"] = text_config_2(kind)
    if kind == "sdxl":
        configs["text_encoder"] = text_config(kind)
    folder = write_config_folder(tmp_path / "config", configs, kind == "sdxl-refiner")
    pipe = reference_pipeline(path, folder, kind == "sdxl-refiner")
    ckpt = load_checkpoint(path, configs=t.overrides())
    for name, state in ckpt_states(ckpt).items():
        assert_same_state(state, getattr(pipe, name), name)


def test_open_clip_split_and_projection_transpose() -> None:
    """q/k/v are the row thirds of ``in_proj_*``; ``text_projection.weight`` is the stored matrix's transpose."""
    config = text_config_2("sdxl") | {"num_hidden_layers": 1}
    h, p = config["hidden_size"], config["projection_dim"]
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config))
    state = sgm_state_dict({}, {}, None, model.state_dict())
    prefix = "conditioner.embedders.0.model."
    fused = torch.randn(3 * h, h)
    stored = torch.randn(h, p)
    state[prefix + "transformer.resblocks.0.attn.in_proj_weight"] = fused
    state[prefix + "text_projection"] = stored
    out = convert_text_2(state, config, "sdxl-refiner", "enc2")
    layer = "text_model.encoder.layers.0.self_attn."
    for i, name in enumerate("qkv"):
        assert torch.equal(out[f"{layer}{name}_proj.weight"], fused[i * h : (i + 1) * h])
    assert torch.equal(out["text_projection.weight"], stored.T)
    state[prefix + "text_projection"] = stored.T.contiguous()  # stored the wrong way round
    with pytest.raises(CheckpointError, match=r"text_projection \(transposed\) -> text_projection\.weight"):
        convert_text_2(state, config, "sdxl-refiner", "enc2")


# --------------------------------------------------------------------------- published layouts (meta)


@pytest.mark.parametrize("name", ["sdxl_base", "sdxl_refiner"])
def test_real_size_layout_on_meta(name: str) -> None:
    """The published SDXL architectures, shapes only: inference + family rules give the published configs
    and the converted keys/shapes are exactly diffusers'/transformers'."""
    published = published_configs(name)
    refiner = name == "sdxl_refiner"
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**published["unet"])
        vae = diffusers.AutoencoderKL(**published["vae"])
        text = None if refiner else transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**published["text_encoder"]))
        text_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**published["text_encoder_2"]))
    state = sgm_state_dict(unet.state_dict(), vae.state_dict(), None if text is None else text.state_dict(),
                           text_2.state_dict())
    ckpt = from_ldm_state(state, Path(f"{name}.safetensors"), None, {})
    assert ckpt.family == ("sdxl-refiner" if refiner else "sdxl")
    sections = [("unet", ckpt.unet_config), ("vae", ckpt.vae_config), ("text_encoder_2", ckpt.text_config_2)]
    if not refiner:
        sections.append(("text_encoder", ckpt.text_config))
    for section, got in sections:
        assert got is not None
        for key, value in published[section].items():
            assert got[key] == value, (section, key, got[key], value)
    pairs: list[tuple[Mapping[str, Tensor] | None, nn.Module]] = [
        (ckpt.unet, unet), (ckpt.vae, vae), (ckpt.text_encoder_2, text_2)]
    if text is not None:
        pairs.append((ckpt.text_encoder, _inner(text)))
    for ours, module in pairs:
        assert ours is not None
        assert {k: tuple(v.shape) for k, v in ours.items()} == {
            k: tuple(v.shape) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- errors


def _save(path: Path, state: Mapping[str, Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_error_missing_and_misshapen_tensors(tmp_path: Path, xl: dict[str, XLTiny]) -> None:
    t = xl["sdxl"]
    good = t.sgm()
    enc2 = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    state = {k: v for k, v in good.items() if k != "model.diffusion_model.label_emb.0.2.weight"}
    state[enc2] = torch.zeros(3 * 48 + 3, 48)
    state["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.zeros(31)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_save(tmp_path / "bad.safetensors", state), configs=t.overrides())
    msg = str(info.value)
    assert "bad.safetensors" in msg and "3 components do not load" in msg
    assert "model.diffusion_model.label_emb.0.2.weight (for add_embedding.linear_2.weight)" in msg
    assert f"{enc2} (q rows) -> text_model.encoder.layers.1.self_attn.q_proj.weight" in msg
    assert "final_layer_norm.weight: checkpoint (31), expected (32)" in msg
    # label_emb.0.0 that fits no pooled width + time ids
    state = dict(good)
    state["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(128, 41)
    with pytest.raises(CheckpointError, match=r"label_emb\.0\.0\.weight \(41 inputs\) does not fit .* 6 time ids"):
        load_checkpoint(_save(tmp_path / "emb.safetensors", state), configs=t.overrides())
    # the UNet without its added embedding at all
    state = {k: v for k, v in good.items() if "label_emb" not in k}
    with pytest.raises(CheckpointError, match=r"missing key model\.diffusion_model\.label_emb\.0\.0\.weight"):
        load_checkpoint(_save(tmp_path / "noemb.safetensors", state))


def test_error_truncated_file(tmp_path: Path, xl: dict[str, XLTiny]) -> None:
    good = xl["sdxl-refiner"].write(tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_checkpoint(cut)


def test_error_family_mismatch_and_odd_conditioners(tmp_path: Path, xl: dict[str, XLTiny]) -> None:
    refiner = xl["sdxl-refiner"].write(tmp_path / "refiner.safetensors")
    with pytest.raises(CheckpointError, match=r"refiner\.safetensors: expected a SDXL base .* \('sdxl'\), but this "
                                              r"is a SDXL refiner .*\('sdxl-refiner'\)"):
        load_checkpoint(refiner, family="sdxl")
    with pytest.raises(CheckpointError, match=r"configs\['text_encoder'\] given, but a sdxl-refiner checkpoint"):
        load_checkpoint(refiner, configs={"text_encoder": {"num_attention_heads": 2}})
    with pytest.raises(CheckpointError, match="family must be one of"):
        load_checkpoint(refiner, family="xl")
    good = xl["sdxl"].sgm()
    with pytest.raises(CheckpointError, match=r"expected a SDXL refiner .* but this is a SDXL base"):
        load_checkpoint(_save(tmp_path / "base.safetensors", good), family="sdxl-refiner")
    odd = {**good, "conditioner.embedders.2.model.foo": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected conditioner keys \(1\):\n    conditioner\.embedders\.2"):
        load_checkpoint(_save(tmp_path / "odd.safetensors", odd))
    no_enc1 = {k: v for k, v in good.items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(CheckpointError, match=r"unrecognised SGM conditioner \['conditioner\.embedders\.1\.model'\]"):
        load_checkpoint(_save(tmp_path / "half.safetensors", no_enc1))
    no_cond = {k: v for k, v in good.items() if not k.startswith("conditioner.")}
    with pytest.raises(CheckpointError, match=r"label_emb\) but no SGM text encoders"):
        load_checkpoint(_save(tmp_path / "nocond.safetensors", no_cond))
