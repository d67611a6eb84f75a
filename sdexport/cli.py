"""The `sdexport` command: build, refit, generate, inspect, bench, demo."""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from runtime.manifest import FORMATS, modules_for
from runtime.prompt import EMPHASIS_MODES
from runtime.prompt_grammar import SYNTAXES
from runtime.samplers import SCHEDULER_NAMES
from runtime.schedulers import PREDICTION_TYPES
from sdexport.bench import BenchOptions
from sdexport.export.build import DEVICES, KERNELS, BuildOptions
from sdexport.export.mkl_linear import CPU_GEMMS
from sdexport.presets import open_model

F = TypeVar("F", bound=Callable[..., Any])
# The click defaults of the build options are BuildOptions' own.
BUILD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BuildOptions)}
BENCH_DEFAULTS = BenchOptions(model="").__dict__


def _friendly(fn: F) -> F:
    """Turn the errors a user can cause into one clean line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from runtime.manifest import ArtifactError

        try:
            return fn(*args, **kwargs)
        except (ValueError, ArtifactError, FileExistsError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper  # type: ignore[return-value]


def _lora_spec(spec: str) -> tuple[Path, float]:
    """`PATH[:SCALE]` -> (path, scale); the scale defaults to 1."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def _adapter_options(fn: F) -> F:
    """--lora PATH[:SCALE] and --embedding PATH, repeatable."""
    fn = click.option("--embedding", "embeddings", multiple=True, type=click.Path(exists=True, path_type=Path),
                      help="textual-inversion embedding (token: the file's stem); repeatable")(fn)
    return click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
                        help="LoRA / LyCORIS file merged into the weights, scale 1 by default; repeatable")(fn)


def _load_adapters(pipe: Any, loras: tuple[str, ...], embeddings: tuple[Path, ...]) -> None:
    for path in embeddings:
        pipe.load_embedding(path)
    for spec in loras:
        info = pipe.load_lora(*_lora_spec(spec))
        click.echo(f"LoRA {info.summary}")


def _stage_bar(label: str, total: int) -> tuple[Callable[[str], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="module")

    def step(name: str) -> None:
        if bar.n or bar.desc != label:
            bar.update(1)
        bar.set_description(f"{label}: {name}")

    def close() -> None:
        bar.update(bar.total - bar.n)
        bar.close()

    return step, close


@click.group()
@click.version_option(package_name="sdexport")
def main() -> None:
    """Stable Diffusion -> frozen compiled artifact with fused kernels, and a light runtime."""


@main.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="artifact directory")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=BUILD_DEFAULTS["format"], show_default=True)
@click.option("--half", is_flag=True, help="16-bit weights and compute: fp16 on cuda, bfloat16 on cpu")
@click.option("--device", type=click.Choice(DEVICES), default=BUILD_DEFAULTS["device"], show_default=True)
@click.option("--kernels", type=click.Choice(KERNELS), default=BUILD_DEFAULTS["kernels"], show_default=True,
              help="UNet and text encoders: our fused ops, or plain torch ops")
@click.option("--vae-kernels", type=click.Choice(KERNELS), default=None,
              help="the VAE's [default: native on cpu (faster there), --kernels on cuda]")
@click.option("--cpu-gemm", type=click.Choice(CPU_GEMMS), default=None,
              help="float32 cpu aoti builds: the linear layers' engine [default: mkl on AVX2 CPUs, onednn "
                   "on AVX-512 ones, the faster as measured]")
@click.option("--max-batch", type=int, default=BUILD_DEFAULTS["max_batch"], show_default=True,
              help="images per call")
@click.option("--min-size", type=int, default=None, help="pixels [default: 256; SDXL 512]")
@click.option("--max-size", type=int, default=None, help="pixels [default: 1024; SDXL 1536]")
@click.option("--max-chunks", type=int, default=BUILD_DEFAULTS["max_chunks"], show_default=True,
              help="77-token prompt chunks")
@click.option("--prediction-type", type=click.Choice(PREDICTION_TYPES), default=None,
              help="override (single-file SD 2 768 checkpoints need v_prediction)")
