"""The HTTP server (runtime/serve) over the demo artifact: a real uvicorn process on a free loopback port,
driven by the A1111 client from PyPI (`webuiapi`) and by raw HTTP for the error cases. Images from the
server must equal `runtime.load(ART)` run with the same arguments."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import ServerHandle, start_server

import runtime
from runtime.serve import images as imgs

webuiapi = pytest.importorskip("webuiapi")
PROMPT, NEGATIVE = "a (red):1.2 fox in the snow", "blurry"
SIZE = 64


@pytest.fixture(scope="module")
def server(demo_artifact: Path) -> Iterator[ServerHandle]:
    srv = start_server([demo_artifact])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipe(demo_artifact: Path) -> runtime.Pipeline:
    return runtime.load(demo_artifact)


def _api(srv: ServerHandle, **kw: Any) -> Any:
    port = int(srv.url.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, **kw)


def _same(a: Image.Image, b: Image.Image, tol: int = 1) -> None:
    """Same pixels (uint8; `tol` for float round-off of different GEMM blockings across processes)."""
    x, y = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    assert x.shape == y.shape
    assert np.abs(x - y).max() <= tol, f"max pixel difference {np.abs(x - y).max()}"


def _healthy(srv: ServerHandle) -> None:
    assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _local(pipe: runtime.Pipeline, kind: str, *args: Any, **kw: Any) -> list[Image.Image]:
    out = getattr(pipe, kind)(*args, syntax="a1111", emphasis="a1111", **kw)
    assert isinstance(out, list)
    return out


# ---- webuiapi ------------------------------------------------------------------------------------------


def test_txt2img_equals_runtime(server: ServerHandle, pipe: runtime.Pipeline) -> None:
    api = _api(server)
    r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, steps=4, width=SIZE, height=SIZE,
                    cfg_scale=6.0, sampler_name="Euler a", batch_size=2, n_iter=2)
    assert len(r.images) == 4
    assert r.info["all_seeds"] == [11, 12, 13, 14]
    assert r.info["sampler_name"] == "Euler a" and r.parameters["cfg_scale"] == 6.0
    for it in range(2):
        want = _local(pipe, "text2img", PROMPT, NEGATIVE, steps=4, scale=6.0, height=SIZE, width=SIZE,
                      seed=[11 + 2 * it, 12 + 2 * it], scheduler="euler_a", batch_size=2)
        for got, exp in zip(r.images[2 * it:2 * it + 2], want, strict=True):
            _same(got, exp)
            assert got.info["parameters"] == exp.info["parameters"]
    assert "Seed: 11" in r.info["infotexts"][0] and "Sampler: Euler a" in r.info["infotexts"][0]


def test_seed_minus_one_draws_consecutive_seeds(server: ServerHandle) -> None:
    r = _api(server).txt2img(prompt="x", seed=-1, steps=2, width=SIZE, height=SIZE, batch_size=2)
    s = r.info["all_seeds"]
    assert s[0] >= 0 and s[1] == s[0] + 1


@pytest.mark.parametrize(("name", "scheduler", "ours"), [("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
                                                        ("DPM++ 2M Karras", "automatic", "dpmpp_2m_karras"),
                                                        ("DDIM", "automatic", "ddim"), ("k_lms", None, "lms")])
def test_sampler_names(server: ServerHandle, pipe: runtime.Pipeline, name: str, scheduler: str | None,
                       ours: str) -> None:
    body = {"prompt": PROMPT, "seed": 3, "steps": 3, "width": SIZE, "height": SIZE, "sampler_name": name,
            "scheduler": scheduler, "eta": 0.5}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    want = _local(pipe, "text2img", PROMPT, steps=3, scale=7.0, height=SIZE, width=SIZE, seed=3, scheduler=ours,
                  eta=0.5 if ours == "ddim" else 0.0)  # eta is DDIM's (A1111)
    _same(got, want[0])


def test_img2img_equals_runtime(server: ServerHandle, pipe: runtime.Pipeline) -> None:
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8))
    r = _api(server).img2img(images=[init], prompt=PROMPT, seed=5, steps=6, denoising_strength=0.6, width=SIZE,
                             height=SIZE, sampler_name="Euler", cfg_scale=5.0)
    resized = imgs.resize(init, SIZE, SIZE, 0)
    want = _local(pipe, "img2img", resized, PROMPT, strength=0.6, steps=6, scale=5.0, seed=5, scheduler="euler")
    _same(r.images[0], want[0])
    assert "Denoising strength: 0.6" in r.images[0].info["parameters"]


@pytest.mark.parametrize("full_res", [False, True])
def test_inpaint_equals_runtime(server: ServerHandle, pipe: runtime.Pipeline, full_res: bool) -> None:
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 40, 48))
    r = _api(server).img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=9, steps=4,
                             denoising_strength=0.8, width=SIZE, height=SIZE, sampler_name="DDIM", eta=0.0,
                             inpaint_full_res=full_res, inpaint_full_res_padding=4)
    want, box = _inpaint_local(pipe, init, mask, full_res, PROMPT, strength=0.8, steps=4, scale=7.0, seed=9,
                               scheduler="ddim")
    _same(r.images[0], want)
    if full_res:
        assert box is not None and box != (0, 0, SIZE, SIZE)


def _inpaint_local(pipe: runtime.Pipeline, init: Image.Image, mask: Image.Image, full_res: bool, prompt: str,
                   **kw: Any) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """A1111's inpaint at SIZE with mask_blur 4, padding 4 and inpainting_fill 0 ("fill"), run locally."""
    blurred = imgs.prepare_mask(mask, False, 4, 4)
    box = imgs.crop_region(blurred, 4, SIZE, SIZE) if full_res else None
    crop = init if box is None else init.crop(box).resize((SIZE, SIZE), resample=Image.Resampling.LANCZOS)
    m = blurred if box is None else blurred.crop(box).resize((SIZE, SIZE), resample=Image.Resampling.LANCZOS)
    out = _local(pipe, "inpaint", imgs.fill(crop, m), m, prompt, **kw)
    return imgs.paste_back(init, out[0], blurred, box), box


