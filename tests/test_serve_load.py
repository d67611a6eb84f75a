"""A bounded load test of the server (the full measurement: scripts/bench_serve.py): 200 requests from 16
concurrent clients against a queue of 8 on the demo artifact, under a minute. Every request is answered, 200 with its
image or a clean 503 with Retry-After; none is lost; the server's memory is flat after warm-up."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServerHandle, start_server

REQUESTS, CLIENTS, WARMUP = 200, 16, 40


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture()
def server(demo_artifact: Path) -> Iterator[ServerHandle]:
    srv = start_server([demo_artifact], max_queue=8)
    yield srv
    srv.stop()


def test_load(server: ServerHandle) -> None:
    # One step at the smallest size: the server's path (queue, batching, 503s, PNGs) is what is loaded here,
    # not the model. One pooled client: 16 connections, no per-request client set-up in this process.
    client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=CLIENTS))

    def one(k: int) -> tuple[int, int, str]:
        body = {"prompt": f"a fox {k % 7}", "seed": k, "steps": 1, "width": 64, "height": 64,
                "sampler_name": "Euler", "cfg_scale": 4.0 + k % 3}
        for _ in range(3):  # a 503 is retried after Retry-After, as a well-behaved client does
            r = client.post(f"{server.url}/sdapi/v1/txt2img", json=body)
            if r.status_code != 503:
                break
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"] == "ServiceUnavailable"
            time.sleep(0.2)
        images = r.json().get("images", []) if r.status_code == 200 else []
        return k, r.status_code, images[0] if images else ""

    with client, ThreadPoolExecutor(CLIENTS) as ex:
        warm = list(ex.map(one, range(WARMUP)))
        rss0 = _rss_mb(server.pid)
        t0 = time.monotonic()
        rest = list(ex.map(one, range(WARMUP, REQUESTS)))
        wall = time.monotonic() - t0
    rss1 = _rss_mb(server.pid)
    results = warm + rest
    assert sorted(k for k, _, _ in results) == list(range(REQUESTS))  # none lost
    assert {code for _, code, _ in results} <= {200, 503}
    ok = [img for _, code, img in results if code == 200]
    assert len(ok) >= REQUESTS // 2
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in ok)
    assert rss1 - rss0 < 64, f"server RSS grew {rss0:.0f} -> {rss1:.0f} MB over {REQUESTS - WARMUP} requests"
    assert wall < 60  # the budget; the timed part is 160 of the 200 requests
    assert httpx.get(f"{server.url}/health").status_code == 200