@click.option("--force", is_flag=True, help="replace an existing artifact")
@_adapter_options
@_friendly
def build(model: str, out: Path, fmt: str, half: bool, device: str, kernels: str, vae_kernels: str | None,
          cpu_gemm: str | None, max_batch: int, min_size: int | None, max_size: int | None, max_chunks: int,
          prediction_type: str | None, force: bool, loras: tuple[str, ...], embeddings: tuple[Path, ...]) -> None:
    """Export MODEL (diffusers folder, .safetensors/.ckpt, or a preset) into an artifact."""
    from sdexport.export.build import build as run_build

    opts = BuildOptions(format=fmt, half=half, device=device, kernels=kernels, vae_kernels=vae_kernels or "",
                        cpu_gemm=cpu_gemm or "", max_batch=max_batch, min_size=min_size, max_size=max_size,
                        max_chunks=max_chunks)
    opts.validate()
    t0 = time.perf_counter()
    if _build_controlnet(model, out, opts, force, prediction_type, loras, embeddings):
        click.echo(f"wrote ControlNet artifact {out} in {time.perf_counter() - t0:.1f}s")
        return
    sd = open_model(model, prediction_type)
    _load_adapters(sd, loras, embeddings)
    step, close = _stage_bar(f"build {fmt}", len(modules_for(sd.info.family)))
    report = run_build(sd, out, opts, overwrite=force, on_stage=step)
    close()
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    click.echo(f"wrote {out} in {time.perf_counter() - t0:.1f}s ({stages})")


def _build_controlnet(model: str, out: Path, opts: BuildOptions, force: bool, prediction_type: str | None,
                      loras: tuple[str, ...], embeddings: tuple[Path, ...]) -> bool:
    """`sdexport build` of a ControlNet (folder or control_model.* file): a control artifact. False when
    `model` is not a ControlNet."""
    from sdexport.loading.controlnet import is_controlnet

    if not is_controlnet(model):
        return False
    if prediction_type is not None or loras or embeddings:
        raise click.UsageError("--prediction-type, --lora and --embedding do not apply to a ControlNet")
    from sdexport.controlnet import ControlNet
    from sdexport.export.control import build_control

    build_control(ControlNet.from_pretrained(model), out, opts, overwrite=force)
    return True


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="new artifact directory (ARTIFACT itself with --force)")
@click.option("--prediction-type", type=click.Choice(PREDICTION_TYPES), default=None,
              help="override (single-file SD 2 768 checkpoints need v_prediction)")
@click.option("--force", is_flag=True, help="replace an existing directory")
@_adapter_options
@_friendly
def refit(artifact: Path, model: str, out: Path, prediction_type: str | None, force: bool,
          loras: tuple[str, ...], embeddings: tuple[Path, ...]) -> None:
    """Put MODEL's weights (a fine-tune or merged LoRA of the same architecture) into a copy of ARTIFACT,
    without recompiling. Works for aoti and pt2 artifacts, whose weights sit beside the program."""
    from sdexport.export.refit import refit as run_refit

    t0 = time.perf_counter()
    sd = open_model(model, prediction_type)
    _load_adapters(sd, loras, embeddings)
    step, close = _stage_bar("refit", len(modules_for(sd.info.family)))
    manifest = run_refit(artifact, sd, out, overwrite=force, on_stage=step)
    close()
    click.echo(f"wrote {out} ({manifest.model_name}) in {time.perf_counter() - t0:.1f}s")


@main.command()
@click.argument("model")
@click.option("-p", "--prompt", required=True)
@click.option("-n", "--negative-prompt", default="")
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--cfg-scale", type=float, default=7.5, show_default=True,
              help="classifier-free guidance scale (the API's `scale`)")
@click.option("-W", "--width", type=int, default=None, help="pixels [default: 512; SDXL 1024]")
@click.option("-H", "--height", type=int, default=None, help="pixels [default: 512; SDXL 1024]")
@click.option("-s", "--seed", type=int, default=None, help="first seed; the batch's images take the next ones")
@click.option("--sampler", type=click.Choice(SCHEDULER_NAMES), default=None,
              help="the API's `scheduler` [default: the model's: ddim; SDXL euler]")