def test_hires_fix_is_txt2img_then_img2img(server: ServerHandle, pipe: runtime.Pipeline) -> None:
    r = _api(server).txt2img(prompt=PROMPT, seed=4, steps=3, width=SIZE, height=SIZE, sampler_name="Euler",
                             enable_hr=True, hr_scale=2, hr_upscaler="Lanczos", denoising_strength=0.5)
    assert r.images[0].size == (2 * SIZE, 2 * SIZE)
    first = _local(pipe, "text2img", PROMPT, steps=3, scale=7.0, height=SIZE, width=SIZE, seed=4, scheduler="euler")
    up = first[0].resize((2 * SIZE, 2 * SIZE), resample=Image.Resampling.LANCZOS)
    want = _local(pipe, "img2img", up, PROMPT, strength=0.5, steps=3, scale=7.0, seed=4, scheduler="euler")
    _same(r.images[0], want[0])
    assert "Hires upscale: 2, Hires upscaler: Lanczos" in r.images[0].info["parameters"]


def test_listing_endpoints(server: ServerHandle, demo_artifact: Path) -> None:
    api = _api(server)
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == [demo_artifact.name]
    assert api.get_options()["sd_model_checkpoint"] == models[0]["title"]
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "Euler", "LMS", "Heun", "DDIM", "PLMS", "DPM++ 2M", "DPM++ 2M Karras", "UniPC"} <= set(names)
    assert api.get_loras() == [] and httpx.get(f"{server.url}/sdapi/v1/embeddings").json()["loaded"] == {}
    assert api.set_options({"sd_model_checkpoint": models[0]["title"]}) is None
    r = httpx.post(f"{server.url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert r.status_code == 422 and r.json()["field"] == "CLIP_stop_at_last_layers"


def test_png_info_round_trip(server: ServerHandle) -> None:
    api = _api(server)
    im = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=21, steps=2, width=SIZE, height=SIZE).image
    r = api.png_info(im)
    assert r.info == im.info["parameters"]
    p = r.json["parameters"]
    assert p["Prompt"] == PROMPT and p["Negative prompt"] == NEGATIVE and p["Seed"] == "21" and p["Steps"] == "2"


