"""Key maps: where each expected parameter comes from in a single file, and the strict conversion.

A key map is ``{target key: Source}``; :func:`convert` picks, splits, transposes and reshapes the source
tensors and reports every missing, unexpected or misshapen key in one :class:`CheckpointError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from .architecture import Shapes
from .errors import format_shape, raise_problems

__all__ = ["Source", "convert"]


@dataclass(frozen=True)
class Source:
    """Where one diffusers key comes from: an LDM key, optionally one third of a fused q/k/v tensor."""

    key: str
    chunk: int | None = None  # 0/1/2: q/k/v rows of an OpenCLIP ``in_proj`` tensor
    transpose: bool = False  # stored transposed (OpenCLIP's ``text_projection``: x @ P)



def convert(
    state: Mapping[str, Tensor],
    key_map: Mapping[str, Source],
    expected: Shapes,
    prefix: str,
    what: str,
    *,
    ignore: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Tensor]:
    """Pick, split and reshape the source tensors named by ``key_map``; every problem in one error.

    All source keys under ``prefix`` must be consumed (or listed in ``ignore``). A ``(C, C, 1, 1)`` 1x1
    convolution kernel becomes the ``(C, C)`` linear weight where the target is linear (the LDM VAE
    attention's q/k/v/proj_out; SD1 UNet proj_in/out stay convolutions in both layouts).
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: set[str] = set()
    for key, src in key_map.items():
        if src.key not in state:
            missing.append(f"{src.key} (for {key})")
            continue
        used.add(src.key)
        stored = state[src.key]
        tensor = stored.t().contiguous() if src.transpose and stored.ndim == 2 else stored
        if src.chunk is not None:
            if stored.ndim == 0 or stored.shape[0] % 3:
                mismatched.add(
                    f"{src.key}: checkpoint {format_shape(stored.shape)} is not a fused q/k/v tensor"
                )
                continue
            tensor = stored.chunk(3, dim=0)[src.chunk]
        want = expected[key]
        if len(want) == 2 and tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1):
            tensor = tensor[:, :, 0, 0]
        if tuple(tensor.shape) != want:
            part = " (transposed)" if src.transpose else ""
            part += "" if src.chunk is None else f" ({'qkv'[src.chunk]} rows)"
            mismatched.add(
                f"{src.key}{part} -> {key}: checkpoint {format_shape(stored.shape)}, "
                f"expected {format_shape(want)}"
            )
            continue
        out[key] = tensor
    unexpected = sorted(k for k in state if k.startswith(prefix) and k not in used and k not in ignore)
    raise_problems(what, sorted(missing), unexpected, sorted(mismatched))
    return out
