"""Prepacked CPU weights (runtime/prepack.py, sdexport/export/prepack.py): a frozen AOTInductor program whose
oneDNN-packed constants are computed from the weights at load, equal to eager, and again after a swap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from runtime.artifact import _aoti, _read_prepack
from runtime.manifest import ArtifactError
from runtime.prepack import ConvPack, PackedProgram, Prepack, PrepackError
from sdexport.export.formats import write_aoti
from sdexport.export.mkl_linear import PACK_LINEAR, _weight_of


class ConvLinear(nn.Module):
    """The packed kinds: a 3x3 convolution with a fused activation, a 1x1 convolution, a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(16, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 1)
        self.lin = nn.Linear(32, 24)

    def forward(self, x: Tensor) -> Tensor:
        y = self.c2(nn.functional.silu(self.c1(x)))
        out: Tensor = self.lin(y.flatten(2).transpose(1, 2))
        return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[ConvLinear, Path]:
    torch.manual_seed(0)
    model = ConvLinear().eval()
    side = torch.export.Dim("side", min=4, max=32)
    out = tmp_path_factory.mktemp("prepack")
    files = write_aoti("m", model, (torch.randn(2, 16, 8, 8),), ({2: side, 3: side},), out, cpu_gemm="onednn")
    assert files["prepack"] == "m.prepack.json"
    return model, out


def _run(prog: PackedProgram, x: Tensor) -> Tensor:
    out = prog(x)
    y: Tensor = out[0] if isinstance(out, (list, tuple)) else out
    return y


def test_packed_program_matches_eager_at_every_size(packed: tuple[ConvLinear, Path]) -> None:
    model, out = packed
    plan = json.loads((out / "m.prepack.json").read_text())
    assert plan["conv"], "no convolution weight is packed"
    assert any(e["op"] == "mkldnn._reorder_linear_weight.default" for e in plan["constants"].values())
    prog, live = _aoti(out / "m.pt2", out / "m.safetensors", torch.device("cpu"), out / "m.prepack.json")
    assert isinstance(prog, PackedProgram)
    assert set(live) == set(model.state_dict())  # the weights, by their names: what adapters swap
    assert sum(t.is_mkldnn for t in prog.live.values()) >= 3  # both convolutions and the linear layer
    with torch.no_grad():
        for side in (8, 5, 32):
            x = torch.randn(2, 16, side, side)
            torch.testing.assert_close(_run(prog, x), model(x), atol=1e-5, rtol=1e-5)


def test_weight_swap_repacks_what_depends_on_it(packed: tuple[ConvLinear, Path]) -> None:
    model, out = packed
    prog, live = _aoti(out / "m.pt2", out / "m.safetensors", torch.device("cpu"), out / "m.prepack.json")
    assert isinstance(prog, PackedProgram)
    swapped = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name in ("c1.weight", "c2.weight", "lin.weight"):  # in place, as a LoRA merge does
            live[name].mul_(-0.5)
            swapped[name].mul_(-0.5)
        prog.load_constants({n: live[n] for n in ("c1.weight", "c2.weight", "lin.weight")})
        x = torch.randn(2, 16, 12, 12)
        other = ConvLinear().eval()
        other.load_state_dict(swapped)
        torch.testing.assert_close(_run(prog, x), other(x), atol=1e-5, rtol=1e-5)


