"""The artifacts a server may use, by name (the artifact folder's name): listed from their manifests at
start, loaded on first use (one resident at a time), and looked up only among themselves, never as a
path. `sd_model_checkpoint` may name one by its name, A1111 title ("name [hash]") or hash."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from runtime.manifest import Manifest, read_manifest
from runtime.pipeline import Pipeline
from runtime.serve.errors import RequestError
from runtime.serve.settings import ServeSettings, artifact_dirs
from runtime.tokenizer import ClipTokenizer


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    manifest: Manifest
    tokenizers: tuple[ClipTokenizer, ...]

    @property
    def title(self) -> str:
        h = self.manifest.model_hash
        return f"{self.name} [{h}]" if h else self.name


class Models:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.models: dict[str, Model] = {}
        for path in artifact_dirs(settings.artifacts):
            m = read_manifest(path, verify=False)  # checksums are verified when the model loads
            toks = tuple(ClipTokenizer.from_json((path / f).read_text(encoding="utf-8")) for f in m.tokenizer_files)
            self.models[path.name] = Model(path.name, path, m, toks)
        self.default = next(iter(self.models))
        self._lock = threading.Lock()
        self._loaded: tuple[str, Pipeline] | None = None

    def resolve(self, name: object, field: str) -> Model:
        if name is None or name == "":
            return self.models[self.default]
        if not isinstance(name, str):
            raise RequestError(field, "must be a model name (see /sdapi/v1/sd-models)")
        for m in self.models.values():
            if name in (m.name, m.title) or (m.manifest.model_hash and name == m.manifest.model_hash):
                return m
        raise RequestError(field, f"unknown model {name!r}; this server has {sorted(self.models)}", status=404)

    def pipeline(self, name: str) -> Pipeline:
        """The loaded pipeline of model `name` (loading it, and dropping the previous one, if needed)."""
        import runtime

        with self._lock:
            if self._loaded is not None and self._loaded[0] == name:
                return self._loaded[1]
            self._loaded = None
            s = self.settings
            pipe = runtime.load(self.models[name].path, device=s.device, lora_dir=s.lora_dir,
                                embeddings_dir=s.embeddings_dir)
            self._loaded = (name, pipe)
            return pipe

    @property
    def loaded(self) -> str | None:
        return None if self._loaded is None else self._loaded[0]
