"""Replay a tensor function through one CUDA graph per input signature (shapes + dtypes).

Launch gaps dominate an SD UNet step on fast GPUs (see shared/reference/anchors.md); a captured graph
replays every kernel with one launch. Inputs are copied into static buffers; outputs are cloned, since
the next replay overwrites the graph's output buffer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

Key = tuple[tuple[tuple[int, ...], torch.dtype], ...]
Replay = Callable[[tuple[Tensor, ...]], Tensor]
# (fn, example args, warm-up calls) -> a replay of fn for args of that signature
Capture = Callable[[Callable[..., Tensor], tuple[Tensor, ...], int], Replay]


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
    """Wraps `fn(*tensors) -> tensor`; captures lazily on the first call of each signature.

    At most `max_graphs` captures are kept (each holds its own memory pool); when a new signature
    needs room, the least recently used capture is dropped.  `capture` makes the replays (CUDA
    graphs by default; the tests pass a CPU stand-in to check the cache without a GPU)."""

    def __init__(
        self, fn: Callable[..., Tensor], warmup: int = 2, max_graphs: int = 16, capture: Capture = _Graph
    ) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.capture = capture
        self.graphs: OrderedDict[Key, Replay] = OrderedDict()  # least recently used first

    def __call__(self, *args: Tensor) -> Tensor:
        key: Key = tuple((tuple(a.shape), a.dtype) for a in args)
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            graph = self.graphs[key] = self.capture(self.fn, args, self.warmup)
        else:
            self.graphs.move_to_end(key)
        return graph(args)
