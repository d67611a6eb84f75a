"""SDXL artifacts (base and refiner, tiny random models, float32): every format built and loaded by
`runtime.load` matches the eager pipeline (<= 1e-3 max abs); pt2 base and refiner artifacts, each run in ONE
fresh process that cannot import sdexport, transformers or diffusers, match diffusers' SDXL pipelines
(text2img for every scheduler, empty / non-empty negatives, size conditioning, img2img, inpaint, emphasis
against value rows scaled in diffusers' cross-attention, refiner img2img with aesthetic scores); refit,
--half, the CLI and bad input."""

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
from blocked import BLOCK_MODEL_CODE
from click.testing import CliRunner

import runtime
from runtime.samplers import SCHEDULER_NAMES
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


# ---- a fresh process against diffusers ------------------------------------------------------------
# The child process: model-code packages blocked, the artifact loaded by `runtime.load`, every case run;
# the images come back in a torch.save file. Cases are literals (ast.literal_eval) naming their tensors.
CHILD = BLOCK_MODEL_CODE + r"""
import ast
import torch, runtime
art, cases_file, tensors_file, out = sys.argv[1:5]
tensors = torch.load(tensors_file, weights_only=True)
cases = ast.literal_eval(open(cases_file).read())
pipe = runtime.load(art)
res = {}
for name, case in cases.items():
    kw = dict(case["kwargs"])
    for key, tensor in case.get("tensors", {}).items():
        kw[key] = tensors[tensor]
    args = [tensors[t] for t in case.get("inputs", ())]
    res[name] = getattr(pipe, case["method"])(*args, case["prompt"], case["negative"], output="tensor", **kw)
assert "sdexport" not in sys.modules and "transformers" not in sys.modules and "diffusers" not in sys.modules
torch.save(res, out)
"""

NEG = "blurry, low quality"
DETERMINISTIC = [s for s in SCHEDULER_NAMES if s != "euler_a"]
# Size conditioning (base): the positive ids alone, then with every negative id set.
FULL_SIZES: list[dict[str, Any]] = [
    {"original_size": (128, 96), "crops_coords_top_left": (8, 16), "target_size": (64, 48)},
    {"original_size": (128, 96), "crops_coords_top_left": (8, 16), "negative_original_size": (32, 40),
     "negative_crops_coords_top_left": (4, 0), "negative_target_size": (48, 56)},
]
I2I_SIZES: dict[str, Any] = {"original_size": (96, 80), "crops_coords_top_left": (8, 4),
                             "negative_original_size": (40, 40)}
REFINER_SIZES: dict[str, Any] = {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0,
                                 "negative_crops_coords_top_left": (4, 8), "original_size": (80, 72)}


def _t2i(prompt: Any, negative: str, latents: str, **kwargs: Any) -> dict[str, Any]:
    return {"method": "text2img", "prompt": prompt, "negative": negative, "tensors": {"latents": latents},
            "kwargs": {"steps": 3, "height": 64, "width": 64, **kwargs}}


def _base_cases() -> dict[str, dict[str, Any]]:
    """The base model's cases (our keyword arguments; "ref" holds what differs on diffusers' side)."""
    cases: dict[str, dict[str, Any]] = {
        f"t2i_{s}": _t2i("a photo of a red fox", NEG, "lat1", scale=6.0, scheduler=s) for s in DETERMINISTIC}
    cases["t2i_euler_a"] = {"method": "text2img", "prompt": "a cat", "negative": "",
                            "kwargs": {"steps": 3, "height": 64, "width": 64, "scale": 7.5, "scheduler": "euler_a",
                                       "seed": 11}}
    # no scheduler: the folder's Euler; our "" is diffusers' None (force_zeros_for_empty_prompt)
    cases["t2i_empty_negative_b2"] = _t2i(["an astronaut riding a horse", "a bowl of fruit"], "", "lat2b",
                                          scale=5.0)
    cases["t2i_empty_negative"] = _t2i("a red fox in the snow", "", "lat1", scale=5.0, scheduler="euler")
    for i, size in enumerate(FULL_SIZES):
        cases[f"t2i_sizes_{i}"] = _t2i("a lighthouse", NEG, "lat3", scale=7.5, scheduler="euler", **size)
    for tag, negative in (("empty", ""), ("neg", NEG)):
        cases[f"i2i_{tag}"] = {"method": "img2img", "prompt": "a watercolor landscape", "negative": negative,
                               "inputs": ["image3"],
                               "kwargs": {"strength": 0.6, "steps": 5, "scale": 7.5, "seed": 5, "scheduler": "euler",
                                          **I2I_SIZES}}
    for strength in (1.0, 0.7):
        cases[f"inpaint_{strength:g}"] = {
            "method": "inpaint", "prompt": "a red door", "negative": "", "inputs": ["image4", "mask"],
            "kwargs": {"strength": strength, "steps": 5, "scale": 7.5, "seed": 9, "scheduler": "euler"}}
    for weight in (0.0, 1.5):
        case = _t2i(f"a (red):{weight:g} fox", NEG, "lat4", scale=7.5, scheduler="euler")
        case["ref"] = {"prompt": "a red fox", "emphasis": weight}
        cases[f"emphasis_{weight:g}"] = case
    return cases


