"""Prepacked CPU weights of AOTInductor programs, computed at load from the weights beside the program.

A CPU aoti artifact is compiled with Inductor's freezing, which turns weights into oneDNN-packed constants
(`_frozen_paramN`, in an opaque layout) and calls oneDNN with them directly, with no reorder per call.
Baked into the program, such constants would end refit and LoRA swaps; instead the build records how each
one is computed from the weights (`sdexport/export/prepack.py`) and this module recomputes it at load, on
the machine that runs the artifact (oneDNN picks the layouts for its own CPU), and again after a weight
swap. The program reads these tensors in place (`load_constants(user_managed=True)`: copying an opaque
tensor's bytes into the program's buffer would not keep its layout).

The recipe file (`<module>.prepack.json`, checksummed with the artifact):
  constants: name -> expression; an expression is {"ref": name} (a weight, or another recipe), a list,
             a number / string / bool / null, {"memory_format": ...}, {"dtype": ...}, or
             {"op": name, "args": [...], "kwargs": {...}} with `name` one of OPS.
  conv:      constant name -> oneDNN convolution parameters; that constant (a weight, or a recipe's value)
             is handed to the program packed by `mkldnn._reorder_convolution_weight`: freezing packs
             convolution weights only for static input shapes, and the artifacts' shapes are dynamic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PREPACK_FORMAT = 1


def _op(qualname: str) -> Callable[..., Any]:
    ns, name, overload = qualname.split(".")
    packet = getattr(getattr(torch.ops, ns), name)
    fn: Callable[..., Any] = getattr(packet, overload)
    return fn


# The ops a recipe may call: the layout changes freezing folds into packed weights. A recipe naming any
# other op is refused (the file is data, never code).
OP_NAMES = (
    "aten.clone.default", "aten.permute.default", "aten.t.default", "aten.transpose.int",
    "aten.contiguous.default", "aten._to_copy.default", "aten.view.default", "aten.reshape.default",
    "aten.unsqueeze.default", "aten.squeeze.dim", "aten.cat.default", "aten.expand.default",
    "prims.convert_element_type.default",
    "mkldnn._reorder_linear_weight.default", "mkldnn._reorder_convolution_weight.default",
    "mkl._mkl_reorder_linear_weight.default",
)
LAYOUT_COPIES = ("aten.clone.default", "aten.contiguous.default")  # same values, another memory layout
MEMORY_FORMATS = {str(f): f for f in (torch.contiguous_format, torch.channels_last, torch.preserve_format)}
DTYPE_NAMES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


class PrepackError(ValueError):
    """A recipe file that cannot be used: malformed, naming a forbidden op or a missing weight."""


@dataclass(frozen=True)
class ConvPack:
    """`mkldnn._reorder_convolution_weight`'s arguments besides the weight; `input_size` is an example
    input shape (oneDNN picks the packed layout from it; other sizes run with the same layout)."""

    padding: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    input_size: tuple[int, ...]

    def pack(self, w: Tensor) -> Tensor:
        """`w` in oneDNN's layout; as it is where oneDNN has no such layout on this CPU (bf16 without
        AVX512-BF16: the program's convolution then reads the plain weight, as unpacked builds do)."""
        if w.is_mkldnn:
            return w
        try:
            packed: Tensor = torch.ops.mkldnn._reorder_convolution_weight(
                w, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(self.input_size))
        except RuntimeError:
            return w
        return packed


