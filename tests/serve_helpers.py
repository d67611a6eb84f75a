"""Shared by the serving tests: the demo artifact (built once per session) and a real server on a free
loopback port.

    from serve_helpers import demo_artifact, start_server   # session fixtures: demo_artifact, demo_control_artifact
    srv = start_server([demo_artifact], api_auth="u:p")      # `python -m runtime.serve` in a subprocess
    httpx.get(f"{srv.url}/health"); srv.stop()

`start_server(artifacts, **settings)` takes runtime.serve.ServeSettings' fields as keywords (host and
port are chosen: 127.0.0.1 and a free port); `in_process=True` runs uvicorn in a thread of this process
instead (no subprocess start-up; `pid` is then this process's).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUILD = dict(format="pt2", kernels="native", max_batch=4, min_size=64, max_size=256)
LOOPBACK_ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def build_demo_artifact(out: Path, fmt: str = "pt2") -> Path:
    """`sdexport demo`'s tiny random-weight model as an artifact (batch 1..4, 64..256 px)."""
    from sdexport.export.build import BuildOptions, build
    from sdexport.presets import random_pipeline

    sd = random_pipeline("demo")
    opts = BuildOptions(**{**DEMO_BUILD, "format": fmt})  # type: ignore[arg-type]
    build(sd, out, opts, overwrite=True)
    return out


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session; SDEXPORT_SERVE_DEMO=DIR keeps it between runs (built there when missing)."""
    keep = os.environ.get("SDEXPORT_SERVE_DEMO")
    if keep:
        out = Path(keep)
        return out if (out / "manifest.json").is_file() else build_demo_artifact(out)
    return build_demo_artifact(tmp_path_factory.mktemp("serve") / "demo")


DEMO_CONTROL = "demo-cn"


@pytest.fixture(scope="session")
def demo_control_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pt2 ControlNet artifact (random weights) mirroring the demo UNet, built once per session in a
    folder of its own (a --control-dir), named DEMO_CONTROL."""
    import torch

    from sdexport.controlnet import ControlNet
    from sdexport.presets import random_pipeline

    torch.manual_seed(3)
    cn = ControlNet.from_unet_config(dict(random_pipeline("demo").configs.unet), name=DEMO_CONTROL)
    return cn.export(tmp_path_factory.mktemp("control-dir") / DEMO_CONTROL, overwrite=True, **DEMO_BUILD)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerHandle:
    url: str
    stop: Callable[[], None]
    pid: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None and self.log.exists() else ""


def _cli_args(artifacts: Sequence[Path], port: int, settings: dict[str, Any]) -> list[str]:
    args = [str(a) for a in artifacts] + ["--host", "127.0.0.1", "--port", str(port)]
    flags = {"device": "--device", "lora_dir": "--lora-dir", "embeddings_dir": "--embeddings-dir",
             "control_dir": "--control-dir",
             "api_auth": "--api-auth", "max_queue": "--max-queue", "max_image_pixels": "--max-image-pixels",
             "threads": "--threads"}
    for key, value in settings.items():
        if key == "batching":
            args += [] if value else ["--no-batching"]
        elif key == "max_body_bytes":
            args += ["--max-body-mb", repr(value / 2**20)]
        elif key in flags:
            args += [flags[key], str(value)]
        else:
            raise TypeError(f"start_server: no CLI flag for {key!r}")
    return args


def wait_healthy(url: str, timeout: float = 120.0, alive: Callable[[], bool] = lambda: True) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited during start-up")
        try:
            r = httpx.get(f"{url}/health", timeout=2.0)
            if r.status_code == 200 and r.json().get("loaded", True):  # the default model is loaded
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer /health within {timeout:.0f}s")


def start_server(artifacts: Sequence[Path], *, in_process: bool = False, timeout: float = 120.0,
                 **settings: Any) -> ServerHandle:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if in_process:
        return _in_process(artifacts, port, url, timeout, settings)
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", *_cli_args(artifacts, port, settings)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    try:
        wait_healthy(url, timeout, alive=lambda: proc.poll() is None)
    except Exception as e:
        stop()
        raise RuntimeError(f"{e}; server log:\n{log.read_text(errors='replace')}") from None
    return ServerHandle(url, stop, proc.pid, proc, log)


def _in_process(artifacts: Sequence[Path], port: int, url: str, timeout: float,
                settings: dict[str, Any]) -> ServerHandle:
    import uvicorn

    from runtime.serve.app import create_app
    from runtime.serve.settings import ServeSettings

    s = ServeSettings(artifacts=tuple(Path(a) for a in artifacts), host="127.0.0.1", port=port, **settings)
    server = uvicorn.Server(uvicorn.Config(create_app(s), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(60)

    try:
        wait_healthy(url, timeout, alive=thread.is_alive)
    except Exception:
        stop()
        raise
    return ServerHandle(url, stop, os.getpid(), None, None, {"server": server})
