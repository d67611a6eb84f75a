"""ControlNet through artifacts: `sdexport build` recognises a ControlNet and writes a control artifact;
pt2 model artifacts and pt2 control artifacts, run in ONE fresh process that cannot import sdexport,
transformers or diffusers, match diffusers' ControlNet pipelines (SD 1.x: text2img, MultiControlNet with
start/end, guess mode with Heun, img2img, inpaint, and no ControlNet; SDXL: text2img with and without
guess mode); the control program in the other formats
(torchscript, onnx, openvino (slow), and aoti with an aoti UNet) matches the eager model; artifacts built before
ControlNet keep working without it and refuse it with a "rebuild" message; the CLI and bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from blocked import BLOCK_MODEL_CODE
from click.testing import CliRunner
from controlnet_reference import make_controlnet_folder, reference_pipeline
from PIL import Image
from test_pipeline import _diffusers_scheduler

import runtime
from runtime.manifest import ArtifactError
from sdexport import ControlNet, StableDiffusion
from sdexport.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-3
H = W = 64
NEG = "blurry, low quality"
SMALL = ["--min-size", "64", "--max-size", "128", "--max-batch", "2", "--max-chunks", "2"]


def _kernels() -> str:
    from runtime import ops

    return "fused" if ops.available() else "native"


def _build(src: Path, out: Path, fmt: str = "pt2") -> Path:
    result = CliRunner().invoke(main, ["build", str(src), "-o", str(out), "--format", fmt, "--kernels", _kernels(),
                                       *SMALL])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def cn_folders(model_root: Path) -> list[Path]:
    return [make_controlnet_folder("sd1", model_root, seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def arts(sd1_folder: Path, cn_folders: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cn-art")
    return {"model": _build(sd1_folder, root / "sd1"), "cn1": _build(cn_folders[0], root / "cn1"),
            "cn2": _build(cn_folders[1], root / "cn2")}


def test_build_recognises_controlnet(arts: dict[str, Path]) -> None:
    m = json.loads((arts["cn1"] / "manifest.json").read_text())
    assert m["kind"] == "controlnet" and m["family"] == "sd1" and set(m["modules"]) == {"controlnet"}
    model = json.loads((arts["model"] / "manifest.json").read_text())
    assert model["control_residuals"] == m["residuals"] and len(m["residuals"]) == 10


# ---- one fresh process against diffusers --------------------------------------------------------------
CHILD = BLOCK_MODEL_CODE + r"""
import ast
import torch, runtime
art, controls, cases_file, tensors_file, out = sys.argv[1:6]
tensors = torch.load(tensors_file, weights_only=True)
cases = ast.literal_eval(open(cases_file).read())
pipe = runtime.load(art)
nets = [runtime.load_control(p) for p in controls.split(",")]
res = {}
for name, case in cases.items():
    kw = dict(case["kwargs"])
    for key, tensor in case.get("tensors", {}).items():
        kw[key] = tensors[tensor]
    if "controls" in case:
        kw["control"] = [nets[i] for i in case["controls"]]
        kw["control_image"] = [tensors[t] for t in case["images"]]
    args = [tensors[t] for t in case.get("inputs", ())]
    res[name] = getattr(pipe, case["method"])(*args, case["prompt"], case["negative"], output="tensor", **kw)
