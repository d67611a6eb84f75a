"""Our custom ops in standard ONNX (opset 18), for `torch.onnx.export(custom_translation_table=...)`.

The exported graph then runs in any ONNX runtime with no custom-op library.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from onnxscript import opset18

op: Any = opset18  # onnxscript's stubs type values by ONNX type; these functions are traced


def group_norm(x: Any, groups: int, weight: Any, bias: Any, eps: float, silu: bool) -> Any:
    """(N, C, H, W): statistics per (sample, group) in float32, affine per channel, optional SiLU."""
    shape = op.Shape(x)
    grouped = op.Concat(op.Slice(shape, [0], [1]), op.Constant(value_ints=[groups, -1]), axis=0)
    xf = op.Cast(op.Reshape(x, grouped), to=1)  # 1 = FLOAT
    mean = op.ReduceMean(xf, [2], keepdims=1)
    d = op.Sub(xf, mean)
    var = op.ReduceMean(op.Mul(d, d), [2], keepdims=1)
    y = op.Div(d, op.Sqrt(op.Add(var, op.Constant(value_float=eps))))
    y = op.CastLike(op.Reshape(y, shape), x)
    if weight is not None:
        y = op.Mul(y, op.Unsqueeze(weight, [1, 2]))
    if bias is not None:
        y = op.Add(y, op.Unsqueeze(bias, [1, 2]))
    if silu:
        y = op.Mul(y, op.Sigmoid(y))
    return y


def attention(q: Any, k: Any, v: Any, scale: float, value_weights: Any) -> Any:
    """softmax(q k^T * scale) (v * w): (B, H, Lq, D), (B, H, Lk, D), w (B, Lk)."""
    if value_weights is not None:
        v = op.Mul(v, op.Unsqueeze(value_weights, [1, 3]))
    scores = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))
    scores = op.Mul(scores, op.CastLike(op.Constant(value_float=scale), scores))
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def geglu(x: Any) -> Any:
    """x[..., :F] * gelu(x[..., F:]) with the exact erf GELU."""
    a, g = op.Split(x, axis=-1, num_outputs=2)
    half = op.CastLike(op.Constant(value_float=0.5), g)
    one = op.CastLike(op.Constant(value_float=1.0), g)
    rsqrt2 = op.CastLike(op.Constant(value_float=1.0 / math.sqrt(2.0)), g)
    gelu = op.Mul(op.Mul(half, g), op.Add(one, op.Erf(op.Mul(g, rsqrt2))))
    return op.Mul(a, gelu)


def translation_table() -> dict[Any, Any]:
    from runtime import ops

    if not ops.available():  # then the graph holds no sdfused nodes (native kernels)
        return {}
    return {
        torch.ops.sdfused.group_norm.default: group_norm,
        torch.ops.sdfused.attention.default: attention,
        torch.ops.sdfused.geglu.default: geglu,
    }
