"""LoRAs and embeddings through the product: eager `load_lora`, `build --lora`, `refit --lora`,
`runtime.load(...).load_lora(...)` (no recompile), prompt tags, unload, bad input; images against
diffusers' `load_lora_weights` + `fuse_lora` and `load_textual_inversion` on tiny random models.

Tolerance: float32 images (in [0, 1]) within 1e-3 max abs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lora_writer as lw
import pytest
import torch
from click.testing import CliRunner
from test_adapters import TEXT_MODULES, UNET_MODULES, _Evil

import runtime
from runtime.adapters import AdapterError
from sdexport import StableDiffusion
from sdexport.cli import main
from sdexport.export.refit import refit

TOL = 1e-3
H = W = 64
STEPS = 3
PROMPT = "a photo of a red fox in the snow"
NEG = "blurry"
SCALES = (1.0, 0.6, -0.5)
OPTIONS = dict(format="pt2", kernels="native", max_batch=1, min_size=64, max_size=64, max_chunks=1)


def _lat() -> torch.Tensor:
    return torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))


def _image(pipe: Any, prompt: str = PROMPT) -> torch.Tensor:
    out = pipe.text2img(prompt, NEG, steps=STEPS, height=H, width=W, latents=_lat(), scheduler="euler",
                        output="tensor")
    assert isinstance(out, torch.Tensor)
    return out


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().item())


def _reference(folder: Path, lora: Path | None = None, scale: float = 1.0, emb: Path | None = None,
               prompt: str = PROMPT, xl: bool = False) -> torch.Tensor:
    import diffusers as d

    cls = d.StableDiffusionXLPipeline if xl else d.StableDiffusionPipeline
    extra: dict[str, Any] = {"add_watermarker": False} if xl else {"safety_checker": None,
                                                                     "requires_safety_checker": False}
    pipe = cls.from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = d.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if lora is not None:
        comps = ["unet", "text_encoder", *(["text_encoder_2"] if xl else [])]
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(lora_scale=scale, components=comps)
        pipe.unload_lora_weights()
    if emb is not None:
        pipe.load_textual_inversion(str(emb), token=emb.stem)
    return pipe(prompt=prompt, negative_prompt=NEG, num_inference_steps=STEPS, guidance_scale=7.5, height=H,
                width=W, latents=_lat(), output_type="pt").images.float()


@functools.cache
def _cached_reference(folder: Path, lora: Path | None, scale: float) -> torch.Tensor:
    return _reference(folder, lora, scale)


@pytest.fixture(scope="module")
def loras(sd1_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kohya (LoCon 3x3 convs and text-encoder modules, alpha) and PEFT files in one lora_dir."""
    sd = StableDiffusion.from_pretrained(sd1_folder)
    shapes = {f"unet.{k}": tuple(v.shape) for k, v in sd.unet.state_dict().items()}
    assert sd.text_encoder is not None
    shapes |= {f"text_encoder.{k}": tuple(v.shape) for k, v in sd.text_encoder.state_dict().items()}
    mods = {c: {n: shapes[f"{c}.{n}.weight"] for n in ns}
            for c, ns in (("unet", UNET_MODULES), ("text_encoder", TEXT_MODULES))}
    root = tmp_path_factory.mktemp("loras")
    return {"kohya": lw.save(lw.kohya(mods, rank=4, alpha=2.0), root / "kohya.safetensors"),
            "peft": lw.save(lw.peft(mods, rank=4, seed=1), root / "peft.safetensors")}