def _refiner_cases() -> dict[str, dict[str, Any]]:
    def i2i(negative: str, **kwargs: Any) -> dict[str, Any]:
        return {"method": "img2img", "prompt": "a sharp photo", "negative": negative, "inputs": ["image4"],
                "kwargs": {"strength": 0.5, "steps": 6, "scale": 7.5, "seed": 6, **kwargs}}

    return {"i2i_aesthetic": i2i("", scheduler="ddim", **REFINER_SIZES),
            "i2i_aesthetic_neg_euler": i2i(NEG, scheduler="euler", aesthetic_score=3.5,
                                           negative_aesthetic_score=1.0),
            "i2i_default": i2i("", scheduler="ddim"),
            "i2i_folder_scheduler": i2i(NEG)}


def _tensors() -> dict[str, torch.Tensor]:
    def lat(seed: int, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))

    def image(seed: int) -> torch.Tensor:
        return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))

    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1.0
    return {"lat1": lat(1), "lat2b": lat(2, batch=2), "lat3": lat(3), "lat4": lat(4), "image3": image(3),
            "image4": image(4), "mask": mask}


def _diffusers_case(folder: Path, case: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One case through diffusers' SDXL pipeline of the same folder, scheduler and inputs."""
    from test_sdxl_pipeline import _diffusers, _scale_value_rows, _with_scheduler

    kw = dict(case["kwargs"])
    pipe = _diffusers(folder, case["method"])
    scheduler = kw.pop("scheduler", "euler")  # the tiny folders' scheduler is Euler
    _with_scheduler(pipe, scheduler)
    ref: dict[str, Any] = case.get("ref", {})
    call: dict[str, Any] = dict(num_inference_steps=kw.pop("steps"), guidance_scale=kw.pop("scale"),
                                output_type="pt")
    for key, tensor in case.get("tensors", {}).items():
        call[key] = tensors[tensor].clone()
    if "seed" in kw:
        seed = kw.pop("seed")
        g = torch.Generator().manual_seed(seed)
        call["generator"] = [g] if scheduler == "euler_a" else g
    inputs = [tensors[t].clone() for t in case.get("inputs", ())]
    if inputs:
        call["image"] = inputs[0]
    if len(inputs) > 1:
        call["mask_image"] = inputs[1]
    if case["method"] == "inpaint":
        call.update(height=64, width=64)
    call.update(kw)
    originals = _scale_value_rows(pipe.unet, 2, ref["emphasis"]) if "emphasis" in ref else {}  # BOS, "a", "red"
    try:
        images = pipe(ref.get("prompt", case["prompt"]), negative_prompt=case["negative"] or None, **call).images
    finally:
        for lin, f in originals.items():
            lin.forward = f
    return images.float().cpu()


def _run_fresh(art: Path, cases: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor],
               tmp_path: Path) -> dict[str, torch.Tensor]:
    """All cases in ONE fresh process that cannot import sdexport, transformers or diffusers."""
    torch.save(tensors, tmp_path / "tensors.pt")
    (tmp_path / "cases.txt").write_text(repr(cases))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(art), str(tmp_path / "cases.txt"),
                           str(tmp_path / "tensors.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got: dict[str, torch.Tensor] = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(got) == set(cases)
    return got


def _against_diffusers(folder: Path, art: Path, cases: dict[str, dict[str, Any]], tmp_path: Path,
                       differ: list[tuple[str, str]]) -> None:
    """The fresh process's images against diffusers' (<= TOL); `differ`: pairs that must not be equal (the
    conditioning or weight under test does something)."""
    tensors = _tensors()
    got = _run_fresh(art, cases, tensors, tmp_path)
    apart = {f"{a} / {b}": (got[a] - got[b]).abs().max().item() for a, b in differ}
    print("apart:", {k: f"{v:.2e}" for k, v in apart.items()})
    assert all(v > 10 * TOL for v in apart.values()), f"the same image: {apart}"
    errors = {}
    for name, case in cases.items():
        ref = _diffusers_case(folder, case, tensors)
        assert got[name].shape == ref.shape, name
        errors[name] = (got[name] - ref).abs().max().item()
    print("max abs error vs diffusers:", {k: f"{v:.2e}" for k, v in errors.items()})
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"fresh-process artifact vs diffusers above {TOL}: {bad}"


def test_base_artifact_matches_diffusers_in_fresh_process(base_art: Path, sdxl_folder: Path,
                                                         tmp_path: Path) -> None:
    """Every scheduler, empty / non-empty negatives, size conditioning, img2img, inpaint, emphasis."""
    cases = _base_cases()
    assert {c["kwargs"].get("scheduler") for c in cases.values()} >= set(SCHEDULER_NAMES)
    _against_diffusers(sdxl_folder, base_art, cases, tmp_path,
                       differ=[("emphasis_0", "emphasis_1.5"), ("t2i_sizes_0", "t2i_sizes_1"),
                               ("i2i_empty", "i2i_neg"), ("inpaint_1", "inpaint_0.7")])


@pytest.fixture(scope="module")
def refiner_art(sdxl_refiner_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The refiner as a pt2 artifact, built by `sdexport build` from its diffusers folder."""
    out = tmp_path_factory.mktemp("sdxl") / "refiner-pt2"
    args = ["build", str(sdxl_refiner_folder), "-o", str(out), "--format", "pt2", "--kernels", _kernels(),
            "--min-size", "64", "--max-size", "64", "--max-batch", "1", "--max-chunks", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def test_refiner_artifact_matches_diffusers_in_fresh_process(refiner_art: Path, sdxl_refiner_folder: Path,
                                                            tmp_path: Path) -> None:
    """img2img with custom and default aesthetic scores, refiner size ids, two schedulers."""
    m = json.loads((refiner_art / "manifest.json").read_text())
    assert m["family"] == "sdxl-refiner" and m["format"] == "pt2"
    _against_diffusers(sdxl_refiner_folder, refiner_art, _refiner_cases(), tmp_path,
                       differ=[("i2i_aesthetic", "i2i_default")])


def _refiner_jobs(pipe: Any) -> dict[str, torch.Tensor]:
    image = _jobs()["image"]
    return {"i2i": pipe.img2img(image, "a watercolor", "", strength=0.5, steps=4, seed=3, output="tensor",
                                aesthetic_score=7.0, negative_aesthetic_score=2.0),
            "i2i_default": pipe.img2img(image, "a cat", "blurry", strength=0.7, steps=3, seed=4, output="tensor")}


@pytest.mark.slow  # ~4 min on 2 cores; aoti is covered in CI by test_export and test_lora_pipeline
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


def test_half_cpu_artifact_is_bfloat16_vae_included(base: StableDiffusion, base_eager: dict[str, torch.Tensor],
                                                tmp_path: Path) -> None:
    """On the CPU `--half` is bfloat16, and the SDXL VAE stays bfloat16: it overflows float16, not bfloat16
    (float32's exponent range), so only a float16 build upcasts it (force_upcast)."""
    art = base.export(tmp_path / "half", format="pt2", half=True, kernels=_kernels(), **SMALL)
    base.attention_backend("sdpa")
    m = json.loads((art / "manifest.json").read_text())
    assert m["dtype"] == "bfloat16" and m["vae_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(art / "vae_decoder.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())  # noqa: SIM118
    with safe_open(str(art / "unet.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys() if f.get_tensor(k).is_floating_point())  # noqa: SIM118
    pipe = runtime.load(art)
    assert pipe.backend.dtype == torch.bfloat16
    jobs = _jobs()
    out = pipe.text2img(PROMPT, "", steps=3, height=64, width=64, latents=jobs["lat1"], scheduler="euler",
                        output="tensor")
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    assert (out - base_eager["t2i_empty_negative"]).abs().max().item() <= 5e-2  # bf16: 8-bit mantissa


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


def test_context_widths_reach_the_artifact(base: StableDiffusion, base_art: Path) -> None:
    """Each encoder's width (for A1111 emphasis) is in ModelInfo, eager and in the manifest."""
    widths = tuple(e.config.hidden_size for e in base.text_encoders)
    assert len(widths) == 2 and base.info.context_widths == widths
    assert runtime.load(base_art).backend.info.context_widths == widths
