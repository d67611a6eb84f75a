"""`python -m runtime.serve ART [ART ... | DIR]`: serve artifacts with uvicorn (or Ray Serve with --ray)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime.serve.settings import ServeSettings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve",
                                description="Serve sdexport artifacts over A1111's HTTP API (/sdapi/v1).")
    p.add_argument("artifacts", nargs="+", type=Path, metavar="ART",
                   help="artifact folder(s), or a folder of artifacts; the first is the default model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--lora-dir", type=Path, default=None, help="where <lora:NAME:w> prompt tags find NAME")
    p.add_argument("--embeddings-dir", type=Path, default=None, help="embeddings named in prompts")
    p.add_argument("--control-dir", type=Path, default=None,
                   help="folder of ControlNet artifacts, named by A1111 ControlNet units' `model`")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]", help="HTTP basic auth")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="decoded image limit (w x h)")
    p.add_argument("--no-batching", dest="batching", action="store_false",
                   help="run requests one at a time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve (RAY_ADDRESS for a cluster)")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    return p


def settings_from(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(artifacts=tuple(args.artifacts), host=args.host, port=args.port, device=args.device,
                         lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, control_dir=args.control_dir,
                         api_auth=args.api_auth,
                         max_queue=args.max_queue, batching=args.batching,
                         max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                         threads=args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.ray:
        from runtime.serve import ray_app

        ray_app.run(settings, args.replicas)
        return 0
    return serve(settings)


def serve(settings: ServeSettings) -> int:
    import torch
    import uvicorn

    from runtime.manifest import ArtifactError
    from runtime.serve.app import create_app

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        app = create_app(settings)
    except (ValueError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # uvicorn's SIGTERM handling: stop accepting, let open requests finish, then the app's shutdown
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
