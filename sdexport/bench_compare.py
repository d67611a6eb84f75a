"""`sdexport bench --compare-openvino`: the side-by-side CPU table of issue 15 (UNet step, VAE decode).

Rows: eager float32 (the reference of every error), eager float32 channels_last, eager bfloat16
channels_last, each given artifact through `runtime.load` (an openvino artifact included), and OpenVINO on
the ONNX artifact's own unet.onnx / vae_decoder.onnx at f32 and at its default precision (bf16 where the CPU
has it). Every engine gets the same explicit thread count (runtime/cpu.py); the candidates of a component are timed in
alternation (one call each per round), so a load change on a shared machine hits all of them alike, and
each figure is the median of the rounds.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import runtime
from runtime.artifact import ArtifactBackend
from runtime.control import Residuals, no_residuals
from runtime.cpu import cpu_caps, use_threads
from runtime.manifest import ArtifactError, read_manifest
from runtime.openvino import cpu_config
from sdexport.bench import BenchOptions, Inputs, _meta, _native_size, make_inputs
from sdexport.pipeline import StableDiffusion
from sdexport.presets import open_model

Log = Callable[[str], None]
Call = Callable[[], Tensor]
COMPARED = ("unet_step", "vae_decode")
OPENVINO_MISSING = ("--compare-openvino needs OpenVINO, an optional dependency: pip install openvino "
                    "(or run `sdexport bench` without --compare-openvino)")


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise ValueError(OPENVINO_MISSING) from None
    return openvino


@dataclass
class Candidate:
    path: str
    calls: dict[str, Call]  # component -> one timed call, output as float32 on the CPU


def _eager(sd: StableDiffusion, inp: Inputs, dtype: torch.dtype, channels_last: bool) -> dict[str, Call]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet, vae = sd.unet.to(dtype=dtype), sd.vae.to(dtype=dtype)
    for m in (unet, vae):  # 4-d weights (convolutions) in `fmt`; nn.Module.to's memory_format is untyped
        for p in m.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=fmt)
    x, z = inp.x.to(dtype).contiguous(memory_format=fmt), inp.z.to(dtype).contiguous(memory_format=fmt)
    context, weights = inp.context.to(dtype), inp.weights.to(dtype)
    extra = {} if inp.text_embeds is None else {"text_embeds": inp.text_embeds.to(dtype), "time_ids": inp.time_ids}
    return {"unet_step": lambda: unet(x, inp.t, context, weights, **extra).float(),
            "vae_decode": lambda: vae.decode(z).float()}


def _artifact(art: Path, inp: Inputs, threads: int, spin: bool) -> tuple[str, dict[str, Call]]:
    pipe = runtime.load(art, device="cpu", threads=threads, spin=spin)
    be = pipe.backend
    assert isinstance(be, ArtifactBackend)
    m = be.manifest
    vae = f", VAE {m.vae_kernels}" if m.vae_kernels and m.vae_kernels != m.kernels else ""
    gemm = f", linear {m.cpu_gemm}" if m.cpu_gemm else ""
    name = f"{m.format} artifact, {m.dtype}, kernels {m.kernels}{vae}{gemm} ({art.name})"
    return name, {"unet_step": lambda: be.unet(inp.x, inp.t, inp.context, inp.weights, inp.text_embeds,
                                                inp.time_ids).float(),
                  "vae_decode": lambda: be.decode(inp.z).float()}


def _ov_args(inp: Inputs, residuals: Residuals) -> dict[str, tuple[Tensor, ...]]:
    """The exported programs' inputs (sdexport/export/control_unet.py), float32: the UNet gets zero ControlNet
    residuals, as the runtime feeds it when no ControlNet acts."""
    b = inp.x.shape[0]
    unet: tuple[Tensor, ...] = (inp.x, inp.t.reshape(1).expand(b), inp.context, inp.weights)
    if inp.text_embeds is not None and inp.time_ids is not None:
        unet += (inp.text_embeds, inp.time_ids)
    unet += no_residuals(residuals, inp.x.shape, torch.float32, inp.x.device)
    return {"unet_step": tuple(a.float().contiguous() for a in unet), "vae_decode": (inp.z.float().contiguous(),)}


def _openvino_calls(onnx_artifact: Path, inp: Inputs, threads: int,
                    precision: str | None) -> tuple[str, dict[str, Call]]:
    """OpenVINO's CPU plugin on the artifact's ONNX graphs; `precision` None: the plugin's default."""
    ov = _openvino()
    core = ov.Core()
    config = cpu_config(threads, precision)  # the settings of openvino artifacts (runtime/openvino.py)
    files = {"unet_step": "unet.onnx", "vae_decode": "vae_decoder.onnx"}
    args = _ov_args(inp, read_manifest(onnx_artifact, verify=False).residuals)
    calls: dict[str, Call] = {}
    used = ""
    for comp, file in files.items():
        compiled = core.compile_model(str(onnx_artifact / file), "CPU", config)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino Type: f32, bf16, f16
        used = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        request = compiled.create_infer_request()
        feeds = [a.numpy() for a in args[comp]]

        def call(request: Any = request, feeds: list[Any] = feeds) -> Tensor:
            return torch.from_numpy(request.infer(feeds)[0].copy()).float()

        calls[comp] = call
    label = "f32" if precision == "f32" else f"default precision ({used})"
    return f"OpenVINO {ov.__version__.split('-')[0]} on {onnx_artifact.name}/*.onnx, {label}", calls


