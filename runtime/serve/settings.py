"""What a server is started with: artifacts, address, device, adapter folders, limits. One frozen value,
built by the CLI (runtime/serve/__main__.py), by tests, and by the Ray deployment (runtime/serve/ray_app.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ServeSettings:
    artifacts: tuple[Path, ...]  # artifact folders (a folder of artifacts is expanded by `artifact_dirs`)
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 7861
    device: str = "cpu"  # "cpu" or "cuda"; one worker per server process
    lora_dir: Path | None = None  # `<lora:NAME>` tags resolve to files directly inside it, nowhere else
    embeddings_dir: Path | None = None
    control_dir: Path | None = None  # ControlNet artifacts, named by their folder directly inside it, nowhere else
    api_auth: str | None = None  # "user:pass[,user2:pass2]" (A1111's --api-auth): HTTP basic on every route but /health
    max_queue: int = 64  # requests waiting (not running); one more answers 503 with Retry-After
    batching: bool = True  # run compatible queued requests in one pipeline call, up to the artifact's max_batch
    max_body_bytes: int = 64 * 2**20  # request bodies above this answer 413
    max_image_pixels: int = 4096 * 4096  # decoded image limit (width x height), checked before decoding
    syntax: str = "a1111"  # prompt syntax (runtime.prompt_grammar.SYNTAXES); A1111's by default
    emphasis: str = "a1111"  # emphasis mode (runtime.prompt.EMPHASIS_MODES); A1111's "Original" by default
    threads: int | None = None  # torch CPU threads for the worker (None: torch's default)
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)  # free-form, for deployments

    def __post_init__(self) -> None:
        if not self.artifacts:
            raise ValueError("give at least one artifact (a folder with manifest.json, or a folder of them)")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {self.port}")
        for name in ("max_queue", "max_body_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.api_auth is not None:
            for cred in self.api_auth.split(","):
                user, sep, pw = cred.partition(":")
                if not (sep and user and pw):
                    raise ValueError("api_auth must be 'user:password' (several separated by commas)")
        for d in (self.lora_dir, self.embeddings_dir, self.control_dir):
            if d is not None and not Path(d).is_dir():
                raise ValueError(f"{d}: not a directory")

    def credentials(self) -> list[tuple[str, str]]:
        if not self.api_auth:
            return []
        return [(u, p) for u, _, p in (c.partition(":") for c in self.api_auth.split(","))]


def artifact_dirs(paths: tuple[Path, ...]) -> list[Path]:
    """Each path is an artifact (holds manifest.json) or a folder whose subfolders are artifacts."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / "manifest.json").is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(c for c in p.iterdir() if (c / "manifest.json").is_file())
            if not found:
                raise ValueError(f"{p}: neither an artifact nor a folder of artifacts (no manifest.json)")
            out.extend(found)
        else:
            raise ValueError(f"{p}: no such artifact folder")
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two artifacts share the folder name {dupes[0]!r}; model names must be unique")
    return out
