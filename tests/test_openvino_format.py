"""`--format openvino`: OpenVINO IR converted from the ONNX graphs, run by the runtime through OpenVINO's CPU
plugin. One tiny artifact (its build exports the ONNX graphs, like the onnx case of test_export.py; slow) serves
every test: parity with eager in a fresh process (float32, <= 1e-3), ControlNet residuals through the
UNet's inputs, thread and precision settings, and the clear refusals (refit, LoRA hot swap, CUDA, no
OpenVINO installed)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_export import OPTIONS, TOL, _eager, _jobs, _run_child

import runtime
from runtime.adapters import AdapterError
from runtime.manifest import ArtifactError
from sdexport import ControlNet, StableDiffusion
from sdexport.export.build import BuildOptions, build

pytest.importorskip("openvino")
# The artifact's build exports four ONNX graphs: ~3 min on the shared 2-core VM, over the CI budget.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd(sd1_folder: Path) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sd1_folder).attention_backend("sdpa")


@pytest.fixture(scope="module")
def ov_artifact(sd: StableDiffusion, tmp_path_factory: pytest.TempPathFactory) -> Path:
    art = tmp_path_factory.mktemp("ov") / "openvino"
    build(sd, art, BuildOptions(format="openvino", kernels="native", **OPTIONS))  # type: ignore[arg-type]
    return art


def test_openvino_artifact_matches_eager_in_fresh_process(sd: StableDiffusion, ov_artifact: Path,
                                                          tmp_path: Path) -> None:
    m = json.loads((ov_artifact / "manifest.json").read_text())
    assert m["format"] == "openvino" and m["dtype"] == "float32"
    assert m["modules"]["unet"] == {"program": "unet.xml", "weights": "unet.bin"}
    on_disk = {p.relative_to(ov_artifact).as_posix() for p in ov_artifact.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {"manifest.json"}  # every file hashed; no ONNX scratch left behind
    eager = _eager(sd, _jobs())
    out = _run_child(ov_artifact, tmp_path)
    for key, ref in eager.items():
        err = (out[key] - ref).abs().max().item()
        assert err <= TOL, f"openvino {key}: max abs error {err}"


def test_controlnet_residuals_reach_the_openvino_unet(sd: StableDiffusion, ov_artifact: Path,
                                                     model_root: Path) -> None:
    from controlnet_reference import make_controlnet_folder

    cn = ControlNet.from_pretrained(make_controlnet_folder("sd1", model_root, 1))
    g = torch.Generator().manual_seed(3)
    lat, hint = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    kw: dict[str, Any] = dict(steps=3, height=64, width=64, latents=lat, output="tensor", control_scale=0.8)
    pipe = runtime.load(ov_artifact)
    art = pipe.text2img("a fox", "blurry", control=cn, control_image=hint, **kw)
    eager = sd.text2img("a fox", "blurry", control=cn, control_image=hint, **kw)
    assert isinstance(art, torch.Tensor) and isinstance(eager, torch.Tensor)
    assert (art - eager).abs().max().item() <= TOL
    plain = pipe.text2img("a fox", "blurry", **{k: v for k, v in kw.items() if k != "control_scale"})
    assert isinstance(plain, torch.Tensor) and (art - plain).abs().max().item() > 1e-2  # the ControlNet acts


def test_threads_and_precision_reach_openvino(ov_artifact: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every program is compiled with the load's thread count; a bfloat16 manifest (`--half`) asks OpenVINO
    for bf16 (on a CPU without native bf16 the plugin computes in f32)."""
    import warnings

    import openvino as ov

    configs: list[dict[str, Any]] = []
    real = ov.Core.compile_model

    def spy(self: Any, model: Any, device: str, config: dict[str, Any]) -> Any:
        configs.append(config)
        return real(self, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", spy)
    before = torch.get_num_threads()
    try:
        runtime.load(ov_artifact, threads=2)
        assert len(configs) == 4 and all(c["INFERENCE_NUM_THREADS"] == 2 for c in configs)
        assert {c["INFERENCE_PRECISION_HINT"] for c in configs} == {"f32"}
        half = shutil.copytree(ov_artifact, tmp_path / "half")
        m = json.loads((half / "manifest.json").read_text())
        m.update(dtype="bfloat16", vae_dtype="bfloat16")  # the programs are float32 graphs in either build
        (half / "manifest.json").write_text(json.dumps(m))
        configs.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no native bf16 here: runtime.load warns
            pipe = runtime.load(half, threads=1)
        assert {c["INFERENCE_PRECISION_HINT"] for c in configs} == {"bf16"} and len(configs) == 4
        assert pipe.backend.dtype == torch.bfloat16
        out = pipe.text2img("a fox", steps=2, height=64, width=64, seed=1, output="tensor")
        assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    finally:
        torch.set_num_threads(before)


def test_openvino_refusals(sd: StableDiffusion, ov_artifact: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    from sdexport.export.refit import refit

    with pytest.raises(ValueError, match="openvino artifacts keep their weights inside the program"):
        refit(ov_artifact, sd, tmp_path / "refit")
    pipe = runtime.load(ov_artifact)
    with pytest.raises(AdapterError, match="use `sdexport build --lora` for this format"):
        pipe.backend.adapter_weights()  # type: ignore[attr-defined]
    with pytest.raises(ArtifactError, match="openvino artifacts run on the CPU"):
        runtime.load(ov_artifact, device="cuda")
    with pytest.raises(ValueError, match="--format openvino builds CPU artifacts"):
        BuildOptions(format="openvino", device="cuda").validate()
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(ArtifactError, match="pip install openvino"):
        runtime.load(ov_artifact)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"--format openvino needs OpenVINO: .*pip install openvino"):
        BuildOptions(format="openvino").validate()