def test_requests_batched_equal_alone(server: ServerHandle, pipe: runtime.Pipeline) -> None:
    """Concurrent compatible requests share pipeline calls, each with its own prompt, seed and CFG scale."""
    bodies = [{"prompt": f"{PROMPT} {k}", "negative_prompt": NEGATIVE if k % 2 else "", "seed": 100 + k,
               "cfg_scale": 3.0 + k, "steps": 8, "width": SIZE, "height": SIZE, "sampler_name": "Euler"}
              for k in range(4)]
    before = httpx.get(f"{server.url}/health").json()
    blocker = {**bodies[0], "steps": 30, "width": 128, "height": 128}  # keeps the worker busy while they queue
    with ThreadPoolExecutor(5) as ex:
        first = ex.submit(httpx.post, f"{server.url}/sdapi/v1/txt2img", json=blocker, timeout=300)
        time.sleep(0.5)
        futs = [ex.submit(httpx.post, f"{server.url}/sdapi/v1/txt2img", json=b, timeout=300) for b in bodies]
        rs = [f.result() for f in futs]
        assert first.result().status_code == 200
    after = httpx.get(f"{server.url}/health").json()
    assert after["units_run"] - before["units_run"] == 5
    assert after["pipeline_calls"] - before["pipeline_calls"] < 5  # some ran together
    for b, r in zip(bodies, rs, strict=True):
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        want = _local(pipe, "text2img", b["prompt"], b["negative_prompt"], steps=8, scale=b["cfg_scale"],
                      height=SIZE, width=SIZE, seed=b["seed"], scheduler="euler")
        _same(got, want[0])


def _picture(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3) if mode == "RGB" else (SIZE, SIZE),
                                        dtype=np.uint8), mode)


def _queued_behind_blocker(srv: ServerHandle, requests: list[tuple[str, dict[str, Any]]]) -> tuple[
        list[Image.Image], int, int]:
    """Send `requests` (path, body) while a long job keeps the worker busy -> their first images, and the
    pipeline calls and units run for them and the blocker."""
    before = httpx.get(f"{srv.url}/health").json()
    blocker = {"prompt": "x", "seed": 1, "steps": 40, "width": 128, "height": 128, "sampler_name": "Euler"}
    with ThreadPoolExecutor(len(requests) + 1) as ex:
        first = ex.submit(httpx.post, f"{srv.url}/sdapi/v1/txt2img", json=blocker, timeout=300)
        while httpx.get(f"{srv.url}/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            time.sleep(0.02)
        futs = [ex.submit(httpx.post, f"{srv.url}/sdapi/v1/{path}", json=b, timeout=300) for path, b in requests]
        rs = [f.result() for f in futs]
        assert first.result().status_code == 200
    after = httpx.get(f"{srv.url}/health").json()
    for r in rs:
        assert r.status_code == 200, r.text
        assert not json.loads(r.json()["info"])["interrupted"]
    images: list[Image.Image] = [Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) for r in rs]
    calls, units = (int(after[k] - before[k]) for k in ("pipeline_calls", "units_run"))
    return images, calls, units


def test_img2img_inpaint_hires_batched_equal_alone(server: ServerHandle, pipe: runtime.Pipeline) -> None:
    """img2img, inpaint and the hires fix's second pass batch too: each request its own init image, mask,
    prompt, seed and CFG scale, and the images it gives alone."""
    common = {"steps": 4, "width": SIZE, "height": SIZE, "sampler_name": "Euler a", "denoising_strength": 0.6}
    prompts = [f"{PROMPT} {k}" for k in range(2)]
    i2i = [{**common, "prompt": prompts[k], "seed": 30 + k, "cfg_scale": 4.0 + k,
            "init_images": [_b64(_picture(k))]} for k in range(2)]
    masks = [Image.new("L", (SIZE, SIZE), 0) for _ in range(2)]
    masks[0].paste(255, (8, 8, 40, 32))
    masks[1].paste(255, (24, 16, 56, 60))
    inp = [{**b, "seed": 40 + k, "mask": _b64(masks[k]), "inpaint_full_res": k == 1, "inpaint_full_res_padding": 4}
           for k, b in enumerate(i2i)]
    hr = [{**common, "prompt": f"{PROMPT} hr {k}", "seed": 50 + k, "cfg_scale": 5.0 + k, "enable_hr": True,
           "hr_scale": 2, "hr_upscaler": "Lanczos"} for k in range(2)]
    requests = [("img2img", b) for b in i2i] + [("img2img", b) for b in inp] + [("txt2img", b) for b in hr]
    got, calls, units = _queued_behind_blocker(server, requests)
    assert units == 1 + 2 + 2 + 2 * 2
    assert calls == 1 + 1 + 1 + 2, "each kind in one call (the hires fix in two)"
    kw = dict(steps=4, scheduler="euler_a")
    for k in range(2):
        want = _local(pipe, "img2img", _picture(k), prompts[k], strength=0.6, scale=4.0 + k, seed=30 + k,
                      **kw)
        _same(got[k], want[0])
        want_inp, _ = _inpaint_local(pipe, _picture(k), masks[k], k == 1, prompts[k], strength=0.6,
                                     scale=4.0 + k, seed=40 + k, **kw)
        _same(got[2 + k], want_inp)
        first = _local(pipe, "text2img", hr[k]["prompt"], height=SIZE, width=SIZE, scale=5.0 + k, seed=50 + k, **kw)
        up = first[0].resize((2 * SIZE, 2 * SIZE), resample=Image.Resampling.LANCZOS)
        want = _local(pipe, "img2img", up, hr[k]["prompt"], strength=0.6, scale=5.0 + k, seed=50 + k, **kw)
        _same(got[4 + k], want[0])