assert "sdexport" not in sys.modules and "transformers" not in sys.modules and "diffusers" not in sys.modules
torch.save(res, out)
"""


def _tensors() -> dict[str, torch.Tensor]:
    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    mask = torch.zeros(1, 1, H, W)
    mask[..., 16:48, 8:40] = 1.0
    return {"lat1": torch.randn(1, 4, 8, 8, generator=gen(1)), "lat2": torch.randn(2, 4, 8, 8, generator=gen(2)),
            "hint1": torch.rand(1, 3, 48, 80, generator=gen(3)), "hint2": torch.rand(2, 3, 64, 64, generator=gen(4)),
            "image": torch.rand(1, 3, H, W, generator=gen(5)), "mask": mask}


def _cases() -> dict[str, dict[str, Any]]:
    """Our keyword arguments; "ref" holds diffusers' call (pipeline kind, ControlNets, extra arguments)."""
    t2i: dict[str, Any] = {"steps": 4, "scale": 7.5, "height": H, "width": W}
    return {
        "t2i": {"method": "text2img", "prompt": "a red fox", "negative": NEG, "tensors": {"latents": "lat1"},
                "controls": [0], "images": ["hint1"], "kwargs": {**t2i, "scheduler": "ddim", "control_scale": 0.8},
                "ref": {"kind": "text2img", "nets": [0], "controlnet_conditioning_scale": 0.8}},
        "t2i_plain": {"method": "text2img", "prompt": "a red fox", "negative": NEG, "tensors": {"latents": "lat1"},
                      "kwargs": {**t2i, "scheduler": "ddim"}, "ref": {"kind": "plain"}},
        "t2i_multi": {"method": "text2img", "prompt": ["a lighthouse", "a bowl of fruit"], "negative": [NEG, ""],
                      "tensors": {"latents": "lat2"}, "controls": [0, 1], "images": ["hint1", "hint2"],
                      "kwargs": {**t2i, "scheduler": "euler", "steps": 5, "control_scale": [0.6, 1.3],
                                 "control_start": [0.0, 0.3], "control_end": [0.5, 1.0]},
                      "ref": {"kind": "text2img", "nets": [0, 1], "controlnet_conditioning_scale": [0.6, 1.3],
                              "control_guidance_start": [0.0, 0.3], "control_guidance_end": [0.5, 1.0]}},
        "t2i_guess": {"method": "text2img", "prompt": "a castle", "negative": NEG, "tensors": {"latents": "lat1"},
                      "controls": [1], "images": ["hint2b"], "kwargs": {**t2i, "scheduler": "heun", "guess_mode": True},
                      "ref": {"kind": "text2img", "nets": [1], "guess_mode": True}},
        "i2i": {"method": "img2img", "prompt": "a watercolor", "negative": NEG, "inputs": ["image"], "controls": [0],
                "images": ["hint1"], "kwargs": {"strength": 0.6, "steps": 6, "scale": 7.5, "seed": 5,
                                                "scheduler": "ddim", "control_scale": 1.2, "control_end": 0.7},
                "ref": {"kind": "img2img", "nets": [0], "controlnet_conditioning_scale": 1.2,
                        "control_guidance_end": 0.7}},
        "inpaint": {"method": "inpaint", "prompt": "a red door", "negative": "", "inputs": ["image", "mask"],
                    "controls": [1], "images": ["hint1"], "kwargs": {"steps": 5, "scale": 7.5, "seed": 9,
                                                                     "scheduler": "ddim", "control_scale": 0.9},
                    "ref": {"kind": "inpaint", "nets": [1], "controlnet_conditioning_scale": 0.9}},
    }


def _reference(folder: Path, cn_folders: list[Path], case: dict[str, Any], t: dict[str, torch.Tensor],
               xl: bool = False) -> torch.Tensor:
    import diffusers as d

    ref = dict(case["ref"])
    kind, nets = ref.pop("kind"), ref.pop("nets", [])
    kw = dict(case["kwargs"])
    for key in ("control_scale", "control_start", "control_end", "guess_mode", "height", "width"):
        kw.pop(key, None)
    if kind == "plain":
        pipe = d.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = reference_pipeline(folder, [cn_folders[i] for i in nets], kind, xl=xl)
    pipe.scheduler = _diffusers_scheduler(kw.pop("scheduler"), dict(pipe.scheduler.config))
    call: dict[str, Any] = dict(num_inference_steps=kw.pop("steps"), guidance_scale=kw.pop("scale"),
                                height=H, width=W, output_type="pt", **ref, **kw)
    for key, name in case.get("tensors", {}).items():
        call[key] = t[name].clone()
    if "seed" in call:
        call["generator"] = torch.Generator().manual_seed(call.pop("seed"))
    images = [t[name].clone() for name in case.get("images", ())]
    inputs = [t[name].clone() for name in case.get("inputs", ())]
    if kind == "text2img":
        call["image"] = images if len(images) > 1 else images[0]
    elif kind in ("img2img", "inpaint"):
        call.update(image=inputs[0], control_image=images[0])
        if kind == "inpaint":
            call["mask_image"] = inputs[1]
    out: torch.Tensor = pipe(case["prompt"], negative_prompt=case["negative"] or None, **call).images
    return out.float()


