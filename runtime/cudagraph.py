"""Replay a tensor function through one CUDA graph per input signature (shapes + dtypes).

Launch gaps dominate an SD UNet step on fast GPUs (see shared/reference/anchors.md); a captured graph
replays every kernel with one launch. Inputs are copied into static buffers; outputs are cloned, since
the next replay overwrites the graph's output buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Key = tuple[tuple[tuple[int, ...], torch.dtype], ...]


class _Graph:
    def __init__(self, fn: Callable[..., Tensor], args: tuple[Tensor, ...], warmup: int) -> None:
        self.inputs = tuple(a.clone() for a in args)
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # lets lazy init and autotuning happen outside the capture
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, args: tuple[Tensor, ...]) -> Tensor:
        for dst, src in zip(self.inputs, args, strict=True):
            dst.copy_(src)
        self.graph.replay()
        return self.output.clone()


class GraphedCall:
    """Wraps `fn(*tensors) -> tensor`; captures lazily on the first call of each signature."""

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2, max_graphs: int = 16) -> None:
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[Key, _Graph] = {}

    def __call__(self, *args: Tensor) -> Tensor:
        key: Key = tuple((tuple(a.shape), a.dtype) for a in args)
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:  # bound memory: drop the oldest capture
                self.graphs.pop(next(iter(self.graphs)))
            graph = self.graphs[key] = _Graph(self.fn, args, self.warmup)
        return graph(args)