def test_interrupt_within_two_steps(server: ServerHandle) -> None:
    api = _api(server)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(
        r=api.txt2img(prompt=PROMPT, seed=1, steps=50, width=256, height=256, sampler_name="Euler")))
    t.start()
    seen = 0
    deadline = time.monotonic() + 120
    while seen < 2 and time.monotonic() < deadline:
        seen = api.get_progress()["state"]["sampling_step"]
        time.sleep(0.02)
    assert seen >= 2
    api.interrupt()
    t.join(120)
    info = result["r"].info
    assert info["interrupted"] is True
    assert info["model_calls_run"] <= seen + 2, (seen, info["model_calls_run"])
    assert [im.size for im in result["r"].images] == [(256, 256)]  # A1111: the stopped call's image
    _healthy(server)
    assert api.txt2img(prompt="after", seed=1, steps=2, width=SIZE, height=SIZE).image is not None


def test_interrupt_returns_the_images_so_far(server: ServerHandle) -> None:
    """n_iter 3 of 4 images, interrupted in the second call: the first call's images and the stopped
    call's (decoded from its latents as they are), not the third's; later requests run normally."""
    body = {"prompt": PROMPT, "seed": 60, "steps": 30, "width": SIZE, "height": SIZE, "batch_size": 4, "n_iter": 3}
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(httpx.post, f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            p = httpx.get(f"{server.url}/sdapi/v1/progress").json()
            if p["progress"] > 1 / 3 and p["state"]["sampling_step"] >= 2:
                break
            time.sleep(0.02)
        assert httpx.post(f"{server.url}/sdapi/v1/interrupt").status_code == 200
        r = fut.result()
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True and len(r.json()["images"]) == 8
    first = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    alone = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "n_iter": 1}, timeout=300)
    assert not json.loads(alone.json()["info"])["interrupted"] and len(alone.json()["images"]) == 4
    _same(first, Image.open(io.BytesIO(base64.b64decode(alone.json()["images"][0]))))


def test_client_disconnect_does_not_wedge(server: ServerHandle) -> None:
    body = {"prompt": PROMPT, "seed": 1, "steps": 50, "width": 256, "height": 256}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=1.0)
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "steps": 2, "width": SIZE, "height": SIZE},
                   timeout=120)
    assert r.status_code == 200
    assert httpx.get(f"{server.url}/sdapi/v1/progress").json()["state"]["job_count"] == 0
    assert time.monotonic() - t0 < 60


# ---- raw HTTP: every bad request is a clean 4xx naming the field, and the server stays up ----------------

