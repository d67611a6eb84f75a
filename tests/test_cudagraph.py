"""CUDA-graph replay of the UNet call: the signature cache on any device, the replays on CUDA
(skipped cleanly without a GPU)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from runtime.cudagraph import GraphedCall, Replay

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


def _key(*shape: int, dtype: torch.dtype = torch.float32) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    return (((*shape,), dtype),)


class _EagerCapture:
    """CPU stand-in for a CUDA-graph capture: counts captures, replays by calling fn."""

    def __init__(self) -> None:
        self.captured: list[tuple[int, ...]] = []

    def __call__(
        self, fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], warmup: int
    ) -> Replay:
        self.captured.append(tuple(args[0].shape))
        return lambda a: fn(*a)


def test_graph_cache_evicts_least_recently_used() -> None:
    cap = _EagerCapture()
    graphed = GraphedCall(lambda x: x * 2, max_graphs=2, capture=cap)
    for n in (1, 2, 1, 3):  # 1 is used again after 2, so 2 is the one to go
        assert torch.equal(graphed(torch.ones(n)), torch.full((n,), 2.0))
    assert list(graphed.graphs) == [_key(1), _key(3)]
    assert cap.captured == [(1,), (2,), (3,)]  # the hit on 1 did not capture again
    graphed(torch.ones(2))  # evicted: captured anew, and 1 (now least recent) goes
    assert list(graphed.graphs) == [_key(3), _key(2)]
    assert cap.captured[-1] == (2,)
    graphed(torch.ones(3, dtype=torch.float16))  # dtype is part of the signature
    assert list(graphed.graphs) == [_key(2), _key(3, dtype=torch.float16)]
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedCall(lambda x: x, max_graphs=0)


@pytest.mark.cuda
@cuda
def test_graph_cache_is_bounded_and_evicts_least_recently_used() -> None:
    graphed = GraphedCall(lambda x: x * 2, max_graphs=2)
    with torch.inference_mode():
        for n in (1, 2, 1, 3):
            assert torch.equal(graphed(torch.ones(n, device="cuda")), torch.full((n,), 2.0, device="cuda"))
    assert list(graphed.graphs) == [_key(1), _key(3)]
