"""Checkpoint loading: diffusers folders, LDM single files, the mapping tables, strict errors.

Everything uses tiny random models (tests/tiny_configs.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from ldm_writer import ldm_state_dict, write_ldm_checkpoint
from safetensors.torch import load_file, save_file
from tiny_configs import scheduler_config, text_config, unet_config, vae_config
from torch import Tensor, nn

from sdexport.loading import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    load_strict,
    published_configs,
    text_shapes,
    unet_key_map,
    unet_shapes,
    vae_key_map,
    vae_shapes,
)
from sdexport.loading.ldm import text_key_map
from sdexport.models.config import UNetConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network, whatever a test does


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


class Tiny:
    """Random tiny diffusers/transformers models of one kind, with reference outputs."""

    def __init__(self, kind: str) -> None:
        torch.manual_seed({"sd1": 0, "sd2": 1, "sd1-inpaint": 2}[kind])
        self.kind = kind
        self.family = "sd2" if kind == "sd2" else "sd1"
        self.unet = diffusers.UNet2DConditionModel(**_plain(unet_config(kind))).eval()
        self.vae = diffusers.AutoencoderKL(**_plain(vae_config())).eval()
        self.text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config(kind))).eval()
        # Random (non-zero-init) weights everywhere so every key matters for the outputs.
        with torch.no_grad():
            for module in (self.unet, self.vae, self.text):
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
        self.outputs = run_models(self.unet, self.vae, self.text)

    def overrides(self) -> dict[str, dict[str, Any]]:
        """What a single file cannot say about these tiny models (published rules don't fit them)."""
        return {
            "unet": {
                "attention_head_dim": unet_config(self.kind)["attention_head_dim"],
                "norm_num_groups": 8,
            },
            "vae": {"norm_num_groups": 8},
            "text_encoder": {"num_attention_heads": text_config(self.kind)["num_attention_heads"]},
        }


def run_models(unet: nn.Module, vae: nn.Module, text: nn.Module) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(123)
    in_ch = unet.config.in_channels
    sample = torch.randn(1, in_ch, 16, 16, generator=gen)
    context = torch.randn(1, 7, unet.config.cross_attention_dim, generator=gen)
    image = torch.randn(1, 3, 32, 32, generator=gen)
    ids = torch.randint(0, 49408, (1, 77), generator=gen)
    with torch.no_grad():
        return {
            "unet": unet(sample, torch.tensor([17]), encoder_hidden_states=context).sample,
            "vae_enc": vae.encode(image).latent_dist.mean,
            "vae_dec": vae.decode(torch.randn(1, 4, 4, 4, generator=gen)).sample,
            "text": text(ids).last_hidden_state,
        }


def clip_inner(text: nn.Module) -> nn.Module:
    """The module whose state-dict names the loader uses: transformers 4 nests it under ``text_model``."""
    inner: nn.Module = getattr(text, "text_model", text)
    return inner


def models_from(ckpt: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Fresh diffusers/transformers models built from the checkpoint's configs, loaded strictly."""
    unet = diffusers.UNet2DConditionModel(**ckpt.unet_config).eval()
    vae = diffusers.AutoencoderKL(**ckpt.vae_config).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**ckpt.text_config)).eval()
    load_strict(unet, ckpt.unet, "unet")
    load_strict(vae, ckpt.vae, "vae")
    load_strict(clip_inner(text), ckpt.text_encoder, "text encoder")
    return unet, vae, text


