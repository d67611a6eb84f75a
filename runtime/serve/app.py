"""The FastAPI app: A1111's /sdapi/v1 routes, /health, and the web page at / (runtime/serve/static).

`create_app(settings)` is all a deployment needs (uvicorn in runtime/serve/__main__.py, Ray Serve in
runtime/serve/ray_app.py). Every error is JSON: {"error", "field", "detail"}; bad input is a 4xx naming
the field, a full queue 503 with Retry-After, never a 500 for something the client sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.serve import a1111, controlnet
from runtime.serve.errors import QueueFull, RequestError
from runtime.serve.images import decode_image, encode_png
from runtime.serve.models import Models
from runtime.serve.schemas import Img2ImgRequest, Options, PngInfoRequest, Txt2ImgRequest
from runtime.serve.settings import ServeSettings
from runtime.serve.worker import Images, Worker

STATIC = Path(__file__).parent / "static"
_DISCONNECT_POLL_S = 0.25


class Server:
    """The state behind the routes: models, the worker, the request mapping context."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.models = Models(settings)
        self.ctx = a1111.Context(settings, self.models)
        self.worker = Worker(self.models.pipeline, lambda name: self.models.models[name].manifest.shapes.max_batch,
                             settings.max_queue, settings.batching, preload=self.models.default)

    async def run(self, request: Request, plan: a1111.Plan) -> tuple[Images, bool]:
        """Queue the plan's job and wait for it; a client that goes away cancels its job."""
        future = asyncio.wrap_future(self.worker.submit(plan.job))
        while True:
            done, _ = await asyncio.wait({future}, timeout=_DISCONNECT_POLL_S)
            if done:
                return future.result(), plan.job.interrupted
            if await request.is_disconnected():
                self.worker.cancel(plan.job)
                future.cancel()
                raise asyncio.CancelledError


def _error(status: int, field: str | None, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    names = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge",
             422: "ValidationError", 503: "ServiceUnavailable"}
    return JSONResponse({"error": names.get(status, "Error"), "field": field, "detail": detail},
                        status_code=status, headers=headers)


class _Guard:
    """HTTP basic auth (all routes but /health) and the request body limit, before any route reads it."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app = app
        self.creds = [f"{u}:{p}".encode() for u, p in settings.credentials()]
        self.limit = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.creds and scope["path"] != "/health" and not self._authorized(headers.get(b"authorization", b"")):
            await _error(401, None, "authentication required", {"WWW-Authenticate": 'Basic realm="sdexport"'})(
                scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _error(413, "body", f"request body above this server's limit of {self.limit} bytes")(
                scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise RequestError("body", f"request body above this server's limit of {self.limit} bytes", 413)
            return msg

        await self.app(scope, limited, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        ok = False
        for cred in self.creds:
            ok |= secrets.compare_digest(given, cred)
        return ok


def create_app(settings: ServeSettings) -> FastAPI:
    server = Server(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(server.worker.stop)  # running calls finish; queued ones get 503

    app = FastAPI(title="sdexport", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _handlers(app)
    _routes(app, server)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_Guard, settings=settings)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return _error(e.status, e.field, e.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        if first.get("type") == "json_invalid":
            return _error(400, "body", f"malformed JSON: {first.get('msg', '')}")
        return _error(422, field, str(first.get("msg", "invalid value")))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return _error(503, None, str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, None, str(e.detail), dict(e.headers or {}))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, e: ValueError) -> JSONResponse:  # from the pipeline: the request
        return _error(422, None, str(e))


def _routes(app: FastAPI, server: Server) -> None:
    ctx, worker = server.ctx, server.worker

    async def generate(request: Request, req: Any, build: Callable[[Any, a1111.Context], a1111.Plan]) -> dict[str, Any]:
        plan = await run_in_threadpool(build, req, ctx)  # image decoding stays off the event loop
        images, interrupted = await server.run(request, plan)
        encoded = await run_in_threadpool(lambda: [encode_png(im) for im in images])
        return {"images": (encoded + plan.init_images) if req.send_images else [],
                "parameters": req.model_dump(), "info": a1111.info(plan, req, images, interrupted)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request, req: Txt2ImgRequest) -> dict[str, Any]:
        return await generate(request, req, a1111.txt2img)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request, req: Img2ImgRequest) -> dict[str, Any]:
        out = await generate(request, req, a1111.img2img)
        out["parameters"]["init_images"] = None  # A1111 does not echo the images back
        out["parameters"]["mask"] = None
        return out

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return [{"title": m.title, "model_name": m.name, "hash": m.manifest.model_hash or None,
                 "sha256": None, "filename": m.name, "config": None} for m in server.models.models.values()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh() -> dict[str, Any]:
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return a1111.sampler_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return a1111.scheduler_list()

    @app.get("/sdapi/v1/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for n in a1111.HR_UPSCALERS]

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return ctx.options()

    @app.post("/sdapi/v1/options")
    async def set_options(opts: Options) -> dict[str, Any] | None:
        ctx.set_options(opts.model_dump())
        return None

    @app.get("/sdapi/v1/progress")
    async def progress() -> dict[str, Any]:
        return worker.progress()

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict[str, Any]:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info(req: PngInfoRequest) -> dict[str, Any]:
        im = await run_in_threadpool(decode_image, req.image, "image", server.settings.max_image_pixels)
        items = {k: v for k, v in im.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": a1111.parse_parameters(text) if text else {}}

    @app.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        d = server.settings.lora_dir
        files = [] if d is None else sorted(p for p in d.iterdir() if p.suffix in a1111.LORA_SUFFIXES)
        return [{"name": p.stem, "alias": p.stem, "path": p.name, "metadata": {}} for p in files]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> dict[str, Any]:
        return await run_in_threadpool(ctx.embeddings.listing, server.models.models[ctx.checkpoint])

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict[str, Any]:
        return {"txt2img": [], "img2img": []}

    @app.get("/controlnet/model_list")
    async def controlnet_models() -> dict[str, list[str]]:
        return controlnet.model_list(ctx.controlnets)

    @app.get("/controlnet/module_list")
    async def controlnet_modules() -> dict[str, list[str]]:
        return controlnet.module_list()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": worker.queued, "loaded": server.models.loaded, "batching": worker.batching,
                "pipeline_calls": worker.batches, "units_run": worker.batched_units,
                "busy_s": round(worker.busy_s, 3)}

    @app.get("/", response_model=None)
    async def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return _error(404, None, "no web page in this install (runtime/serve/static/index.html)")
        return FileResponse(page)
