"""Fused custom ops `torch.ops.sdfused.*` (built from csrc/ into `runtime._C`).

`available()` says whether the compiled library could be loaded; `load()` loads it (idempotent,
cheap after the first call) and raises a clear error when it was never built.  The wrappers
`group_norm`, `attention` and `geglu` call the compiled ops (no fallback: without the library
they raise OpLibraryNotBuiltError); `reference_*` are pure-PyTorch definitions of the same maths,
used by the tests and benchmarks as the ground truth.  Loading also registers the fake (meta)
kernels used by torch.export / torch.compile, which reject what the compiled kernels reject, and
autograd formulas (eager training and `torch.library.opcheck`), so the ops trace into graphs as
single custom-op nodes.

The CPU kernels come in several builds (portable, AVX2, AVX-512: csrc/cpu/kernels.h); the first call
picks the best one this CPU runs, capped at ATen's choice (so `ATEN_CPU_CAPABILITY=avx2` lowers both).
`cpu_kernels()` names it, `cpu_kernel_capabilities()` lists those usable here, `use_cpu_kernels()`
switches (tests and benchmarks).

This module must not import sdexport, transformers or diffusers.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "BUILD_HINT",
    "OpLibraryNotBuiltError",
    "attention",
    "available",
    "cpu_kernel_capabilities",
    "cpu_kernels",
    "geglu",
    "group_norm",
    "load",
    "reference_attention",
    "reference_geglu",
    "reference_group_norm",
    "use_cpu_kernels",
]

# Bumped when an op's schema or semantics change; artifacts record the version they were built with.
VERSION = "1"
BUILD_HINT = "sdexport op library not built: run pip install --no-build-isolation -e ."

_QUALNAMES = ("sdfused::group_norm", "sdfused::attention", "sdfused::geglu")

_loaded = False
_load_error: BaseException | None = None


class OpLibraryNotBuiltError(ImportError):
    """The compiled extension `runtime._C` is missing or failed to load."""


def _try_load() -> bool:
    global _loaded, _load_error
    if _loaded:
        return True
    try:
        # torch is imported above, so libc10/libtorch are already resolvable.
        ext = importlib.import_module(f"{__package__ or 'runtime'}._C")
    except (ImportError, OSError) as e:
        _load_error = e
        return False
    # The flag lives on the extension module so a reloaded runtime.ops does not re-register.
    if not getattr(ext, "_sdfused_python_registered", False):
        _register_python_side()
        setattr(ext, "_sdfused_python_registered", True)  # noqa: B010
    _loaded = True
    _load_error = None
    return True


def available() -> bool:
    """True when the compiled op library is (or can be) loaded."""
    return _loaded or _try_load()


def load() -> None:
    """Load the op library; raises OpLibraryNotBuiltError with a build hint when missing."""
    if not _try_load():
        raise OpLibraryNotBuiltError(f"{BUILD_HINT} ({_load_error})") from _load_error


def _ext() -> Any:
    load()
    return importlib.import_module(f"{__package__ or 'runtime'}._C")


def cpu_kernels() -> str:
    """The CPU kernels build the ops run on: "default" (portable), "avx2" or "avx512"."""
    name: str = _ext().cpu_kernels()
    return name


def cpu_kernel_capabilities() -> tuple[str, ...]:
    """The CPU kernels builds this CPU runs and this install ships, lowest first."""
    names: tuple[str, ...] = _ext().cpu_kernel_capabilities()
    return names


def use_cpu_kernels(capability: str) -> None:
    """Run later CPU op calls on the named build; ValueError (nothing changed) when it is unknown, the
    CPU lacks its instructions or the install lacks it."""
    _ext().use_cpu_kernels(capability)


# --------------------------------------------------------------------------------------------
# Wrappers (signatures are part of the model-code contract; keep them).


def group_norm(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm over (N, C, *) with optional fused SiLU; keeps contiguous / channels_last."""
    if not _loaded:
        load()
    out: torch.Tensor = torch.ops.sdfused.group_norm(x, groups, weight, bias, eps, silu)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    value_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) @ (v * value_weights[:, None, :, None]); q (B, H, Lq, D), k/v (B, H, Lk, D).

    `scale` defaults to D ** -0.5; `value_weights` (B, Lk) may be None (no weighting)."""
    if not _loaded:
        load()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out: torch.Tensor = torch.ops.sdfused.attention(q, k, v, scale, value_weights)
    return out


def geglu(x: torch.Tensor) -> torch.Tensor:
    """x[..., :F] * gelu(x[..., F:]) (exact erf GELU); last dim 2F -> F."""
    if not _loaded:
        load()
    out: torch.Tensor = torch.ops.sdfused.geglu(x)
    return out


# --------------------------------------------------------------------------------------------
# Pure-PyTorch references: the ground truth of the tests and benchmarks (not a fallback).


def reference_group_norm(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    value_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Materialises the (Lq, Lk) softmax; computes in the inputs' dtype."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    if value_weights is not None:
        v = v * value_weights.to(v.dtype)[:, None, :, None]
    return probs @ v


def reference_geglu(x: torch.Tensor) -> torch.Tensor:
    a, gate = x.chunk(2, dim=-1)
    return a * F.gelu(gate)


# --------------------------------------------------------------------------------------------
# Fake kernels (shape/stride/dtype propagation for FakeTensor tracing).  The checks and layout
# rules mirror csrc/sdfused_common.h (same conditions, same messages), so a bad call fails at
# trace time as it would at run time.

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond: Any, msg: Callable[[], str] | str) -> None:
    """torch._check (symbolic-shape friendly assert); `msg` may be a lazy callable."""
    check: Any = torch._check
    check(cond, msg if callable(msg) else lambda: msg)


def _check_affine(t: torch.Tensor | None, name: str, x: torch.Tensor) -> None:
    if t is None:
        return
    _check(
        t.dim() == 1 and t.shape[0] == x.shape[1],
        lambda: f"sdfused::group_norm: {name} must be a 1-d tensor of C={x.shape[1]} elements, got shape "
        f"{tuple(t.shape)}",
    )
    _check(t.device == x.device, f"sdfused::group_norm: {name} is on {t.device} but x is on {x.device}")
    _check(t.dtype.is_floating_point, f"sdfused::group_norm: {name} must be a floating-point tensor, got {t.dtype}")


def _group_norm_fake(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    _check(
        x.dim() >= 2,
        lambda: f"sdfused::group_norm: x must have shape (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}",
    )
    _check(x.dtype in _FLOATS, f"sdfused::group_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    _check(groups > 0, f"sdfused::group_norm: groups must be positive, got {groups}")
    _check(
        x.shape[1] % groups == 0,
        lambda: f"sdfused::group_norm: groups={groups} must divide the channel count C={x.shape[1]}",
    )
    _check(eps >= 0.0, f"sdfused::group_norm: eps must be non-negative, got {eps}")
    _check_affine(weight, "weight", x)
    _check_affine(bias, "bias", x)
    if x.is_contiguous():
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    value_weights: torch.Tensor | None,
) -> torch.Tensor:
    _check(
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
        lambda: "sdfused::attention: q, k and v must be 4-d (B, H, L, D), got shapes "
        f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
    )
    _check(
        q.dtype == k.dtype == v.dtype,
        f"sdfused::attention: q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}",
    )
    _check(q.dtype in _FLOATS, f"sdfused::attention: q, k, v must be float32, float16 or bfloat16, got {q.dtype}")
    _check(q.device == k.device == v.device, "sdfused::attention: q, k and v must be on the same device")
    _check(
        k.shape == v.shape,
        lambda: "sdfused::attention: k and v must have the same shape (B, H, Lk, D), got "
        f"{tuple(k.shape)} and {tuple(v.shape)}",
    )
    _check(
        q.shape[0] == k.shape[0] and q.shape[1] == k.shape[1] and q.shape[3] == k.shape[3],
        lambda: f"sdfused::attention: q (B, H, Lq, D) and k (B, H, Lk, D) disagree in B, H or D: "
        f"{tuple(q.shape)} vs {tuple(k.shape)}",
    )
    _check(k.shape[2] > 0, "sdfused::attention: need at least one key (Lk > 0)")
    _check(q.shape[3] > 0, "sdfused::attention: head dim D must be positive")
    if value_weights is not None:
        w = value_weights
        _check(
            w.dim() == 2 and w.shape[0] == k.shape[0] and w.shape[1] == k.shape[2],
            lambda: f"sdfused::attention: value_weights must have shape (B, Lk) = ({k.shape[0]}, {k.shape[2]}), "
            f"got {tuple(w.shape)}",
        )
        _check(
            w.dtype.is_floating_point, f"sdfused::attention: value_weights must be floating point, got {w.dtype}"
        )
        _check(
            w.device == q.device, f"sdfused::attention: value_weights is on {w.device} but q is on {q.device}"
        )
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _geglu_fake(x: torch.Tensor) -> torch.Tensor:
    _check(x.dim() >= 1, "sdfused::geglu: x must have at least 1 dim")
    _check(x.shape[-1] % 2 == 0, lambda: f"sdfused::geglu: last dim must be even (2F), got {x.shape[-1]}")
    _check(x.dtype in _FLOATS, f"sdfused::geglu: x must be float32, float16 or bfloat16, got {x.dtype}")
    return torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------------------------
# Autograd formulas (fp32 math, plain aten ops so they trace under AOTAutograd).


def _gn_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, groups, weight, bias, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.groups, ctx.eps, ctx.silu = groups, eps, silu


def _gn_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias = ctx.saved_tensors
    groups: int = ctx.groups
    n, c = x.shape[0], x.shape[1]
    bshape = [1, c] + [1] * (x.dim() - 2)
    red = [0, *range(2, x.dim())]
    xg = x.float().reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xg.var(-1, unbiased=False, keepdim=True) + ctx.eps)
    xhat_g = (xg - mean) * rstd
    xhat = xhat_g.reshape(x.shape)
    g = grad.float()
    w = weight.float().reshape(bshape) if weight is not None else None
    if ctx.silu:
        y = xhat * w if w is not None else xhat
        if bias is not None:
            y = y + bias.float().reshape(bshape)
        sig = torch.sigmoid(y)
        g = g * (sig * (1 + y * (1 - sig)))
    dw = (g * xhat).sum(red).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
    db = g.sum(red).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
    dx = None
    if ctx.needs_input_grad[0]:
        dxh = (g * w if w is not None else g).reshape(n, groups, -1)
        dxg = rstd * (dxh - dxh.mean(-1, keepdim=True) - xhat_g * (dxh * xhat_g).mean(-1, keepdim=True))
        dx = dxg.reshape(x.shape).to(x.dtype)
    return dx, None, dw, db, None, None


def _attn_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    q, k, v, scale, value_weights = inputs
    ctx.save_for_backward(q, k, v, value_weights)
    ctx.scale = scale


def _attn_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    # Materialises the probabilities: backward is for eager training / checks, not export.
    q, k, v, w = ctx.saved_tensors
    scale: float = ctx.scale
    qf, kf, vf, go = q.float(), k.float(), v.float(), grad.float()
    p = torch.softmax((qf @ kf.transpose(-1, -2)) * scale, dim=-1)
    wb = w.float()[:, None, :, None] if w is not None else None
    vw = vf * wb if wb is not None else vf
    dvw = p.transpose(-1, -2) @ go
    dv = (dvw * wb if wb is not None else dvw).to(v.dtype)
    dw = (dvw * vf).sum(dim=(1, 3)).to(w.dtype) if w is not None and ctx.needs_input_grad[4] else None
    dp = go @ vw.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = ((ds @ kf) * scale).to(q.dtype)
    dk = ((ds.transpose(-1, -2) @ qf) * scale).to(k.dtype)
    return dq, dk, dv, None, dw


def _geglu_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _geglu_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    a, b = x.float().chunk(2, dim=-1)
    g = grad.float()
    cdf = 0.5 * (1.0 + torch.erf(b * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * b * b) * (1.0 / math.sqrt(2.0 * math.pi))
    return torch.cat([g * (b * cdf), g * a * (cdf + b * pdf)], dim=-1).to(x.dtype)


def _register_python_side() -> None:
    """Registers fakes and autograd formulas (once per process, see _try_load)."""
    fakes: dict[str, Callable[..., Any]] = {
        "sdfused::group_norm": _group_norm_fake,
        "sdfused::attention": _attention_fake,
        "sdfused::geglu": _geglu_fake,
    }
    grads: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
        "sdfused::group_norm": (_gn_backward, _gn_setup),
        "sdfused::attention": (_attn_backward, _attn_setup),
        "sdfused::geglu": (_geglu_backward, _geglu_setup),
    }
    for name in _QUALNAMES:
        try:
            torch.library.register_fake(name, fakes[name])
        except RuntimeError as e:  # already registered by an earlier copy of this module
            if "already" not in str(e):
                raise
        backward, setup = grads[name]
        torch.library.register_autograd(name, backward, setup_context=setup)


_try_load()
