"""Scale-out on Ray Serve: the single-process app (`create_app`) as N replicas behind Ray Serve's HTTP proxy.

Each replica builds its own app, so it loads the artifacts and batches with its own worker exactly as
`python -m runtime.serve` does; the proxy spreads requests over the replicas. One replica per GPU
(`num_gpus=1`) with device "cuda", else CPU replicas (one CPU each). Without RAY_ADDRESS a local Ray
instance is started that uses loopback only (`LOOPBACK_ENV`, `_init_local`); with it the replicas join
that cluster, whose own configuration decides its network (README: "Serve over HTTP").

    server = start(settings, replicas=2)    # returns once every replica answers; server.url
    server.stop()                           # removes the app (and the local instance)
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    from runtime.serve.settings import ServeSettings

APP_NAME = "sdexport"
REPLICA_HEADER = "X-Sdexport-Replica"  # "<host>:<pid>" of the replica that answered
OBJECT_STORE_BYTES = 256 * 2**20  # local instance: request and response bodies only (Ray's minimum is 75 MiB)
CONSTRUCTOR_RETRIES = 2  # Ray's default is 20: minutes before a replica that cannot load is reported
_LOOPBACK_FLAG = "SDEXPORT_RAY_LOOPBACK"

# The environment of a local instance's processes. Ray probes cloud metadata addresses (169.254.169.254)
# at start-up even with usage stats off: outbound HTTP(S) goes to a closed port on loopback instead.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's single-machine mode: the node address stays 127.0.0.1 (else
# Ray swaps a loopback node address for the machine's external one) and its servers bind to it.
LOOPBACK_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    _LOOPBACK_FLAG: "1",
}


def replica_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _loopback_replica() -> None:
    """Ray Serve starts each replica's inter-deployment gRPC server on "[::]:0" (every interface), with no
    setting to change it: on a local instance, bind it to loopback instead (it runs after this, in the
    replica's `_on_initialized`). A Ray version without that hook is left as is (the network test shows it)."""
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "_sdexport_loopback", False):
        return

    def loopback(server: Any, address: str) -> Any:
        return add_port(server, address.replace("[::]", "127.0.0.1").replace("0.0.0.0", "127.0.0.1"))

    loopback._sdexport_loopback = True  # type: ignore[attr-defined]
    setattr(replica, "add_port_to_grpc_server", loopback)  # noqa: B010 (not an exported name)


def build_app(settings: ServeSettings) -> FastAPI:
    """One replica's app: the single-process app plus a response header naming the replica."""
    if os.environ.get(_LOOPBACK_FLAG) == "1":
        _loopback_replica()
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
    from runtime.serve.app import create_app

    app = create_app(settings)
    name = replica_name()

    @app.middleware("http")
    async def tag_replica(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = name
        return response

    return app


def _set_env(values: dict[str, str]) -> Callable[[], None]:
    """Set `values` in os.environ (processes started afterwards inherit them); returns the undo."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)

    def restore() -> None:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old

    return restore


@dataclass
class RayServer:
    """A running deployment: `url` is Ray Serve's HTTP proxy."""

    url: str
    replicas: int
    local: bool  # this process started the Ray instance (and stops it)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def stop(self) -> None:
        """Remove the app (replicas finish their running requests first); stop the local instance."""
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            if self.local:
                ray.shutdown()
            while self._undo:
                self._undo.pop()()


def _init_local(settings: ServeSettings, replicas: int, undo: list[Callable[[], None]]) -> None:
    runtime_root = str(Path(__file__).resolve().parents[2])  # replicas import this very `runtime` package
    path = os.pathsep.join(p for p in (runtime_root, os.environ.get("PYTHONPATH", "")) if p)
    undo.append(_set_env({**LOOPBACK_ENV, "PYTHONPATH": path}))
    if "ray" in sys.modules:  # imported before the environment above: its constant was read already
        from ray._private import ray_constants

        before = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False

        def restore() -> None:
            ray_constants.ENABLE_RAY_CLUSTER = before

        undo.append(restore)
    import ray

    gpu = settings.device == "cuda"
    ray.init(
        address="local",
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        # a CPU replica reserves one CPU: never fewer CPUs than replicas, or they would wait forever
        num_cpus=max(os.cpu_count() or 1, 0 if gpu else replicas),
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=False,
        configure_logging=False,
    )


def start(settings: ServeSettings, replicas: int = 1) -> RayServer:
    """Deploy `replicas` copies of the app and return once all of them answer; Ray Serve's HTTP proxy
    listens on settings.host:settings.port. A local Ray instance unless RAY_ADDRESS names a cluster."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    cluster = os.environ.get("RAY_ADDRESS", "")
    if not cluster:  # a bad artifact is refused here, not by each replica in turn (their paths are ours)
        from runtime.serve.models import Models

        Models(settings)
    undo: list[Callable[[], None]] = []
    server = RayServer(url=f"http://{settings.host}:{settings.port}", replicas=replicas, local=not cluster,
                       _undo=undo)
    try:
        if cluster:
            import ray

            ray.init(address=cluster, log_to_driver=False, configure_logging=False)
        else:
            _init_local(settings, replicas, undo)  # sets the environment before Ray is imported
        from ray import serve

        serve.start(http_options={"host": settings.host, "port": settings.port})
        options: dict[str, Any] = {"num_gpus": 1} if settings.device == "cuda" else {"num_cpus": 1}

        def builder() -> FastAPI:  # runs in each replica
            return build_app(settings)

        config: dict[str, Any] = {
            "name": APP_NAME,
            "num_replicas": replicas,
            "ray_actor_options": options,
            # A replica queues and batches by itself and answers 503 past max_queue: Ray sends it up to that
            # many, and holds as many more at the proxy before it answers 503 itself.
            "max_ongoing_requests": settings.max_queue,
            "max_queued_requests": settings.max_queue,
        }
        if "max_constructor_retry_count" in inspect.signature(serve.deployment).parameters:
            config["max_constructor_retry_count"] = CONSTRUCTOR_RETRIES  # a replica that cannot start: fail soon
        deployment: Any = serve.deployment(serve.ingress(builder)(), **config)
        serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")
    except BaseException:
        server.stop()
        raise
    return server


def run(settings: ServeSettings, replicas: int = 1) -> None:
    """`python -m runtime.serve ART --ray --replicas N`: deploy, serve until SIGINT / SIGTERM, clean up."""
    from runtime.manifest import ArtifactError

    try:
        server = start(settings, replicas)
    except (ValueError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    where = f"the cluster at {os.environ['RAY_ADDRESS']}" if not server.local else "a local Ray instance"
    print(f"sdexport: {replicas} replica(s) on {where}, serving {server.url}", flush=True)
    try:
        done.wait()
    finally:
        server.stop()