def test_recipes_are_data_not_code(tmp_path: Path) -> None:
    bad = {"format": 1, "conv": {}, "constants": {"p": {"op": "aten.from_file.default", "args": ["/etc/passwd"]}}}
    with pytest.raises(PrepackError, match=r"aten\.from_file\.default.*not one a recipe may call"):
        Prepack.from_json(json.dumps(bad), "x.json")
    for text, why in [("{", "malformed"), (json.dumps({"format": 9, "conv": {}, "constants": {}}), "format 9"),
                      (json.dumps({"format": 1, "conv": {}, "constants": {"p": {"what": 1}}}), "malformed")]:
        with pytest.raises(PrepackError, match=why):
            Prepack.from_json(text, "x.json")
    # through the loader: a clear ArtifactError, not a crash
    (tmp_path / "m.prepack.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="not one a recipe may call"):
        _read_prepack(tmp_path / "m.prepack.json")


def test_recipe_values_and_sources() -> None:
    torch.manual_seed(0)
    w, lw = torch.randn(8, 4, 3, 3), torch.randn(6, 5)
    plan = Prepack({"t": {"op": "aten.permute.default", "args": [{"ref": "lin.weight"}, [1, 0]], "kwargs": {}},
                    "packed": {"op": "aten.clone.default", "args": [{"ref": "t"}],
                               "kwargs": {"memory_format": {"memory_format": "torch.contiguous_format"}}}},
                   {"conv.weight": ConvPack((1, 1), (1, 1), (1, 1), 1, (1, 4, 8, 8))})
    plan = Prepack.from_json(plan.to_json(), "roundtrip")
    assert plan.sources("packed") == {"lin.weight"} and plan.sources("conv.weight") == {"conv.weight"}
    got = plan.compute({"lin.weight": lw, "conv.weight": w}, ["packed", "conv.weight"])
    torch.testing.assert_close(got["packed"], lw.t())
    assert got["conv.weight"].is_mkldnn
    x = torch.randn(1, 4, 8, 8)
    y = torch.ops.mkldnn._convolution_pointwise(x, got["conv.weight"], None, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
    torch.testing.assert_close(y, nn.functional.conv2d(x, w, padding=1), atol=1e-5, rtol=1e-5)


def test_bfloat16_program_runs_on_any_cpu(tmp_path: Path) -> None:
    """A bf16 build: oneDNN packs bf16 weights only where the CPU has bf16 support; elsewhere the recipes leave
    them plain (a convolution pack falls back to the weight as it is) and the program still matches eager."""
    torch.manual_seed(0)
    model = ConvLinear().eval().to(torch.bfloat16)
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)
    files = write_aoti("m", model, (x,), None, tmp_path)
    prepack = tmp_path / files["prepack"] if "prepack" in files else None
    prog, _ = _aoti(tmp_path / "m.pt2", tmp_path / "m.safetensors", torch.device("cpu"), prepack)
    with torch.no_grad():
        out = prog(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        torch.testing.assert_close(out.float(), model(x).float(), atol=3e-2, rtol=3e-2)
    w = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
    packed = ConvPack((1, 1), (1, 1), (1, 1), 1, (1, 4, 8, 8)).pack(w)
    assert torch.equal(packed.to_dense() if packed.is_mkldnn else packed, w)


class Block(nn.Module):
    """Transformer-shaped linear layers on (B, L, C) tokens: without bias, with a GELU (Inductor fuses it into
    oneDNN's call), a residual one (Inductor fuses the add) and a square one (where a transposed weight would
    still fit)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 32, bias=False)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.out = nn.Linear(32, 32)

    def forward(self, x: Tensor) -> Tensor:
        h = self.q(x)
        h = h + self.down(nn.functional.gelu(self.up(h)))
        y: Tensor = self.out(h)
        return y


def test_mkl_linears_read_the_weights_in_place(tmp_path: Path) -> None:
    """cpu_gemm="mkl": the float32 linear layers, the residual one included, become MKL calls on their weights
    (no packed copy, no recipe); one with a fused activation stays oneDNN's. The program matches eager at
    every length and follows an in-place swap."""
    torch.manual_seed(0)
    model = Block().eval()
    tokens = torch.export.Dim("tokens", min=2, max=300)
    files = write_aoti("m", model, (torch.randn(2, 77, 32),), ({1: tokens},), tmp_path, cpu_gemm="mkl")
    prepack = tmp_path / files["prepack"]
    recipes = json.loads(prepack.read_text())["constants"]
    packed = [n for n, e in recipes.items() if e["op"] == PACK_LINEAR]
    assert len(packed) == 1 and _weight_of(recipes, packed[0]) == ("up.weight", True), recipes
    prog, live = _aoti(tmp_path / "m.pt2", tmp_path / "m.safetensors", torch.device("cpu"), prepack)
    assert set(live) == set(model.state_dict())
    with torch.no_grad():
        for n in (77, 2, 300):
            x = torch.randn(2, n, 32)
            torch.testing.assert_close(_run(prog, x), model(x), atol=1e-5, rtol=1e-5)
        swapped = ("q.weight", "up.weight", "down.weight", "out.weight")
        for name in swapped:  # in place, as a LoRA merge does
            live[name].mul_(-0.5)
            getattr(model, name.split(".")[0]).weight.mul_(-0.5)
        prog.load_constants({n: live[n] for n in swapped})
        x = torch.randn(2, 50, 32)
        torch.testing.assert_close(_run(prog, x), model(x), atol=1e-5, rtol=1e-5)


def test_a_rewrite_that_finds_nothing_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If a torch upgrade changes the graphs so that no linear layer is rewritten, the build says so (and the
    program still works, on oneDNN)."""
    from sdexport.export import mkl_linear

    monkeypatch.setattr(mkl_linear, "rewrite", lambda graph, constants: 0)
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 77, 32)
    with pytest.warns(RuntimeWarning, match="no linear layer became an MKL call"):
        files = write_aoti("m", model, (x,), None, tmp_path, cpu_gemm="mkl")
    prog, _ = _aoti(tmp_path / "m.pt2", tmp_path / "m.safetensors", torch.device("cpu"), tmp_path / files["prepack"])
    with torch.no_grad():
        torch.testing.assert_close(_run(prog, x), model(x), atol=1e-5, rtol=1e-5)


def test_onednn_linears_stay_packed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Block().eval()
    files = write_aoti("m", model, (torch.randn(2, 77, 32),), None, tmp_path, cpu_gemm="onednn")
    recipes = json.loads((tmp_path / files["prepack"]).read_text())["constants"]
    assert sum(e["op"] == PACK_LINEAR for e in recipes.values()) == 4


def test_packed_linear_weight_resolution() -> None:
    """The rewrite finds the weight behind a packed constant through transposes only."""
    perm = {"op": "aten.permute.default", "args": [{"ref": "w"}, [1, 0]], "kwargs": {}}
    consts: dict[str, Any] = {
        "t": perm,
        "p1": {"op": PACK_LINEAR, "args": [{"op": "aten.permute.default", "args": [{"ref": "t"}, [1, 0]],
                                            "kwargs": {}}, 8], "kwargs": {}},
        "p2": {"op": PACK_LINEAR, "args": [perm, 8], "kwargs": {}},
        "p3": {"op": PACK_LINEAR, "args": [{"op": "aten.cat.default", "args": [[{"ref": "w"}, {"ref": "v"}]],
                                            "kwargs": {}}, 8], "kwargs": {}},
    }
    assert _weight_of(consts, "p1") == ("w", True)  # packs permute(permute(w)) = w, stored (out, in)
    assert _weight_of(consts, "p2") == ("w", False)  # packs permute(w): w is stored (in, out)
    assert _weight_of(consts, "p3") is None and _weight_of(consts, "t") is None
