"""float32 linear layers of a CPU AOTInductor program as MKL sgemm calls instead of oneDNN packed matmuls.

In an AOT compile with freezing, Inductor turns every linear layer into `mkldnn._linear_pointwise` on a
oneDNN-packed weight (`mkldnn._reorder_linear_weight`), optionally with the residual add fused
(`_linear_pointwise.binary`). On an AVX2 CPU (no AVX-512) MKL's sgemm on the plain weight is 13% (one thread)
and 8% (two) faster over the SD 1.5 UNet's shapes (BENCHMARKS.md, "Linear layers: MKL against oneDNN"); on an
AVX-512 CPU the issue that asked for prepacking measured the opposite (MKL sgemm at half oneDNN's rate).
`rewrite` runs as a post-grad pass: each such float32 linear whose packed weight is a transpose of one
weight becomes `mm` / `addmm` on that weight (then `+ other` for a fused residual). The weight stays a
plain constant the program reads in place, so refit and LoRA swaps need no recipe for it.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx

CPU_GEMMS = ("mkl", "onednn")
LINEAR = torch.ops.mkldnn._linear_pointwise.default
PACK_LINEAR = "mkldnn._reorder_linear_weight.default"
TRANSPOSES = ("aten.permute.default", "aten.t.default")
aten = torch.ops.aten


def default_cpu_gemm() -> str:
    """The faster engine for this CPU's float32 linear layers, as measured (see the module docstring)."""
    if not torch._C.has_mkl:
        return "onednn"
    return "onednn" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "mkl"


def _weight_of(constants: Mapping[str, Any], packed: str) -> tuple[str, bool] | None:
    """(weight name, whether it is (out, in)) when the packed constant is a transpose chain of one weight
    (the packing op takes the (out, in) matrix); None for anything else, e.g. a concatenation."""
    expr = constants.get(packed)
    if not (isinstance(expr, dict) and expr.get("op") == PACK_LINEAR):
        return None
    expr, flips = expr["args"][0], 0
    while isinstance(expr, dict):
        if "ref" in expr:
            if expr["ref"] not in constants:
                return expr["ref"], flips % 2 == 0
            expr = constants[expr["ref"]]
        elif expr.get("op") in TRANSPOSES and expr["args"][1:] in ([], [[1, 0]], [[-1, -2]]):
            flips, expr = flips + 1, expr["args"][0]
        else:
            return None
    return None


def _residual_linear(node: fx.Node) -> bool:
    """A lowering match of a linear layer with a residual add (its node takes the linear's arguments and
    `other`)."""
    from torch._inductor.pattern_matcher import Match  # Inductor's import is slow: only where it compiles

    target = node.target
    if not isinstance(target, functools.partial) or not target.args or not isinstance(target.args[0], Match):
        return False
    kinds = sorted(str(n.target) for n in target.args[0].nodes)
    return kinds == sorted((str(LINEAR), str(aten.add.Tensor))) and set(node.kwargs) == {"other"}


def rewrite(graph: fx.Graph, constants: Mapping[str, Any]) -> int:
    """Rewrites the float32 oneDNN linear layers of `graph` to MKL (see the module docstring); `constants`
    are the freezing recipes (sdexport/export/prepack.py). Returns how many it rewrote."""
    gm = graph.owning_module
    assert gm is not None
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        residual = _residual_linear(node)
        if not (residual or node.target is LINEAR) or node.args[3] != "none":  # fused activations stay
            continue
        x, packed, bias = node.args[:3]
        assert isinstance(x, fx.Node) and isinstance(packed, fx.Node)
        xv = x.meta["val"]
        found = _weight_of(constants, str(packed.target)) if packed.op == "get_attr" else None
        if xv.dtype != torch.float32 or found is None:
            continue
        name, out_in = found
        weight = operator.attrgetter(name)(gm)
        k = xv.shape[-1]
        if tuple(weight.shape) != ((node.meta["val"].shape[-1], k) if out_in else (k, node.meta["val"].shape[-1])):
            continue
        with graph.inserting_before(node):
            new = _mkl_linear(graph, xv.fake_mode, x, name, weight, out_in, bias,
                              node.kwargs["other"] if residual else None)
        new.meta = {**node.meta, "val": new.meta["val"]}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    return done


def _mkl_linear(graph: fx.Graph, fake_mode: Any, x: fx.Node, name: str, weight: torch.Tensor, out_in: bool,
                bias: Any, other: Any) -> fx.Node:
    """x (..., K) @ weight^T (+ bias) (+ other) as aten mm / addmm on a 2-d view, reshaped back."""

    def call(op: Callable[..., Any], *args: Any) -> fx.Node:
        n = graph.call_function(op, args)
        with fake_mode:
            n.meta["val"] = op(*fx.node.map_arg(args, lambda a: a.meta["val"]))
        return n

    w = graph.get_attr(name)
    w.meta["val"] = fake_mode.from_tensor(weight, static_shapes=True)
    wt = call(aten.permute.default, w, [1, 0]) if out_in else w  # (K, N): MKL reads the transpose in place
    xv = x.meta["val"]
    x2 = call(aten.reshape.default, x, [-1, xv.shape[-1]]) if xv.dim() != 2 else x
    y = call(aten.mm.default, x2, wt) if bias is None else call(aten.addmm.default, bias, x2, wt)
    if xv.dim() != 2:  # back to (..., N); symbolic leading sizes are read from x
        lead: list[Any] = []
        for i, size in enumerate(xv.shape[:-1]):
            if isinstance(size, int):
                lead.append(size)
            else:
                dim = graph.call_function(aten.sym_size.int, (x, i))
                dim.meta["val"] = size
                lead.append(dim)
        y = call(aten.reshape.default, y, [*lead, wt.meta["val"].shape[1]])
    return y if other is None else call(aten.add.Tensor, y, other)
