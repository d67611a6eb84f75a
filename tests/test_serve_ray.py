"""Ray Serve scale-out (runtime/serve/ray_app.py): a local Ray instance with two CPU replicas over the demo
artifact. Requests are spread over both replicas, give the same images as the single-process server, and
every socket of Ray's processes stays on loopback."""

from __future__ import annotations

import base64
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from serve_helpers import free_port, start_server
from serve_net import SocketWatch

from runtime.serve import ray_app
from runtime.serve.settings import ServeSettings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's pydantic v1-style fields

# Small, distinct jobs: 64 px, 3 steps, each its own seed / prompt / sampler.
JOBS: list[dict[str, Any]] = [
    {"prompt": f"a lighthouse, study {i}", "negative_prompt": "blurry" if i % 2 else "", "seed": 100 + i,
     "steps": 3, "width": 64, "height": 64, "cfg_scale": 5 + i, "sampler_name": ("Euler a", "DDIM", "Euler")[i % 3]}
    for i in range(6)
]


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _post_all(url: str, jobs: list[dict[str, Any]]) -> list[httpx.Response]:
    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: client.post(f"{url}/sdapi/v1/txt2img", json=job), jobs))


def test_bad_input_is_refused_before_ray_starts(demo_artifact: Path, tmp_path: Path) -> None:
    import ray

    settings = ServeSettings(artifacts=(demo_artifact,), port=free_port())
    with pytest.raises(ValueError, match="replicas must be an integer >= 1"):
        ray_app.start(settings, replicas=0)
    missing = ServeSettings(artifacts=(tmp_path / "no-such-artifact",), port=free_port())
    with pytest.raises(ValueError, match="no such artifact folder"):
        ray_app.start(missing, replicas=1)
    assert not ray.is_initialized()


def test_two_cpu_replicas_spread_requests_and_match_the_single_process_server(demo_artifact: Path) -> None:
    single = start_server([demo_artifact], in_process=True, threads=1)
    try:
        reference = _post_all(single.url, JOBS)
    finally:
        single.stop()
    assert all(r.status_code == 200 for r in reference), [r.text for r in reference]

    settings = ServeSettings(artifacts=(demo_artifact,), host="127.0.0.1", port=free_port(), threads=1)
    with SocketWatch(os.getpid(), interval=0.05) as watch:  # Ray's processes are all descendants of this one
        server = ray_app.start(settings, replicas=2)
        try:
            assert server.local and server.url == f"http://127.0.0.1:{settings.port}"
            responses = _post_all(server.url, JOBS)
            replicas = {r.headers.get(ray_app.REPLICA_HEADER) for r in responses}
            sent = len(JOBS)
            for _ in range(3):  # the proxy picks the shorter of two queues: concurrent jobs reach both
                if len(replicas) >= 2:
                    break
                extra = _post_all(server.url, JOBS)
                assert all(r.status_code == 200 for r in extra), [r.text for r in extra]
                replicas |= {r.headers.get(ray_app.REPLICA_HEADER) for r in extra}
                sent += len(JOBS)
            stats: dict[str, dict[str, Any]] = {}  # each replica's /health: the counters of its own worker
            for _ in range(200):
                if len(stats) >= len(replicas):
                    break
                h = httpx.get(f"{server.url}/health", timeout=30)
                assert h.status_code == 200 and h.json()["status"] == "ok"
                stats[h.headers[ray_app.REPLICA_HEADER]] = h.json()
            ray_pids = {p.pid for p in psutil.Process().children(recursive=True)}
        finally:
            server.stop()

    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert None not in replicas and len(replicas) == 2, replicas
    # Each replica ran its share with its own batching worker; together, every job once.
    assert set(stats) == replicas, (stats, replicas)
    assert all(st["batching"] and st["units_run"] >= 1 for st in stats.values()), stats
    assert sum(st["units_run"] for st in stats.values()) == sent, (stats, sent)
    pids = {int(name.rsplit(":", 1)[1]) for name in replicas if name}
    assert os.getpid() not in pids and pids <= ray_pids, (pids, ray_pids)  # Ray's workers, not this process

    for job, got, want in zip(JOBS, responses, reference, strict=True):
        g, w = got.json(), want.json()
        assert len(g["images"]) == len(w["images"]) == 1
        # Concurrent jobs batch differently on one worker and on two: float round-off of other GEMM shapes
        # may move a channel by one level (as in tests/test_serve_api.py), never more.
        diff = np.abs(_pixels(g["images"][0]) - _pixels(w["images"][0]))
        assert diff.max() <= 1, (job, int(diff.max()))
        assert json.loads(g["info"])["infotexts"] == json.loads(w["info"])["infotexts"]

    assert not watch.violations(), "\n".join(watch.violations())
    # The watch did see Ray: the HTTP proxy's listener and many more sockets, in several processes.
    assert ("127.0.0.1", settings.port) in watch.listening()
    assert len({s.pid for s in watch.seen}) >= 4, {s.process for s in watch.seen}
