"""Network hygiene of the server: every socket it opens, from start-up to exit, stays on loopback.

The watcher samples the test process's tree (the server runs as its child) from before the server starts
until after it exits; any listening address or peer outside 127.0.0.0/8 fails the test. The Ray deployment
gets the same check in tests/test_serve_ray.py.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from serve_helpers import start_server
from serve_net import Sock, SocketWatch, is_loopback


def test_loopback_classification() -> None:
    for ip in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(ip), ip
    for ip in ("0.0.0.0", "::", "192.0.2.2", "169.254.169.254", "8.8.8.8", "::ffff:10.0.0.1", "fe80::1%eth0"):
        assert not is_loopback(ip), ip


def test_socket_verdicts() -> None:
    def sock(local: tuple[str, int] | None, remote: tuple[str, int] | None, status: str) -> Sock:
        return Sock(pid=1, process="p", kind="tcp", local=local, remote=remote, status=status)

    assert sock(("127.0.0.1", 7861), None, psutil.CONN_LISTEN).problem() is None
    assert sock(("::ffff:127.0.0.1", 5), ("::ffff:127.0.0.1", 6), psutil.CONN_ESTABLISHED).problem() is None
    assert sock(("0.0.0.0", 7861), None, psutil.CONN_LISTEN).problem() == "listening on 0.0.0.0:7861"
    assert sock(("::", 7861), None, psutil.CONN_LISTEN).problem() == "listening on :::7861"
    assert sock(("10.0.0.2", 5), ("169.254.169.254", 80), psutil.CONN_SYN_SENT).problem() == \
        "peer 169.254.169.254:80"


def test_watch_sees_a_child_listener() -> None:
    """The watcher samples the whole tree: a child's listener shows up (on loopback: no violation)."""
    code = "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); " \
           "print(s.getsockname()[1], flush=True); time.sleep(30)"
    with SocketWatch(os.getpid()) as watch:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            deadline = time.monotonic() + 10
            while ("127.0.0.1", port) not in watch.listening() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            child.kill()
            child.wait()
    assert any(s.pid == child.pid and s.local == ("127.0.0.1", port) for s in watch.seen)
    assert not watch.violations(), watch.violations()


def test_server_talks_to_loopback_only(demo_artifact: Path) -> None:
    import webuiapi

    with SocketWatch(os.getpid()) as watch:  # the server is our child: watched from its first instruction
        srv = start_server([demo_artifact])
        try:
            server_pid = srv.pid
            port = int(srv.url.rsplit(":", 1)[1])
            for path in ("/health", "/", "/static/app.js", "/sdapi/v1/samplers", "/sdapi/v1/sd-models",
                         "/sdapi/v1/options", "/sdapi/v1/progress"):
                assert httpx.get(srv.url + path, timeout=30).status_code == 200, path
            api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
            result = api.txt2img(prompt="a lighthouse", seed=3, steps=2, width=64, height=64, sampler_name="Euler")
            assert result.image.size == (64, 64)
            buf = io.BytesIO()
            result.image.save(buf, format="PNG")
            r = httpx.post(srv.url + "/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()},
                           timeout=30)
            assert r.status_code == 200
            proc = psutil.Process(server_pid)
            listening = {c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        finally:
            srv.stop()
    assert not watch.violations(), "\n".join(watch.violations())
    # The watch did see the server: its listener, and connections to it from this test.
    assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", port)}
    server_socks = [s for s in watch.seen if s.pid == server_pid]
    assert any(s.status == psutil.CONN_LISTEN and s.local == ("127.0.0.1", port) for s in server_socks)
    assert any(s.remote is not None for s in server_socks), "no connection to the server was observed"
    assert watch.samples > 10
