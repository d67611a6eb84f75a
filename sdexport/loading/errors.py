"""The loader's single error type and the strict key/shape comparison behind it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "check_state_dict",
    "format_list",
    "format_shape",
    "load_strict",
    "raise_problems",
    "shape_problems",
]

# How many names an error message lists per category before summarising the rest as a count.
MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or matched to the expected architecture."""


def format_list(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    """Render names one per line, indented; lists longer than ``limit`` end with "... and N more"."""
    shown = [f"    {item}" for item in items[:limit]]
    if len(items) > limit:
        shown.append(f"    ... and {len(items) - limit} more")
    return "\n".join(shown)


def format_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def shape_problems(
    state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mismatched)`` of ``state`` against an expected ``{key: shape}`` table."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {format_shape(state[k].shape)}, expected {format_shape(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    )
    return missing, unexpected, mismatched


def raise_problems(
    what: str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]
) -> None:
    """Raise one :class:`CheckpointError` listing every problem (nothing happens when there are none)."""
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{what} does not match the expected architecture:"]
    if missing:
        parts.append(f"  missing keys ({len(missing)}):\n{format_list(missing)}")
    if unexpected:
        parts.append(f"  unexpected keys ({len(unexpected)}):\n{format_list(unexpected)}")
    if mismatched:
        parts.append(f"  shape mismatches ({len(mismatched)}):\n{format_list(mismatched)}")
    raise CheckpointError("\n".join(parts))


def check_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Compare ``state`` against an expected ``{key: shape}`` table; raise one readable error."""
    raise_problems(what, *shape_problems(state, expected))


def load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with one readable :class:`CheckpointError`.

    Keys and shapes are compared against ``module.state_dict()`` first (non-persistent buffers are not
    part of it and are therefore neither required nor accepted), so a mismatch never leaves the module
    half-loaded. Works for modules on the meta device too (``assign=True`` is used there).
    """
    own = module.state_dict()
    check_state_dict(state, {k: tuple(v.shape) for k, v in own.items()}, what)
    on_meta = any(v.device.type == "meta" for v in own.values())
    with torch.no_grad():
        module.load_state_dict(dict(state), strict=True, assign=on_meta)