def assert_outputs_close(got: Mapping[str, Tensor], want: Mapping[str, Tensor]) -> None:
    for name, ref in want.items():
        err = (got[name].float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item()
        assert err <= 1e-4 * max(scale, 1.0), f"{name}: max abs err {err} (scale {scale})"


def assert_same_state(got: Mapping[str, Tensor], module: nn.Module) -> None:
    want = clip_inner(module).state_dict()
    assert set(got) == set(want), set(got) ^ set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


class _LazyTiny(dict[str, Tiny]):
    def __missing__(self, kind: str) -> Tiny:
        self[kind] = Tiny(kind)
        return self[kind]


@pytest.fixture(scope="module")
def tiny() -> dict[str, Tiny]:
    """Tiny models by kind, built on first use."""
    return _LazyTiny()


def write_tokenizer(folder: Path) -> None:
    """A minimal but valid CLIP BPE vocabulary (enough for CLIPTokenizer to load)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "a": 4}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"})
    )


def write_diffusers_folder(root: Path, t: Tiny, *, tokenizer: bool = True) -> Path:
    t.unet.save_pretrained(root / "unet")
    t.vae.save_pretrained(root / "vae")
    t.text.save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    sched = scheduler_config(t.kind) | {"_class_name": "PNDMScheduler"}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    if tokenizer:
        write_tokenizer(root / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


# --------------------------------------------------------------------------- shape tables


def _meta_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in clip_inner(module).state_dict().items()}


UNET_CASES = {
    "tiny-sd1": _plain(unet_config("sd1")),
    "tiny-sd2": _plain(unet_config("sd2")),
    "tiny-inpaint": _plain(unet_config("sd1-inpaint")),
    "sd15": published_configs("sd15")["unet"],
    "sd21": published_configs("sd21_768_v")["unet"],
    "mixed": {
        "block_out_channels": [32, 48],
        "layers_per_block": [1, 2],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 3,
        "transformer_layers_per_block": 2,
        "cross_attention_dim": 20,
        "norm_num_groups": 8,
        "in_channels": 9,
        "out_channels": 3,
    },
}


@pytest.mark.parametrize("name", sorted(UNET_CASES))
def test_unet_shapes_match_diffusers(name: str) -> None:
    """The tables come from our modules: their names and shapes are diffusers'."""
    config = UNET_CASES[name]
    try:
        UNetConfig.from_diffusers(config)
    except ValueError as exc:  # an option our UNet does not implement (yet): the loader refuses it
        with pytest.raises(CheckpointError, match="unet config is not supported"):
            unet_shapes(config)
        pytest.skip(f"our UNet does not implement this config: {exc}")
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**config)
    assert unet_shapes(config) == _meta_shapes(model)


@pytest.mark.parametrize("name", ["tiny", "sd15"])
def test_vae_shapes_match_diffusers(name: str) -> None:
    config = _plain(vae_config()) if name == "tiny" else published_configs("sd15")["vae"]
    with torch.device("meta"):
        model = diffusers.AutoencoderKL(**config)
    assert vae_shapes(config) == _meta_shapes(model)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "sd15", "sd21_base"])
def test_text_shapes_match_transformers(name: str) -> None:
    if name.startswith("tiny"):
        config = text_config(name.removeprefix("tiny-"))
    else:
        config = published_configs(name)["text_encoder"]
    with torch.device("meta"):
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    assert text_shapes(config) == _meta_shapes(model)


def test_unsupported_unet_config_is_refused() -> None:
    """The model config decides what is supported; the loader reports its refusal as a CheckpointError."""
    lcm = {**published_configs("sd15")["unet"], "time_cond_proj_dim": 256}
    with pytest.raises(CheckpointError, match="time_cond_proj_dim"):
        unet_shapes(lcm)
    with pytest.raises(CheckpointError, match="down_block_types"):
        unet_shapes({**published_configs("sd15")["unet"], "down_block_types": ["SimpleDown"] * 4})
    with pytest.raises(CheckpointError, match="hidden_act"):
        text_shapes({**published_configs("sd15")["text_encoder"], "hidden_act": "relu"})