@click.option("-b", "--batch-size", type=int, default=1, show_default=True)
@click.option("--strength", type=float, default=None, help="img2img / inpaint strength")
@click.option("-i", "--init", "init_image", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--mask", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--device", default=None, help="cpu or cuda (default: the model's)")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="artifacts on CUDA: replay the UNet step through a CUDA graph per shape")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads of every engine (torch, onnxruntime) [default: torch's]")
@click.option("--original-size", type=(int, int), default=None, metavar="H W",
              help="SDXL size conditioning [default: the image size]")
@click.option("--crop", type=(int, int), default=None, metavar="TOP LEFT",
              help="SDXL crop conditioning (crops_coords_top_left) [default: 0 0]")
@click.option("--target-size", type=(int, int), default=None, metavar="H W",
              help="SDXL base target-size conditioning [default: the image size]")
@click.option("--aesthetic-score", type=float, default=None, help="SDXL refiner [default: 6.0]")
@click.option("--syntax", type=click.Choice(SYNTAXES), default=SYNTAXES[0], show_default=True,
              help="prompt grammar: ours (A1111's plus `(words):1.3`) or exactly A1111's")
@click.option("--emphasis", type=click.Choice(EMPHASIS_MODES), default=EMPHASIS_MODES[0], show_default=True,
              help="how weights act: on cross-attention values, A1111's 'Original', or not at all")
@click.option("--lora-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="where prompt tags <lora:NAME:0.8> find NAME.safetensors")
@click.option("--embeddings-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="embeddings used by writing their file stem in a prompt")
@_adapter_options
@click.option("--control", "controls", multiple=True,
              help="ControlNet: a control artifact, a diffusers folder or a control_model.* file (repeatable)")
@click.option("--control-image", "control_images", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="one per --control")
@click.option("--control-scale", "control_scales", multiple=True, type=float,
              help="one, or one per --control [default: 1.0]")
@click.option("--control-start", "control_starts", multiple=True, type=float,
              help="fraction of the steps where it starts acting [default: 0.0]")
@click.option("--control-end", "control_ends", multiple=True, type=float, help="[default: 1.0]")
@click.option("--guess-mode", is_flag=True, help="ControlNet on the conditional half only (works without a prompt)")
@click.option("--control-preprocess", "preprocess", multiple=True, type=click.Choice(["none", "canny"]),
              help="applied to the control image: one, or one per --control [default: none]")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@_friendly
def generate(model: str, prompt: str, negative_prompt: str, steps: int, cfg_scale: float, width: int | None,
             height: int | None, seed: int | None, sampler: str | None, batch_size: int, strength: float | None,
             init_image: Path | None, mask: Path | None, device: str | None, cuda_graphs: bool,
             threads: int | None, original_size: tuple[int, int] | None, crop: tuple[int, int] | None,
             target_size: tuple[int, int] | None, aesthetic_score: float | None, syntax: str, emphasis: str,
             lora_dir: Path | None, embeddings_dir: Path | None, loras: tuple[str, ...],
             embeddings: tuple[Path, ...], controls: tuple[str, ...], control_images: tuple[Path, ...],
             control_scales: tuple[float, ...], control_starts: tuple[float, ...], control_ends: tuple[float, ...],
             guess_mode: bool, preprocess: tuple[str, ...], out: Path) -> None:
    """Generate PNGs (with A1111-style metadata) from MODEL: an artifact, a checkpoint or a preset."""
    from tqdm import tqdm

    from runtime.png import save_png

    if mask is not None and init_image is None:
        raise click.UsageError("--mask needs --init (the image to inpaint)")
    # Images are read before the model loads, so that a bad file fails at once.
    image = _open_image(init_image, "--init").convert("RGB") if init_image is not None else None
    mask_image = _open_image(mask, "--mask") if mask is not None else None
    hints = _control_images(controls, control_images, preprocess)
    t0 = time.perf_counter()
    if (Path(model) / "manifest.json").is_file():
        import runtime

        pipe: Any = runtime.load(model, device=device, cuda_graphs=cuda_graphs, threads=threads)
    else:
        from runtime.cpu import use_threads

        use_threads(threads)
        pipe = open_model(model)
        if device is not None:
            pipe.to(device)
    pipe.set_adapter_dirs(lora_dir, embeddings_dir)
    _load_adapters(pipe, loras, embeddings)
    loaded = time.perf_counter() - t0
    bars: list[Any] = []  # made at the first step, so that a rejected request prints no bar

    def progress(i: int, n: int) -> None:
        if not bars:
            bars.append(tqdm(total=n, desc="sampling", unit="step"))
        bars[0].update(i - bars[0].n)

    # The seeds are chosen here (A1111's convention: consecutive), so that the files can be named by them.
    first = secrets.randbelow(2**32) if seed is None else seed
    seeds = [first + i for i in range(batch_size)]
    common: dict[str, Any] = dict(steps=steps, scale=cfg_scale, seed=seeds, scheduler=sampler,
                                  batch_size=batch_size, progress=progress, syntax=syntax, emphasis=emphasis)
    # SDXL conditioning: only what was given, so that SD 1.x/2.x models refuse it clearly
    xl = {"original_size": original_size, "crops_coords_top_left": crop, "target_size": target_size,
          "aesthetic_score": aesthetic_score}
    common.update({k: v for k, v in xl.items() if v is not None})
    if controls:
        common.update(control=[_open_control(c, device) for c in controls], control_image=hints,
                      control_scale=_per_control(control_scales, len(controls), 1.0, "--control-scale"),
                      control_start=_per_control(control_starts, len(controls), 0.0, "--control-start"),
                      control_end=_per_control(control_ends, len(controls), 1.0, "--control-end"),
                      guess_mode=guess_mode)
    native = 1024 if pipe.backend.info.family.startswith("sdxl") else 512
    t1 = time.perf_counter()
    if image is None:
        images = pipe.text2img(prompt, negative_prompt, height=height or native, width=width or native, **common)
    elif mask_image is None:
        images = pipe.img2img(image, prompt, negative_prompt, strength=0.8 if strength is None else strength,
                              **common)
    else:
        images = pipe.inpaint(image, mask_image, prompt, negative_prompt,
                              strength=1.0 if strength is None else strength, **common)
    for bar in bars:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    for img, img_seed in zip(images, seeds, strict=True):
        path = save_png(img, _free_name(out, f"{img_seed}.png"))
        click.echo(f"wrote {path}")
    click.echo(f"load {loaded:.2f}s, generate {time.perf_counter() - t1:.2f}s")


def _control_images(controls: tuple[str, ...], paths: tuple[Path, ...], preprocess: tuple[str, ...]) -> list[Any]:
    """The control images, read (and preprocessed) before any model loads."""
    if len(paths) != len(controls):
        raise click.UsageError(f"give one --control-image per --control ({len(controls)} controls, "
                               f"{len(paths)} images)")
    if preprocess and len(preprocess) not in (1, len(controls)):
        raise click.UsageError("--control-preprocess: give one, or one per --control")
    images = [_open_image(p, "--control-image").convert("RGB") for p in paths]
    modes = list(preprocess) * len(controls) if len(preprocess) == 1 else list(preprocess) or ["none"] * len(controls)
    if "canny" in modes:
        from runtime.canny import canny

        images = [canny(img) if mode == "canny" else img for img, mode in zip(images, modes, strict=True)]
    return images


def _per_control(values: tuple[float, ...], n: int, default: float, option: str) -> list[float]:
    if not values:
        return [default] * n
    if len(values) not in (1, n):
        raise click.UsageError(f"{option}: give one value, or one per --control ({n})")
    return list(values) * n if len(values) == 1 else list(values)


def _open_control(path: str, device: str | None) -> Any:
    """A control artifact (runtime.load_control) or a ControlNet checkpoint (eager)."""
    if (Path(path) / "manifest.json").is_file():
        import runtime

        return runtime.load_control(path, device=device)
    from sdexport.controlnet import ControlNet

    cn = ControlNet.from_pretrained(path)
    return cn.to(device) if device is not None else cn


def _open_image(path: Path, option: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise click.BadParameter(f"{path} is not a readable image ({e})", param_hint=option) from None


def _free_name(folder: Path, name: str) -> Path:
    path, stem, k = folder / name, Path(name).stem, 1
    while path.exists():
        path, k = folder / f"{stem}-{k}.png", k + 1
    return path


@main.command()
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@_friendly
def inspect(artifact: Path) -> None:
    """Print an artifact's manifest readably and verify every file's checksum."""
    from runtime.manifest import read_manifest

    m = read_manifest(artifact, verify=False)
    s = m.shapes
    rows = [
        ("format", f"{m.format} (version {m.format_version})"),
        ("model", f"{m.model_name} [{m.family}, {m.prediction_type}] hash {m.model_hash or '-'}"),
        ("dtype / device", f"{m.dtype} / {m.device}"
                           + (f" (VAE {m.vae_dtype_name})" if m.vae_dtype_name != m.dtype else "")),
        ("programs", ", ".join(m.modules)),
        ("kernels", m.kernels + (f", VAE {m.vae_kernels}" if m.vae_kernels and m.vae_kernels != m.kernels else "")
                    + (f" (op library {m.op_library_version})" if m.op_library_version else "")
                    + (f", linear layers {m.cpu_gemm}" if m.cpu_gemm else "")),
        ("torch", m.torch_version),
        ("shapes", f"batch 1..{s.max_batch}, {s.min_size}..{s.max_size} px in steps of {s.multiple}, "
                   f"prompts up to {s.max_chunks * 75} tokens"),
        ("scheduler", json.dumps(m.scheduler_config, sort_keys=True)),
    ]
    for k, v in rows:
        click.echo(f"{k:>15}: {v}")
    click.echo("          files:")
    for rel in sorted(m.files):
        size = (artifact / rel).stat().st_size if (artifact / rel).exists() else 0
        click.echo(f"                 {rel:<32} {size / 2**20:9.2f} MiB")
    from runtime.manifest import verify_files

    verify_files(artifact, m)
    click.echo(f"verified: {len(m.files)} files match their sha256")


@main.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=BUILD_DEFAULTS["format"], show_default=True)
@click.option("--kernels", type=click.Choice(KERNELS), default=BUILD_DEFAULTS["kernels"], show_default=True)
@_friendly
def demo(out: Path, fmt: str, kernels: str) -> None:
    """Build the tiny random-weight demo model, load it with the runtime, generate one image."""
    import torch
    from torch import Tensor

    import runtime
    from runtime.png import save_png
    from sdexport.export.build import build as run_build
    from sdexport.presets import random_pipeline

    if kernels == "fused":
        from runtime import ops

        if not ops.available():
            click.echo("op library not built: using --kernels native", err=True)
            kernels = "native"
    # The demo model is tiny: thread start-up and barriers cost more than they bring (and on a busy
    # machine OpenMP waits can slow it down a hundredfold).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sd = random_pipeline("demo")
    prompt = "a (red):1.4 fox in the snow, [blurry]"
    t1 = time.perf_counter()
    eager = sd.text2img(prompt, steps=20, height=128, width=128, seed=7, output="tensor")
    t_eager = time.perf_counter() - t1
    art = out / f"demo-{fmt}"
    step, close = _stage_bar(f"build {fmt}", len(modules_for(sd.info.family)))
    opts = BuildOptions(format=fmt, kernels=kernels, max_batch=2, min_size=64, max_size=256)
    run_build(sd, art, opts, overwrite=True, on_stage=step)
    close()
    t_build = time.perf_counter() - t1 - t_eager
    t2 = time.perf_counter()
    pipe = runtime.load(art)
    t_load = time.perf_counter() - t2
    images = pipe.text2img(prompt, steps=20, height=128, width=128, seed=7)
    t_first = time.perf_counter() - t2 - t_load
    t3 = time.perf_counter()
    compiled = pipe.text2img(prompt, steps=20, height=128, width=128, seed=7, output="tensor")
    t_second = time.perf_counter() - t3
    assert isinstance(images, list) and isinstance(compiled, Tensor) and isinstance(eager, Tensor)
    png = save_png(images[0], out / "demo.png")
    diff = (compiled - eager).abs().max().item()
    gemm = f", linear layers {opts.cpu_gemm_used}" if opts.cpu_gemm_used else ""
    click.echo(f"artifact  {art}  ({fmt}, kernels {kernels}, VAE {opts.vae_kernels_used}{gemm})")
    click.echo(f"image     {png}  (128x128, 20 ddim steps, seed 7)")
    click.echo(f"timings   model init {t1 - t0:.2f}s | build {t_build:.1f}s | load {t_load:.2f}s | "
               f"first image {t_first:.2f}s | next image {t_second:.2f}s | eager image {t_eager:.2f}s")
    click.echo(f"parity    max |compiled - eager| = {diff:.2e}")
    if not diff <= 1e-3:  # also catches NaN
        raise click.ClickException(f"the compiled image differs from the eager one by {diff:.2e} (> 1e-3)")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Serve artifacts over A1111's HTTP API: the same as `python -m runtime.serve ART ...` (--help there)."""
    from runtime.serve.__main__ import main as serve_main

    raise SystemExit(serve_main(list(args)))


@main.command()
@click.argument("model")
@click.option("--artifact", "artifacts", multiple=True, type=click.Path(exists=True, path_type=Path))
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--half", is_flag=True)
@click.option("-W", "--width", type=int, default=None, help="default: the model's native size")
@click.option("-H", "--height", type=int, default=None)
@click.option("--steps", type=int, default=BENCH_DEFAULTS["steps"], show_default=True,
              help="steps of the whole-image timing")
@click.option("--repeat", type=int, default=BENCH_DEFAULTS["repeat"], show_default=True)
@click.option("--backends", default=",".join(BENCH_DEFAULTS["backends"]), show_default=True,
              help="eager kernels to time, comma-separated")
@click.option("--diffusers/--no-diffusers", "with_diffusers", default=True, show_default=True)
@click.option("--compile/--no-compile", "with_compile", default=False, show_default=True,
              help="also time diffusers + torch.compile")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads of every engine (torch, onnxruntime, OpenVINO) [default: torch's]")
@click.option("--compare-openvino", is_flag=True,
              help="CPU: the side-by-side UNet step / VAE decode table (eager fp32, channels_last, bf16, the "
                   "--artifact paths (openvino ones too), OpenVINO on the ONNX artifact; needs openvino), at 1 "
                   "and all threads unless --threads")
@click.option("--openvino-onnx", type=click.Path(exists=True, path_type=Path), default=None,
              help="--compare-openvino: the float32 onnx artifact whose graphs OpenVINO runs, not itself timed "
                   "in onnxruntime unless also an --artifact (saves its memory) [default: the first onnx "
                   "--artifact]")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="--compare-openvino: the eager fp32 channels_last row (a second copy of the model in memory)")
@click.option("--ort-spin/--no-ort-spin", "spin", default=True, show_default=True,
              help="onnxruntime's idle threads spin-wait between ops (its default); --no-ort-spin frees the "
                   "cores after each call, so the engine timed next does not share them")
@click.option("--control", default=None, metavar="CN",
              help="also time the UNet step with one ControlNet: a control artifact, a ControlNet folder or "
                   "file, or 'random' (mirrors the model's UNet)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@_friendly
def bench(model: str, artifacts: tuple[Path, ...], device: str, half: bool, width: int | None,
          height: int | None, steps: int, repeat: int, backends: str, with_diffusers: bool,
          with_compile: bool, threads: int | None, compare_openvino: bool, openvino_onnx: Path | None,
          channels_last: bool, spin: bool, control: str | None, json_path: Path | None) -> None:
    """Time text encoder, UNet step (CFG batch 2), VAE decode/encode and a whole image, per path."""
    from sdexport.bench import format_table, run_bench

    opts = BenchOptions(model=model, artifacts=list(artifacts), device=device, half=half, width=width,
                        height=height, steps=steps, repeat=repeat,
                        backends=[b for b in backends.split(",") if b], diffusers=with_diffusers,
                        torch_compile=with_compile, threads=threads, control=control, spin=spin,
                        channels_last=channels_last,
                        openvino_onnx=None if openvino_onnx is None else str(openvino_onnx))
    if compare_openvino and control:
        raise click.UsageError("--control times the ControlNet on the bench's paths, not with --compare-openvino")
    if compare_openvino:
        import os

        from sdexport.bench_compare import format_compare, run_compare

        counts = [threads] if threads else sorted({1, os.cpu_count() or 1})
        result = run_compare(opts, counts, log=lambda s: click.echo(s, err=True))
        click.echo(format_compare(result))
    else:
        result = run_bench(opts, log=lambda s: click.echo(s, err=True))
        click.echo(format_table(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