def time_alternating(calls: dict[str, Call], repeat: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per call; each round calls every candidate once, in turn."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeat):
        for k, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _onnx_artifact(artifacts: list[Path], given: Path | None) -> Path:
    """The float32 ONNX artifact whose graphs OpenVINO runs: `given` (--openvino-onnx; then it is not
    timed in onnxruntime unless also an --artifact), else the first such --artifact."""
    if given is not None:
        try:
            m = read_manifest(given)
        except ArtifactError as e:
            raise ValueError(f"--openvino-onnx {given}: not a float32 onnx artifact ({e})") from None
        if m.format != "onnx" or m.dtype != "float32":
            raise ValueError(f"--openvino-onnx {given}: not a float32 onnx artifact ({m.format}, {m.dtype})")
        return given
    for art in artifacts:
        m = read_manifest(art)
        if m.format == "onnx" and m.dtype == "float32":
            return art
    raise ValueError("--compare-openvino runs OpenVINO on an ONNX artifact's graphs: pass a float32 one with "
                     "--artifact or --openvino-onnx (sdexport build MODEL -o ART --format onnx --kernels native)")


def _ov_default_is_f32() -> bool:
    hint = _openvino().Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return (hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)) == "f32"


def _candidates(sd: StableDiffusion, inp: Inputs, opts: BenchOptions, threads: int, onnx_art: Path,
                log: Log) -> list[Candidate]:
    """The rows. Without native bf16 (runtime.cpu.CpuCaps) eager bf16 only measures ATen's emulation
    (0.13-0.19x of fp32 on an AVX2 CPU), so it is left out unless `opts.half`; OpenVINO's default precision
    is timed only where it is not f32 (else it is the f32 row again)."""
    rows = [Candidate("eager fp32", _eager(sd, inp, torch.float32, channels_last=False))]
    if opts.channels_last:
        rows.append(Candidate("eager fp32 channels_last", _eager(copy.deepcopy(sd), inp, torch.float32, True)))
    if cpu_caps().native_bf16 or opts.half:
        rows.append(Candidate("eager bf16 channels_last", _eager(copy.deepcopy(sd), inp, torch.bfloat16, True)))
    else:
        log("eager bf16 left out: this CPU has no native bf16 (--half times it anyway)")
    for art in opts.artifacts:
        rows.append(Candidate(*_artifact(Path(art), inp, threads, opts.spin)))
    precisions: list[str | None] = ["f32"]
    if _ov_default_is_f32():
        log("OpenVINO's default precision is f32 on this CPU: one OpenVINO row")
    else:
        precisions.append(None)
    for precision in precisions:
        rows.append(Candidate(*_openvino_calls(onnx_art, inp, threads, precision)))
    return rows


