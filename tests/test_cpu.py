"""CPU execution: explicit thread counts for every engine, bfloat16 artifacts (`--half` on the CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import runtime
from runtime import cpu
from runtime.manifest import ArtifactError


@pytest.fixture
def keep_threads() -> Any:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tiny_onnx(path: Path) -> Path:
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU()).eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and quick for a tiny graph
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 8),), str(path), dynamo=False, input_names=["x"])
    return path


def test_onnx_sessions_get_the_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            keep_threads: Any) -> None:
    """onnxruntime keeps its own pool, which OMP_NUM_THREADS does not bind: the session options say it."""
    import onnxruntime as ort

    from runtime import artifact

    made: list[Any] = []
    real = ort.InferenceSession

    def spy(*args: Any, **kwargs: Any) -> Any:
        session = real(*args, **kwargs)
        made.append(kwargs["sess_options"])
        return session

    monkeypatch.setattr(ort, "InferenceSession", spy)
    onnx = _tiny_onnx(tmp_path / "m.onnx")
    x = torch.randn(2, 8)
    for n, spin in ((1, True), (2, False)):
        out = artifact._onnx(onnx, torch.device("cpu"), cpu.use_threads(n), spin)(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 4)
        assert torch.get_num_threads() == n
        assert made[-1].intra_op_num_threads == n and made[-1].inter_op_num_threads == 1
        assert made[-1].get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")


def test_load_sets_and_records_threads(sd1_folder: Path, tmp_path: Path, keep_threads: Any) -> None:
    from sdexport import StableDiffusion

    sd = StableDiffusion.from_pretrained(sd1_folder)
    art = sd.export(tmp_path / "a", format="pt2", kernels="native", max_batch=1, min_size=64, max_size=64,
                    max_chunks=1)
    pipe = runtime.load(art, threads=2)
    assert torch.get_num_threads() == 2 and pipe.backend.threads == 2  # type: ignore[attr-defined]
    pipe = runtime.load(art)  # None: torch's current count, recorded
    assert pipe.backend.threads == torch.get_num_threads()  # type: ignore[attr-defined]
    torch.set_num_threads(1)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            runtime.load(art, threads=bad)
    assert torch.get_num_threads() == 1  # a refused call changes nothing
    with pytest.raises(ArtifactError):
        runtime.load(tmp_path / "missing", threads=1)


@pytest.fixture(scope="module")
def onnx_artifact(sd1_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdexport import StableDiffusion

    sd = StableDiffusion.from_pretrained(sd1_folder)
    return sd.export(tmp_path_factory.mktemp("cpu") / "onnx", format="onnx", kernels="native", max_batch=1,
                     min_size=64, max_size=64, max_chunks=1)


def test_compare_openvino_needs_openvino(monkeypatch: pytest.MonkeyPatch, sd1_folder: Path) -> None:
    import sys

    from sdexport.bench import BenchOptions
    from sdexport.bench_compare import run_compare

    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="pip install openvino"):
        run_compare(BenchOptions(model=str(sd1_folder)), [1])


def test_compare_openvino_table(sd1_folder: Path, onnx_artifact: Path, keep_threads: Any,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row of the side-by-side table, at two thread counts; the float32 engines agree with eager.
    Eager bf16 is timed where the CPU has native bf16 or with `half`; OpenVINO's default precision only
    where it is not f32."""
    pytest.importorskip("openvino")
    from sdexport import bench_compare
    from sdexport.bench import BenchOptions
    from sdexport.bench_compare import COMPARED, format_compare, run_compare

    opts = BenchOptions(model=str(sd1_folder), artifacts=[onnx_artifact], width=64, height=64, repeat=2,
                        half=True, spin=False)
    with pytest.raises(ValueError, match="pass a float32 one with --artifact"):
        run_compare(BenchOptions(model=str(sd1_folder), width=64, height=64), [1])
    result = run_compare(opts, [1, 2], log=lambda s: None)
    assert [t["threads"] for t in result["tables"]] == [1, 2]
    default_row = not bench_compare._ov_default_is_f32()
    for table in result["tables"]:
        paths = [r["path"] for r in table["rows"]]
        assert paths[:3] == ["eager fp32", "eager fp32 channels_last", "eager bf16 channels_last"]
        assert paths[3].startswith("onnx artifact, float32") and "f32" in paths[4]
        assert len(paths) == 5 + default_row and (not default_row or "default" in paths[5])
        for row in table["rows"]:
            for comp in COMPARED:
                assert row["ms"][comp] > 0
                bound = 0.1 if "bf16" in row["path"] or "default" in row["path"] else 1e-4
                assert row["max_abs_diff"][comp] <= bound, (row["path"], comp)
    text = format_compare(result)
    assert "threads 2:" in text and "| eager fp32 channels_last |" in text and "spinning off" in text
    plain = cpu.CpuCaps(capability="AVX2", avx512=False, avx512_bf16=False, amx=False)
    monkeypatch.setattr(bench_compare, "cpu_caps", lambda: plain)
    logged: list[str] = []
    result = run_compare(BenchOptions(model=str(sd1_folder), width=64, height=64, repeat=1, channels_last=False,
                                      openvino_onnx=str(onnx_artifact)), [1], log=logged.append)
    paths = [r["path"] for r in result["tables"][0]["rows"]]
    assert "bf16" not in " ".join(paths) and any("no native bf16" in line for line in logged)
    # no channels_last row; OpenVINO on the given graphs, which onnxruntime does not time (not an --artifact)
    assert paths[0] == "eager fp32" and "OpenVINO" in paths[1] and len(paths) == 2 + default_row
    with pytest.raises(ValueError, match="not a float32 onnx artifact"):
        run_compare(BenchOptions(model=str(sd1_folder), width=64, height=64, openvino_onnx=str(sd1_folder)), [1])