def _run_fresh(art: Path, controls: list[Path], cases: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor],
               tmp_path: Path) -> dict[str, torch.Tensor]:
    """All cases in ONE fresh process that cannot import sdexport, transformers or diffusers."""
    torch.save(tensors, tmp_path / "tensors.pt")
    (tmp_path / "cases.txt").write_text(repr({k: {f: v for f, v in c.items() if f != "ref"} for k, c in cases.items()}))
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(art), ",".join(map(str, controls)),
                           str(tmp_path / "cases.txt"), str(tmp_path / "tensors.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got: dict[str, torch.Tensor] = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(got) == set(cases)
    return got


def test_fresh_process_matches_diffusers(arts: dict[str, Path], sd1_folder: Path, cn_folders: list[Path],
                                         tmp_path: Path) -> None:
    tensors = _tensors()
    tensors["hint2b"] = tensors["hint2"][:1]
    cases = _cases()
    got = _run_fresh(arts["model"], [arts["cn1"], arts["cn2"]], cases, tensors, tmp_path)
    for name, case in cases.items():
        ref = _reference(sd1_folder, cn_folders, case, tensors)
        err = (got[name] - ref).abs().max().item()
        assert err <= TOL, f"{name}: max abs error {err}"
    assert (got["t2i"] - got["t2i_plain"]).abs().max().item() > 1e-2  # the ControlNet acts


def test_sdxl_fresh_process_matches_diffusers(sdxl_folder: Path, model_root: Path, tmp_path: Path) -> None:
    """An SDXL artifact and an SDXL control artifact (pooled embedding and time ids into the ControlNet)
    against StableDiffusionXLControlNetPipeline, with and without guess mode."""
    cn_folder = make_controlnet_folder("sdxl", model_root, 5)
    model, control = _build(sdxl_folder, tmp_path / "sdxl"), _build(cn_folder, tmp_path / "cn-sdxl")
    t2i: dict[str, Any] = {"steps": 4, "scale": 6.0, "height": H, "width": W, "scheduler": "euler"}
    cases: dict[str, dict[str, Any]] = {
        "t2i": {"method": "text2img", "prompt": "a fox in the snow", "negative": NEG, "tensors": {"latents": "lat1"},
                "controls": [0], "images": ["hint1"], "kwargs": {**t2i, "control_scale": 0.7, "control_start": 0.25},
                "ref": {"kind": "text2img", "nets": [0], "controlnet_conditioning_scale": 0.7,
                        "control_guidance_start": 0.25}},
        "t2i_guess": {"method": "text2img", "prompt": "a lighthouse", "negative": NEG, "tensors": {"latents": "lat1"},
                      "controls": [0], "images": ["hint1"], "kwargs": {**t2i, "guess_mode": True},
                      "ref": {"kind": "text2img", "nets": [0], "guess_mode": True}},
    }
    tensors = _tensors()
    got = _run_fresh(model, [control], cases, tensors, tmp_path)
    for name, case in cases.items():
        err = (got[name] - _reference(sdxl_folder, [cn_folder], case, tensors, xl=True)).abs().max().item()
        assert err <= TOL, f"{name}: max abs error {err}"


# ---- formats ---------------------------------------------------------------------------------------------
def _eager_and_artifact(sd: Any, pipe: Any, cn: ControlNet, control: Any) -> tuple[torch.Tensor, torch.Tensor]:
    t = _tensors()
    kw: dict[str, Any] = dict(steps=3, scale=7.5, height=H, width=W, latents=t["lat1"], scheduler="euler",
                              output="tensor", control_scale=0.8)
    return (sd.text2img("a fox", NEG, control=cn, control_image=t["hint1"], **kw),
            pipe.text2img("a fox", NEG, control=control, control_image=t["hint1"], **kw))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx",
                                 pytest.param("openvino", marks=pytest.mark.slow)])  # slow: ONNX export + IR
def test_control_formats_match_eager(fmt: str, arts: dict[str, Path], sd1_folder: Path, cn_folders: list[Path],
                                     tmp_path: Path) -> None:
    """The control program in another format, paired with the pt2 model artifact."""
    if fmt == "openvino":
        pytest.importorskip("openvino")
    sd = StableDiffusion.from_pretrained(sd1_folder).attention_backend("sdpa")
    cn = ControlNet.from_pretrained(cn_folders[0])
    control = runtime.load_control(_build(cn_folders[0], tmp_path / fmt, fmt))
    eager, art = _eager_and_artifact(sd, runtime.load(arts["model"]), cn, control)
    assert (eager - art).abs().max().item() <= TOL


