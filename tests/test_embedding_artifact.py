"""Textual inversion in an artifact without a rebuild: the exported text encoders take token vectors and
the runtime owns the token tables (runtime/token_tables.py). Every format, SD 1.x and SDXL (clip_l +
clip_g), refit with new embeddings, and artifacts built before (ids-fed, format 1) still loading.
Images against diffusers' `load_textual_inversion`; float32 images within 1e-3 max abs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lora_writer as lw
import pytest
import torch
from click.testing import CliRunner
from test_lora_pipeline import NEG, OPTIONS, STEPS, TOL, H, W, _err, _image, _lat

import runtime
from runtime.adapters import AdapterError
from runtime.manifest import ArtifactError
from sdexport import StableDiffusion
from sdexport.cli import main
from sdexport.export import build as build_module
from sdexport.export.refit import refit

PROMPT = "a fox in mystyle, snow"


def _emb(tmp: Path, width: int = 32, n: int = 2, seed: int = 3, name: str = "mystyle") -> Path:
    v = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    return lw.a1111_embedding(v, tmp / f"{name}.pt", name=name)


def _xl_emb(tmp: Path, seed: int = 4) -> Path:
    g = torch.Generator().manual_seed(seed)
    return lw.save({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)},
                   tmp / "mystyle.safetensors")


def _reference(folder: Path, emb: Path, xl: bool = False) -> torch.Tensor:
    """diffusers with the embedding (SDXL: clip_l into text_encoder, clip_g into text_encoder_2)."""
    import diffusers as d
    from safetensors.torch import load_file

    if xl:
        pipe: Any = d.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
        state = load_file(str(emb))
        pipe.load_textual_inversion(state["clip_l"], token=emb.stem, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=emb.stem, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    else:
        pipe = d.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.load_textual_inversion(str(emb), token=emb.stem)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = d.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe(prompt=PROMPT, negative_prompt=NEG, num_inference_steps=STEPS, guidance_scale=7.5, height=H,
                width=W, latents=_lat(), output_type="pt").images.float()


@pytest.fixture(scope="module")
def ref(sd1_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    path = _emb(tmp_path_factory.mktemp("emb"))
    return path, _reference(sd1_folder, path)


@pytest.fixture(scope="module")
def art(sd1_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return StableDiffusion.from_pretrained(sd1_folder).export(tmp_path_factory.mktemp("art") / "a", **OPTIONS)


def _old_form(sd: StableDiffusion, out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An artifact as built before token tables: encoders fed ids, format version 1."""
    with monkeypatch.context() as m:
        m.setattr(build_module, "TOKEN_TABLES", False)
        return sd.export(out, **OPTIONS)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "onnx"])
