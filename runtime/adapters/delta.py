"""The weight update ΔW of one adapted module, from its factors (no scale: callers multiply by
`multiplier · entry.scale`, entry.scale = alpha / rank).

Formulas (shapes: out = output features/channels, in = input, k = kernel dims, r = rank):
- LoRA (Hu et al. 2021, arXiv:2106.09685): ΔW = B·A, B = up (out, r), A = down (r, in); LoCon (kohya /
  LyCORIS) for a k×k conv: A is a k×k conv (r, in, k, k), B a 1×1 conv (out, r, 1, 1), ΔW = B·A reshaped
  to (out, in, k, k). With LoCon's CP middle `lora_mid` M (r, r, k, k): ΔW[o,c] = Σ_ij M[i,j]·B[o,i]·A[j,c].
- LoHa (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS, Yeh et al. 2024, arXiv:2309.14859):
  ΔW = (W1a·W1b) ⊙ (W2a·W2b), reshaped to the weight's shape. Tucker form (LyCORIS `use_tucker`): each
  factor is T ×1 Wa ×2 Wb: W[o,c,...] = Σ_ij T[i,j,...]·Wa[i,o]·Wb[j,c], Wa (r, out), Wb (r, in).
- LoKr (LyCORIS paper §3): ΔW = W1 ⊗ W2 (Kronecker product), W1 = `lokr_w1` or W1a·W1b, W2 = `lokr_w2`,
  W2a·W2b, or the Tucker form of `lokr_t2`; for a conv W1 is (a, b, 1, 1) and W2 (c, d, k, k).
- full (LyCORIS `diff`): ΔW = diff (and Δbias = diff_b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from runtime.adapters.lora import LoraEntry

__all__ = ["delta", "fits", "natural_shape"]


def _f(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """T ×1 Wa ×2 Wb (Tucker / CP core with its two mode factors)."""
    return torch.einsum("ij...,io,jc->oc...", _f(t), _f(wa), _f(wb))


def _pair(a: Tensor, b: Tensor) -> Tensor:
    return _f(a).flatten(1) @ _f(b).flatten(1)


def _w(e: LoraEntry, n: str) -> tuple[int, ...]:
    """Shape of the LoHa / LoKr factor n ("1" or "2") before reshaping, from the tensor shapes only."""
    t = e.tensors
    if e.kind == "lokr" and f"w{n}" in t:
        return tuple(t[f"w{n}"].shape)
    if f"t{n}" in t:
        return (t[f"w{n}a"].shape[1], t[f"w{n}b"].shape[1], *t[f"t{n}"].shape[2:])
    return (t[f"w{n}a"].shape[0], math.prod(t[f"w{n}b"].shape[1:]))


def natural_shape(e: LoraEntry) -> tuple[int, ...]:
    """ΔW's shape as the factors give it; LoHa / LoKr products of flattened factors are 2-D and fit any
    weight with the same first dim and number of elements."""
    t = e.tensors
    if e.kind == "full":
        return tuple(t["diff"].shape)
    if e.kind == "lora":
        k = tuple(t["mid"].shape[2:]) if "mid" in t else tuple(t["down"].shape[2:])
        return (t["up"].shape[0], t["down"].shape[1], *k)
    if e.kind == "loha":
        return _w(e, "1")
    a, b = _w(e, "1")[:2]
    w2 = _w(e, "2")
    return (a * w2[0], b * math.prod(w2[1:]))


def fits(e: LoraEntry, shape: Sequence[int]) -> bool:
    """Whether e's ΔW is a weight of `shape`: equal, or equal up to trailing 1×1 kernel dims (a linear
    LoRA on a 1×1 conv, as A1111 applies), or for LoHa / LoKr same first dim and size."""
    nat, shape = natural_shape(e), tuple(shape)

    def squeeze(s: tuple[int, ...]) -> tuple[int, ...]:
        while len(s) > 2 and s[-1] == 1:
            s = s[:-1]
        return s

    if nat == shape or squeeze(nat) == squeeze(shape):
        return True
    if e.kind in ("loha", "lokr") and len(nat) == 2 and shape:
        return nat[0] == shape[0] and math.prod(nat) == math.prod(shape)
    return False


def _lokr_w2(e: LoraEntry, shape: Sequence[int]) -> Tensor:
    t = e.tensors
    if "w2" in t:
        w2 = _f(t["w2"])
    elif "t2" in t:
        w2 = _tucker(t["t2"], t["w2a"], t["w2b"])
    else:
        w2 = _pair(t["w2a"], t["w2b"])
    if len(shape) == 4 and w2.dim() == 2:  # (c, d·k·k) -> (c, d, k, k)
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    return w2


def delta(e: LoraEntry, shape: Sequence[int]) -> Tensor:
    """ΔW (float32, unscaled) reshaped to the target weight's `shape`; call `fits` first."""
    t = e.tensors
    if e.kind == "full":
        out = _f(t["diff"])
    elif e.kind == "lora":
        if "mid" in t:
            out = _tucker(t["mid"], _f(t["up"]).flatten(1).T, _f(t["down"]).flatten(1))
        else:
            out = _pair(t["up"], t["down"])
    elif e.kind == "loha":
        w = []
        for n in ("1", "2"):
            w.append(_tucker(t[f"t{n}"], t[f"w{n}a"], t[f"w{n}b"]) if f"t{n}" in t else _pair(t[f"w{n}a"], t[f"w{n}b"]))
        out = w[0].reshape(shape) * w[1].reshape(shape)
    else:
        w1 = _f(t["w1"]) if "w1" in t else _pair(t["w1a"], t["w1b"])
        w2 = _lokr_w2(e, shape)
        if w2.dim() > w1.dim():
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
        out = torch.kron(w1.contiguous(), w2.contiguous())
    return out.reshape(shape)


def bias_delta(e: LoraEntry) -> Tensor | None:
    """Δbias of a full-diff module with `diff_b`, else None."""
    b = e.tensors.get("diff_b")
    return None if b is None else _f(b)
