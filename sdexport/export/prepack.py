"""Compile a CPU AOTInductor program with Inductor's freezing and record how its folded constants come
from the weights (runtime/prepack.py recomputes them at load, so refit and LoRA swaps keep working).

Two records are taken while Inductor compiles (its caches are off, so every pass runs):
- each constant freezing folds (`constant_folding.replace_node_with_constant`): the expression of the
  folded node over named constants (weights or earlier folds), e.g. `_frozen_param2 =
  mkldnn._reorder_linear_weight(permute(unet.x.weight, [1, 0]), 512)`;
- each oneDNN convolution of the final graph (a post-grad pass): its weight constant and parameters, packed
  at load by runtime.prepack.ConvPack (freezing leaves them unpacked under dynamic shapes). The same pass
  may turn float32 linear layers into MKL calls on their weights (mkl_linear.py), which need no recipe.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import Match

from runtime.prepack import DTYPE_NAMES, MEMORY_FORMATS, OP_NAMES, ConvPack, Prepack, refs
from sdexport.export import mkl_linear

CONV = torch.ops.mkldnn._convolution_pointwise.default
PACK_CONV = "mkldnn._reorder_convolution_weight.default"


class NotRecordable(ValueError):
    """A folded constant whose computation a recipe cannot express."""


def _hint(s: Any) -> int:
    """An example size: oneDNN picks a packed layout from the channels, any spatial size will do."""
    if isinstance(s, int):
        return s
    hint = s.node.hint
    return int(hint) if hint is not None else 64


def _op_name(target: Any) -> str:
    """`ns.op.overload` (str() of an OpOverload drops `.default` for some namespaces)."""
    if isinstance(target, torch._ops.OpOverloadPacket) and target.overloads() == ["default"]:  # type: ignore[no-untyped-call]
        target = target.default  # Inductor's packing passes call packets of one-overload ops
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname or 'default'}"
    return str(target)


def _expr(a: Any) -> Any:
    if isinstance(a, fx.Node):
        if a.op == "get_attr":
            return {"ref": str(a.target)}
        name = _op_name(a.target)
        if a.op != "call_function" or name not in OP_NAMES:
            raise NotRecordable(f"a folded constant calls {name} ({a.op})")
        return {"op": name, "args": [_expr(x) for x in a.args],
                "kwargs": {k: _expr(v) for k, v in a.kwargs.items()}}
    if isinstance(a, (list, tuple)):
        return [_expr(x) for x in a]
    if isinstance(a, torch.memory_format) and str(a) in MEMORY_FORMATS:
        return {"memory_format": str(a)}
    if isinstance(a, torch.dtype) and str(a) in DTYPE_NAMES:
        return {"dtype": str(a)}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise NotRecordable(f"a folded constant has the argument {a!r} ({type(a).__name__})")


@dataclass
class Recorder:
    constants: dict[str, Any] = field(default_factory=dict)  # folded name -> expression
    unrecordable: dict[str, str] = field(default_factory=dict)  # folded name -> why it has no expression
    conv: dict[str, ConvPack] = field(default_factory=dict)
    mkl_linears: int = 0  # linear layers rewritten to MKL sgemm

    def plan(self, program_constants: list[str], weights: set[str]) -> Prepack:
        """The recipes of the program's constants that are not weights (and of the folds they read);
        raises NotRecordable when one has none."""
        needed: dict[str, Any] = {}

        def need(name: str) -> None:
            if name in weights or name in needed:
                return
            if name in self.unrecordable:
                raise NotRecordable(f"{name}: {self.unrecordable[name]}")
            if name not in self.constants:
                raise NotRecordable(f"the program's constant {name} is neither a weight nor a recorded fold")
            needed[name] = self.constants[name]
            for ref in refs(self.constants[name]):
                need(ref)

        for n in program_constants:
            need(n)
        # with static input shapes freezing packed the convolution weights itself
        conv = {k: v for k, v in self.conv.items() if k in program_constants
                and not (k in needed and needed[k].get("op") == PACK_CONV)}
        return Prepack(needed, conv)


def _is_conv(target: Any) -> bool:
    """A oneDNN convolution, alone or as the pattern match of one with a fused activation (a lowering
    partial holding the match; its node takes the convolution's arguments)."""
    if target is CONV:
        return True
    if isinstance(target, functools.partial):
        return any(isinstance(a, Match) and any(n.target is CONV for n in a.nodes) for a in target.args)
    return False


class _PostGrad(CustomGraphPass):
    """Post-grad pass: with `cpu_gemm` "mkl", float32 linear layers become MKL sgemm calls on their weights
    (sdexport/export/mkl_linear.py); then it notes each oneDNN convolution whose weight is a constant used by
    that convolution alone (it changes no convolution)."""

    def __init__(self, rec: Recorder, cpu_gemm: str) -> None:
        self.rec, self.cpu_gemm = rec, cpu_gemm

    def __call__(self, graph: fx.Graph) -> None:
        if self.cpu_gemm == "mkl":
            self.rec.mkl_linears += mkl_linear.rewrite(graph, self.rec.constants)
        for node in graph.nodes:
            if node.op != "call_function" or not _is_conv(node.target):
                continue
            x, w = node.args[0], node.args[1]
            if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1):
                continue
            padding, stride, dilation, groups = node.args[3:7]
            shape = tuple(_hint(s) for s in x.meta["val"].shape)
            self.rec.conv[str(w.target)] = ConvPack(tuple(padding), tuple(stride), tuple(dilation), int(groups),
                                                    shape)

    def uuid(self) -> Any:
        return None  # never cached: the compile runs with caches off


@contextmanager
def recording(cpu_gemm: str) -> Iterator[Recorder]:
    """Inductor config and hooks for a recorded freezing compile (restored on exit); `cpu_gemm`: one of
    mkl_linear.CPU_GEMMS, the engine of the float32 linear layers."""
    import torch._inductor.constant_folding as cf

    rec = Recorder()
    original = cf.replace_node_with_constant

    def replace(gm: fx.GraphModule, node: fx.Node, constant: torch.Tensor | None = None,
                name: str | None = None) -> None:
        try:
            expr, why = _expr(node), ""
        except NotRecordable as e:
            expr, why = None, str(e)
        original(gm, node, constant, name)
        qualname = name or f"_frozen_param{cast(int, gm._frozen_param_count) - 1}"  # the name it chose
        if expr is not None:
            rec.constants[qualname] = expr
        else:
            rec.unrecordable[qualname] = why

    cf.replace_node_with_constant = replace
    try:
        with torch._inductor.config.patch(freezing=True, force_disable_caches=True,
                                          post_grad_custom_post_pass=_PostGrad(rec, cpu_gemm)), torch.no_grad():
            yield rec
    finally:
        cf.replace_node_with_constant = original