def _bomb_png() -> str:
    """A 20000 x 20000 1-bit PNG: a few kB on disk, 400 M pixels decoded."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


GOOD = {"prompt": "x", "steps": 2, "width": SIZE, "height": SIZE, "seed": 1}


@pytest.mark.parametrize(("path", "body", "status", "field"), [
    ("txt2img", b"{not json", 400, "body"),
    ("txt2img", {**GOOD, "steps": "many"}, 422, "steps"),
    ("txt2img", {**GOOD, "width": [64]}, 422, "width"),
    ("txt2img", {**GOOD, "width": 4096}, 422, "width"),
    ("txt2img", {**GOOD, "height": 72}, 422, "height"),
    ("txt2img", {**GOOD, "sampler_name": "DPM++ SDE"}, 422, "sampler_name"),
    ("txt2img", {**GOOD, "scheduler": "exponential"}, 422, "scheduler"),
    ("txt2img", {**GOOD, "restore_faces": True}, 422, "restore_faces"),
    ("txt2img", {**GOOD, "enable_hr": True, "hr_upscaler": "Latent"}, 422, "hr_upscaler"),
    ("txt2img", {**GOOD, "enable_hr": True, "hr_upscaler": "Lanczos", "hr_scale": 8}, 422, "hr_scale"),
    ("txt2img", {**GOOD, "override_settings": {"sd_model_checkpoint": "nope"}}, 404,
     "override_settings.sd_model_checkpoint"),
    ("txt2img", {**GOOD, "override_settings": {"sd_model_checkpoint": "../demo"}}, 404,
     "override_settings.sd_model_checkpoint"),
    ("txt2img", {**GOOD, "prompt": "a <lora:../../etc/passwd:1>"}, 422, "prompt"),
    ("txt2img", {**GOOD, "prompt": "a <lora:detail:1>"}, 422, "prompt"),  # no --lora-dir
    ("txt2img", {**GOOD, "alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, 422,
     "alwayson_scripts.ControlNet"),
    ("img2img", {**GOOD, "init_images": ["@@not base64@@"]}, 422, "init_images[0]"),
    ("img2img", {**GOOD, "init_images": [base64.b64encode(b"not an image").decode()]}, 422, "init_images[0]"),
    ("img2img", {**GOOD, "init_images": []}, 422, "init_images"),
    ("img2img", {**GOOD, "init_images": ["BOMB"]}, 413, "init_images[0]"),
    ("img2img", {**GOOD, "init_images": ["SMALL"], "mask": "BOMB"}, 413, "mask"),
    ("png-info", {"image": "BOMB"}, 413, "image"),
    ("png-info", {"image": 5}, 422, "image"),
])
def test_bad_requests(server: ServerHandle, path: str, body: Any, status: int, field: str) -> None:
    if isinstance(body, dict):
        small = _b64(Image.new("RGB", (SIZE, SIZE)))
        swap = {"BOMB": _bomb_png(), "SMALL": small}
        body = {k: ([swap.get(x, x) for x in v] if isinstance(v, list) else swap.get(v, v) if isinstance(v, str)
                    else v) for k, v in body.items()}
        content = json.dumps(body).encode()
    else:
        content = body
    r = httpx.post(f"{server.url}/sdapi/v1/{path}", content=content, headers={"Content-Type": "application/json"},
                   timeout=120)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field, r.text
    _healthy(server)


def test_body_limit_and_unknown_route(demo_artifact: Path) -> None:
    srv = start_server([demo_artifact], max_body_bytes=2**16, in_process=True)
    try:
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**GOOD, "prompt": "x" * 2**17}, timeout=30)
        assert r.status_code == 413 and r.json()["field"] == "body"
        assert httpx.get(f"{srv.url}/sdapi/v1/nothing").status_code == 404
        _healthy(srv)
    finally:
        srv.stop()


def test_api_auth(demo_artifact: Path) -> None:
    srv = start_server([demo_artifact], api_auth="alice:s3cret", in_process=True)
    try:
        url = f"{srv.url}/sdapi/v1/sd-models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url).headers["WWW-Authenticate"].startswith("Basic")
        assert httpx.get(url, auth=("alice", "wrong")).status_code == 401
        assert httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=GOOD).status_code == 401
        assert httpx.get(url, auth=("alice", "s3cret")).status_code == 200
        _healthy(srv)  # no credentials needed for the health check
        api = _api(srv, username="alice", password="s3cret")
        assert len(api.txt2img(prompt="x", seed=1, steps=2, width=SIZE, height=SIZE).images) == 1
    finally:
        srv.stop()


def test_full_queue_answers_503(demo_artifact: Path) -> None:
    srv = start_server([demo_artifact], max_queue=1, batching=False, in_process=True)
    try:
        body = {**GOOD, "steps": 10, "width": 128, "height": 128}
        with ThreadPoolExecutor(6) as ex:
            first = ex.submit(httpx.post, f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300)
            _wait_running(srv)
            rs = list(ex.map(lambda _: httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300), range(5)))
            assert first.result().status_code == 200
        codes = sorted(r.status_code for r in rs)
        assert codes == [200, 503, 503, 503, 503], codes  # one waits (max_queue=1), the rest are turned away
        busy = next(r for r in rs if r.status_code == 503)
        assert int(busy.headers["Retry-After"]) >= 1
        _healthy(srv)
    finally:
        srv.stop()


def _wait_running(srv: ServerHandle) -> None:
    deadline = time.monotonic() + 120
    while httpx.get(f"{srv.url}/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigterm_finishes_running_job(demo_artifact: Path) -> None:
    srv = start_server([demo_artifact])
    assert srv.proc is not None
    result: dict[str, Any] = {}
    body = {**GOOD, "steps": 12, "width": 128, "height": 128}
    t = threading.Thread(target=lambda: result.update(
        r=httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300)))
    t.start()
    _wait_running(srv)
    srv.stop()  # SIGTERM, then wait
    t.join(60)
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 1
    assert srv.proc.returncode in (0, -signal.SIGTERM), srv.logs()  # uvicorn re-raises the signal it handled


# ---- LoRA tags through the server ----------------------------------------------------------------------

def test_lora_tags(demo_artifact: Path, tmp_path: Path) -> None:
    """`<lora:NAME:w>` resolves NAME inside --lora-dir only; the image equals the runtime's with the same
    lora_dir; requests with different tag sets are never batched together."""
    import lora_writer as lw

    from sdexport.presets import random_pipeline

    sd = random_pipeline("demo")
    assert sd.text_encoder is not None
    mods = {"unet": {k[:-7]: tuple(v.shape) for k, v in sd.unet.state_dict().items() if k.endswith("to_q.weight")},
            "text_encoder": {k[:-7]: tuple(v.shape) for k, v in sd.text_encoder.state_dict().items()
                             if k.endswith("q_proj.weight")}}
    loras = tmp_path / "loras"
    loras.mkdir()
    lw.save({k: v * 20 for k, v in lw.kohya(mods, rank=4, alpha=4.0).items()}, loras / "detail.safetensors")
    (tmp_path / "secret.safetensors").write_bytes((loras / "detail.safetensors").read_bytes())
    srv = start_server([demo_artifact], lora_dir=loras, in_process=True)
    try:
        assert [x["name"] for x in httpx.get(f"{srv.url}/sdapi/v1/loras").json()] == ["detail"]
        tagged = {**GOOD, "prompt": "a fox <lora:detail:0.8>", "steps": 3}
        with ThreadPoolExecutor(2) as ex:
            rs = list(ex.map(lambda b: httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=b, timeout=300),
                             [tagged, {**tagged, "prompt": "a fox"}]))
        assert [r.status_code for r in rs] == [200, 200], [r.text for r in rs]
        got = [Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) for r in rs]
        local = runtime.load(demo_artifact, lora_dir=loras)
        for g, prompt in zip(got, ["a fox <lora:detail:0.8>", "a fox"], strict=True):
            _same(g, _local(local, "text2img", prompt, steps=3, scale=7.0, height=SIZE, width=SIZE, seed=1,
                            scheduler="euler")[0])
        assert np.abs(np.asarray(got[0], dtype=np.int16) - np.asarray(got[1], dtype=np.int16)).max() > 0
        assert "Lora hashes" in got[0].info["parameters"]
        for bad in ("a <lora:../secret:1>", "a <lora:missing:1>"):
            r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**GOOD, "prompt": bad}, timeout=60)
            assert r.status_code == 422 and "LoRA" in r.json()["detail"], r.text
            _healthy(srv)
    finally:
        srv.stop()


# ---- embeddings through the server --------------------------------------------------------------------

def test_embeddings(demo_artifact: Path, tmp_path: Path, pipe: runtime.Pipeline) -> None:
    """An embedding's file stem in a prompt (--embeddings-dir) gives the image of runtime.load +
    load_embedding; other words are plain text (A1111), a name never reaches outside the folder, one for
    another model is a 422; counted as its vectors, a long prompt is not batched with a short one."""
    import lora_writer as lw
    import torch

    embs = tmp_path / "embeddings"
    embs.mkdir()
    gen = torch.Generator().manual_seed(5)
    mystyle = lw.a1111_embedding(torch.randn(8, 32, generator=gen), embs / "mystyle.pt", name="mystyle")
    lw.a1111_embedding(torch.randn(2, 64, generator=gen), embs / "otherfamily.pt", name="otherfamily")
    lw.a1111_embedding(torch.randn(2, 32, generator=gen), tmp_path / "secret.pt", name="secret")
    srv = start_server([demo_artifact], embeddings_dir=embs, in_process=True)
    try:
        listing = httpx.get(f"{srv.url}/sdapi/v1/embeddings").json()
        assert listing["loaded"]["mystyle"]["vectors"] == 8 and listing["loaded"]["mystyle"]["shape"] == 32
        assert list(listing["skipped"]) == ["otherfamily"]
        for prompt in ("a fox in nostyle", "a fox in ../secret"):  # plain text; the file outside is never read
            r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**GOOD, "prompt": prompt, "steps": 3}, timeout=60)
            assert r.status_code == 200, r.text
            want = _local(pipe, "text2img", prompt, steps=3, scale=7.0, height=SIZE, width=SIZE, seed=1,
                          scheduler="euler")[0]
            _same(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), want)
            assert "TI hashes" not in r.json()["info"]
        long_prompt = "a fox in mystyle " + "snow " * 66  # 1 chunk as plain text, 2 with the 8 vectors
        prompts = [long_prompt, "a fox in the snow", "a fox in mystyle"]
        bodies = [{**GOOD, "prompt": p, "steps": 3, "seed": 7 + k} for k, p in enumerate(prompts)]
        plain = _local(pipe, "text2img", prompts[2], steps=3, scale=7.0, height=SIZE, width=SIZE, seed=9,
                       scheduler="euler")[0]
        got, calls, units = _queued_behind_blocker(srv, [("txt2img", b) for b in bodies])
        assert (calls, units) == (3, 4), "the 2-chunk prompt runs alone, the two 1-chunk ones together"
        pipe.load_embedding(mystyle)  # the module's runtime.load(ART): other tests' prompts do not name it
        for g, b in zip(got, bodies, strict=True):
            _same(g, _local(pipe, "text2img", b["prompt"], steps=3, scale=7.0, height=SIZE, width=SIZE,
                            seed=b["seed"], scheduler="euler")[0])
        assert "TI hashes" in got[2].info["parameters"]
        assert np.abs(np.asarray(got[2], dtype=np.int16) - np.asarray(plain, dtype=np.int16)).max() > 0
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**GOOD, "prompt": "a otherfamily fox"}, timeout=60)
        assert r.status_code == 422 and r.json()["field"] == "prompt" and "otherfamily" in r.json()["detail"]
        _healthy(srv)
    finally:
        srv.stop()


def test_several_artifacts(demo_artifact: Path, tmp_path: Path, pipe: runtime.Pipeline) -> None:
    """A folder of artifacts: each is listed, `sd_model_checkpoint` picks one by name or title, only among them."""
    import shutil

    folder = tmp_path / "models"
    for name in ("alpha", "beta"):
        shutil.copytree(demo_artifact, folder / name)
    srv = start_server([folder], in_process=True)
    try:
        api = _api(srv)
        models = api.get_sd_models()
        assert [m["model_name"] for m in models] == ["alpha", "beta"]
        assert api.get_options()["sd_model_checkpoint"] == models[0]["title"]
        for choice in ("beta", models[1]["title"], "alpha"):
            r = api.txt2img(prompt=PROMPT, seed=2, steps=2, width=SIZE, height=SIZE, sampler_name="Euler",
                            override_settings={"sd_model_checkpoint": choice})
            assert r.info["sd_model_name"] == choice.split(" ")[0]
            want = _local(pipe, "text2img", PROMPT, steps=2, scale=7.0, height=SIZE, width=SIZE, seed=2,
                          scheduler="euler")
            _same(r.image, want[0])
        api.set_options({"sd_model_checkpoint": "beta"})
        assert api.get_options()["sd_model_checkpoint"] == models[1]["title"]
        for bad in (str(demo_artifact), "models/alpha", "alpha/../beta"):
            r = httpx.post(f"{srv.url}/sdapi/v1/options", json={"sd_model_checkpoint": bad})
            assert r.status_code == 404 and r.json()["field"] == "sd_model_checkpoint", r.text
    finally:
        srv.stop()


def test_cli_entry_points(tmp_path: Path) -> None:
    """`sdexport serve` forwards to `python -m runtime.serve`; bad arguments are one clean line, exit 2."""
    from click.testing import CliRunner

    from runtime.serve.__main__ import main as serve_main
    from sdexport.cli import main

    r = CliRunner().invoke(main, ["serve", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no such artifact folder" in r.output
    assert serve_main([str(tmp_path), "--api-auth", "nocolon"]) == 2
    with pytest.raises(SystemExit) as e:
        serve_main(["--help"])
    assert e.value.code == 0