@pytest.mark.slow  # an aoti build of UNet and ControlNet: ~6 min on 2 cores; pt2/torchscript/onnx run in CI
def test_aoti_model_and_control_match_eager(sd1_folder: Path, cn_folders: list[Path], tmp_path: Path) -> None:
    """AOTInductor: the UNet program with residual inputs and the control program."""
    sd = StableDiffusion.from_pretrained(sd1_folder)
    cn = ControlNet.from_pretrained(cn_folders[0])
    pipe = runtime.load(_build(sd1_folder, tmp_path / "sd1-aoti", "aoti"))
    control = runtime.load_control(_build(cn_folders[0], tmp_path / "cn-aoti", "aoti"))
    eager, art = _eager_and_artifact(sd.attention_backend("sdpa"), pipe, cn, control)
    assert (eager - art).abs().max().item() <= TOL


# ---- artifacts built before ControlNet, bad input ---------------------------------------------------------
def test_artifact_without_control_inputs(sd1_folder: Path, arts: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An artifact built before ControlNet support (a UNet program without residual inputs, no
    control_residuals in its manifest) runs as before, and refuses ControlNet with a rebuild message."""
    from sdexport.export import build as build_module
    from sdexport.export.modules import UNetStep

    monkeypatch.setattr(build_module, "ControlUNetStep", UNetStep)
    monkeypatch.setattr(build_module, "control_unet_example",
                        lambda unet, spec, dtype, device, xl: spec.unet(unet.config.in_channels,
                                                                        unet.config.cross_attention_dim, dtype, device))
    old = _build(sd1_folder, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["control_residuals"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipe, new = runtime.load(old), runtime.load(arts["model"])
    t = _tensors()
    kw: dict[str, Any] = dict(steps=2, height=H, width=W, latents=t["lat1"], output="tensor")
    assert (pipe.text2img("a fox", **kw) - new.text2img("a fox", **kw)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"takes no ControlNet residuals.*rebuild it with `sdexport build`"):
        pipe.text2img("a fox", control=runtime.load_control(arts["cn1"]), control_image=t["hint1"], **kw)


def test_bad_artifacts(arts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"a ControlNet artifact: load it with runtime\.load_control"):
        runtime.load(arts["cn1"])
    with pytest.raises(ArtifactError, match="not a ControlNet artifact"):
        runtime.load_control(arts["model"])
    other = tmp_path / "sd2-cn"
    shutil.copytree(arts["cn1"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "family": "sd2"}))
    pipe, t = runtime.load(arts["model"]), _tensors()
    with pytest.raises(ValueError, match="is a sd2 ControlNet; this model is sd1"):
        pipe.text2img("a", control=runtime.load_control(other), control_image=t["hint1"], steps=2, height=H, width=W)
    (other / "manifest.json").write_text(json.dumps(manifest))
    (other / manifest["modules"]["controlnet"]["weights"]).write_bytes(b"x")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        runtime.load_control(other)
    with pytest.raises(ValueError, match=r"ControlNet artifact cn1: height 256 px is outside"):
        runtime.load_control(arts["cn1"]).check_shape(2, 256, 64)


def test_cli_generate_with_control(arts: dict[str, Path], tmp_path: Path) -> None:
    """`sdexport generate ART --control CN_ART --control-image edges.png --control-scale 0.8` gives the
    API's image; --control-preprocess canny runs the Canny preprocessor first."""
    pytest.importorskip("cv2")
    from runtime.canny import canny

    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    args = ["generate", str(arts["model"]), "-p", "a fox", "--steps", "2", "-W", "64", "-H", "64", "-s", "7",
            "--sampler", "euler", "--control", str(arts["cn1"]), "--control-image", str(tmp_path / "photo.png"),
            "--control-scale", "0.8", "--control-preprocess", "canny", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out" / "7.png") as im:
        png = np.asarray(im.convert("RGB"))
    pipe = runtime.load(arts["model"])
    api = pipe.text2img("a fox", steps=2, height=64, width=64, seed=7, scheduler="euler",
                        control=runtime.load_control(arts["cn1"]),
                        control_image=canny(Image.open(tmp_path / "photo.png")), control_scale=0.8)
    assert np.array_equal(png, np.asarray(api[0]))
    bad = CliRunner().invoke(main, [*args[:-2], "--control-image", str(tmp_path / "photo.png"), "-o", str(tmp_path)])
    assert bad.exit_code != 0 and "one --control-image per --control" in bad.output
