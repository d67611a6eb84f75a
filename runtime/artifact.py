"""`runtime.load(path)`: verify an artifact and run it through the shared pipeline.

Each format's modules become plain callables over tensors; no model code is imported.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from runtime.adapters import AdapterError, Embedding
from runtime.backend import ModelInfo
from runtime.control import no_residuals, residual_shapes
from runtime.cpu import check_bf16, ort_session_options, use_threads
from runtime.cudagraph import GraphedCall
from runtime.manifest import DTYPES, FLAT_INPUT_FORMATS, TEXT_ENCODERS, ArtifactError, Manifest, read_manifest
from runtime.pipeline import Pipeline
from runtime.prepack import PackedProgram, Prepack, PrepackError, read_prepack
from runtime.token_tables import TokenTables
from runtime.tokenizer import ClipTokenizer


class Built(Protocol):
    """What `_check_compatible` reads of a manifest (a model's or a ControlNet's)."""

    @property
    def format(self) -> str: ...
    @property
    def torch_version(self) -> str: ...
    @property
    def device(self) -> str: ...

Output = Tensor | tuple[Tensor, ...]  # text_encoder_2 returns (context, pooled)
Program = Callable[..., Any]  # a loaded program, any format
Call = Callable[..., Tensor]
Weights = dict[str, Tensor]  # the live weight tensors of a loaded program (pt2, aoti)
ADAPTER_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _check_compatible(m: Built, device: torch.device, root: Path) -> None:
    here, built = _version(torch.__version__), _version(m.torch_version)
    if m.format == "aoti" and here != built:
        raise ArtifactError(f"{root}: AOTInductor artifacts run only on the torch they were built with "
                            f"({m.torch_version}); this is torch {torch.__version__}. Rebuild the artifact.")
    if m.format == "pt2" and here < built:
        raise ArtifactError(f"{root}: built with torch {m.torch_version}, newer than this torch "
                            f"{torch.__version__}; upgrade torch or rebuild the artifact")
    if m.format in ("aoti",) and device.type != m.device:
        raise ArtifactError(f"{root}: this {m.format} artifact was compiled for {m.device}; "
                            f"it cannot run on {device.type}")
    if m.format == "openvino" and device.type != "cpu":
        raise ArtifactError(f"{root}: openvino artifacts run on the CPU (OpenVINO's CPU plugin), not on {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{root}: CUDA was requested but this torch sees no CUDA device")


def _load_safetensors(path: Path, device: torch.device) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def _pt2(program: Path, weights: Path, device: torch.device) -> tuple[Program, Weights]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.load(str(program))
    state = _load_safetensors(weights, device)
    missing = set(ep.state_dict) - set(state)
    if missing:
        raise ArtifactError(f"{weights}: weights missing for {sorted(missing)[:5]}")
    for name in ep.state_dict:  # the program holds zero-stride placeholders; the weights live beside it
        ep.state_dict[name] = torch.nn.Parameter(state[name], requires_grad=False)
    for name in ep.constants:
        if name in state:
            ep.constants[name] = state[name]
    module = ep.module().to(device)
    live = {**dict(module.named_parameters()), **dict(module.named_buffers())}  # what the graph reads
    return module, live


def _aoti(program: Path, weights: Path, device: torch.device, prepack: Path | None) -> tuple[Program, Weights]:
    from torch._inductor import aoti_load_package

    compiled = aoti_load_package(str(program))
    state = _load_safetensors(weights, device)
    names = [n for n in compiled.get_constant_fqns() if not n.startswith("_FOLDED_CONST")]
    plan = None if prepack is None else _read_prepack(prepack)
    needed = names if plan is None else sorted(plan.weights_needed(names))
    missing = [n for n in needed if n not in state]
    if missing:
        raise ArtifactError(f"{weights}: weights missing for {missing[:5]}")
    live = {n: state[n] for n in needed}
    if plan is not None:  # packed from the weights here and after each swap (runtime/prepack.py)
        try:
            return PackedProgram(compiled, plan, live, names), live
        except RuntimeError as e:
            raise ArtifactError(f"{program}: packing its weights for this CPU failed ({e}); rebuild the "
                                "artifact on a machine like this one") from None
    # Folded constants are recomputed from these at the first run (runtime constant folding), so a
    # weight swap (LoRA merge, fine-tune) needs no recompile.
    compiled.load_constants(live, check_full_update=False)
    return compiled, live  # copied in: changes need `load_constants` again


def _read_prepack(path: Path) -> Prepack:
    try:
        return read_prepack(path)
    except PrepackError as e:
        raise ArtifactError(str(e)) from None


def _torchscript(program: Path, device: torch.device) -> Program:
    with warnings.catch_warnings():  # torch.jit warns that it is deprecated on every call
        warnings.simplefilter("ignore")
        module: Program = torch.jit.load(str(program), map_location=device)  # type: ignore[no-untyped-call]
    return module


def _onnx(program: Path, device: torch.device, threads: int, spin: bool) -> Callable[..., Output]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ArtifactError("ONNX artifacts need onnxruntime: pip install onnxruntime") from None
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    opts = ort_session_options(threads, spin)
    session = ort.InferenceSession(str(program), sess_options=opts, providers=providers)
    names = [i.name for i in session.get_inputs()]

    def run(*args: Tensor) -> Output:
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True)}
        outs = [torch.from_numpy(o).to(device) for o in session.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return run


def _load(fmt: str, root: Path, files: dict[str, str], device: torch.device, threads: int,
          dtype: str = "float32", spin: bool = True) -> tuple[Program, Weights]:
    """One module's program (and its live weights, for the formats that keep them beside it); `dtype` (the
    manifest's name) sets OpenVINO's precision, the other formats' programs carry theirs."""
    program = root / files["program"]
    if fmt == "openvino":
        from runtime.openvino import load_program

        return load_program(program, threads, dtype), {}
    if fmt == "pt2":
        return _pt2(program, root / files["weights"], device)
    if fmt == "aoti":
        prepack = root / files["prepack"] if files.get("prepack") else None
        return _aoti(program, root / files["weights"], device, prepack)
    if fmt == "torchscript":
        return _torchscript(program, device), {}
    return _onnx(program, device, threads, spin), {}


