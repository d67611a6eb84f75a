"""LoRAs and embeddings on a loaded pipeline, eager or deployed: the part of `runtime.pipeline.Pipeline`
that talks to `Backend.adapter_weights()` (the live weight tensors, `unet.<name>`, `text_encoder.<name>`,
`text_encoder_2.<name>`).

    pipe.load_lora("detail.safetensors", 0.8)   # stacks additively with the LoRAs already loaded
    pipe.unload_loras()                          # the weights as loaded, bit for bit
    pipe.set_adapter_dirs(lora_dir=..., embeddings_dir=...)
    pipe.text2img("a <lora:detail:0.6> photo of mystyle")   # A1111 tags, embeddings by name

Prompt tags `<lora:NAME>` / `<lora:NAME:SCALE>` name a file stem in `lora_dir`; they are removed from
the prompts before encoding and their set is merged for the call (the same set as the previous call:
no work). As A1111, `<lora:NAME:TE:UNET>` (or named `te=` / `unet=`) scales the text encoders and the UNet
separately (UNET defaults to TE); DyLoRA's `dyn=` is refused. As in A1111, negative prompts are left
as written (tags there are neither applied nor removed). Every prompt of a batch must carry the same set
of tags (or none): different sets in one batch are refused. Weights change in place (`copy_` into each
tensor's own storage): no recompile.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from runtime.adapters.embeddings import Embedding, read_embedding
from runtime.adapters.files import AdapterError, FileInfo, file_info, same_file
from runtime.adapters.keys import Resolved, resolve
from runtime.adapters.lora import read_lora
from runtime.adapters.merge import LoraMerger
from runtime.backend import AdapterBackend, Backend
from runtime.tensor_files import TORCH_SUFFIXES

__all__ = ["ADAPTER_SUFFIXES", "PREFIXES", "AdapterMixin", "LoadedLora", "named_in", "parse_tags"]

PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
_TAG = re.compile(r"<lora:([^>]*)>")
Tag = tuple[str, float, float]  # (file stem, text-encoder scale, UNet scale)
ADAPTER_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)  # the files a name in an adapter folder may be
Active = tuple[tuple[Resolved, float], ...]


@dataclass(frozen=True)
class LoadedLora:
    """One merged LoRA: its name (file stem), scale, A1111 short hash and what it adapted."""

    name: str
    scale: float
    hash: str
    report: dict[str, int]  # component -> number of adapted weights
    summary: str
    tag: bool = False  # from a prompt tag (this call) rather than load_lora


def _tag(text: str) -> Tag:
    """A1111's reading of `NAME[:TE[:UNET]]` with `te=` / `unet=` overriding (extra_networks_lora.py)."""
    items = [x.strip() for x in text.split(":")]
    named = dict(x.split("=", 1) for x in items if "=" in x)
    positional = [x for x in items if "=" not in x]
    name = positional[0] if positional else ""
    if not name or any(c in name for c in "/\\") or ".." in name:
        raise AdapterError(f"<lora:{text}>: a LoRA tag names a file stem in lora_dir (no paths)")
    if "dyn" in named or len(positional) > 3:
        raise AdapterError(f"<lora:{text}>: DyLoRA's dyn (a 4th value) is not supported")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise AdapterError(f"<lora:{text}>: unknown argument {unknown[0]!r} (te=, unet=)")
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else "1"))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    except ValueError:
        raise AdapterError(f"<lora:{text}>: the scales must be numbers (<lora:NAME:0.8>, "
                           "<lora:NAME:TE:UNET>, <lora:NAME:te=0.5:unet=1>)") from None
    return name, te, unet


def parse_tags(prompt: str) -> tuple[str, list[Tag]]:
    """A prompt without its `<lora:...>` tags, and the tags (scales 1 when not given)."""
    tags: list[Tag] = []

    def take(m: re.Match[str]) -> str:
        tags.append(_tag(m[1]))
        return ""

    return _TAG.sub(take, prompt), tags


