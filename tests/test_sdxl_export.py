"""SDXL artifacts (base and refiner, tiny random models, float32): every format built and loaded by
`runtime.load` matches the eager pipeline (<= 1e-3 max abs), and diffusers in a fresh process that cannot
import sdexport, transformers or diffusers; refit, --half, the CLI and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiny_configs as tc
import torch
from click.testing import CliRunner

import runtime
from sdexport import StableDiffusion
from sdexport.cli import main
from sdexport.export.build import BuildOptions, build
from sdexport.export.refit import refit

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-3
SMALL: dict[str, Any] = dict(max_batch=2, min_size=64, max_size=128, max_chunks=2)
PROMPT = "a (red):1.3 fox in the snow"
# Non-default SDXL size conditioning (base), as text2img / img2img keyword arguments.
SIZES: dict[str, Any] = dict(original_size=(96, 80), crops_coords_top_left=(8, 4), target_size=(64, 64),
             negative_original_size=(64, 48))


def _kernels() -> str:
    from runtime import ops

    return "fused" if ops.available() else "native"


@pytest.fixture(scope="module")
def base(sdxl_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sdxl_folder).attention_backend("sdpa")


@pytest.fixture(scope="module")
def base_art(sdxl_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base as a pt2 artifact, built by `sdexport build` from its diffusers folder."""
    out = tmp_path_factory.mktemp("sdxl") / "base-pt2"
    args = ["build", str(sdxl_folder), "-o", str(out), "--format", "pt2", "--kernels", _kernels(),
            "--min-size", "64", "--max-size", "128", "--max-batch", "2", "--max-chunks", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def _jobs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    return {"lat1": torch.randn(1, 4, 8, 8, generator=g), "lat2": torch.randn(2, 4, 16, 8, generator=g),
            "image": torch.rand(1, 3, 64, 64, generator=g), "mask": mask}


def _base_jobs(pipe: Any, jobs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's cases: empty / non-empty negative prompt, size conditioning, img2img, inpaint."""
    out = {
        "t2i_empty_negative": pipe.text2img(PROMPT, "", steps=3, height=64, width=64, latents=jobs["lat1"],
                                            scheduler="euler", output="tensor"),
        "t2i_sizes_b2": pipe.text2img(["a fox", "a cat"], "blurry", steps=2, height=128, width=64, batch_size=2,
                                      latents=jobs["lat2"], scheduler="euler", output="tensor", **SIZES),
        "i2i": pipe.img2img(jobs["image"], "a watercolor", "ugly", strength=0.6, steps=3, seed=5, output="tensor"),
        "inpaint": pipe.inpaint(jobs["image"], jobs["mask"], "a door", steps=3, seed=9, output="tensor"),
    }
    return out


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, tol: float = TOL) -> None:
    for key, ref in want.items():
        assert got[key].shape == ref.shape, f"{what} {key}"
        err = (got[key] - ref).abs().max().item()
        assert err <= tol, f"{what} {key}: max abs error {err}"


@pytest.fixture(scope="module")
def base_eager(base: StableDiffusion) -> dict[str, torch.Tensor]:
    return _base_jobs(base, _jobs())


def test_base_artifact_matches_eager(base_art: Path, base_eager: dict[str, torch.Tensor]) -> None:
    m = json.loads((base_art / "manifest.json").read_text())
    assert m["family"] == "sdxl" and m["time_ids"] == 6 and m["force_zeros_for_empty_prompt"]
    assert set(m["modules"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert m["tokenizer"] == "tokenizer.json" and m["tokenizer_2"] == "tokenizer_2.json"
    assert m["vae_dtype"] == "float32" and m["pooled_dim"] == tc.XL_POOLED_DIM
    pipe = runtime.load(base_art)
    assert [t.pad_id for t in pipe.backend.tokenizers] != [pipe.backend.tokenizers[0].pad_id] * 2  # "!" pads 2
    _close(_base_jobs(pipe, _jobs()), base_eager, "pt2")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_other_formats_match_eager(fmt: str, base: StableDiffusion, base_eager: dict[str, torch.Tensor],
                                   tmp_path: Path) -> None:
    art = base.export(tmp_path / fmt, format=fmt, kernels=_kernels(), **SMALL)
    base.attention_backend("sdpa")
    pipe: Any = runtime.load(art)
    jobs = _jobs()
    got = {"t2i_sizes_b2": pipe.text2img(["a fox", "a cat"], "blurry", steps=2, height=128, width=64,
                                         batch_size=2, latents=jobs["lat2"], scheduler="euler", output="tensor",
                                         **SIZES)}
    _close(got, {"t2i_sizes_b2": base_eager["t2i_sizes_b2"]}, fmt)


# The child process: model-code packages blocked, the artifact loaded, the diffusers cases run.
CHILD = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sdexport", "transformers", "diffusers"):
            raise ImportError(f"{name} is blocked in the runtime test")
        return None
sys.meta_path.insert(0, Block())
import torch, runtime
art, out = sys.argv[1], sys.argv[2]
jobs = torch.load(sys.argv[3], weights_only=True)
pipe = runtime.load(art)
res = {}
res["empty_negative"] = pipe.text2img("a red fox in the snow", "", steps=3, height=64, width=64, scale=5.0,
                                      latents=jobs["lat1"], scheduler="euler", output="tensor")
res["sizes"] = pipe.text2img("a red fox in the snow", "blurry", steps=3, height=64, width=64, scale=5.0,
                             latents=jobs["lat1"], scheduler="euler", output="tensor", original_size=(96, 80),
                             crops_coords_top_left=(8, 4), target_size=(64, 64))
assert "sdexport" not in sys.modules and "transformers" not in sys.modules and "diffusers" not in sys.modules
torch.save(res, out)
"""


def _diffusers_reference(folder: Path, lat: torch.Tensor) -> dict[str, torch.Tensor]:
    import diffusers

    d: Any = diffusers
    pipe = d.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    common: dict[str, Any] = dict(num_inference_steps=3, height=64, width=64, guidance_scale=5.0, output_type="pt")
    out = {
        # our "" is diffusers' None: force_zeros_for_empty_prompt gives zero negative context and pooled
        "empty_negative": pipe("a red fox in the snow", negative_prompt=None, latents=lat.clone(), **common).images,
        "sizes": pipe("a red fox in the snow", negative_prompt="blurry", latents=lat.clone(), original_size=(96, 80),
                      crops_coords_top_left=(8, 4), target_size=(64, 64), **common).images,
    }
    return {k: v.float().cpu() for k, v in out.items()}


def test_base_artifact_matches_diffusers_in_fresh_process(base_art: Path, sdxl_folder: Path,
                                                         tmp_path: Path) -> None:
    jobs = _jobs()
    ref = _diffusers_reference(sdxl_folder, jobs["lat1"])
    torch.save(jobs, tmp_path / "jobs.pt")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(base_art), str(tmp_path / "out.pt"),
                           str(tmp_path / "jobs.pt")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _close(torch.load(tmp_path / "out.pt", weights_only=True), ref, "child vs diffusers")


def _refiner_jobs(pipe: Any) -> dict[str, torch.Tensor]:
    image = _jobs()["image"]
    return {"i2i": pipe.img2img(image, "a watercolor", "", strength=0.5, steps=4, seed=3, output="tensor",
                                aesthetic_score=7.0, negative_aesthetic_score=2.0),
            "i2i_default": pipe.img2img(image, "a cat", "blurry", strength=0.7, steps=3, seed=4, output="tensor")}


def test_refiner_aoti_artifact_matches_eager(sdxl_refiner_folder: Path, tmp_path: Path) -> None:
    sd = StableDiffusion.from_pretrained(sdxl_refiner_folder)
    art = sd.export(tmp_path / "refiner", format="aoti", kernels=_kernels(), **SMALL)
    m = json.loads((art / "manifest.json").read_text())
    assert m["family"] == "sdxl-refiner" and m["time_ids"] == 5 and not m["force_zeros_for_empty_prompt"]
    assert set(m["modules"]) == {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert m["tokenizer"] == "" and m["tokenizer_2"] == "tokenizer_2.json"
    want = _refiner_jobs(sd.attention_backend("sdpa"))
    _close(_refiner_jobs(runtime.load(art)), want, "refiner aoti")


def _moved(folder: Path) -> StableDiffusion:
    """The same architecture with every weight moved (both text encoders too)."""
    sd = StableDiffusion.from_pretrained(folder)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in sd.modules():
            for p in m.parameters():
                p.mul_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
    return sd.attention_backend("sdpa")


def test_refit_runs_the_new_weights(base_art: Path, sdxl_folder: Path, base_eager: dict[str, torch.Tensor],
                                    tmp_path: Path) -> None:
    tuned = _moved(sdxl_folder)
    refit(base_art, tuned, tmp_path / "tuned")
    got = _base_jobs(runtime.load(tmp_path / "tuned"), _jobs())
    _close(got, _base_jobs(tuned, _jobs()), "refit")
    assert max((got[k] - base_eager[k]).abs().max().item() for k in got) > 50 * TOL  # really new weights
    old, new = (json.loads((p / "manifest.json").read_text()) for p in (base_art, tmp_path / "tuned"))
    for name in ("text_encoder", "text_encoder_2"):
        assert old["files"][f"{name}.pt2"] == new["files"][f"{name}.pt2"]
        assert old["files"][f"{name}.safetensors"] != new["files"][f"{name}.safetensors"]


def test_refit_rejects_another_family(base_art: Path, sdxl_refiner_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"family is 'sdxl-refiner', the artifact was built for 'sdxl'"):
        refit(base_art, StableDiffusion.from_pretrained(sdxl_refiner_folder), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_half_artifact_keeps_the_vae_in_float32(base: StableDiffusion, base_eager: dict[str, torch.Tensor],
                                                tmp_path: Path) -> None:
    art = base.export(tmp_path / "half", format="pt2", half=True, kernels=_kernels(), **SMALL)
    base.attention_backend("sdpa")
    m = json.loads((art / "manifest.json").read_text())
    assert m["dtype"] == "float16" and m["vae_dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(str(art / "vae_decoder.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())  # noqa: SIM118
    with safe_open(str(art / "unet.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys() if f.get_tensor(k).is_floating_point())  # noqa: SIM118
    pipe = runtime.load(art)
    assert pipe.backend.dtype == torch.float16
    jobs = _jobs()
    out = pipe.text2img(PROMPT, "", steps=3, height=64, width=64, latents=jobs["lat1"], scheduler="euler",
                        output="tensor")
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    assert (out - base_eager["t2i_empty_negative"]).abs().max().item() <= 3e-2


def test_default_sizes_follow_the_family() -> None:
    assert BuildOptions().sizes("sdxl") == (512, 1536) and BuildOptions().sizes("sdxl-refiner") == (512, 1536)
    assert BuildOptions().sizes("sd1") == (256, 1024)
    assert BuildOptions(min_size=64, max_size=128).sizes("sdxl") == (64, 128)
    assert BuildOptions(max_size=1024).sizes("sdxl") == (512, 1024)
    with pytest.raises(ValueError, match="min_size 1792 exceeds max_size 1536"):
        BuildOptions(min_size=1792).sizes("sdxl")


def test_bad_input_is_a_clear_error(base_art: Path, sd1_folder: Path, tmp_path: Path) -> None:
    pipe = runtime.load(base_art)
    with pytest.raises(ValueError, match=r"height 192 px is outside this artifact's range"):
        pipe.text2img("a fox", steps=1, height=192, width=64)
    with pytest.raises(ValueError, match=r"needs text_embeds and time_ids"):
        pipe.backend.unet(torch.zeros(1, 4, 8, 8), torch.tensor(1.0), torch.zeros(1, 77, 80), torch.ones(1, 77))
    sd1 = StableDiffusion.from_pretrained(sd1_folder)
    art = build(sd1, tmp_path / "sd1", BuildOptions(format="pt2", kernels="native", max_batch=1, min_size=64,
                                                     max_size=64, max_chunks=1)).path
    sd1_pipe: Any = runtime.load(art)
    with pytest.raises(ValueError, match="original_size"):
        sd1_pipe.text2img("a fox", steps=1, height=64, width=64, original_size=(64, 64))
    with pytest.raises(ValueError, match=r"takes no text_embeds / time_ids"):
        sd1_pipe.backend.unet(torch.zeros(1, 4, 8, 8), torch.tensor(1.0), torch.zeros(1, 77, 32), torch.ones(1, 77),
                              torch.zeros(1, 40), torch.zeros(1, 6))


def test_cli_generate_with_sdxl_conditioning(base_art: Path, tmp_path: Path) -> None:
    from PIL import Image

    result = CliRunner().invoke(main, ["generate", str(base_art), "-p", "a fox", "--steps", "2", "-W", "64",
                                       "-H", "64", "-s", "3", "--original-size", "96", "80", "--crop", "8", "4",
                                       "--target-size", "64", "64", "--sampler", "euler", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "3.png").size == (64, 64)
    result = CliRunner().invoke(main, ["inspect", str(base_art)])
    assert result.exit_code == 0 and "text_encoder_2" in result.output and "[sdxl," in result.output
