"""CUDA-graph replay of the UNet call (CUDA only; skipped cleanly without a GPU)."""

from __future__ import annotations

import pytest
import torch

from runtime.cudagraph import GraphedCall

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_graphed_call_matches_eager_per_shape_and_does_not_alias() -> None:
    lin = torch.nn.Linear(16, 16).cuda()

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(lin(x)) * w

    graphed = GraphedCall(fn)
    with torch.inference_mode():
        for shape in [(2, 16), (4, 16), (2, 16)]:
            x, w = torch.randn(shape, device="cuda"), torch.rand(shape, device="cuda")
            assert torch.allclose(graphed(x, w), fn(x, w))
        a = graphed(torch.ones(2, 16, device="cuda"), torch.ones(2, 16, device="cuda"))
        b = graphed(torch.zeros(2, 16, device="cuda"), torch.ones(2, 16, device="cuda"))
    assert len(graphed.graphs) == 2
    assert not torch.equal(a, b)  # the first result survived the second replay


@pytest.mark.cuda
@cuda
def test_graph_cache_is_bounded() -> None:
    graphed = GraphedCall(lambda x: x * 2, max_graphs=2)
    with torch.inference_mode():
        for n in (1, 2, 3):
            graphed(torch.ones(n, device="cuda"))
    assert len(graphed.graphs) == 2