def run_compare(opts: BenchOptions, thread_counts: list[int], log: Log = print) -> dict[str, Any]:
    """The table for each thread count: per component, every candidate's median ms, its speed relative to
    eager fp32 and its max abs difference from eager fp32's output."""
    _openvino()
    if opts.device != "cpu":
        raise ValueError("--compare-openvino compares CPU engines: use --device cpu")
    onnx_art = _onnx_artifact([Path(a) for a in opts.artifacts],
                              None if opts.openvino_onnx is None else Path(opts.openvino_onnx))
    sd = open_model(opts.model).to("cpu", torch.float32)
    height = opts.height or _native_size(opts.model, sd.info.family)
    width = opts.width or height
    inp = make_inputs(sd, height, width, torch.device("cpu"), torch.float32)
    tables: list[dict[str, Any]] = []
    reference: dict[str, Tensor] = {}
    with torch.inference_mode():
        for n in thread_counts:
            use_threads(n)
            log(f"threads {n}: preparing candidates ...")
            cands = _candidates(sd, inp, opts, n, onnx_art, log)
            rows: dict[str, dict[str, Any]] = {c.path: {"ms": {}, "max_abs_diff": {}} for c in cands}
            for comp in COMPARED:
                outs = {c.path: c.calls[comp]() for c in cands}
                reference.setdefault(comp, outs[cands[0].path])
                for path, out in outs.items():
                    rows[path]["max_abs_diff"][comp] = float((out - reference[comp]).abs().max())
                log(f"threads {n}: timing {comp} ({len(cands)} candidates, {opts.repeat} rounds) ...")
                for path, ms in time_alternating({c.path: c.calls[comp] for c in cands}, opts.repeat).items():
                    rows[path]["ms"][comp] = ms
            tables.append({"threads": n, "rows": [{"path": p, **r} for p, r in rows.items()]})
            del cands
    meta = _meta(opts, torch.device("cpu"), "float32", height, width)
    ov = _openvino()
    meta.update(threads=thread_counts, cpu=cpu_caps().describe(), openvino=ov.__version__.split("-")[0],
                onnxruntime=_ort_version(),
                onnxruntime_threads=f"intra N, inter 1, spinning {'on' if opts.spin else 'off'}",
                openvino_config=", ".join(f"{k} {v}" for k, v in {**cpu_config(1, None),
                                                                   "INFERENCE_NUM_THREADS": "N"}.items()))
    return {"meta": meta, "tables": tables}


def _ort_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "not installed"
    return str(onnxruntime.__version__)


def format_compare(result: dict[str, Any]) -> str:
    """Markdown: one table per thread count, a column pair (ms, speed vs eager fp32) per component."""
    meta = result["meta"]
    lines = [f"{meta['model']} {meta['size']}, CFG batch 2, CPU {meta['device_name']} {meta['cpu']}; torch "
             f"{meta['torch']}, onnxruntime {meta['onnxruntime']} ({meta['onnxruntime_threads']}), OpenVINO "
             f"{meta['openvino']} ({meta['openvino_config']}); median of {meta['repeat']} alternating rounds; "
             f"rev {meta['revision']}, {meta['date']}"]
    for table in result["tables"]:
        base = table["rows"][0]["ms"]
        lines += ["", f"threads {table['threads']}:", "",
                  "| path | " + " | ".join(f"{c} ms | vs eager fp32 | max abs err" for c in COMPARED) + " |",
                  "|---|" + "---|---|---|" * len(COMPARED)]
        for row in table["rows"]:
            cells = [f"{row['ms'][c]:.1f} | {base[c] / row['ms'][c]:.2f}x | {row['max_abs_diff'][c]:.1e}"
                     for c in COMPARED]
            lines.append(f"| {row['path']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