@pytest.fixture(scope="module")
def base_art(sd1_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return StableDiffusion.from_pretrained(sd1_folder).export(tmp_path_factory.mktemp("art") / "base", **OPTIONS)


@pytest.fixture()
def no_compile(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any export or compile entry point raises: a LoRA swap must need none."""
    import torch._inductor
    import torch._inductor.compile_fx

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("compiled during a LoRA swap")

    for owner, name in ((torch.export, "export"), (torch, "compile"), (torch._inductor, "aoti_compile_and_package"),
                        (torch._inductor, "compile"), (torch._inductor.compile_fx, "compile_fx")):
        monkeypatch.setattr(owner, name, boom)
    yield


# ---- parity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_eager_load_lora_matches_diffusers(sd1_folder: Path, loras: dict[str, Path], layout: str,
                                           scale: float) -> None:
    sd = StableDiffusion.from_pretrained(sd1_folder)
    base = _image(sd)
    info = sd.load_lora(loras[layout], scale)
    assert info.report == {"unet": len(UNET_MODULES), "text_encoder": len(TEXT_MODULES)}
    assert [x.name for x in sd.loras] == [layout]
    img = _image(sd)
    assert _err(img, _cached_reference(sd1_folder, loras[layout], scale)) <= TOL
    assert _err(img, base) > 10 * TOL
    sd.unload_loras()
    assert torch.equal(_image(sd), base) and sd.loras == []


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_artifact_hot_swap_matches_diffusers(sd1_folder: Path, base_art: Path, loras: dict[str, Path],
                                             layout: str, scale: float, no_compile: None) -> None:
    pipe = runtime.load(base_art)
    base = _image(pipe)
    pipe.load_lora(loras[layout], scale)
    assert _err(_image(pipe), _cached_reference(sd1_folder, loras[layout], scale)) <= TOL
    pipe.unload_loras()
    assert torch.equal(_image(pipe), base)


def test_aoti_hot_swap_and_exact_unload(sd1_folder: Path, loras: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    art = StableDiffusion.from_pretrained(sd1_folder).export(tmp_path / "aoti", **{**OPTIONS, "format": "aoti"})
    pipe = runtime.load(art)
    base = _image(pipe)
    no = pytest.MonkeyPatch()
    with no.context() as m:
        import torch._inductor

        m.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: pytest.fail("recompiled"))
        m.setattr(torch.export, "export", lambda *a, **k: pytest.fail("re-exported"))
        pipe.load_lora(loras["kohya"], 0.6)
        assert _err(_image(pipe), _cached_reference(sd1_folder, loras["kohya"], 0.6)) <= TOL
        pipe.load_lora(loras["peft"], -0.5)  # swap on top, then back
        pipe.unload_loras()
        assert torch.equal(_image(pipe), base)
        emb = lw.a1111_embedding(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)),
                                 tmp_path / "mystyle.pt", name="mystyle")
        pipe.load_embedding(emb)  # textual inversion with no rebuild: rows in the runtime's token table
        prompt = "a fox in mystyle, snow"
        assert _err(_image(pipe, prompt), _reference(sd1_folder, emb=emb, prompt=prompt)) <= TOL


@pytest.mark.parametrize(("layout", "scale"), [("kohya", 0.6), ("peft", -0.5), ("kohya", 1.0)])
def test_build_with_lora_matches_diffusers(sd1_folder: Path, loras: dict[str, Path], tmp_path: Path,
                                           layout: str, scale: float) -> None:
    sd = StableDiffusion.from_pretrained(sd1_folder)
    sd.load_lora(loras[layout], scale)
    art = sd.export(tmp_path / "art", **OPTIONS)
    assert _err(_image(runtime.load(art)), _cached_reference(sd1_folder, loras[layout], scale)) <= TOL


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_refit_with_lora_matches_diffusers(sd1_folder: Path, base_art: Path, loras: dict[str, Path],
                                           tmp_path: Path, layout: str, scale: float, no_compile: None) -> None:
    sd = StableDiffusion.from_pretrained(sd1_folder)
    sd.load_lora(loras[layout], scale)
    refit(base_art, sd, tmp_path / "refit")
    assert _err(_image(runtime.load(tmp_path / "refit")), _cached_reference(sd1_folder, loras[layout], scale)) <= TOL


def test_cli_build_refit_and_generate_with_lora(sd1_folder: Path, base_art: Path, loras: dict[str, Path],
                                                tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["refit", str(base_art), str(sd1_folder), "-o", str(tmp_path / "r"),
                             "--lora", f"{loras['kohya']}:0.6"])
    assert r.exit_code == 0, r.output
    assert _err(_image(runtime.load(tmp_path / "r")), _cached_reference(sd1_folder, loras["kohya"], 0.6)) <= TOL
    r = runner.invoke(main, ["generate", str(base_art), "-p", "a fox <lora:kohya:0.6>", "--steps", "2", "-W", "64",
                             "-H", "64", "-s", "1", "--lora-dir", str(loras["kohya"].parent),
                             "--lora", str(loras["peft"]), "-o", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    from PIL import Image

    text = Image.open(tmp_path / "png" / "1.png").info["parameters"]
    assert 'Lora hashes: "peft: ' in text and ", kohya: " in text and "<lora:kohya:0.6>" in text
    r = runner.invoke(main, ["build", str(sd1_folder), "-o", str(tmp_path / "b"), "--format", "pt2", "--kernels",
                             "native", "--max-batch", "1", "--min-size", "64", "--max-size", "64", "--max-chunks",
                             "1", "--lora", f"{loras['peft']}:-0.5"])
    assert r.exit_code == 0, r.output
    assert _err(_image(runtime.load(tmp_path / "b")), _cached_reference(sd1_folder, loras["peft"], -0.5)) <= TOL
    r = runner.invoke(main, ["generate", str(base_art), "-p", "x <lora:missing>", "--lora-dir",
                             str(loras["kohya"].parent), "-o", str(tmp_path / "png")])
    assert r.exit_code != 0 and "no LoRA named 'missing'" in r.output


def test_tag_and_option_parsing_and_png_fields() -> None:
    from runtime.adapters.session import parse_tags
    from runtime.png import Parameters, format_parameters
    from sdexport.cli import _lora_spec

    assert parse_tags("a <lora:x:0.5> b<lora:y>") == ("a  b", [("x", 0.5, 0.5), ("y", 1.0, 1.0)])
    assert _lora_spec("C:/l/x.safetensors:0.7") == (Path("C:/l/x.safetensors"), 0.7)
    assert _lora_spec("C:/l/x.safetensors") == (Path("C:/l/x.safetensors"), 1.0)
    text = format_parameters(Parameters("p", "", 20, "euler", 7.0, 1, 512, 512, lora_hashes="a: 0123, b: 4567",
                                        ti_hashes="emb: 89ab"))
    assert text.endswith('Lora hashes: "a: 0123, b: 4567", TI hashes: "emb: 89ab"')


# ---- stacking, tags, no re-merge ------------------------------------------------------------------

def test_two_loras_stack_additively(sd1_folder: Path, base_art: Path, loras: dict[str, Path]) -> None:
    from runtime.adapters import deltas, read_lora, resolve
    from runtime.adapters.session import PREFIXES

    pipe = runtime.load(base_art)
    weights = pipe.backend.adapter_weights()  # type: ignore[attr-defined]
    before = {k: v.clone() for k, v in weights.items()}
    pipe.load_lora(loras["kohya"], 0.6)
    pipe.load_lora(loras["peft"], -0.5)
    shapes = {k: tuple(v.shape) for k, v in before.items()}
    d1 = deltas(resolve(read_lora(loras["kohya"]), shapes, PREFIXES), 0.6)
    d2 = deltas(resolve(read_lora(loras["peft"]), shapes, PREFIXES), -0.5)
    for k in d1:
        assert _err(weights[k], before[k] + d1[k] + d2[k]) <= 1e-6, k
    assert [(x.name, x.scale) for x in pipe.loras] == [("kohya", 0.6), ("peft", -0.5)]
    pipe.unload_loras()
    assert all(torch.equal(weights[k], before[k]) for k in before)


def test_prompt_tags_equal_explicit_load_and_do_not_remerge(sd1_folder: Path, base_art: Path,
                                                            loras: dict[str, Path], no_compile: None) -> None:
    explicit = runtime.load(base_art)
    explicit.load_lora(loras["kohya"], 0.6)
    want = _image(explicit)
    pipe = runtime.load(base_art, lora_dir=loras["kohya"].parent)
    base = _image(pipe)
    assert torch.equal(_image(pipe, f"{PROMPT} <lora:kohya:0.6>"), want)
    merges = pipe.lora_merges
    _image(pipe, f"<lora:kohya:0.6>{PROMPT}")  # same set: no merge
    assert pipe.lora_merges == merges
    assert [(x.name, x.tag) for x in pipe.loras] == [("kohya", True)]
    assert torch.equal(_image(pipe), base)  # no tags: the tag LoRA is out again
    with pytest.raises(AdapterError, match=r"different <lora:\.\.\.> tags"):
        pipe.text2img([f"{PROMPT} <lora:kohya:0.6>", PROMPT], steps=1, height=H, width=W)
    for bad, msg in (("<lora:../kohya:1>", "no paths"), ("<lora:nope:1>", "no LoRA named 'nope'"),
                     ("<lora:kohya:x>", "must be numbers")):
        with pytest.raises(AdapterError, match=msg):
            pipe.text2img(bad, steps=1, height=H, width=W)
    # explicit and tag LoRAs combine
    pipe.load_lora(loras["peft"], -0.5)
    explicit.load_lora(loras["peft"], -0.5)
    assert torch.equal(_image(pipe, f"{PROMPT} <lora:kohya:0.6>"), _image(explicit))


def test_torchscript_artifact_refuses_hot_swap(base_art: Path, loras: dict[str, Path]) -> None:
    import dataclasses

    pipe = runtime.load(base_art)
    be: Any = pipe.backend
    be.manifest = dataclasses.replace(be.manifest, format="torchscript")
    with pytest.raises(AdapterError, match=r"needs an aoti or pt2 artifact.*use `sdexport build --lora`"):
        pipe.load_lora(loras["kohya"])


# ---- bad input leaves the pipeline unchanged ------------------------------------------------------

def test_bad_files_leave_the_pipeline_unchanged(sd1_folder: Path, sdxl_folder: Path, loras: dict[str, Path],
                                                tmp_path: Path) -> None:
    sd = StableDiffusion.from_pretrained(sd1_folder)
    sd.load_lora(loras["kohya"], 0.6)
    before = {k: v.clone() for k, v in sd.backend.adapter_weights().items()}
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(loras["kohya"].read_bytes()[:-100])
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, tmp_path / "evil.pt")
    good = lw.kohya({"unet": {"conv_in": (32, 4, 3, 3)}})
    ranks = lw.save({**good, "lora_unet_conv_in.lora_up.weight": torch.ones(32, 3, 1, 1)}, tmp_path / "r.safetensors")
    nan = lw.save({**good, "lora_unet_conv_in.lora_down.weight": torch.full((4, 4, 3, 3), float("nan"))},
                  tmp_path / "nan.safetensors")
    for path, msg in ((cut, "truncated or corrupt"), (tmp_path / "evil.pt", "run code"),
                      (ranks, "mismatched ranks"), (nan, "NaN")):
        with pytest.raises(AdapterError, match=msg):
            sd.load_lora(path)
    assert not marker.exists()
    after = sd.backend.adapter_weights()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [x.name for x in sd.loras] == ["kohya"]
    xl = StableDiffusion.from_pretrained(sdxl_folder)
    xl_before = {k: v.clone() for k, v in xl.backend.adapter_weights().items()}
    with pytest.raises(AdapterError, match="do not fit this model"):
        xl.load_lora(loras["kohya"])
    assert all(torch.equal(v, xl_before[k]) for k, v in xl.backend.adapter_weights().items())


# ---- SDXL -------------------------------------------------------------------------------------

def test_sdxl_eager_lora_matches_diffusers(sdxl_folder: Path, tmp_path: Path) -> None:
    from test_adapters import XL_SGM

    sd = StableDiffusion.from_pretrained(sdxl_folder)
    table = {k: tuple(v.shape) for k, v in sd.backend.adapter_weights().items()}
    names = {"unet": tuple(XL_SGM), "text_encoder": TEXT_MODULES,
             "text_encoder_2": ("text_model.encoder.layers.0.mlp.fc2",)}
    mods = {c: {n: table[f"{c}.{n}.weight"] for n in ns} for c, ns in names.items()}
    path = lw.save(lw.kohya(mods, sdxl=True, sgm=XL_SGM), tmp_path / "xl.safetensors")
    sd.load_lora(path, 0.6)
    ref = _reference(sdxl_folder, path, 0.6, xl=True)
    assert _err(_image(sd), ref) <= TOL


# ---- textual inversion --------------------------------------------------------------------------

def test_embedding_eager_build_and_dir_match_diffusers(sd1_folder: Path, tmp_path: Path) -> None:
    path = lw.a1111_embedding(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)),
                              tmp_path / "mystyle.pt", name="mystyle")
    prompt = "a fox in mystyle, snow"
    ref = _reference(sd1_folder, emb=path, prompt=prompt)
    sd = StableDiffusion.from_pretrained(sd1_folder)
    plain = _image(sd, prompt)
    sd.load_embedding(path)
    assert _err(_image(sd, prompt), ref) <= TOL and _err(plain, ref) > 10 * TOL
    art = sd.export(tmp_path / "art", **OPTIONS)  # built in: the token table and the tokenizer
    pipe = runtime.load(art, embeddings_dir=tmp_path)
    assert _err(_image(pipe, prompt), ref) <= TOL
    img = pipe.text2img(prompt, steps=1, height=H, width=W, seed=1)
    assert isinstance(img, list) and 'TI hashes: "mystyle: ' in img[0].info["parameters"]
    lazy = StableDiffusion.from_pretrained(sd1_folder, embeddings_dir=tmp_path)
    assert _err(_image(lazy, prompt), ref) <= TOL and list(lazy.embeddings) == ["mystyle"]
    # without a rebuild (tests/test_embedding_artifact.py): a refit to the plain model drops the token
    refit(art, StableDiffusion.from_pretrained(sd1_folder), tmp_path / "r")
    assert _err(_image(runtime.load(tmp_path / "r"), prompt), plain) <= TOL