def _parts(r: Resolved, te: float, unet: float) -> Active:
    """(r, scale), or with separate scales its text-encoder and UNet parts (those that adapt something)."""
    if te == unet:
        return ((r, float(te)),)
    text = tuple(c for c in r.report() if c != "unet")
    parts = ((r.only(text), float(te)), (r.only(("unet",)), float(unet)))
    return tuple((x, s) for x, s in parts if x.targets)


def _loaded(r: Resolved, scale: float, tag: bool) -> LoadedLora:
    try:
        h = r.lora.a1111_hash
    except AdapterError:
        h = ""
    return LoadedLora(r.lora.name, float(scale), h, r.report(), r.summary(), tag)


class AdapterMixin:
    """LoRA / embedding methods of a pipeline over `self.backend` (module docstring)."""

    backend: Backend

    def _adapter_init(self) -> None:
        self._merger: LoraMerger | None = None
        self._explicit: Active = ()
        self._tags: Active = ()
        self._cache: dict[Path, tuple[FileInfo, Resolved]] = {}
        self._lora_dir: Path | None = None
        self._emb_dir: Path | None = None
        self._embeddings: dict[str, Embedding] = {}

    # ---- public API -------------------------------------------------------------------------
    def set_adapter_dirs(self, lora_dir: str | Path | None = None,
                         embeddings_dir: str | Path | None = None) -> None:
        """Where `<lora:NAME>` tags and embedding names in prompts are looked up (file stems)."""
        for d in (lora_dir, embeddings_dir):
            if d is not None and not Path(d).is_dir():
                raise AdapterError(f"{d}: not a directory")
        self._lora_dir = None if lora_dir is None else Path(lora_dir)
        self._emb_dir = None if embeddings_dir is None else Path(embeddings_dir)

    def load_lora(self, path: str | Path, scale: float = 1.0, *, te_scale: float | None = None) -> LoadedLora:
        """Merge a LoRA / LyCORIS file into the weights, on top of the ones loaded (they add up).
        `te_scale`: the text encoders' scale when it differs from the UNet's `scale` (A1111's te / unet).
        A file that does not fit the model is an error listing the unmatched keys; nothing changes."""
        r = self._resolved(Path(path))
        self._merge((*self._explicit, *_parts(r, scale if te_scale is None else te_scale, scale)), self._tags)
        return _loaded(r, scale, False)

    def unload_loras(self) -> None:
        """Every LoRA out (explicit and tag ones): the weights exactly as loaded."""
        if self._merger is not None and self._merger.unload():
            self._be().weights_changed(set(self._merger.weights))
        self._explicit, self._tags = (), ()

    @property
    def loras(self) -> list[LoadedLora]:
        """The LoRAs merged now, in order, with what each adapted."""
        return [_loaded(r, s, False) for r, s in self._explicit] + [_loaded(r, s, True) for r, s in self._tags]

    @property
    def lora_merges(self) -> int:
        """How many merges were done (a call with the same LoRA set as the previous one does none)."""
        return 0 if self._merger is None else self._merger.merges

    def load_embedding(self, path: str | Path, token: str | None = None) -> Embedding:
        """Add a textual-inversion embedding: its token (default the file's stem) in prompts stands for
        its vectors. Eager models and artifacts (rows added to the runtime's token tables; artifacts built
        before token tables take only the embeddings built in with `sdexport build --embedding`)."""
        emb = read_embedding(path, token)
        if emb.token in self._embeddings:
            raise AdapterError(f"an embedding named {emb.token!r} is already loaded")
        self._be().add_embedding(emb)
        if self._merger is not None:  # an eager token table is a new tensor now
            self._merger.weights = self._be().adapter_weights()
        self._embeddings[emb.token] = emb
        return emb

    @property
    def embeddings(self) -> dict[str, Embedding]:
        return dict(self._embeddings)

    # ---- used by the pipeline -----------------------------------------------------------------
    def _prompt_adapters(self, prompts: Sequence[str], negatives: Sequence[str]) -> tuple[list[str], Active]:
        """Prompts without their LoRA tags and the tag set (refused when it differs within the batch);
        embeddings of `embeddings_dir` named in the prompts get loaded."""
        parsed = [parse_tags(p) for p in prompts]
        sets = {tuple(t) for _, t in parsed}
        if len(sets) > 1:
            raise AdapterError("the prompts of one batch carry different <lora:...> tags; one set per call "
                               "(run the prompts in separate calls)")
        tags = next(iter(sets)) if sets else ()
        if tags and self._lora_dir is None:
            raise AdapterError("a prompt has <lora:...> tags, but no lora_dir was given")
        active = tuple(x for n, te, unet in tags
                       for x in _parts(self._resolved(self._find(self._lora_dir, n, "LoRA")), te, unet))
        self._dir_embeddings([*prompts, *negatives])
        return [t for t, _ in parsed], active

    def _use_tags(self, tags: Active) -> None:
        if tags or self._tags:
            self._merge(self._explicit, tags)

    def _adapter_hashes(self, prompt: str, negative: str) -> tuple[str, str]:
        """A1111's `Lora hashes` and `TI hashes` values for one image."""
        loras = ", ".join(dict.fromkeys(f"{x.name}: {x.hash}" for x in self.loras if x.hash))  # te/unet parts: once
        text = f"{prompt} {negative}"
        tis = ", ".join(f"{e.token}: {e.a1111_hash}" for e in self._embeddings.values()
                        if e.info is not None and named_in(e.token, text))
        return loras, tis

    # ---- internals ----------------------------------------------------------------------------
    def _be(self) -> AdapterBackend:
        if not hasattr(self.backend, "adapter_weights"):
            raise AdapterError(f"{type(self.backend).__name__} takes no LoRAs or embeddings")
        return cast(AdapterBackend, self.backend)

    def _merge(self, explicit: Active, tags: Active) -> None:
        if self._merger is None:
            self._merger = LoraMerger(self._be().adapter_weights())
        merger = self._merger
        old = merger.active
        try:
            changed = merger.set([*explicit, *tags])
        except BaseException:
            merger.set(old)  # the merger restored the originals; put the previous set back
            self._be().weights_changed(set(merger.weights))
            raise
        if changed:
            self._be().weights_changed(set(merger.weights))
        self._explicit, self._tags = explicit, tags

    def _resolved(self, path: Path) -> Resolved:
        hit = self._cache.get(path)
        if hit is not None and same_file(hit[0], path):
            return hit[1]
        lora = read_lora(path)
        shapes = {k: tuple(t.shape) for k, t in self._be().adapter_weights().items()}
        r = resolve(lora, shapes, PREFIXES)
        self._cache[path] = (lora.info or file_info(path), r)
        return r

    def _find(self, folder: Path | None, name: str, what: str) -> Path:
        assert folder is not None
        for suffix in ADAPTER_SUFFIXES:
            p = folder / f"{name}{suffix}"
            if p.is_file():
                return p
        raise AdapterError(f"no {what} named {name!r} in {folder} (looked for {name}{{{','.join(ADAPTER_SUFFIXES)}}})")

    def _dir_embeddings(self, texts: Sequence[str]) -> None:
        if self._emb_dir is None:
            return
        text = " ".join(texts)
        for p in sorted(self._emb_dir.iterdir()):
            stem = p.stem
            if p.suffix in ADAPTER_SUFFIXES and stem not in self._embeddings and named_in(stem, text):
                self.load_embedding(p)


def named_in(token: str, text: str) -> bool:
    """Whether `token` appears in `text` as a word of its own (how a prompt names an embedding)."""
    return re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", text, re.IGNORECASE) is not None
