"""OpenVINO as an artifact engine (`sdexport build --format openvino`, CPU only).

The program is OpenVINO IR (`<module>.xml` + its weights `<module>.bin`) converted from the module's ONNX
graph, always float32; OpenVINO's CPU plugin computes it at the precision the manifest's dtype names
(`PRECISION_HINTS`: `--half` -> bf16), with explicit thread settings (runtime/cpu.py). Like the ONNX
programs, it takes the ControlNet residuals as separate inputs. OpenVINO is an optional dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from runtime.manifest import DTYPES, ArtifactError

# The manifest dtype of an openvino artifact -> OpenVINO's INFERENCE_PRECISION_HINT.
PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16"}
MISSING = "OpenVINO is an optional dependency: pip install openvino"

Output = Tensor | tuple[Tensor, ...]


def openvino() -> Any:
    """The openvino module, or an ArtifactError that says how to install it."""
    try:
        import openvino
    except ImportError:
        raise ArtifactError(f"this needs OpenVINO: {MISSING}") from None
    return openvino


def cpu_config(threads: int, precision: str | None) -> dict[str, Any]:
    """OpenVINO CPU plugin settings: `threads` inference threads, one stream (one request at a time, for
    latency); `precision` an INFERENCE_PRECISION_HINT (f32, bf16) or None for the plugin's default."""
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


def precision_hint(dtype: str) -> str:
    if dtype not in PRECISION_HINTS:
        raise ArtifactError(f"openvino artifacts are float32 or bfloat16 (--half on the CPU), not {dtype}")
    return PRECISION_HINTS[dtype]


def load_program(program: Path, threads: int, dtype: str) -> Callable[..., Output]:
    """The compiled IR as a function of tensors: inputs are cast to the types the graph declares, outputs
    come back as CPU tensors in `dtype` (floating ones) - one tensor, or a tuple when there are several."""
    ov = openvino()
    compiled = ov.Core().compile_model(str(program), "CPU", cpu_config(threads, precision_hint(dtype)))
    request = compiled.create_infer_request()
    types = [torch.from_numpy(np.empty(0, dtype=i.get_element_type().to_dtype())).dtype for i in compiled.inputs]
    n_out = len(compiled.outputs)
    out_dtype = DTYPES[dtype]

    def run(*args: Tensor) -> Output:
        if len(args) != len(types):
            raise ValueError(f"{program.name} takes {len(types)} inputs, got {len(args)}")
        feeds = [a.detach().to("cpu", t).contiguous().numpy() for a, t in zip(args, types, strict=True)]
        result = request.infer(feeds)
        outs = [torch.from_numpy(np.array(result[k], copy=True)) for k in range(n_out)]  # buffers are reused
        outs = [o.to(out_dtype) if o.is_floating_point() else o for o in outs]
        return outs[0] if n_out == 1 else tuple(outs)

    return run