def test_key_maps_match_known_sd15_layout() -> None:
    """Anchors from the published SD 1.5 checkpoint's key names."""
    config = published_configs("sd15")
    unet = {k: s.key for k, s in unet_key_map(config["unet"]).items()}
    assert len(unet) == 686
    m = "model.diffusion_model."
    assert unet["down_blocks.0.resnets.0.norm1.weight"] == m + "input_blocks.1.0.in_layers.0.weight"
    assert unet["down_blocks.0.attentions.1.proj_in.weight"] == m + "input_blocks.2.1.proj_in.weight"
    assert unet["down_blocks.0.downsamplers.0.conv.weight"] == m + "input_blocks.3.0.op.weight"
    assert unet["down_blocks.3.resnets.1.conv2.bias"] == m + "input_blocks.11.0.out_layers.3.bias"
    assert unet["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (
        m + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    )
    assert unet["up_blocks.0.upsamplers.0.conv.weight"] == m + "output_blocks.2.1.conv.weight"
    assert unet["up_blocks.1.upsamplers.0.conv.weight"] == m + "output_blocks.5.2.conv.weight"
    assert (
        unet["up_blocks.3.resnets.2.conv_shortcut.weight"] == m + "output_blocks.11.0.skip_connection.weight"
    )
    assert unet["time_embedding.linear_2.bias"] == m + "time_embed.2.bias"
    assert unet["conv_out.weight"] == m + "out.2.weight"
    vae = {k: s.key for k, s in vae_key_map(config["vae"]).items()}
    assert len(vae) == 248
    assert (
        vae["decoder.up_blocks.0.resnets.2.norm1.weight"]
        == "first_stage_model.decoder.up.3.block.2.norm1.weight"
    )
    assert vae["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"] == (
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"
    )
    assert (
        vae["encoder.mid_block.attentions.0.to_out.0.weight"]
        == "first_stage_model.encoder.mid.attn_1.proj_out.weight"
    )
    assert vae["decoder.conv_norm_out.bias"] == "first_stage_model.decoder.norm_out.bias"
    text = text_key_map(published_configs("sd21_base")["text_encoder"], "sd2")
    q = text["encoder.layers.22.self_attn.k_proj.bias"]
    assert (q.key, q.chunk) == ("cond_stage_model.model.transformer.resblocks.22.attn.in_proj_bias", 1)
    assert text["embeddings.position_embedding.weight"].key == "cond_stage_model.model.positional_embedding"
    assert len(text) == 4 + 16 * 23


# --------------------------------------------------------------------------- diffusers folders


def test_diffusers_folder_round_trip(tmp_path: Path, tiny: dict[str, Tiny]) -> None:
    t = tiny["sd2"]
    root = write_diffusers_folder(tmp_path / "pipe", t)
    ckpt = load_checkpoint(root)
    assert (ckpt.family, ckpt.inpainting, ckpt.prediction_type) == ("sd2", False, "v_prediction")
    assert ckpt.tokenizer_dir == root / "tokenizer"
    assert ckpt.source == root
    assert ckpt.vae_config["scaling_factor"] == 0.18215
    assert ckpt.scheduler_config["beta_schedule"] == "scaled_linear"
    assert_same_state(ckpt.unet, t.unet)
    assert_same_state(ckpt.vae, t.vae)
    assert_same_state(ckpt.text_encoder, t.text)
    assert_outputs_close(run_models(*models_from(ckpt)), t.outputs)
    # prediction_type argument wins over the scheduler config
    assert load_checkpoint(root, prediction_type="epsilon").prediction_type == "epsilon"