def test_bf16_artifact_on_a_cpu_without_native_bf16_runs_and_warns(sd1_folder: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`runtime.load` runs a bfloat16 artifact on any CPU (ATen converts around each op where the CPU has no
    bf16 arithmetic): it warns that float32 is faster there, and is silent where bf16 is native."""
    import warnings

    from sdexport import StableDiffusion

    sd = StableDiffusion.from_pretrained(sd1_folder)
    art = sd.export(tmp_path / "bf16", format="pt2", half=True, kernels="native", max_batch=1, min_size=64,
                    max_size=64, max_chunks=1)
    native = cpu.CpuCaps(capability="AVX512", avx512=True, avx512_bf16=True, amx=False)
    plain = cpu.CpuCaps(capability="AVX2", avx512=False, avx512_bf16=False, amx=False)
    monkeypatch.setattr(cpu, "cpu_caps", lambda: plain)
    with pytest.warns(RuntimeWarning, match=r"without native bf16 \(AVX2 \(no AVX512/BF16/AMX\)\)"):
        pipe = runtime.load(art)
    out = pipe.text2img("a fox", steps=1, height=64, width=64, seed=1, output="tensor")
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    monkeypatch.setattr(cpu, "cpu_caps", lambda: native)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.load(art).backend.dtype == torch.bfloat16


def test_bf16_artifact_refits(sd1_folder: Path, tmp_path: Path) -> None:
    """Weights beside the program hold for bf16 CPU artifacts: `refit` swaps in another model's weights, and the
    result matches that model in eager bfloat16."""
    import warnings

    from sdexport import StableDiffusion
    from sdexport.export.refit import refit

    base = StableDiffusion.from_pretrained(sd1_folder)
    art = base.export(tmp_path / "bf16", format="pt2", half=True, kernels="native", max_batch=1, min_size=64,
                      max_size=64, max_chunks=1)
    tuned = StableDiffusion.from_pretrained(sd1_folder)
    with torch.no_grad():
        for p in tuned.unet.parameters():
            p.mul_(1.1)
    assert refit(art, tuned, tmp_path / "tuned").dtype == "bfloat16"
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def image(pipe: Any) -> torch.Tensor:
        out = pipe.text2img("a fox", steps=2, height=64, width=64, latents=lat, output="tensor")
        assert isinstance(out, torch.Tensor)
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no native bf16 on the test machine (checked above)
        got, before = image(runtime.load(tmp_path / "tuned")), image(runtime.load(art))
    assert (got - image(tuned.bfloat16())).abs().max().item() <= 1e-3
    assert (got - before).abs().max().item() > 1e-2  # the weights really changed


def test_profile_cpu_script(sd1_folder: Path, onnx_artifact: Path, tmp_path: Path) -> None:
    """scripts/profile_cpu.py: our ops and oneDNN's primitives for an artifact (adding up to its wall time),
    OpenVINO's layers for the ONNX graph."""
    pytest.importorskip("openvino")
    import re
    import subprocess
    import sys

    from sdexport import StableDiffusion

    # a fused VAE (not the CPU default) so that the table has rows of our ops
    art = StableDiffusion.from_pretrained(sd1_folder).export(tmp_path / "pt2", format="pt2", vae_kernels="fused",
                                                             max_batch=1, min_size=64, max_size=64, max_chunks=1)
    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_cpu.py"
    out = subprocess.run([sys.executable, str(script), str(art), str(onnx_artifact), "--component", "vae",
                          "--size", "64"], capture_output=True, text=True, check=True, timeout=300).stdout
    ours, theirs = out.split("OpenVINO f32 on")
    assert "| op sdfused::" in ours and "| oneDNN convolution " in ours and "| Convolution " in theirs
    assert "| rest (Inductor loops, other ATen ops, copies) |" in ours

    def table(text: str) -> tuple[float, list[float]]:
        wall = re.search(r"wall ([\d.]+) ms", text)
        assert wall is not None
        return float(wall[1]), [float(m) for m in re.findall(r"^\| [^|]+ \| (-?[\d.]+) \|", text, re.M)]

    wall, rows = table(ours)
    assert wall > 0 and abs(sum(rows) - wall) <= 0.1 * wall  # the rest is wall minus the ops measured
    wall, rows = table(theirs)
    assert wall > 0 and rows and min(rows) >= 0
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "profiling" in bad.stderr and "missing" in bad.stderr  # the child's error
    assert "Traceback" not in bad.stderr
