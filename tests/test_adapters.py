"""runtime.adapters: LoRA / LyCORIS / textual inversion reading, resolution and merging, against diffusers'
`load_lora_weights` + `fuse_lora` and `load_textual_inversion` (and the LyCORIS formulas for LoHa / LoKr)
on tiny random models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lora_writer as lw
import pytest
import torch
from torch import Tensor

from runtime.adapters import (
    AdapterError,
    LoraMerger,
    Resolved,
    apply,
    deltas,
    read_embedding,
    read_lora,
    resolve,
    restore,
)

SCALES = (1.0, 0.6, -0.5)
UNET_MODULES = (
    "conv_in",  # 3x3 LoCon
    "time_embedding.linear_1",
    "down_blocks.0.resnets.0.conv1",  # 3x3 LoCon
    "down_blocks.0.resnets.0.time_emb_proj",
    "down_blocks.0.attentions.0.proj_in",  # SD1: a 1x1 conv
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.1.resnets.0.conv_shortcut",  # 1x1 conv
    "down_blocks.0.downsamplers.0.conv",  # 3x3, stride 2
)
TEXT_MODULES = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj", "encoder.layers.1.mlp.fc1")


def _pipe(folder: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _tables(pipe: Any, components: tuple[str, ...] = ("unet", "text_encoder")) -> dict[str, Tensor]:
    """The canonical table "component:name" -> a copy of the weight."""
    return {f"{c}:{k}": v.detach().clone() for c in components for k, v in getattr(pipe, c).state_dict().items()}


def _modules(table: dict[str, Tensor], names: dict[str, tuple[str, ...]]) -> lw.Modules:
    return {c: {n: tuple(table[f"{c}:{n}.weight"].shape) for n in ns} for c, ns in names.items()}


def _shapes(table: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in table.items()}


def _fused(pipe: Any, path: Path, scale: float,
           components: tuple[str, ...] = ("unet", "text_encoder")) -> dict[str, Tensor]:
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale, components=list(components))
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT layers
    return _tables(pipe, components)


def _compare(ours: dict[str, Tensor], ref: dict[str, Tensor], touched: set[str]) -> None:
    assert set(ours) == set(ref)
    for k in ref:
        if k in touched:
            err = (ours[k] - ref[k]).abs().max().item()
            assert err <= 1e-5, f"{k}: {err}"
        else:
            assert torch.equal(ours[k], ref[k]), k


def _merge(table: dict[str, Tensor], path: Path, scale: float) -> tuple[dict[str, Tensor], Resolved]:
    res = resolve(read_lora(path), _shapes(table))
    weights = {k: v.clone() for k, v in table.items()}
    apply(weights, deltas(res, scale))
    return weights, res


SD1_WRITERS: dict[str, Callable[[lw.Modules], dict[str, Tensor]]] = {
    "kohya": lambda m: lw.kohya(m, rank=4, alpha=2.0),
    "kohya-no-alpha": lambda m: lw.kohya(m, rank=3, alpha=None),
    "peft": lambda m: lw.peft(m, rank=4),
    "old-diffusers": lambda m: lw.peft(m, rank=4, form="old"),
}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", sorted(SD1_WRITERS))
def test_lora_merge_matches_diffusers_fuse(sd1_folder: Path, tmp_path: Path, layout: str, scale: float) -> None:
    pipe = _pipe(sd1_folder)
    table = _tables(pipe)
    mods = _modules(table, {"unet": UNET_MODULES, "text_encoder": TEXT_MODULES})
    path = lw.save(SD1_WRITERS[layout](mods), tmp_path / f"{layout}.safetensors")
    ours, res = _merge(table, path, scale)
    assert res.report() == {"unet": len(UNET_MODULES), "text_encoder": len(TEXT_MODULES)}
    touched = {t for _, t, _ in res.targets}
    _compare(ours, _fused(pipe, path, scale), touched)


def test_peft_alphas_from_adapter_metadata(sd1_folder: Path, tmp_path: Path) -> None:
    pipe = _pipe(sd1_folder)
    table = _tables(pipe)
    mods = _modules(table, {"unet": UNET_MODULES[4:9], "text_encoder": TEXT_MODULES})
    meta = lw.peft_metadata({"unet": 8.0, "text_encoder": 2.0}, rank=4, modules=mods)
    path = lw.save(lw.peft(mods, rank=4), tmp_path / "alphas.safetensors", meta)
    lora = read_lora(path)
    assert {e.component: e.scale for e in lora.entries} == {"unet": 2.0, "text_encoder": 0.5}
    ours, res = _merge(table, path, 0.6)
    _compare(ours, _fused(pipe, path, 0.6), {t for _, t, _ in res.targets})


def test_pickle_lora_reads_like_safetensors(sd1_folder: Path, tmp_path: Path) -> None:
    table = _tables(_pipe(sd1_folder))
    tensors = lw.kohya(_modules(table, {"unet": UNET_MODULES[:3]}))
    a = deltas(resolve(read_lora(lw.save(tensors, tmp_path / "a.safetensors")), _shapes(table)))
    b = deltas(resolve(read_lora(lw.save(tensors, tmp_path / "a.pt")), _shapes(table)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# LoHa / LoKr: diffusers' kohya converter reads only lora_down/up, so the reference is the formula.


def _loha_ref(t: dict[str, Tensor], key: str, shape: tuple[int, ...]) -> Tensor:
    """FedPara / LyCORIS: ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r; Tucker: W = T ×1 Wa ×2 Wb."""
    def w(n: str) -> Tensor:
        a, b = t[f"{key}.hada_w{n}_a"], t[f"{key}.hada_w{n}_b"]
        if f"{key}.hada_t{n}" in t:
            core = t[f"{key}.hada_t{n}"]
            return torch.einsum("ijhw,io,jc->ochw", core, a, b)
        return (a @ b).reshape(shape)
    r = t[f"{key}.hada_w1_b"].shape[0]
    return w("1") * w("2") * (t[f"{key}.alpha"].item() / r)


def _lokr_ref(t: dict[str, Tensor], key: str, shape: tuple[int, ...]) -> Tensor:
    """LyCORIS LoKr: ΔW = W1 ⊗ W2 · alpha / r (r of the decomposed factor; 1 if none is decomposed)."""
    g = t.get
    w1 = g(f"{key}.lokr_w1") if f"{key}.lokr_w1" in t else t[f"{key}.lokr_w1_a"] @ t[f"{key}.lokr_w1_b"]
    if f"{key}.lokr_w2" in t:
        w2 = t[f"{key}.lokr_w2"]
    elif f"{key}.lokr_t2" in t:
        w2 = torch.einsum("ijhw,io,jc->ochw", t[f"{key}.lokr_t2"], t[f"{key}.lokr_w2_a"], t[f"{key}.lokr_w2_b"])
    else:
        w2 = t[f"{key}.lokr_w2_a"] @ t[f"{key}.lokr_w2_b"]
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    assert w1 is not None
    out = torch.stack([torch.stack([w1[i, j] * w2 for j in range(w1.shape[1])]) for i in range(w1.shape[0])])
    # out[i, j, c, d, ...] -> ((i c), (j d), ...)
    a, b, c, d = out.shape[:4]
    out = out.permute(0, 2, 1, 3, *range(4, out.dim())).reshape(a * c, b * d, *out.shape[4:])
    r_key = next((f"{key}.{n}" for n in ("lokr_w1_b", "lokr_w2_b") if f"{key}.{n}" in t), None)
    s = 1.0 if r_key is None else t[f"{key}.alpha"].item() / t[r_key].shape[0]
    return out.reshape(shape) * s


LYCORIS = {
    "loha": (lambda m: lw.loha(m), _loha_ref),
    "loha-tucker": (lambda m: lw.loha(m, tucker=True), _loha_ref),
    "lokr": (lambda m: lw.lokr(m), _lokr_ref),
    "lokr-w1ab": (lambda m: lw.lokr(m, decompose_w1=True), _lokr_ref),
    "lokr-full": (lambda m: lw.lokr(m, decompose_w2=False), _lokr_ref),
    "lokr-tucker": (lambda m: lw.lokr(m, tucker=True), _lokr_ref),
}


@pytest.mark.parametrize("layout", sorted(LYCORIS))
def test_lycoris_merge_matches_formula(sd1_folder: Path, tmp_path: Path, layout: str) -> None:
    table = _tables(_pipe(sd1_folder))
    names = {"unet": UNET_MODULES, "text_encoder": TEXT_MODULES}
    mods = _modules(table, names)
    write, ref = LYCORIS[layout]
    tensors = write(mods)
    path = lw.save(tensors, tmp_path / f"{layout}.safetensors")
    ours, res = _merge(table, path, -0.5)
    assert len(res.targets) == len(UNET_MODULES) + len(TEXT_MODULES)
    for comp, ms in mods.items():
        for name, shape in ms.items():
            key = lw.KOHYA_PREFIX[comp] + lw._text(comp, name).replace(".", "_")
            target = f"{comp}:{name}.weight"
            expected = table[target] + -0.5 * ref(tensors, key, shape)
            assert (ours[target] - expected).abs().max().item() <= 1e-5, target


# Unload, stacking, caching.


def test_merger_unload_is_bit_identical_stacks_and_does_not_remerge(sd1_folder: Path, tmp_path: Path) -> None:
    table = _tables(_pipe(sd1_folder))
    half = {k: v.to(torch.float16) for k, v in table.items()}  # fp16: subtracting would not be exact
    mods = _modules(table, {"unet": UNET_MODULES, "text_encoder": TEXT_MODULES})
    a = resolve(read_lora(lw.save(lw.kohya(mods, seed=1), tmp_path / "a.safetensors")), _shapes(half))
    b = resolve(read_lora(lw.save(lw.peft(mods, seed=2), tmp_path / "b.safetensors")), _shapes(half))
    live = {k: v.clone() for k, v in half.items()}
    storage = {k: v.data_ptr() for k, v in live.items()}
    merger = LoraMerger(live)
    assert merger.set([(a, 0.7), (b, -0.5)]) and merger.merges == 1
    expected = {k: v.clone() for k, v in half.items()}
    restore(expected, apply(expected, {k: d for k, d in deltas(a, 0.7).items()}))  # apply/restore round trip
    assert all(torch.equal(expected[k], half[k]) for k in half)
    da, db = deltas(a, 0.7), deltas(b, -0.5)
    for k in da:  # additive: W + ΔA + ΔB, in float32, cast once
        assert torch.equal(live[k], (half[k].float() + (da[k] + db[k])).half()), k
    assert not merger.set([(a, 0.7), (b, -0.5)]) and merger.merges == 1  # same set: no work
    assert merger.set([(a, 0.7)]) and merger.merges == 2
    assert all(torch.equal(live[k], (half[k].float() + da[k]).half()) for k in da)
    assert merger.unload() and not merger.unload()
    assert all(torch.equal(live[k], half[k]) for k in half)
    assert all(live[k].data_ptr() == storage[k] for k in live)  # in place: compiled programs see it


# Bad input: clear errors, nothing changed.


def test_truncated_and_code_pickles_are_refused(tmp_path: Path) -> None:
    good = lw.save(lw.kohya({"unet": {"conv_in": (32, 4, 3, 3)}}), tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        read_lora(cut)
    cut_pt = lw.save(lw.kohya({"unet": {"conv_in": (32, 4, 3, 3)}}), tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(cut_pt.read_bytes()[:200])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        read_lora(tmp_path / "cut.pt")
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(AdapterError, match="run code"):
        read_lora(tmp_path / "evil.pt")
    with pytest.raises(AdapterError, match="run code"):
        read_embedding(tmp_path / "evil.pt")
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize(("extra", "message"), [
    ({"lora_unet_conv_in.dora_scale": torch.ones(32, 1, 1, 1)}, "DoRA"),
    ({"lora_unet_conv_out.on_input": torch.ones(1), "lora_unet_conv_out.weight": torch.ones(4)}, "IA3"),
    ({"lora_unet_conv_out.oft_blocks": torch.ones(4, 1, 1)}, "OFT"),
    ({"lora_unet_conv_in.lora_up.weight": torch.ones(32, 3, 1, 1)}, "mismatched ranks"),
    ({"lora_unet_conv_in.lora_down.weight": torch.full((4, 4, 3, 3), float("nan"))}, "NaN"),
    ({"lora_unet_conv_in.lora_down.weight": torch.full((4, 4, 3, 3), float("inf"))}, "NaN or Inf"),
])
def test_bad_lora_files(tmp_path: Path, extra: dict[str, Tensor], message: str) -> None:
    tensors = {**lw.kohya({"unet": {"conv_in": (32, 4, 3, 3)}}), **extra}
    with pytest.raises(AdapterError, match=message):
        read_lora(lw.save(tensors, tmp_path / "bad.safetensors"))


def test_sd1_lora_on_sdxl_lists_unmatched_keys(sd1_folder: Path, sdxl_folder: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    table = _tables(_pipe(sd1_folder))
    path = lw.save(lw.kohya(_modules(table, {"unet": UNET_MODULES})), tmp_path / "sd1.safetensors")
    xl = {f"unet:{k}": tuple(v.shape) for k, v in UNet2DConditionModel.from_pretrained(sdxl_folder / "unet")
          .state_dict().items()}
    with pytest.raises(AdapterError, match="do not fit this model") as info:
        resolve(read_lora(path), xl)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in str(info.value)
    good = lw.kohya(_modules(table, {"unet": UNET_MODULES}))
    typo = {k.replace("attn1_to_q", "attn1_to_qq"): v for k, v in good.items()}
    with pytest.raises(AdapterError, match=r"unmatched \(1\): lora_unet_.*attn1_to_qq"):
        resolve(read_lora(lw.save(typo, tmp_path / "typo.safetensors")), _shapes(table))


# Textual inversion.


def test_embeddings_each_format(tmp_path: Path) -> None:
    v = torch.randn(3, 32)
    a = read_embedding(lw.a1111_embedding(v, tmp_path / "style.pt"))
    assert a.token == "style" and torch.equal(a.vectors["text_encoder"], v) and a.num_vectors == 3
    assert a.a1111_hash == __import__("hashlib").sha256((tmp_path / "style.pt").read_bytes()).hexdigest()[:12]
    b = read_embedding(lw.save({"emb_params": v}, tmp_path / "p.safetensors"), token="tok")
    assert b.token == "tok" and torch.equal(b.vectors["text_encoder"], v)
    xl = read_embedding(lw.save({"clip_l": v, "clip_g": torch.randn(3, 48)}, tmp_path / "xl.safetensors"))
    assert xl.for_encoders({"text_encoder": 32, "text_encoder_2": 48})["text_encoder_2"].shape == (3, 48)
    with pytest.raises(AdapterError, match="width 32 for text_encoder, the model's is 48"):
        a.for_encoders({"text_encoder": 48})
    with pytest.raises(AdapterError, match="is for text encoders"):
        xl.for_encoders({"text_encoder": 32})
    d = read_embedding(lw.save({"<cat>": v[0]}, tmp_path / "learned_embeds.safetensors"))
    assert d.token == "<cat>" and d.vectors["text_encoder"].shape == (1, 32)
    with pytest.raises(AdapterError, match="NaN"):
        read_embedding(lw.save({"emb_params": v * float("nan")}, tmp_path / "nan.safetensors"))


@pytest.mark.parametrize("fmt", ["a1111", "diffusers"])
def test_embedding_matches_diffusers_load_textual_inversion(sd1_folder: Path, tmp_path: Path, fmt: str) -> None:
    pipe = _pipe(sd1_folder)
    v = torch.randn(2, 32)
    if fmt == "a1111":
        path = lw.a1111_embedding(v, tmp_path / "mystyle.pt", name="mystyle")
        pipe.load_textual_inversion(str(path), token="mystyle")
    else:
        path = lw.save({"mystyle": v}, tmp_path / "learned_embeds.safetensors")
        pipe.load_textual_inversion(str(path))
    ours = read_embedding(path)
    assert ours.token == "mystyle" and ours.token_names() == ["mystyle", "mystyle_1"]
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = [pipe.tokenizer.convert_tokens_to_ids(t) for t in ours.token_names()]
    assert torch.equal(table[ids].detach(), ours.vectors["text_encoder"])


# SDXL: lora_te1_ / lora_te2_, and kohya's SGM spelling of the UNet blocks.

XL_SGM = {  # diffusers name -> SGM name (1 resnet per level: input block 1 + level·2 + j)
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.attentions.0.proj_out": "output_blocks.0.1.proj_out",
}


@pytest.mark.parametrize("sgm", [False, True])
def test_sdxl_kohya_matches_diffusers(sdxl_folder: Path, tmp_path: Path, sgm: bool) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    comps = ("unet", "text_encoder", "text_encoder_2")
    table = _tables(pipe, comps)
    # Real kohya SDXL files are all-SGM; diffusers renumbers a mix wrongly: the extra block is diffusers-only.
    extra = () if sgm else ("down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_v",)
    # diffusers silently drops a text encoder `v_proj` LoRA here (our resolve would not), so none is used.
    names = {"unet": (*XL_SGM, *extra), "text_encoder": TEXT_MODULES,
             "text_encoder_2": ("text_model.encoder.layers.2.self_attn.out_proj",
                                "text_model.encoder.layers.0.mlp.fc2")}
    tensors = lw.kohya(_modules(table, names), sdxl=True, sgm=XL_SGM if sgm else None)
    path = lw.save(tensors, tmp_path / "xl.safetensors")
    ours, res = _merge(table, path, 0.6)
    assert res.report() == {"unet": len(XL_SGM) + len(extra), "text_encoder": 3, "text_encoder_2": 2}
    _compare(ours, _fused(pipe, path, 0.6, comps), {t for _, t, _ in res.targets})