def test_diffusers_folder_variants_bin_and_shards(tmp_path: Path, tiny: dict[str, Tiny]) -> None:
    t = tiny["sd1"]
    root = write_diffusers_folder(tmp_path / "pipe", t, tokenizer=False)
    # UNet: only an fp16 variant; VAE: sharded safetensors; text encoder: transformers-4 style .bin.
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    half = {k: v.half() for k, v in t.unet.state_dict().items()}
    save_file(half, str(root / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    shutil.rmtree(root / "vae")
    t.vae.save_pretrained(root / "vae", max_shard_size="100KB")
    assert (root / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    (root / "text_encoder" / "model.safetensors").unlink()
    old = {"text_model." + k.removeprefix("text_model."): v for k, v in t.text.state_dict().items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(old, root / "text_encoder" / "pytorch_model.bin")

    ckpt = load_checkpoint(root)
    assert ckpt.tokenizer_dir is None and ckpt.family == "sd1"
    assert ckpt.unet["conv_in.weight"].dtype == torch.float16
    assert_same_state(ckpt.vae, t.vae)
    assert_same_state(ckpt.text_encoder, t.text)

    ckpt32 = load_checkpoint(root, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in ckpt32.unet.values())
    unet, vae, text = models_from(ckpt32)
    got = run_models(unet, vae, text)
    ref = t.outputs["unet"]
    assert (got["unet"] - ref).abs().max() <= 1e-2 * ref.abs().max()  # fp16 weights
    assert_outputs_close(
        {k: got[k] for k in ("vae_enc", "text")}, {k: t.outputs[k] for k in ("vae_enc", "text")}
    )

    # explicit variant: the fp16 file is chosen even when a regular file exists
    save_file(t.unet.state_dict(), str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    assert load_checkpoint(root).unet["conv_in.weight"].dtype == torch.float32
    with pytest.raises(CheckpointError, match=r"vae.*no weights found.*fp16"):
        load_checkpoint(root, variant="fp16")


# --------------------------------------------------------------------------- LDM single files


@pytest.mark.parametrize(
    ("kind", "suffix"), [("sd1", ".safetensors"), ("sd2", ".safetensors"), ("sd1-inpaint", ".ckpt")]
)
def test_ldm_single_file_round_trip(tmp_path: Path, tiny: dict[str, Tiny], kind: str, suffix: str) -> None:
    t = tiny[kind]
    path = write_ldm_checkpoint(
        tmp_path / f"model{suffix}", t.unet.state_dict(), t.vae.state_dict(), t.text.state_dict(), t.family
    )
    ckpt = load_checkpoint(path, configs=t.overrides())
    assert ckpt.family == t.family
    assert ckpt.inpainting == (kind == "sd1-inpaint")
    assert ckpt.tokenizer_dir is None and ckpt.source == path
    assert ckpt.prediction_type == "epsilon"
    ucfg = unet_config(kind)
    for key in (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "cross_attention_dim",
    ):
        assert ckpt.unet_config[key] == ucfg[key], key
    assert ckpt.unet_config.get("use_linear_projection", False) == ucfg.get("use_linear_projection", False)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "hidden_act"):
        assert ckpt.text_config[key] == text_config(kind)[key], key
    assert ckpt.vae_config["block_out_channels"] == vae_config()["block_out_channels"]
    assert_same_state(ckpt.unet, t.unet)
    assert_same_state(ckpt.vae, t.vae)
    assert_same_state(ckpt.text_encoder, t.text)
    assert_outputs_close(run_models(*models_from(ckpt)), t.outputs)


def test_ldm_defaults_prediction_type_and_dtype(tmp_path: Path, tiny: dict[str, Tiny]) -> None:
    t = tiny["sd2"]
    path = write_ldm_checkpoint(
        tmp_path / "m.safetensors", t.unet.state_dict(), t.vae.state_dict(), t.text.state_dict(), "sd2"
    )
    # Only the group counts overridden (tiny channels): heads follow the published SD2 rule (64 per head).
    groups = {"unet": {"norm_num_groups": 8}, "vae": {"norm_num_groups": 8}}
    base = load_checkpoint(path, configs=groups)
    assert base.unet_config["attention_head_dim"] == [1, 1, 1]
    assert base.text_config["num_attention_heads"] == 1
    assert base.unet_config["upcast_attention"] is False and base.unet_config["sample_size"] == 64
    assert base.scheduler_config["prediction_type"] == "epsilon"
    models_from(base)  # shapes do not depend on head counts: still loads strictly
    v = load_checkpoint(path, prediction_type="v_prediction", dtype=torch.bfloat16)
    assert v.scheduler_config["prediction_type"] == "v_prediction"
    assert v.unet_config["upcast_attention"] is True and v.unet_config["sample_size"] == 96
    assert all(x.dtype == torch.bfloat16 for x in v.unet.values())
    with pytest.raises(CheckpointError, match="prediction_type"):
        load_checkpoint(path, prediction_type="v")
    with pytest.raises(CheckpointError, match="unknown sections"):
        load_checkpoint(path, configs={"tokenizer": {}})


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_writer_agrees_with_diffusers_from_single_file(
    tmp_path: Path, tiny: dict[str, Tiny], kind: str
) -> None:
    """diffusers' own LDM converter reads our writer's files into the original weights (offline)."""
    t = tiny[kind]
    path = write_ldm_checkpoint(
        tmp_path / "m.safetensors", t.unet.state_dict(), t.vae.state_dict(), t.text.state_dict(), t.family
    )
    config = write_diffusers_folder(tmp_path / "config", t)
    try:
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except OSError as exc:  # pragma: no cover - only if diffusers insists on the network
        pytest.skip(f"diffusers.from_single_file needs files it cannot get offline: {exc}")
    ckpt = load_checkpoint(path, configs=t.overrides())
    for ours, theirs, original in (
        (ckpt.unet, pipe.unet, t.unet),
        (ckpt.vae, pipe.vae, t.vae),
        (ckpt.text_encoder, pipe.text_encoder, t.text),
    ):
        assert_same_state(ours, theirs)
        assert_same_state(ours, original)


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def ldm_sd1(tiny: dict[str, Tiny]) -> dict[str, Tensor]:
    t = tiny["sd1"]
    return ldm_state_dict(t.unet.state_dict(), t.vae.state_dict(), t.text.state_dict(), "sd1")


def _save(path: Path, state: Mapping[str, Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_error_missing_unexpected_and_mismatched_keys(tmp_path: Path, ldm_sd1: dict[str, Tensor]) -> None:
    state = dict(ldm_sd1)
    gone = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    del state[gone]
    state["model.diffusion_model.input_blocks.1.1.bogus.weight"] = torch.zeros(3)
    bad = "model.diffusion_model.out.0.weight"
    state[bad] = torch.zeros(5)
    state["first_stage_model.decoder.mid.attn_1.k.weight"] = torch.zeros(32, 31, 1, 1)
    path = _save(tmp_path / "broken.safetensors", state)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, configs={"unet": {"attention_head_dim": 2}})
    msg = str(info.value)
    assert msg.startswith("2 components do not load")  # every component's problems in one error
    assert f"{path}: UNet does not match" in msg and f"{path}: VAE does not match" in msg
    assert "decoder.mid.attn_1.k.weight -> decoder.mid_block.attentions.0.to_k.weight" in msg
    assert "checkpoint (32, 31, 1, 1), expected (32, 32)" in msg
    assert "missing keys (1)" in msg and gone in msg and "down_blocks.0.attentions.0" in msg
    assert "unexpected keys (1)" in msg and "input_blocks.1.1.bogus.weight" in msg
    assert "shape mismatches (1)" in msg and "out.0.weight -> conv_norm_out.weight" in msg
    assert "checkpoint (5), expected (32)" in msg


def test_error_missing_component_in_single_file(tmp_path: Path, ldm_sd1: dict[str, Tensor]) -> None:
    no_vae = {k: v for k, v in ldm_sd1.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match="no VAE found"):
        load_checkpoint(_save(tmp_path / "novae.safetensors", no_vae))
    no_text = {k: v for k, v in ldm_sd1.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match="no text encoder found"):
        load_checkpoint(_save(tmp_path / "notext.safetensors", no_text))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion LDM checkpoint"):
        load_checkpoint(_save(tmp_path / "other.safetensors", {"foo": torch.zeros(1)}))


def test_error_long_lists_are_truncated(tmp_path: Path, ldm_sd1: dict[str, Tensor]) -> None:
    state = {k: v for k, v in ldm_sd1.items() if not ("input_blocks" in k and "transformer_blocks" in k)}
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\):[\s\S]*\.\.\. and \d+ more") as info:
        load_checkpoint(_save(tmp_path / "m.safetensors", state))
    assert len(str(info.value).splitlines()) < 40


def test_error_truncated_and_empty_files(tmp_path: Path, ldm_sd1: dict[str, Tensor]) -> None:
    good = _save(tmp_path / "good.safetensors", ldm_sd1)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_checkpoint(cut)
    ckpt = tmp_path / "good.ckpt"
    torch.save({"state_dict": ldm_sd1}, ckpt)
    cut_ckpt = tmp_path / "cut.ckpt"
    cut_ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated or corrupt"):
        load_checkpoint(cut_ckpt)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.safetensors: the file is empty"):
        load_checkpoint(empty)


class NotATensor:
    """A pickled object that weights_only loading must refuse."""

    def __init__(self) -> None:
        self.payload = 1


def test_error_non_tensor_pickle(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": NotATensor()}}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*only plain-tensor checkpoints are supported"):
        load_checkpoint(path)
    path2 = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1), "b": [1, 2]}}, path2)
    with pytest.raises(CheckpointError, match=r"mixed\.ckpt: entries that are not tensors \(b\)"):
        load_checkpoint(path2)


