"""`sdexport bench`: time each component and a whole image on every path, from one process.

Every path is a `runtime.backend.Backend` (eager backends, loaded artifacts, diffusers), so the same
inputs go through the same calls; each row also reports its max abs difference from eager `sdpa`.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import runtime
from runtime import ops
from runtime.artifact import ArtifactBackend
from runtime.backend import Backend, ModelInfo
from runtime.cpu import use_threads
from runtime.manifest import DTYPES
from runtime.pipeline import Pipeline
from runtime.tokenizer import ClipTokenizer
from sdexport.bench_control import control_cost, format_control
from sdexport.models.layers import Kernels
from sdexport.pipeline import StableDiffusion
from sdexport.presets import PUBLISHED, SMALL, open_model, preset_config

Log = Callable[[str], None]
COMPONENTS = ("text_encoder", "unet_step", "vae_decode", "vae_encode")
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class BenchOptions:
    model: str
    artifacts: list[Any] = field(default_factory=list)
    device: str = "cpu"
    half: bool = False
    width: int | None = None
    height: int | None = None
    steps: int = 20
    repeat: int = 5
    backends: list[str] = field(default_factory=lambda: [k.value for k in Kernels])
    diffusers: bool = True
    torch_compile: bool = False
    threads: int | None = None  # CPU threads of every engine (runtime.cpu.use_threads); None: torch's
    control: str | None = None  # also the UNet step with one ControlNet (sdexport/bench_control.py)
    spin: bool = True  # onnxruntime's idle threads spin-wait (runtime.load's `spin`)
    channels_last: bool = True  # --compare-openvino: also eager fp32 channels_last (a second copy of the model)
    openvino_onnx: str | None = None  # --compare-openvino: the ONNX artifact OpenVINO runs (sdexport/bench_compare.py)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Median milliseconds of `repeat` calls after `warmup` (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    for _ in range(repeat):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class Inputs:
    ids: list[Tensor]  # one (2, 77) tensor per text encoder
    x: Tensor
    t: Tensor
    context: Tensor
    weights: Tensor
    z: Tensor  # float32, as the protocol passes latents and images
    image: Tensor
    text_embeds: Tensor | None = None  # SDXL's added UNet inputs
    time_ids: Tensor | None = None


def _ids(tokenizer: ClipTokenizer, prompt: str) -> list[int]:
    row = [tokenizer.bos_id, *tokenizer.tokenize(prompt)[:75], tokenizer.eos_id]
    return row + [tokenizer.pad_id] * (77 - len(row))


def make_inputs(sd: StableDiffusion, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Inputs:
    g = torch.Generator().manual_seed(0)
    h, w = height // 8, width // 8
    ctx_dim = sd.unet.config.cross_attention_dim
    rows = [_ids(tok, PROMPT) for tok in sd.tokenizers]
    inp = Inputs(
        ids=[torch.tensor([row, row], device=device) for row in rows],
        x=torch.randn(2, sd.unet.config.in_channels, h, w, generator=g).to(device, dtype),
        t=torch.tensor(500.0, device=device),
        context=torch.randn(2, 77, ctx_dim, generator=g).to(device, dtype),
        weights=torch.ones(2, 77, device=device, dtype=dtype),
        z=torch.randn(1, 4, h, w, generator=g).to(device),
        image=(torch.rand(1, 3, height, width, generator=g) * 2 - 1).to(device),
    )
    n = sd.info.time_ids
    if n and sd.text_encoder_2 is not None:
        # base: original size, crop top-left, target size; refiner: original size, crop, aesthetic score 6
        numbers = [float(height), float(width), 0.0, 0.0, *([float(height), float(width)] if n == 6 else [6.0])]
        inp.text_embeds = torch.randn(2, sd.text_encoder_2.config.projection_dim, generator=g).to(device, dtype)
        inp.time_ids = torch.tensor([numbers, numbers], device=device)
    return inp


def bench_backend(be: Backend, inp: Inputs, steps: int, height: int, width: int, repeat: int,
                  device: torch.device) -> tuple[dict[str, float], dict[str, Tensor]]:
    outs: dict[str, Tensor] = {}
    calls: dict[str, Callable[[], Tensor]] = {
        "text_encoder": lambda: be.encode_text(inp.ids)[0],
        "unet_step": lambda: be.unet(inp.x, inp.t, inp.context, inp.weights, inp.text_embeds, inp.time_ids),
        "vae_decode": lambda: be.decode(inp.z),
        "vae_encode": lambda: be.encode(inp.image),
    }
    ms: dict[str, float] = {}
    with torch.inference_mode():
        for name, call in calls.items():
            outs[name] = call().float().cpu()
            ms[name] = time_call(call, device, repeat)
    pipe = Pipeline(be)

    def image() -> Tensor:
        out = pipe.text2img(PROMPT, steps=steps, height=height,
                            width=width, seed=0, output="tensor")
        assert isinstance(out, Tensor)
        return out

    outs["image"] = image()
    ms["image"] = time_call(image, device, max(1, min(repeat, 3)), warmup=1)
    return ms, outs


class DiffusersBackend:
    """diffusers' modules on our weights (same state-dict names), behind the Backend protocol. SDXL: both
    encoders' penultimate hidden states (as StableDiffusionXLPipeline), the added conditioning, and the VAE
    in float32 when it is force_upcast."""

    def __init__(self, sd: StableDiffusion, compile_unet: bool) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cfgs = sd.configs
        unet: Any = UNet2DConditionModel(**cfgs.unet)  # type: ignore[no-untyped-call]
        vae: Any = AutoencoderKL(**cfgs.vae)  # type: ignore[no-untyped-call]
        unet.load_state_dict(sd.unet.state_dict())
        vae.load_state_dict(sd.vae.state_dict())
        self.encoders: list[Any] = []
        if sd.text_encoder is not None and cfgs.text_encoder is not None:
            text: Any = CLIPTextModel(CLIPTextConfig(**cfgs.text_encoder))
            # transformers 4 nests the modules under text_model; 5 does not (our keys follow 5)
            getattr(text, "text_model", text).load_state_dict(sd.text_encoder.state_dict(), strict=False)
            self.encoders.append(text)
        if sd.text_encoder_2 is not None and cfgs.text_encoder_2 is not None:
            text_2: Any = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs.text_encoder_2))
            text_2.load_state_dict(sd.text_encoder_2.state_dict(), strict=False)
            self.encoders.append(text_2)
        dev, dt = sd.backend.device, sd.backend.dtype
        self.xl = sd.text_encoder_2 is not None
        self.vae_dtype = torch.float32 if sd.info.force_upcast else dt
        for m in (unet, *self.encoders):
            m.to(dev, dt).eval()
        vae.to(dev, self.vae_dtype).eval()
        self.device, self.dtype = dev, dt
        self.vae = vae
        self.tokenizers: tuple[ClipTokenizer, ...] = sd.tokenizers
        self.info: ModelInfo = sd.info
        mode = "reduce-overhead" if dev.type == "cuda" else "default"
        self._unet: Any = torch.compile(unet, mode=mode) if compile_unet else unet

    def check_shape(self, batch: int, height: int, width: int) -> None:
        return None

    def encode_text(self, ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        if not self.xl:
            out: Tensor = self.encoders[0](ids[0])[0]
            return out, None
        contexts, pooled = [], None
        for enc, chunk_ids in zip(self.encoders, ids, strict=True):
            res = enc(chunk_ids, output_hidden_states=True)
            contexts.append(res.hidden_states[-2])
            pooled = getattr(res, "text_embeds", None)
        return torch.cat(contexts, dim=-1), pooled

    def unet(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, text_embeds: Tensor | None = None,
             time_ids: Tensor | None = None, control: Sequence[Tensor] | None = None) -> Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        res = {} if control is None else {"down_block_additional_residuals": tuple(control[:-1]),
                                          "mid_block_additional_residual": control[-1]}
        out: Tensor = self._unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, **res).sample
        return out

    def decode(self, z: Tensor) -> Tensor:
        out: Tensor = self.vae.decode(z.to(self.vae_dtype)).sample
        return out.float()

    def encode(self, image: Tensor) -> Tensor:
        out: Tensor = self.vae.encode(image.to(self.vae_dtype)).latent_dist.parameters
        return out.float()


def _native_size(model: str, family: str) -> int:
    if model in SMALL or model in PUBLISHED:
        return int(preset_config(model)["native_size"])
    return 1024 if family.startswith("sdxl") else 512


def _git_revision() -> str:
    """The checkout sdexport runs from (not the working directory's), `-dirty` with uncommitted changes."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("nan")
    return float((a - b).abs().max())


class _Rows:
    """The result rows; the first recorded path is the reference of every difference."""

    def __init__(self, inp: Inputs, opts: BenchOptions, height: int, width: int, device: torch.device,
                 log: Log) -> None:
        self.inp, self.opts, self.height, self.width, self.device, self.log = inp, opts, height, width, device, log
        self.rows: list[dict[str, Any]] = []
        self.reference: dict[str, Tensor] = {}
        self.artifacts: list[tuple[str, Backend]] = []  # the loaded artifacts, for the ControlNet rows

    def record(self, path: str, be: Backend) -> None:
        self.log(f"timing {path} ...")
        ms, outs = bench_backend(be, self.inp, self.opts.steps, self.height, self.width, self.opts.repeat,
                                 self.device)
        if not self.reference:
            self.reference.update(outs)
        diffs = {k: _diff(outs[k], self.reference[k]) for k in outs}
        self.rows.append({"path": path, "ms": ms, "max_abs_diff": diffs})


def _eager_rows(sd: StableDiffusion, rows: _Rows) -> None:
    order = ["sdpa"] + [b for b in rows.opts.backends if b != "sdpa"]  # sdpa first: it is the reference
    for name in order:
        if name == "fused" and not ops.available():
            rows.log("skipping eager fused: op library not built")
            continue
        sd.attention_backend(Kernels(name))
        rows.record(f"eager {name}", sd.backend)
    sd.attention_backend(Kernels.SDPA)


def _artifact_rows(rows: _Rows) -> None:
    for art in rows.opts.artifacts:
        t0 = time.perf_counter()
        pipe = runtime.load(art, device=rows.opts.device, threads=rows.opts.threads, spin=rows.opts.spin)
        assert isinstance(pipe.backend, ArtifactBackend)
        rows.log(f"loaded {art} in {time.perf_counter() - t0:.2f}s")
        path = f"artifact {pipe.backend.manifest.format} ({art})"
        rows.record(path, pipe.backend)
        rows.artifacts.append((path, pipe.backend))


def _diffusers_rows(sd: StableDiffusion, rows: _Rows) -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        rows.log("diffusers not installed: skipping its rows")
        return
    rows.record("diffusers eager", DiffusersBackend(sd, compile_unet=False))
    if rows.opts.torch_compile:
        rows.record("diffusers + torch.compile", DiffusersBackend(sd, compile_unet=True))


def _meta(opts: BenchOptions, device: torch.device, dtype_name: str, height: int, width: int) -> dict[str, Any]:
    cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    if not cuda and ops.available():
        device_name += f", {ops.cpu_kernels()} kernels"  # which build of our CPU kernels ran
    return {
        "date": datetime.date.today().isoformat(),
        "model": opts.model, "device": opts.device, "device_name": device_name,
        "threads": torch.get_num_threads(), "onnxruntime_threads": [torch.get_num_threads(), 1],
        "onnxruntime_spin": opts.spin,
        "dtype": dtype_name,
        "size": f"{width}x{height}", "steps": opts.steps, "repeat": opts.repeat,
        "torch": torch.__version__, "revision": _git_revision(),
    }


def run_bench(opts: BenchOptions, log: Log = print) -> dict[str, Any]:
    """Every requested path timed on the same inputs: eager kernels, artifacts, diffusers."""
    device = torch.device(opts.device)
    use_threads(opts.threads)
    dtype_name = ("float16" if device.type == "cuda" else "bfloat16") if opts.half else "float32"
    dtype = DTYPES[dtype_name]
    sd = open_model(opts.model).to(device, dtype)
    height = opts.height or _native_size(opts.model, sd.info.family)
    width = opts.width or height
    rows = _Rows(make_inputs(sd, height, width, device, dtype), opts, height, width, device, log)
    _eager_rows(sd, rows)
    _artifact_rows(rows)
    if opts.diffusers:
        _diffusers_rows(sd, rows)
    result = {"meta": _meta(opts, device, dtype_name, height, width), "rows": rows.rows}
    if opts.control:
        result["control"] = control_cost(sd, rows.inp, opts.control, rows.artifacts, opts.device,
                                         lambda fn: time_call(fn, device, opts.repeat), height, width, log)
    return result


def format_table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    head = (f"{meta['model']} {meta['size']} {meta['dtype']} on {meta['device']} ({meta['device_name']}, "
            f"{meta['threads']} threads, onnxruntime intra/inter {meta.get('onnxruntime_threads', '?')}, "
            f"spinning {'on' if meta.get('onnxruntime_spin', True) else 'off'}), "
            f"torch {meta['torch']}, rev {meta['revision']}, {meta['date']}")
    cols = [*COMPONENTS, "image"]
    lines = [head, f"{'path':<44}" + "".join(f"{c:>14}" for c in cols) + f"{'max|diff|':>12}"]
    base = result["rows"][0]["ms"] if result["rows"] else {}
    for row in result["rows"]:
        cells = []
        for c in cols:
            v = row["ms"][c]
            unit = f"{v / 1e3:.2f}s" if c == "image" else f"{v:.2f}ms"
            ratio = base[c] / v if v else float("nan")
            cells.append(f"{unit} {ratio:4.2f}x")
        worst = max(row["max_abs_diff"].values())
        lines.append(f"{row['path'][:43]:<44}" + "".join(f"{s:>14}" for s in cells) + f"{worst:>12.2e}")
    lines.append("ratios: speed relative to the first row (eager sdpa); >1 is faster")
    if "control" in result:
        lines.append(format_control(result["control"]))
    return "\n".join(lines)
