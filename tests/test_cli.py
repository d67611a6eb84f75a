"""The `sdexport` command as a user runs it: build, inspect, generate, bench, and its error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from runtime.manifest import FORMAT_VERSION
from sdexport.cli import main

SMALL = ["--format", "pt2", "--kernels", "native", "--min-size", "64", "--max-size", "128", "--max-batch", "1"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, sd1_folder: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "art"
    result = CliRunner().invoke(main, ["build", str(sd1_folder), "-o", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    return out


def test_inspect_prints_and_verifies(artifact: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(artifact)])
    assert result.exit_code == 0, result.output
    assert f"pt2 (version {FORMAT_VERSION})" in result.output
    assert "batch 1..1, 64..128 px in steps of 64" in result.output
    assert "verified:" in result.output and "unet.safetensors" in result.output


def test_inspect_reports_tampering(artifact: Path, tmp_path: Path) -> None:
    import shutil

    bad = shutil.copytree(artifact, tmp_path / "bad")
    (bad / "tokenizer.json").write_text("{}")
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 1
    assert "checksum mismatch in tokenizer.json" in result.output


def test_generate_from_artifact_writes_png_with_metadata(artifact: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime

    seen: dict[str, Any] = {}
    real_load = runtime.load

    def load(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(runtime, "load", load)
    result = CliRunner().invoke(main, ["generate", str(artifact), "-p", "a (red):1.2 fox", "-n", "blurry",
                                       "--steps", "2", "-W", "64", "-H", "64", "-s", "12", "--sampler", "euler",
                                       "--no-cuda-graphs", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["cuda_graphs"] is False
    png = tmp_path / "12.png"
    info = Image.open(png).info["parameters"]
    expected = "a (red):1.2 fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 12"
    assert info.startswith(expected)


def test_generate_refuses_sdxl_conditioning_on_sd1(artifact: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["generate", str(artifact), "-p", "x", "--steps", "1", "-W", "64", "-H", "64",
                                       "--original-size", "64", "64", "-o", str(tmp_path)])
    assert result.exit_code == 1 and "original_size" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.png"))


def test_generate_names_each_file_by_its_seed(sd1_folder: Path, tmp_path: Path) -> None:
    """Without --seed the CLI draws the first seed; a batch takes consecutive ones, each file named by its own."""
    result = CliRunner().invoke(main, ["generate", str(sd1_folder), "-p", "x", "--steps", "1", "-W", "64", "-H", "64",
                                       "-b", "2", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    seeds = sorted(int(p.stem) for p in tmp_path.glob("*.png"))
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1
    for seed in seeds:
        assert f"Seed: {seed}," in Image.open(tmp_path / f"{seed}.png").info["parameters"]


def test_generate_img2img_and_inpaint_from_checkpoint(sd1_folder: Path, tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    out = tmp_path / "out"
    runner = CliRunner()
    r1 = runner.invoke(main, ["generate", str(sd1_folder), "-p", "a fox", "--steps", "3", "-s", "1", "-i", str(init),
                              "--strength", "0.5", "-o", str(out)])
    assert r1.exit_code == 0, r1.output
    assert "Denoising strength: 0.5" in Image.open(out / "1.png").info["parameters"]
    r2 = runner.invoke(main, ["generate", str(sd1_folder), "-p", "a fox", "--steps", "2", "-s", "1", "-i", str(init),
                              "--mask", str(mask), "-b", "2", "-o", str(out)])
    assert r2.exit_code == 0, r2.output
    assert (out / "1-1.png").exists() and (out / "2.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "no/such/model", "-p", "x"], "no/such/model"),
        (["generate", "demo", "-p", "x", "-W", "100"], "width must be a positive multiple of 8"),
        (["generate", "demo", "-p", "x", "--sampler", "magic", "--steps", "1"], "'magic' is not one of 'ddim'"),
        (["build", "demo", "-o", "x", "--min-size", "100"], "min_size must be a multiple of 64"),
        (["build", "demo", "-o", "x", "--half", "--cpu-gemm", "mkl"], "cpu_gemm applies to float32 CPU aoti"),
    ],
)
def test_user_errors_are_one_clean_line(args: list[str], message: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and "sampling" not in result.output  # no stray progress bar


def test_unreadable_init_image_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    result = CliRunner().invoke(main, ["generate", "no/such/model", "-p", "x", "-i", str(bad)])
    assert result.exit_code == 2 and "notes.txt is not a readable image" in result.output
    assert "Traceback" not in result.output


def test_mask_needs_init(tmp_path: Path) -> None:
    mask = tmp_path / "m.png"
    Image.new("L", (64, 64)).save(mask)
    result = CliRunner().invoke(main, ["generate", "demo", "-p", "x", "--mask", str(mask)])
    assert result.exit_code == 2 and "--mask needs --init" in result.output


def test_bench_reports_every_path_with_differences(artifact: Path, sd1_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(sd1_folder), "--artifact", str(artifact), "-W", "64", "-H", "64",
                                       "--steps", "2", "--repeat", "1", "--backends", "sdpa,reference",
                                       "--threads", "1", "--no-ort-spin", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    paths = [r["path"] for r in data["rows"]]
    assert paths[0] == "eager sdpa" and "eager reference" in paths and "diffusers eager" in paths
    assert any(p.startswith("artifact pt2") for p in paths)
    for row in data["rows"]:
        assert set(row["ms"]) == {"text_encoder", "unet_step", "vae_decode", "vae_encode", "image"}
        assert all(v > 0 for v in row["ms"].values())
        assert max(row["max_abs_diff"].values()) < 1e-3, row  # every path computes the same thing
    assert data["meta"]["torch"] == torch.__version__
    assert data["meta"]["threads"] == 1 and data["meta"]["onnxruntime_threads"] == [1, 1]  # every engine's
    assert data["meta"]["onnxruntime_spin"] is False and "spinning off" in result.output
    assert "unet_step" in result.output


def test_demo_builds_loads_generates_and_checks_parity(tmp_path: Path) -> None:
    """The README's main command (with the faster pt2 format)."""
    result = CliRunner().invoke(main, ["demo", "--format", "pt2", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert (tmp_path / "demo-pt2" / "manifest.json").is_file()
    assert Image.open(tmp_path / "demo.png").size == (128, 128)
    assert "first image" in lines["timings"]
    assert float(lines["parity"].rsplit("=", 1)[1]) <= 1e-3


def test_generate_syntax_and_emphasis_reach_the_pipeline(sd1_folder: Path, tmp_path: Path) -> None:
    """--syntax a1111 --emphasis a1111 give the API's image for the same arguments, recorded in the PNG text;
    the scheduler defaults to the model's (ddim for SD 1.x)."""
    from sdexport import StableDiffusion

    prompt = "a ((fox):1.2) [BREAK]"
    args = ["generate", str(sd1_folder), "-p", prompt, "--steps", "2", "-W", "64", "-H", "64", "-s", "5",
            "--syntax", "a1111", "--emphasis", "a1111", "-o", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    png = Image.open(tmp_path / "5.png")
    text = png.info["parameters"]
    assert "Sampler: DDIM" in text and "Prompt syntax" not in text and "Emphasis" not in text
    ref = StableDiffusion.from_pretrained(sd1_folder).text2img(prompt, steps=2, height=64, width=64, seed=5,
                                                               syntax="a1111", emphasis="a1111")
    assert isinstance(ref, list)
    assert (np.asarray(png) == np.asarray(ref[0])).all()
    bad = CliRunner().invoke(main, [*args[:-2], "--syntax", "nope"])
    assert bad.exit_code != 0 and "'nope' is not one of" in bad.output