def model_info(m: Manifest) -> ModelInfo:
    """What a pipeline (and a ControlNet pairing check) knows of an artifact's model, from its manifest."""
    return ModelInfo(family=m.family, unet_in_channels=m.unet_in_channels, latent_channels=m.latent_channels,
                     scaling_factor=m.scaling_factor, scheduler_config=m.scheduler_config, name=m.model_name,
                     hash=m.model_hash, time_ids=m.time_ids, force_upcast=m.force_upcast,
                     force_zeros_for_empty_prompt=m.force_zeros_for_empty_prompt,
                     context_widths=tuple(m.context_widths), context_dim=m.context_dim,
                     control_residuals=m.residuals)


class ArtifactBackend:
    """A `Backend` over the compiled modules of an artifact (`runtime.manifest.modules_for` its family)."""

    def __init__(self, root: Path, m: Manifest, device: torch.device, cuda_graphs: bool,
                 threads: int | None = None, spin: bool = True) -> None:
        self.manifest = m
        self.threads = use_threads(threads)  # every engine's intra-op threads (runtime/cpu.py)
        self.device = device
        self.dtype = DTYPES[m.dtype]
        self.vae_dtype = DTYPES[m.vae_dtype_name]  # float32 in a half build of a force_upcast model
        self.info = model_info(m)
        self.tokenizers = tuple(ClipTokenizer.from_json((root / f).read_text(encoding="utf-8"))
                                for f in m.tokenizer_files)
        loaded = {name: _load(m.format, root, files, device, self.threads,
                              m.vae_dtype_name if name.startswith("vae") else m.dtype, spin)
                  for name, files in m.modules.items()}
        calls = {name: program for name, (program, _) in loaded.items()}
        self._programs = calls
        self._weights = {name: w for name, (_, w) in loaded.items() if name in ADAPTER_COMPONENTS}
        self._encoders = [(name, calls[name]) for name in TEXT_ENCODERS[m.family]]
        names = TEXT_ENCODERS[m.family]
        widths = m.encoder_widths if m.token_tables else {}
        self._tokens = TokenTables(root, m.token_tables, dict(zip(names, self.tokenizers, strict=True)), widths,
                                   device)  # empty for artifacts whose encoders take ids (format 1)
        self._decode: Call = calls["vae_decoder"]
        self._encode: Call = calls["vae_encoder"]
        unet: Call = _flat_control(calls["unet"], m)
        # onnxruntime runs outside torch's stream, so only torch formats can be captured (openvino: CPU only)
        graphed = cuda_graphs and device.type == "cuda" and m.format not in FLAT_INPUT_FORMATS
        self._unet: Call = GraphedCall(unet) if graphed else unet
        self._no_control: dict[tuple[int, ...], tuple[Tensor, ...]] = {}  # zero residuals per latent shape

    def check_shape(self, batch: int, height: int, width: int) -> None:
        self.manifest.shapes.check(batch, height, width)

    def encode_text(self, ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """Each encoder's program on its ids; contexts concatenated on D, the pooled output of
        `text_encoder_2` (SDXL), else None."""
        if len(ids) != len(self._encoders):
            raise ValueError(f"{len(ids)} id tensors for the {len(self._encoders)} text encoders of this artifact")
        shapes = self.manifest.shapes
        rows = 2 * shapes.max_batch * shapes.max_chunks
        contexts: list[Tensor] = []
        pooled: Tensor | None = None
        for (name, call), chunk_ids in zip(self._encoders, ids, strict=True):
            if chunk_ids.ndim != 2 or chunk_ids.shape[1] != 77 or chunk_ids.shape[0] != ids[0].shape[0]:
                raise ValueError(f"{name} takes (N, 77) token ids, the same N for every encoder; got "
                                 f"{tuple(chunk_ids.shape)}")
            if chunk_ids.shape[0] > rows:
                raise ValueError(f"prompt too long for this artifact: {chunk_ids.shape[0]} 77-token chunks in the "
                                 f"batch, at most {rows} (max_chunks={shapes.max_chunks})")
            chunk_ids = chunk_ids.to(self.device, torch.long).contiguous()
            if not self._tokens:
                out = call(chunk_ids)
            elif name == "text_encoder_2":  # the ids locate the pooled EOS token
                out = call(self._tokens.lookup(name, chunk_ids), chunk_ids)
            else:
                out = call(self._tokens.lookup(name, chunk_ids))
            if name == "text_encoder_2":
                context, pooled = out
            else:
                context = out
            contexts.append(context)
        return (contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=-1)), pooled

    def _control(self, x: Tensor, control: Sequence[Tensor] | None) -> tuple[Tensor, ...]:
        """The residual inputs of the UNet program: `control`, checked, or zeros (no ControlNet)."""
        layout = self.info.control_residuals
        if not layout:
            if control is not None:
                raise ValueError("this artifact's UNet takes no ControlNet residuals (built before ControlNet "
                                 "support): rebuild it with `sdexport build` to use ControlNet")
            return ()
        if control is None:
            key = tuple(x.shape)
            if key not in self._no_control:
                self._no_control = {key: no_residuals(layout, key, self.dtype, self.device)}
            return self._no_control[key]
        shapes = residual_shapes(layout, x.shape)
        got = [tuple(r.shape) for r in control]
        if got != shapes:
            raise ValueError(f"ControlNet residuals {got} do not fit this UNet's {shapes}")
        return _dense(self.dtype, *control)

    def unet(self, x: Tensor, t: Tensor, context: Tensor, weights: Tensor, text_embeds: Tensor | None = None,
             time_ids: Tensor | None = None, control: Sequence[Tensor] | None = None) -> Tensor:
        m = self.manifest
        residuals = self._control(x, control)
        chunks = m.shapes.max_chunks
        if context.shape[1] > 77 * chunks:
            raise ValueError(f"prompt too long for this artifact: {context.shape[1] // 77} chunks of 75 tokens, "
                             f"at most {chunks} (max_chunks; rebuild with a larger --max-chunks)")
        if context.shape[2] != m.context_dim:
            raise ValueError(f"context width {context.shape[2]}, this artifact's UNet takes {m.context_dim}")
        t = t.to(device=self.device, dtype=torch.float32).reshape(1).expand(x.shape[0])
        args = (*_dense(self.dtype, x), t.contiguous(), *_dense(self.dtype, context, weights))
        if not m.time_ids:
            if text_embeds is not None or time_ids is not None:
                raise ValueError(f"this artifact's UNet ({m.family}) takes no text_embeds / time_ids (SDXL only)")
            return self._unet(*args, *residuals)
        if text_embeds is None or time_ids is None:
            raise ValueError(f"this artifact's UNet ({m.family}) needs text_embeds and time_ids")
        b = x.shape[0]
        if tuple(text_embeds.shape) != (b, m.pooled_dim) or tuple(time_ids.shape) != (b, m.time_ids):
            raise ValueError(f"text_embeds must be ({b}, {m.pooled_dim}) and time_ids ({b}, {m.time_ids}), got "
                             f"{tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
        return self._unet(*args, *_dense(self.dtype, text_embeds), *_dense(torch.float32, time_ids), *residuals)

    def decode(self, z: Tensor) -> Tensor:
        return self._decode(*_dense(self.vae_dtype, z)).float()

    # ---- adapters (runtime/adapters/session.py) ----------------------------------------------
    def adapter_weights(self) -> dict[str, Tensor]:
        """Each module's weights renamed `<module>.<name inside the wrapped model>` (the export wrappers
        hold the UNet as `unet.`, either text encoder as `text_encoder.`)."""
        if self.manifest.format not in ("pt2", "aoti"):
            raise AdapterError(f"LoRA hot swap needs an aoti or pt2 artifact; this one is "
                               f"{self.manifest.format}: use `sdexport build --lora` for this format")
        return {f"{module}.{name.partition('.')[2]}": t
                for module, weights in self._weights.items() for name, t in weights.items()}

    def weights_changed(self, names: Collection[str]) -> None:
        """aoti programs hold copies of their constants: hand them the changed tensors (no recompile;
        constants folded from them are folded again at the next run)."""
        if self.manifest.format != "aoti":
            return  # pt2 graphs read the tensors themselves
        for module, weights in self._weights.items():
            changed = {n: t for n, t in weights.items() if f"{module}.{n.partition('.')[2]}" in names}
            if changed:
                program: Any = self._programs[module]
                program.load_constants(changed, check_full_update=False)
                if module == "unet" and isinstance(self._unet, GraphedCall):
                    self._unet.graphs.clear()  # captured against the old constant buffers: capture again

    def add_embedding(self, emb: Embedding) -> None:
        """New rows in the token tables (runtime/token_tables.py), any format. Artifacts built before
        token tables (format 1) take only the embeddings built in (`sdexport build --embedding`)."""
        if self._tokens:
            self._tokens.add(emb)
            return
        if all(tok.added.get(emb.token) is not None and len(tok.added[emb.token]) == emb.num_vectors
               for tok in self.tokenizers):
            return
        raise AdapterError(f"{emb.token!r}: this artifact has no such token; textual inversion in an "
                           "artifact needs a rebuild: `sdexport build MODEL --embedding FILE`")

    def encode(self, image: Tensor) -> Tensor:
        return self._encode(*_dense(self.vae_dtype, image)).float()


def _flat_control(program: Program, m: Manifest) -> Call:
    """The UNet program as a function of flat tensors: torch formats take the residuals as one tuple
    (the last input), ONNX and OpenVINO as separate inputs (sdexport/export/control_unet.py)."""
    if not m.control_residuals or m.format in FLAT_INPUT_FORMATS:
        return program
    k = len(m.control_residuals)

    def call(*args: Tensor) -> Tensor:
        out: Tensor = program(*args[:-k], tuple(args[-k:]))
        return out

    return call


def _dense(dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Compiled programs assume the contiguous layout they were traced with (AOTInductor does not check
    strides): a channels_last input, e.g. latents derived from a channels_last VAE output, must be copied."""
    return tuple(t.to(dtype).contiguous() for t in tensors)


def load_kernels(root: Path, *kernels: str) -> None:
    """Load the fused op library when an artifact (model or ControlNet) was built with it (`kernels`: the
    kernels of its programs)."""
    if "fused" not in kernels:
        return
    from runtime import ops

    try:
        ops.load()
    except (ImportError, OSError, RuntimeError) as e:
        raise ArtifactError(f"{root}: this artifact uses the fused ops, but the op library could not "
                            f"be loaded: {e}") from None


def load(path: str | Path, device: str | torch.device | None = None, *, cuda_graphs: bool = True,
         low_ram: bool = False, verify: bool = True, lora_dir: str | Path | None = None,
         embeddings_dir: str | Path | None = None, threads: int | None = None, spin: bool = True) -> Pipeline:
    """Load an artifact built by `sdexport build` and return a pipeline with text2img/img2img/inpaint.

    device: defaults to the device the artifact was built for. cuda_graphs: capture the UNet step in a
    CUDA graph per input shape (CUDA only). verify: check the sha256 of every file first.
    lora_dir / embeddings_dir: where `<lora:NAME:0.8>` prompt tags and embedding names are looked up
    (runtime/adapters/session.py); `pipe.load_lora(path, scale)` swaps LoRAs in with no recompile.
    threads: CPU threads for every engine (torch.set_num_threads, process-wide; onnxruntime's intra-op
    pool); None keeps torch's current count and gives onnxruntime the same. spin: onnxruntime's idle
    threads spin-wait for the next op (its default, fastest back to back); False frees the cores between
    calls (a server sharing them, a benchmark timing another engine right after).
    """
    root = Path(path)
    m = read_manifest(root, verify=verify)
    dev = torch.device(device if device is not None else m.device)
    _check_compatible(m, dev, root)
    if dev.type == "cpu" and "bfloat16" in (m.dtype, m.vae_dtype_name):
        check_bf16(str(root))  # runs everywhere; warns where the CPU has no native bf16
    load_kernels(root, m.kernels, m.vae_kernels)
    pipe = Pipeline(ArtifactBackend(root, m, dev, cuda_graphs, threads, spin), low_ram=low_ram)
    pipe.set_adapter_dirs(lora_dir, embeddings_dir)
    return pipe