def test_error_wrong_formats_and_folders(tmp_path: Path, tiny: dict[str, Tiny]) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: unsupported file type '\.txt'"):
        load_checkpoint(txt)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint(tmp_path / "absent.safetensors")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty_dir: not a diffusers folder \(no model_index\.json\)"):
        load_checkpoint(empty)

    root = write_diffusers_folder(tmp_path / "pipe", tiny["sd1"], tokenizer=False)
    shutil.rmtree(root / "vae")
    with pytest.raises(CheckpointError, match=r"pipe: missing component folder 'vae/'"):
        load_checkpoint(root)
    tiny["sd1"].vae.save_pretrained(root / "vae")
    (root / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"text_encoder: no weights found \(looked for model\.safetensors"
    ):
        load_checkpoint(root)
    tiny["sd1"].text.save_pretrained(root / "text_encoder")
    (root / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"unet/config\.json: not valid JSON"):
        load_checkpoint(root)
    cfg = json.loads(json.dumps(tiny["sd1"].unet.config))
    (root / "unet" / "config.json").write_text(json.dumps(cfg))
    # Components that do not belong together, and a config that does not fit its weights.
    with pytest.raises(CheckpointError, match=r"cross_attention_dim \(32\) differs .* hidden_size \(48\)"):
        load_checkpoint(root, configs={"text_encoder": {"hidden_size": 48}})
    cfg["block_out_channels"] = [32, 64, 96]
    (root / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unet: UNet does not match[\s\S]*expected \(96,"):
        load_checkpoint(root)


def test_load_strict_reports_everything() -> None:
    module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    del state["1.bias"]
    state["0.weight"] = torch.zeros(4, 5)
    state["2.weight"] = torch.zeros(1)
    before = module[0].bias.clone()
    state["0.bias"] = torch.ones(4)
    with pytest.raises(CheckpointError) as info:
        load_strict(module, state, "toy")
    msg = str(info.value)
    assert msg.startswith("toy does not match")
    assert "missing keys (1):\n    1.bias" in msg
    assert "unexpected keys (1):\n    2.weight" in msg
    assert "0.weight: checkpoint (4, 5), expected (4, 3)" in msg
    assert torch.equal(module[0].bias, before)  # nothing was loaded
    good = {k: torch.ones_like(v) for k, v in module.state_dict().items()}
    load_strict(module, good, "toy")
    assert torch.equal(module[0].bias, torch.ones(4))
    check_state_dict(good, {k: tuple(v.shape) for k, v in good.items()}, "toy")


def test_safetensors_reader_only_keeps_model_keys(tmp_path: Path, ldm_sd1: dict[str, Tensor]) -> None:
    state = dict(ldm_sd1)
    state["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(2)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    path = _save(tmp_path / "m.safetensors", state)
    ckpt = load_checkpoint(path, configs={"unet": {"attention_head_dim": 2}})
    assert set(ckpt.unet) == set(unet_shapes(ckpt.unet_config))
    assert "betas" in load_file(str(path))  # present in the file, ignored by the loader


@pytest.mark.parametrize(("name", "pred"), [("sd15", "epsilon"), ("sd21_768_v", "v_prediction")])
def test_real_size_layout_on_meta(name: str, pred: str) -> None:
    """The published architectures, shapes only: a real-size LDM layout converts back to the exact
    diffusers/transformers keys, and inference + family rules reproduce the published configs."""
    from sdexport.loading.single_file import from_ldm_state

    published = published_configs(name)
    family = "sd1" if name == "sd15" else "sd2"
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**published["unet"])
        vae = diffusers.AutoencoderKL(**published["vae"])
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**published["text_encoder"]))
    state = ldm_state_dict(unet.state_dict(), vae.state_dict(), text.state_dict(), family)
    if family == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in state  # 24 blocks
    ckpt = from_ldm_state(state, Path(f"{name}.safetensors"), pred, {})
    assert ckpt.family == family and ckpt.prediction_type == pred
    for section, got in (
        ("unet", ckpt.unet_config),
        ("vae", ckpt.vae_config),
        ("text_encoder", ckpt.text_config),
    ):
        for key, value in published[section].items():
            assert got[key] == value, (section, key)
    assert ckpt.scheduler_config == published["scheduler"]
    for ours, module in ((ckpt.unet, unet), (ckpt.vae, vae), (ckpt.text_encoder, text)):
        assert {k: tuple(v.shape) for k, v in ours.items()} == _meta_shapes(module)
