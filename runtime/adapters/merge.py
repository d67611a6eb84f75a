"""Merging resolved LoRAs into a weight table in place, exactly undoably.

W' = W + Σ_l s_l · (alpha_l / rank_l) · ΔW_l, computed in float32 and cast to W's dtype. Undo does not
subtract (that would not be bit-exact in fp16/bf16): `apply` returns copies of the touched originals and
`restore` copies them back. :class:`LoraMerger` keeps one weight table merged with a list of
(LoRA, scale) and skips the work when the same list is asked for again.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import torch
from torch import Tensor

from runtime.adapters.delta import bias_delta, delta
from runtime.adapters.files import AdapterError
from runtime.adapters.keys import Resolved

__all__ = ["LoraMerger", "apply", "deltas", "restore", "stacked"]


def deltas(resolved: Resolved, scale: float = 1.0) -> dict[str, Tensor]:
    """target name -> scale · entry.scale · ΔW (float32, CPU or where the LoRA's tensors are)."""
    out: dict[str, Tensor] = {}
    for e, target, shape in resolved.targets:
        s = scale * e.scale
        d = delta(e, shape)
        out[target] = d * s if e.kind == "full" else d.mul_(s)  # factor products are fresh tensors
        b = bias_delta(e)
        if b is not None:
            out[target[: -len("weight")] + "bias"] = b * s
    return out


def stacked(loras: Sequence[tuple[Resolved, float]]) -> dict[str, Tensor]:
    """The sum of several LoRAs' deltas (they stack additively)."""
    out: dict[str, Tensor] = {}
    for resolved, scale in loras:
        for k, d in deltas(resolved, scale).items():
            if k in out:
                out[k].add_(d)  # out[k] is a fresh tensor of deltas()
            else:
                out[k] = d
    return out


def restore(weights: MutableMapping[str, Tensor], originals: Mapping[str, Tensor]) -> None:
    """Copy saved originals back into the weights' own storage (bit-identical)."""
    with torch.no_grad():
        for k, t in originals.items():
            weights[k].copy_(t)


def apply(weights: MutableMapping[str, Tensor], updates: Mapping[str, Tensor], sign: int = 1,
          keep_device: torch.device | str | None = None,
          saved: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """W += sign · ΔW in place (each weight keeps its storage, dtype and device); returns copies of the
    touched originals (on `keep_device`, default the weight's) for `restore`; `saved` holds copies
    already made (equal to the weights now), reused rather than copied again. Everything is checked
    before anything changes; a failure half-way restores what was changed."""
    problems = [f"{k} is not a weight of this model" for k in updates if k not in weights]
    problems += [f"{k}: ΔW {tuple(d.shape)} vs weight {tuple(weights[k].shape)}"
                 for k, d in updates.items() if k in weights and d.shape != weights[k].shape]
    if problems:
        raise AdapterError("cannot merge: " + "; ".join(problems[:8]))
    originals: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for k, d in updates.items():
                w = weights[k]
                originals[k] = saved[k] if saved and k in saved else w.detach().to(keep_device or w.device, copy=True)
                if w.dtype == torch.float32:  # in place, the same bits as below
                    w.add_(d.to(w.device, torch.float32), alpha=sign)
                else:
                    w.copy_((w.to(torch.float32) + sign * d.to(w.device, torch.float32)).to(w.dtype))
    except BaseException:
        restore(weights, originals)
        raise
    return originals


def _identity(resolved: Resolved) -> str:
    """The file (sha256) and the components it adapts (`Resolved.only` parts differ from the whole)."""
    info = resolved.lora.info
    what = info.sha256 if info is not None else f"id:{id(resolved.lora)}"
    return f"{what}:{','.join(sorted(resolved.report()))}"


class LoraMerger:
    """Keeps `weights` (a live name -> tensor table: a module's parameters, an artifact's constants)
    merged with a list of LoRAs. `set` with the same list (same files by sha256, same scales) as the
    current one does nothing; `merges` counts the merges done."""

    def __init__(self, weights: MutableMapping[str, Tensor], keep_device: torch.device | str | None = None) -> None:
        self.weights = weights
        self.keep_device = keep_device
        self.merges = 0
        self._originals: dict[str, Tensor] = {}
        self._key: tuple[tuple[str, float], ...] = ()
        self._active: tuple[tuple[Resolved, float], ...] = ()

    @property
    def active(self) -> tuple[tuple[Resolved, float], ...]:
        return self._active

    def key(self, loras: Sequence[tuple[Resolved, float]]) -> tuple[tuple[str, float], ...]:
        return tuple((_identity(r), float(s)) for r, s in loras)

    def set(self, loras: Sequence[tuple[Resolved, float]]) -> bool:
        """Merge exactly `loras` (replacing the current set); False when that set is already merged."""
        key = self.key(loras)
        if key == self._key:
            return False
        updates = stacked(loras)  # computed (and checked) before the weights change
        saved = self._originals  # still right for the weights they were taken from, after `unload`
        self.unload()
        if updates:
            self._originals = apply(self.weights, updates, keep_device=self.keep_device, saved=saved)
            self.merges += 1
        self._key, self._active = key, tuple(loras)
        return True

    def add(self, resolved: Resolved, scale: float = 1.0) -> bool:
        return self.set([*self._active, (resolved, scale)])

    def unload(self) -> bool:
        """Restore the weights as they were before any merge; False if nothing was merged."""
        if not self._key:
            return False
        restore(self.weights, self._originals)
        self._originals, self._key, self._active = {}, (), ()
        return True
