"""`sdexport refit`: an aoti / pt2 artifact given another model's weights runs that model, with no recompile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import runtime
from runtime.manifest import ArtifactError
from sdexport import StableDiffusion
from sdexport.cli import main
from sdexport.export.refit import refit

TOL = 1e-3
OPTIONS = dict(max_batch=1, min_size=64, max_size=64, max_chunks=1)


def _kernels() -> str:
    from runtime import ops

    return "fused" if ops.available() else "native"


def _fine_tune(folder: Path) -> StableDiffusion:
    """The same architecture with every weight moved, and v-prediction (a manifest field refit must update)."""
    sd = StableDiffusion.from_pretrained(folder, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in sd.unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for p in list(sd.vae.parameters()) + list(sd.text_encoder.parameters()):
            p.mul_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
    return sd


def _jobs(pipe: StableDiffusion | runtime.Pipeline) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lat, image = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    t2i = pipe.text2img("a (red):1.3 fox", "blurry", steps=3, height=64, width=64, latents=lat, output="tensor")
    i2i = pipe.img2img(image, "a watercolor", strength=0.6, steps=4, seed=5, output="tensor")
    assert isinstance(t2i, torch.Tensor) and isinstance(i2i, torch.Tensor)
    return {"t2i": t2i, "i2i": i2i}


def _max_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("aoti", marks=pytest.mark.slow)])  # aoti: ~4 min
def test_refitted_artifact_runs_the_new_weights(fmt: str, sd1_folder: Path, tmp_path: Path) -> None:
    base = StableDiffusion.from_pretrained(sd1_folder)
    art = base.export(tmp_path / "base", format=fmt, kernels=_kernels(), **OPTIONS)
    tuned = _fine_tune(sd1_folder)
    manifest = refit(art, tuned, tmp_path / "tuned")
    assert manifest.prediction_type == "v_prediction" and manifest.format == fmt

    expected = _jobs(tuned.attention_backend("sdpa"))
    got = _jobs(runtime.load(tmp_path / "tuned"))
    assert _max_err(got, expected) <= TOL
    # the weights really changed, and the original artifact still runs the original model
    assert _max_err(got, _jobs(base.attention_backend("sdpa"))) > 50 * TOL
    assert _max_err(_jobs(runtime.load(art)), _jobs(base)) <= TOL
    old, new = (json.loads((p / "manifest.json").read_text()) for p in (art, tmp_path / "tuned"))
    programs = [m["program"] for m in old["modules"].values()]
    assert all(old["files"][p] == new["files"][p] for p in programs)  # the same compiled programs
    assert old["files"]["unet.safetensors"] != new["files"]["unet.safetensors"]


def test_refit_in_place_and_from_the_cli(sd1_folder: Path, tmp_path: Path) -> None:
    art = StableDiffusion.from_pretrained(sd1_folder).export(tmp_path / "art", format="pt2", kernels="native",
                                                             **OPTIONS)
    runner = CliRunner()
    res = runner.invoke(main, ["refit", str(art), str(sd1_folder), "-o", str(art)])
    assert res.exit_code != 0 and "already exists" in res.output
    res = runner.invoke(main, ["refit", str(art), str(sd1_folder), "-o", str(art), "--force",
                               "--prediction-type", "v_prediction"])
    assert res.exit_code == 0, res.output
    assert runtime.load(art).backend.info.scheduler_config["prediction_type"] == "v_prediction"
    assert not list(tmp_path.glob(".art.*"))  # no temporary directories left behind


def test_refit_rejects_what_does_not_fit(sd1_folder: Path, sd2_folder: Path, tmp_path: Path) -> None:
    art = StableDiffusion.from_pretrained(sd1_folder).export(tmp_path / "art", format="pt2", kernels="native",
                                                             **OPTIONS)
    with pytest.raises(ValueError, match=r"family is 'sd2', the artifact was built for 'sd1'"):
        refit(art, StableDiffusion.from_pretrained(sd2_folder), tmp_path / "sd2")
    wider = StableDiffusion.from_pretrained(sd1_folder)
    wider.unet.conv_in = torch.nn.Conv2d(4, wider.unet.conv_in.out_channels, 3, padding=1)
    wider.unet.conv_in.weight.data = torch.zeros(wider.unet.conv_in.out_channels, 4, 5, 5)
    with pytest.raises(ValueError, match=r"unet does not fit the artifact: unet.conv_in.weight is \(\d+, 4, 5, 5\)"):
        refit(art, wider, tmp_path / "wider")
    assert not (tmp_path / "sd2").exists() and not (tmp_path / "wider").exists()

    (art / "unet.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match=r"checksum mismatch in unet\.safetensors"):
        refit(art, StableDiffusion.from_pretrained(sd1_folder), tmp_path / "x")

    ts = StableDiffusion.from_pretrained(sd1_folder).export(tmp_path / "ts", format="torchscript",
                                                            kernels="native", **OPTIONS)
    with pytest.raises(ValueError, match="torchscript artifacts keep their weights inside the program"):
        refit(ts, StableDiffusion.from_pretrained(sd1_folder), tmp_path / "y")