@dataclass(frozen=True)
class Prepack:
    constants: dict[str, Any]  # name -> expression (see the module docstring)
    conv: dict[str, ConvPack]

    def to_json(self) -> str:
        conv = {k: {"padding": list(c.padding), "stride": list(c.stride), "dilation": list(c.dilation),
                    "groups": c.groups, "input_size": list(c.input_size)} for k, c in sorted(self.conv.items())}
        return json.dumps({"format": PREPACK_FORMAT, "constants": self.constants, "conv": conv}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Prepack:
        try:
            d = json.loads(text)
            if d.get("format") != PREPACK_FORMAT:
                raise PrepackError(f"{where}: prepack format {d.get('format')!r}, this runtime reads "
                                   f"{PREPACK_FORMAT}; rebuild the artifact")
            conv = {str(k): ConvPack(tuple(c["padding"]), tuple(c["stride"]), tuple(c["dilation"]),
                                     int(c["groups"]), tuple(c["input_size"])) for k, c in d["conv"].items()}
            constants = {str(k): v for k, v in d["constants"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if isinstance(e, PrepackError):
                raise
            raise PrepackError(f"{where}: malformed prepack recipes ({e})") from None
        plan = cls(constants, conv)
        for name, expr in constants.items():
            plan._check(expr, f"{where}: {name}")
        return plan

    def _check(self, expr: Any, where: str) -> None:
        if isinstance(expr, list):
            for e in expr:
                self._check(e, where)
        elif isinstance(expr, dict):
            if "op" in expr:
                if expr["op"] not in OP_NAMES:
                    raise PrepackError(f"{where}: op {expr['op']!r} is not one a recipe may call")
                self._check(expr.get("args", []), where)
                self._check(list(expr.get("kwargs", {}).values()), where)
            elif "memory_format" in expr:
                if expr["memory_format"] not in MEMORY_FORMATS:
                    raise PrepackError(f"{where}: unknown memory format {expr['memory_format']!r}")
            elif "dtype" in expr:
                if expr["dtype"] not in DTYPE_NAMES:
                    raise PrepackError(f"{where}: unknown dtype {expr['dtype']!r}")
            elif set(expr) != {"ref"} or not isinstance(expr["ref"], str):
                raise PrepackError(f"{where}: malformed expression {expr!r}")
        elif not (expr is None or isinstance(expr, (bool, int, float, str))):
            raise PrepackError(f"{where}: malformed expression {expr!r}")

    def sources(self, name: str) -> set[str]:
        """The weights constant `name` is computed from (itself, if it is a weight)."""
        if name not in self.constants:
            return {name}
        found: set[str] = set()
        for ref in refs(self.constants[name]):
            found |= self.sources(ref)
        return found

    def weights_needed(self, names: Iterable[str]) -> set[str]:
        return {s for n in names for s in self.sources(n)}

    def compute(self, weights: Mapping[str, Tensor], names: Collection[str]) -> dict[str, Tensor]:
        """The program's constants `names` from the weights: recipes evaluated, conv weights packed."""
        memo: dict[str, Tensor] = {}

        def value(name: str) -> Tensor:
            if name not in memo:
                memo[name] = _eval(self.constants[name], value) if name in self.constants else weights[name]
            return memo[name]

        def source_of_copy(name: str) -> str:
            # packing a layout copy repeats the copy's work (on SD 1.5: 5 s of a 16 s load): pack its source
            expr = self.constants.get(name)
            while (isinstance(expr, dict) and expr.get("op") in LAYOUT_COPIES and expr["args"]
                   and isinstance(expr["args"][0], dict) and "ref" in expr["args"][0]):
                name = expr["args"][0]["ref"]
                expr = self.constants.get(name)
            return name

        with torch.no_grad():
            return {n: self.conv[n].pack(value(source_of_copy(n))) if n in self.conv else value(n) for n in names}


def refs(expr: Any) -> Iterable[str]:
    """The names an expression reads."""
    if isinstance(expr, list):
        for e in expr:
            yield from refs(e)
    elif isinstance(expr, dict):
        if "ref" in expr:
            yield expr["ref"]
        elif "op" in expr:
            yield from refs(expr.get("args", []))
            yield from refs(list(expr.get("kwargs", {}).values()))


def _eval(expr: Any, value: Callable[[str], Tensor]) -> Any:
    if isinstance(expr, list):
        return [_eval(e, value) for e in expr]
    if isinstance(expr, dict):
        if "ref" in expr:
            return value(expr["ref"])
        if "memory_format" in expr:
            return MEMORY_FORMATS[expr["memory_format"]]
        if "dtype" in expr:
            return DTYPE_NAMES[expr["dtype"]]
        args = [_eval(a, value) for a in expr.get("args", [])]
        kwargs = {k: _eval(v, value) for k, v in expr.get("kwargs", {}).items()}
        return _op(expr["op"])(*args, **kwargs)
    return expr


def read_prepack(path: Path) -> Prepack:
    return Prepack.from_json(path.read_text(encoding="utf-8"), str(path))


class PackedProgram:
    """An aoti program built with prepacking, called like the program: its constants are computed from
    `weights` (the live weight tensors, which adapters and refit change) and kept alive here, since the
    program reads them in place."""

    def __init__(self, program: Any, plan: Prepack, weights: dict[str, Tensor], names: list[str]) -> None:
        self.program, self.plan, self.weights, self.names = program, plan, weights, names
        self.live: dict[str, Tensor] = {}
        self._update(None)

    def __call__(self, *args: Any) -> Any:
        return self.program(*args)

    def load_constants(self, changed: Mapping[str, Tensor], *, check_full_update: bool = False) -> None:
        """New values of some weights (the AOTInductor loader's signature): the constants computed from
        them are computed again."""
        self.weights.update(changed)
        self._update(set(changed))

    def _update(self, changed: set[str] | None) -> None:
        names = self.names if changed is None else [n for n in self.names if self.plan.sources(n) & changed]
        if names:
            new = self.plan.compute(self.weights, names)
            self.program.load_constants(new, check_full_update=False, user_managed=True)
            self.live.update(new)
