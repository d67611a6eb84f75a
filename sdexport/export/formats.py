"""One writer per artifact format. Each takes an eval-mode module, example inputs and torch.export
dynamic-shape specs, writes its files into the artifact directory and returns their names."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn


def _export(module: nn.Module, args: tuple[Tensor, ...], dyn: Any) -> torch.export.ExportedProgram:
    return torch.export.export(module, args, dynamic_shapes=dyn, strict=False)


def _weights(ep: torch.export.ExportedProgram) -> dict[str, Tensor]:
    state = {k: v for k, v in ep.state_dict.items() if isinstance(v, Tensor)}
    state.update({k: v for k, v in ep.constants.items() if isinstance(v, Tensor)})
    # safetensors refuses shared storage; each entry gets its own contiguous copy.
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def write_pt2(name: str, module: nn.Module, args: tuple[Tensor, ...], dyn: Any, out: Path) -> dict[str, str]:
    """torch.export ExportedProgram; weights in .safetensors beside it, the program keeps only
    zero-stride placeholders (a few bytes each) so a weight swap needs no re-export."""
    ep = _export(module, args, dyn)
    weights = _weights(ep)
    save_file(weights, str(out / f"{name}.safetensors"))
    for k, v in list(ep.state_dict.items()):
        ep.state_dict[k] = nn.Parameter(torch.zeros((), dtype=v.dtype, device=v.device).expand(v.shape),
                                        requires_grad=False)
    for k, v in list(ep.constants.items()):
        if isinstance(v, Tensor):
            ep.constants[k] = torch.zeros((), dtype=v.dtype, device=v.device).expand(v.shape)
    torch.export.save(ep, str(out / f"{name}.pt2"))
    return {"program": f"{name}.pt2", "weights": f"{name}.safetensors"}


def write_aoti(name: str, module: nn.Module, args: tuple[Tensor, ...], dyn: Any, out: Path,
               cpu_gemm: str = "") -> dict[str, str]:
    """AOTInductor package without weights inside the .so; constants folded at run time, so weights
    loaded from the .safetensors (and later swapped) take effect everywhere. On the CPU it is compiled
    with freezing (oneDNN-packed weights) and `<name>.prepack.json` says how the runtime packs them at
    load (sdexport/export/prepack.py); a program whose folds no recipe can express is compiled without.
    `cpu_gemm`: the engine of float32 linear layers on the CPU, one of mkl_linear.CPU_GEMMS ("": this
    CPU's default)."""
    ep = _export(module, args, dyn)
    weights = _weights(ep)
    save_file(weights, str(out / f"{name}.safetensors"))
    package = out / f"{name}.pt2"
    configs = {"aot_inductor.package_constants_in_so": False, "aot_inductor.use_runtime_constant_folding": True}
    if args[0].device.type == "cpu":
        from sdexport.export.mkl_linear import PACK_LINEAR, default_cpu_gemm
        from sdexport.export.prepack import NotRecordable, recording

        gemm = cpu_gemm or default_cpu_gemm()
        with recording(gemm) as rec:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(package), inductor_configs=configs)
        try:
            plan = rec.plan(_constant_names(package), set(weights))
        except NotRecordable as e:
            warnings.warn(f"{name}: compiled without prepacked weights ({e})", RuntimeWarning, stacklevel=2)
        else:
            if gemm == "mkl" and not rec.mkl_linears and any(
                    e.get("op") == PACK_LINEAR for e in plan.constants.values()):
                warnings.warn(f"{name}: no linear layer became an MKL call (this torch's graphs differ from what "
                              "sdexport/export/mkl_linear.py expects); they stay oneDNN's", RuntimeWarning,
                              stacklevel=2)
            (out / f"{name}.prepack.json").write_text(plan.to_json(), encoding="utf-8")
            return {"program": package.name, "weights": f"{name}.safetensors", "prepack": f"{name}.prepack.json"}
    torch._inductor.aoti_compile_and_package(ep, package_path=str(package), inductor_configs=configs)
    return {"program": package.name, "weights": f"{name}.safetensors"}


def _constant_names(package: Path) -> list[str]:
    """The constants a compiled package asks for (those folded at run time excepted)."""
    from torch._inductor import aoti_load_package

    return [n for n in aoti_load_package(str(package)).get_constant_fqns() if not n.startswith("_FOLDED_CONST")]


def write_torchscript(name: str, module: nn.Module, args: tuple[Tensor, ...], dyn: Any,
                      out: Path) -> dict[str, str]:
    """torch.jit trace + freeze (weights are inlined by freezing; the format keeps them inside)."""
    traced = torch.jit.trace(module, args, check_trace=False)  # type: ignore[no-untyped-call]
    frozen = torch.jit.freeze(traced.eval())
    torch.jit.save(frozen, str(out / f"{name}.ts"))
    return {"program": f"{name}.ts", "weights": ""}


def write_onnx(name: str, module: nn.Module, args: tuple[Tensor, ...], dyn: Any, out: Path) -> dict[str, str]:
    """ONNX (dynamo exporter); our custom ops become standard ONNX ops via a translation table.
    Weights go to ONNX external data beside the graph."""
    from sdexport.export.onnx_ops import translation_table

    onnx_path = out / f"{name}.onnx"
    program = torch.onnx.export(module, args, dynamic_shapes=dyn, dynamo=True, external_data=True,
                                custom_translation_table=translation_table(), optimize=True,
                                verbose=False)
    if program is None:
        raise RuntimeError(f"ONNX export of {name} produced nothing")
    program.save(str(onnx_path), external_data=True)
    data = out / f"{name}.onnx.data"
    return {"program": onnx_path.name, "weights": data.name if data.exists() else ""}


def write_openvino(name: str, module: nn.Module, args: tuple[Tensor, ...], dyn: Any,
                   out: Path) -> dict[str, str]:
    """OpenVINO IR converted from the ONNX graph (`write_onnx`, in a scratch directory removed after):
    `<name>.xml` and its float32 weights `<name>.bin` (runtime/openvino.py)."""
    from runtime.openvino import openvino

    ov = openvino()
    with tempfile.TemporaryDirectory(prefix=f".{name}-onnx-", dir=out) as scratch:
        onnx = write_onnx(name, module, args, dyn, Path(scratch))
        model = ov.convert_model(str(Path(scratch) / onnx["program"]))
        ov.save_model(model, str(out / f"{name}.xml"), compress_to_fp16=False)
        del model
    return {"program": f"{name}.xml", "weights": f"{name}.bin"}


WRITERS = {"pt2": write_pt2, "aoti": write_aoti, "torchscript": write_torchscript, "onnx": write_onnx,
           "openvino": write_openvino}


def write(fmt: str, name: str, module: nn.Module, args: tuple[Tensor, ...], dyn: Any, out: Path,
          cpu_gemm: str = "") -> dict[str, str]:
    """`cpu_gemm` applies to CPU aoti programs (write_aoti)."""
    if fmt == "aoti":
        return write_aoti(name, module, args, dyn, out, cpu_gemm)
    return WRITERS[fmt](name, module, args, dyn, out)