def test_embedding_loaded_into_artifact_matches_diffusers(sd1_folder: Path, art: Path,
                                                          ref: tuple[Path, torch.Tensor], tmp_path: Path,
                                                          fmt: str) -> None:
    path, want = ref
    root = art if fmt == "pt2" else StableDiffusion.from_pretrained(sd1_folder).export(
        tmp_path / fmt, **{**OPTIONS, "format": fmt})
    m = json.loads((root / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["modules"]["text_encoder"]["tokens"] == "text_encoder.tokens.safetensors"
    pipe = runtime.load(root)
    plain = _image(pipe, PROMPT)
    assert _err(plain, want) > 10 * TOL
    # a failed load changes nothing: a word of the vocabulary, a width for another model
    with pytest.raises(AdapterError, match="is a word of the tokenizer already"):
        pipe.load_embedding(_emb(tmp_path, name="fox"))
    with pytest.raises(AdapterError, match="width 48 for text_encoder"):
        pipe.load_embedding(_emb(tmp_path, width=48, name="wide"))
    assert torch.equal(_image(pipe, PROMPT), plain) and pipe.embeddings == {}
    pipe.load_embedding(path)  # not built in: new rows in the runtime's token table
    assert _err(_image(pipe, PROMPT), want) <= TOL
    lazy = runtime.load(root, embeddings_dir=path.parent)  # by name in the prompt
    assert _err(_image(lazy, PROMPT), want) <= TOL and list(lazy.embeddings) == ["mystyle"]


def test_sd2_embedding_loaded_into_artifact_matches_diffusers(sd2_folder: Path, tmp_path: Path) -> None:
    path = _emb(tmp_path, width=48)
    want = _reference(sd2_folder, path)
    pipe = runtime.load(StableDiffusion.from_pretrained(sd2_folder).export(tmp_path / "sd2", **OPTIONS))
    pipe.load_embedding(path)
    assert _err(_image(pipe, PROMPT), want) <= TOL


def test_sdxl_embedding_eager_and_artifact_match_diffusers(sdxl_folder: Path, tmp_path: Path) -> None:
    path = _xl_emb(tmp_path)
    want = _reference(sdxl_folder, path, xl=True)
    sd = StableDiffusion.from_pretrained(sdxl_folder)
    root = sd.export(tmp_path / "xl", **OPTIONS)
    assert set(runtime.load(root).backend.manifest.token_tables) == {"text_encoder", "text_encoder_2"}  # type: ignore[attr-defined]
    sd.load_embedding(path)
    assert _err(_image(sd, PROMPT), want) <= TOL
    pipe = runtime.load(root)
    plain = _image(pipe, PROMPT)
    with pytest.raises(AdapterError, match="is for text encoders"):  # an SD 1.x embedding on SDXL
        pipe.load_embedding(_emb(tmp_path, name="sd1style"))
    assert torch.equal(_image(pipe, PROMPT), plain)
    pipe.load_embedding(path)
    assert _err(_image(pipe, PROMPT), want) <= TOL


def test_refit_with_new_embedding_and_cli(sd1_folder: Path, art: Path, ref: tuple[Path, torch.Tensor],
                                          tmp_path: Path) -> None:
    path, want = ref
    sd = StableDiffusion.from_pretrained(sd1_folder)
    sd.load_embedding(path)  # the artifact was built without it
    refit(art, sd, tmp_path / "r")
    assert _err(_image(runtime.load(tmp_path / "r"), PROMPT), want) <= TOL
    r = CliRunner().invoke(main, ["refit", str(art), str(sd1_folder), "-o", str(tmp_path / "c"),
                                  "--embedding", str(path)])
    assert r.exit_code == 0, r.output
    pipe = runtime.load(tmp_path / "c")
    assert _err(_image(pipe, PROMPT), want) <= TOL
    pipe.load_embedding(path)  # built in now: the same vectors again, no error
    assert _err(_image(pipe, PROMPT), want) <= TOL
    r = CliRunner().invoke(main, ["generate", str(art), "-p", PROMPT, "--steps", "1", "-W", "64", "-H", "64",
                                  "-s", "1", "--embedding", str(path), "-o", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert 'TI hashes: "mystyle: ' in Image.open(tmp_path / "png" / "1.png").info["parameters"]


def test_artifact_built_before_token_tables_still_loads(sd1_folder: Path, art: Path, ref: tuple[Path, torch.Tensor],
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, want = ref
    sd = StableDiffusion.from_pretrained(sd1_folder)
    old = _old_form(sd, tmp_path / "old", monkeypatch)
    m = json.loads((old / "manifest.json").read_text())
    assert m["format_version"] == 1 and "tokens" not in m["modules"]["text_encoder"]
    pipe = runtime.load(old)
    assert _err(_image(pipe), _image(runtime.load(art))) <= 1e-6
    with pytest.raises(AdapterError, match="needs a rebuild: `sdexport build MODEL --embedding FILE`"):
        pipe.load_embedding(path)
    refit(old, StableDiffusion.from_pretrained(sd1_folder), tmp_path / "r")  # same tokens: fine
    sd.load_embedding(path)
    with pytest.raises(ValueError, match="rebuild with `sdexport build --embedding`"):
        refit(old, sd, tmp_path / "r2")
    built = _old_form(sd, tmp_path / "old-emb", monkeypatch)  # built in: served, and loading it again is fine
    pipe = runtime.load(built)
    pipe.load_embedding(path)
    assert _err(_image(pipe, PROMPT), want) <= TOL


def test_manifest_token_tables_are_checked(art: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 1  # says ids-fed, but lists token tables
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 1 with token tables"):
        runtime.load(bad)
    m["format_version"] = 3
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"format version 3 is not supported.*reads 1, 2"):
        runtime.load(bad)
