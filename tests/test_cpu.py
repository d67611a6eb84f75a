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
    for n in (1, 2):
        out = artifact._onnx(onnx, torch.device("cpu"), cpu.use_threads(n))(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 4)
        assert torch.get_num_threads() == n
        assert made[-1].intra_op_num_threads == n and made[-1].inter_op_num_threads == 1


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
