"""LoRA through the product, beyond kohya / PEFT on SD 1.x (tests/test_lora_pipeline.py): LyCORIS LoHa /
LoKr images against the LyCORIS formulas, SDXL LoRA through an artifact, A1111's separate text-encoder /
UNet multipliers, and bad input on a loaded artifact. Float32 images within 1e-3 max abs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lora_writer as lw
import pytest
import torch
from test_adapters import LYCORIS, TEXT_MODULES, UNET_MODULES, XL_SGM, _Evil
from test_lora_pipeline import NEG, OPTIONS, PROMPT, STEPS, TOL, H, W, _err, _image, _lat, _reference

import runtime
from runtime.adapters import AdapterError
from runtime.adapters.session import parse_tags
from sdexport import StableDiffusion


def _diffusers(folder: Path) -> Any:
    import diffusers as d

    pipe = d.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = d.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def _run(pipe: Any, prompt: str = PROMPT) -> torch.Tensor:
    return pipe(prompt=prompt, negative_prompt=NEG, num_inference_steps=STEPS, guidance_scale=7.5, height=H,
                width=W, latents=_lat(), output_type="pt").images.float()  # type: ignore[no-any-return]


def _mods(sd: StableDiffusion, names: dict[str, tuple[str, ...]]) -> lw.Modules:
    table = {k: tuple(v.shape) for k, v in sd.backend.adapter_weights().items()}
    return {c: {n: table[f"{c}.{n}.weight"] for n in ns} for c, ns in names.items()}


@pytest.fixture(scope="module")
def base_art(sd1_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return StableDiffusion.from_pretrained(sd1_folder).export(tmp_path_factory.mktemp("art") / "base", **OPTIONS)


@pytest.mark.parametrize(("layout", "scale"), [("loha-tucker", 0.6), ("lokr-tucker", -0.5), ("lokr-full", 1.0)])
def test_lycoris_images_match_the_formula(sd1_folder: Path, base_art: Path, tmp_path: Path, layout: str,
                                          scale: float) -> None:
    """Reference: diffusers' pipeline with W + scale · ΔW, ΔW from the LyCORIS paper's formulas
    (LoHa: Hadamard product of two low-rank products; LoKr: Kronecker product; Tucker cores for convs)."""
    sd = StableDiffusion.from_pretrained(sd1_folder)
    mods = _mods(sd, {"unet": UNET_MODULES, "text_encoder": TEXT_MODULES})
    write, formula = LYCORIS[layout]
    # LoKr's products of small random factors barely move an image: W1 x 10 (ΔW = W1 ⊗ W2 is linear in it)
    tensors = {k: v * 10 if k.endswith((".lokr_w1", ".lokr_w1_a")) else v for k, v in write(mods).items()}
    path = lw.save(tensors, tmp_path / f"{layout}.safetensors")
    ref = _diffusers(sd1_folder)
    with torch.no_grad():
        for comp, ms in mods.items():
            for name, shape in ms.items():
                key = lw.KOHYA_PREFIX[comp] + lw._text(comp, name).replace(".", "_")
                getattr(ref, comp).get_parameter(f"{name}.weight").add_(scale * formula(tensors, key, shape))
    want = _run(ref)
    info = sd.load_lora(path, scale)
    assert info.report == {"unet": len(UNET_MODULES), "text_encoder": len(TEXT_MODULES)}
    assert _err(_image(sd), want) <= TOL
    pipe = runtime.load(base_art)
    base = _image(pipe)
    assert _err(base, want) > 10 * TOL
    pipe.load_lora(path, scale)
    assert _err(_image(pipe), want) <= TOL
    pipe.unload_loras()
    assert torch.equal(_image(pipe), base)


def test_sdxl_lora_through_an_artifact_and_bad_input(sd1_folder: Path, sdxl_folder: Path, tmp_path: Path) -> None:
    sd = StableDiffusion.from_pretrained(sdxl_folder)
    names = {"unet": tuple(XL_SGM), "text_encoder": TEXT_MODULES,
             "text_encoder_2": ("text_model.encoder.layers.0.mlp.fc2", "text_model.encoder.layers.1.self_attn.q_proj")}
    path = lw.save(lw.kohya(_mods(sd, names), sdxl=True, sgm=XL_SGM), tmp_path / "xl.safetensors")
    art = sd.export(tmp_path / "xl-art", **OPTIONS)
    pipe = runtime.load(art)
    base = _image(pipe)
    info = pipe.load_lora(path, 0.6)  # lora_te1_ / lora_te2_ / SGM-named UNet blocks
    assert info.report == {"unet": len(XL_SGM), "text_encoder": len(TEXT_MODULES), "text_encoder_2": 2}
    assert _err(_image(pipe), _reference(sdxl_folder, path, 0.6, xl=True)) <= TOL
    # an SD 1.x LoRA on SDXL: refused, listing the keys, and the loaded LoRA stays as it was
    sd1_mods = _mods(StableDiffusion.from_pretrained(sd1_folder), {"unet": UNET_MODULES, "text_encoder": TEXT_MODULES})
    sd1 = lw.save(lw.kohya(sd1_mods), tmp_path / "sd1.safetensors")
    merged = _image(pipe)
    with pytest.raises(AdapterError, match="do not fit this model"):
        pipe.load_lora(sd1)
    assert torch.equal(_image(pipe), merged) and [x.name for x in pipe.loras] == ["xl"]
    pipe.unload_loras()
    assert torch.equal(_image(pipe), base)


def test_bad_files_leave_a_loaded_artifact_unchanged(base_art: Path, tmp_path: Path) -> None:
    good = lw.kohya({"unet": {"conv_in": (32, 4, 3, 3)}, "text_encoder": {TEXT_MODULES[0]: (32, 32)}})
    path = lw.save(good, tmp_path / "good.safetensors")
    pipe = runtime.load(base_art)
    pipe.load_lora(path, 0.6)
    weights = pipe.backend.adapter_weights()  # type: ignore[attr-defined]
    before = {k: v.clone() for k, v in weights.items()}
    image = _image(pipe, "a fox in mystyle")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-40])
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, tmp_path / "evil.pt")
    ranks = lw.save({**good, "lora_unet_conv_in.lora_up.weight": torch.ones(32, 3, 1, 1)}, tmp_path / "r.safetensors")
    nan = lw.save({**good, "lora_unet_conv_in.lora_down.weight": torch.full((4, 4, 3, 3), float("nan"))},
                  tmp_path / "nan.safetensors")
    for bad, msg in ((cut, "truncated or corrupt"), (tmp_path / "evil.pt", "run code"),
                     (ranks, "mismatched ranks"), (nan, "NaN")):
        with pytest.raises(AdapterError, match=msg):
            pipe.load_lora(bad)
    emb = lw.a1111_embedding(torch.randn(1, 32), tmp_path / "mystyle.pt")
    (tmp_path / "cut.pt").write_bytes(emb.read_bytes()[:-30])
    torch.save({"emb_params": _Evil(str(marker))}, tmp_path / "evil-emb.pt")
    nan_emb = lw.a1111_embedding(torch.full((1, 32), float("nan")), tmp_path / "mystyle2.pt")
    for bad, msg in ((tmp_path / "cut.pt", "truncated or corrupt"), (tmp_path / "evil-emb.pt", "run code"),
                     (nan_emb, "NaN")):
        with pytest.raises(AdapterError, match=msg):
            pipe.load_embedding(bad, token="mystyle")
    assert not marker.exists()
    assert all(torch.equal(weights[k], before[k]) for k in before)
    assert [(x.name, x.scale) for x in pipe.loras] == [("good", 0.6)] and pipe.embeddings == {}
    assert torch.equal(_image(pipe, "a fox in mystyle"), image)


# ---- A1111's <lora:NAME:TE:UNET> --------------------------------------------------------------------

def test_a1111_tag_arguments() -> None:
    assert parse_tags("a <lora:x:0.5> b<lora:y>") == ("a  b", [("x", 0.5, 0.5), ("y", 1.0, 1.0)])
    assert parse_tags("<lora:x:0.5:0.8>")[1] == [("x", 0.5, 0.8)]
    assert parse_tags("<lora:x:te=0.3:unet=0.7>")[1] == [("x", 0.3, 0.7)]
    assert parse_tags("<lora:x:unet=0.2>")[1] == [("x", 1.0, 0.2)]  # te defaults to 1
    assert parse_tags("<lora:x:0.4:unet=0.2>")[1] == [("x", 0.4, 0.2)]
    assert parse_tags("<lora:x:te=0.4>")[1] == [("x", 0.4, 0.4)]  # unet defaults to te
    for bad, msg in (("<lora:x:1:1:8>", "dyn"), ("<lora:x:dyn=8>", "dyn"), ("<lora:x:foo=1>", "unknown argument 'foo'"),
                     ("<lora:x:0.5:y>", "must be numbers"), ("<lora::1>", "no paths"), ("<lora:a/b:1>", "no paths")):
        with pytest.raises(AdapterError, match=msg):
            parse_tags(bad)


def test_a1111_te_and_unet_multipliers_match_diffusers(sd1_folder: Path, base_art: Path,
                                                       tmp_path: Path) -> None:
    sd = StableDiffusion.from_pretrained(sd1_folder)
    mods = _mods(sd, {"unet": UNET_MODULES, "text_encoder": TEXT_MODULES})
    path = lw.save(lw.kohya(mods, rank=4, alpha=2.0), tmp_path / "style.safetensors")
    ref = _diffusers(sd1_folder)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.8, components=["unet"])
    ref.fuse_lora(lora_scale=-0.5, components=["text_encoder"])
    ref.unload_lora_weights()
    want = _run(ref)
    pipe = runtime.load(base_art, lora_dir=tmp_path)
    got = _image(pipe, f"{PROMPT} <lora:style:-0.5:0.8>")
    assert _err(got, want) <= TOL
    assert [(x.scale, x.report) for x in pipe.loras] == [(-0.5, {"text_encoder": len(TEXT_MODULES)}),
                                                         (0.8, {"unet": len(UNET_MODULES)})]
    merges = pipe.lora_merges
    assert torch.equal(_image(pipe, f"{PROMPT} <lora:style:te=-0.5:unet=0.8>"), got)  # same set: no merge
    assert pipe.lora_merges == merges
    explicit = runtime.load(base_art)
    explicit.load_lora(path, 0.8, te_scale=-0.5)
    assert torch.equal(_image(explicit), got)
    sd.load_lora(path, 0.8, te_scale=-0.5)  # eager too
    assert _err(_image(sd), want) <= TOL
    img = pipe.text2img(f"{PROMPT} <lora:style:-0.5:0.8>", steps=1, height=H, width=W, seed=1)
    assert isinstance(img, list)
    text = img[0].info["parameters"]
    assert text.count("style: ") == 1 and "<lora:style:-0.5:0.8>" in text  # one Lora hashes entry
