"""`sdexport bench --control`: the UNet step without and with one ControlNet (sdexport/bench_control.py),
eager and on a model artifact, with a control artifact or a random ControlNet mirroring the UNet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdexport.cli import main

FAST = ["-W", "64", "-H", "64", "--steps", "1", "--repeat", "1", "--backends", "sdpa", "--no-diffusers",
        "--threads", "1"]


def test_bench_control_rows(demo_artifact: Path, demo_control_artifact: Path, tmp_path: Path) -> None:
    spec = str(demo_control_artifact)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "demo", "--artifact", str(demo_artifact), *FAST, "--control", spec,
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    control = json.loads(out.read_text())["control"]
    rows = {r["path"].split(" (")[0]: r for r in control["rows"]}
    assert set(rows) == {"eager sdpa", "artifact pt2"}
    assert rows["eager sdpa"]["controlnet"] == "eager ControlNet"
    assert rows["artifact pt2"]["controlnet"] == f"ControlNet artifact ({spec})"
    for r in rows.values():
        assert r["unet_step_ms"] > 0 and r["with_controlnet_ms"] > 0
        assert r["added"] == pytest.approx(r["with_controlnet_ms"] / r["unet_step_ms"] - 1)
    assert control["flops_controlnet"] > 0 and control["flop_ratio"] > 0
    assert f"ControlNet ({spec})" in result.output and "+ControlNet" in result.output


def test_random_controlnet_on_eager_only() -> None:
    """`random` mirrors the model's UNet; without model artifacts only the eager row is timed."""
    import torch

    from sdexport.bench import make_inputs
    from sdexport.bench_control import control_cost
    from sdexport.presets import open_model

    sd = open_model("demo").attention_backend("sdpa")
    inp = make_inputs(sd, 64, 64, torch.device("cpu"), torch.float32)
    calls: list[float] = []

    def timer(fn: object) -> float:
        out = fn()  # type: ignore[operator]
        calls.append(float(out.abs().sum()))
        return 1.0 + len(calls)

    result = control_cost(sd, inp, "random", [], "cpu", timer, 64, 64, log=lambda s: None)
    assert [r["path"] for r in result["rows"]] == ["eager sdpa"]
    assert result["rows"][0]["unet_step_ms"] == 2.0 and result["rows"][0]["with_controlnet_ms"] == 3.0
    assert calls[0] != calls[1]  # the step with the ControlNet's residuals is another computation


def test_bench_control_bad_input(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["bench", "demo", *FAST, "--control", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "not a control artifact, a ControlNet folder or file, or 'random'" in r.output
    r = CliRunner().invoke(main, ["bench", "demo", *FAST, "--control", "random", "--compare-openvino"])
    assert r.exit_code == 2 and "--compare-openvino" in r.output
