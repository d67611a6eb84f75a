"""The cost of one ControlNet in the UNet step (`sdexport bench --control CN`, scripts/bench_controlnet.py).

The UNet step (the bench's CFG batch of 2) is timed without and with one ControlNet (its residuals
computed, scaled and added): eager (sdpa), and on each model artifact with the control artifact (or,
without one, the eager ControlNet). `CN` is a control artifact (`sdexport build CONTROLNET`), a ControlNet
folder or single file, or `random` (random weights mirroring the model's UNet). An artifact alone times
its eager side on a random mirror of the model's UNet, of the same architecture. The FLOP ratio of the
ControlNet to the UNet is the cost one would expect.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import runtime
from runtime.backend import Backend
from runtime.control import ControlModel, check_pair, scale_residuals
from runtime.control_artifact import CONTROL_KIND
from runtime.manifest import MANIFEST
from sdexport.controlnet import ControlNet
from sdexport.pipeline import StableDiffusion

__all__ = ["RANDOM", "control_cost", "format_control", "open_control"]

RANDOM = "random"
Log = Callable[[str], None]
Timer = Callable[[Callable[[], Any]], float]


def _is_control_artifact(path: Path) -> bool:
    try:
        return bool(json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("kind") == CONTROL_KIND)
    except (OSError, ValueError, AttributeError):
        return False


def open_control(spec: str, sd: StableDiffusion, device: str) -> tuple[ControlNet, ControlModel | None]:
    """(eager ControlNet in the model's device and dtype, control artifact or None) of `spec`."""
    artifact = None
    if spec != RANDOM and _is_control_artifact(Path(spec)):
        artifact = runtime.load_control(spec, device=device)
    if spec == RANDOM or artifact is not None:
        torch.manual_seed(0)
        eager = ControlNet.from_unet_config(dict(sd.configs.unet), name="random-controlnet")
    elif Path(spec).exists():
        eager = ControlNet.from_pretrained(spec)
    else:
        raise ValueError(f"--control {spec!r}: not a control artifact, a ControlNet folder or file, or 'random'")
    check_pair(eager.info, sd.info)
    return eager.to(sd.backend.device, sd.backend.dtype).attention_backend("sdpa"), artifact


def _step(be: Backend, cn: ControlModel | None, x: Tensor, t: Tensor, ctx: Tensor, w: Tensor, image: Tensor,
          te: Tensor | None, ti: Tensor | None) -> Callable[[], Tensor]:
    def call() -> Tensor:
        res = None
        if cn is not None:
            args = [a.to(cn.device, cn.dtype) for a in (x, ctx, w, image)]
            raw = cn.residuals(args[0], t.to(cn.device), args[1], args[2], args[3],
                               None if te is None else te.to(cn.device, cn.dtype),
                               None if ti is None else ti.to(cn.device))
            res = [r.to(be.dtype) for r in scale_residuals(raw, 1.0, False)]
        return be.unet(x, t, ctx, w, te, ti, control=res)

    return call


def control_cost(sd: StableDiffusion, inp: Any, spec: str, artifacts: Sequence[tuple[str, Backend]], device: str,
                 timer: Timer, height: int, width: int, log: Log = print) -> dict[str, Any]:
    """UNet step without / with one ControlNet on eager sdpa and each loaded model artifact (its row name,
    its backend); `inp` is the bench's `Inputs` (CFG batch of 2), `timer` its `time_call` (ms of a call)."""
    dev = torch.device(device)
    eager, artifact = open_control(spec, sd, device)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(inp.x.shape[0], eager.info.conditioning_channels, height, width, generator=g).to(dev)
    base = (inp.x, inp.t, inp.context, inp.weights, image, inp.text_embeds, inp.time_ids)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            _step(sd.backend, None, *base)()
        unet_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            eager.residuals(inp.x, inp.t, inp.context, inp.weights, image.to(eager.dtype), inp.text_embeds,
                            inp.time_ids)
        cn_flops = fc.get_total_flops()
    rows: list[dict[str, Any]] = []

    def row(path: str, be: Backend, cn: ControlModel, what: str) -> None:
        log(f"timing the UNet step of {path} without / with {what} ...")
        with torch.inference_mode():
            plain = timer(_step(be, None, *base))
            with_cn = timer(_step(be, cn, *base))
        rows.append({"path": path, "controlnet": what, "unet_step_ms": plain, "with_controlnet_ms": with_cn,
                     "added": with_cn / plain - 1.0})

    row("eager sdpa", sd.backend, eager, "eager ControlNet")
    for path, be in artifacts:
        cn: ControlModel = artifact if artifact is not None else eager
        check_pair(cn.info, be.info)
        row(path, be, cn, f"ControlNet artifact ({spec})" if artifact is not None else "eager ControlNet")
    return {"spec": spec, "flops_unet": unet_flops, "flops_controlnet": cn_flops,
            "flop_ratio": cn_flops / unet_flops if unet_flops else float("nan"), "rows": rows}


def format_control(result: dict[str, Any]) -> str:
    lines = [f"ControlNet ({result['spec']}): UNet step (CFG batch 2) without / with one ControlNet; FLOPs "
             f"ControlNet / UNet = {result['flop_ratio']:.2f}",
             f"{'path':<44}{'controlnet':>36}{'step':>12}{'+ControlNet':>14}{'added':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['path'][:43]:<44}{r['controlnet'][:35]:>36}{r['unet_step_ms']:>10.2f}ms"
                     f"{r['with_controlnet_ms']:>12.2f}ms{r['added']:>8.0%}")
    return "\n".join(lines)
