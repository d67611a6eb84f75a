"""A1111's ControlNet units on the HTTP server (runtime/serve/controlnet.py): a real server over the demo
artifact with a --control-dir holding a pt2 control artifact of the demo's family, driven by `webuiapi`'s
ControlNetUnit and by raw HTTP. Images must equal `runtime.load(ART)` run with `runtime.load_control(CN)`
and the same arguments; every bad unit is a 4xx naming its field, and the server stays up."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import DEMO_CONTROL, ServerHandle, start_server

import runtime
from runtime.canny import canny
from runtime.serve import images as imgs
from runtime.serve.__main__ import parser, settings_from

webuiapi = pytest.importorskip("webuiapi")
PROMPT, NEGATIVE = "a (red):1.2 fox in the snow", "blurry"
SIZE = 64
CN = DEMO_CONTROL


@pytest.fixture(scope="module")
def control_dir(demo_control_artifact: Path) -> Path:
    """--control-dir: the demo's ControlNet artifact, and a folder that is not one."""
    root = demo_control_artifact.parent
    (root / "notes").mkdir(exist_ok=True)
    (root / "notes" / "readme.txt").write_text("not an artifact")
    return root


@pytest.fixture(scope="module")
def server(demo_artifact: Path, control_dir: Path) -> Iterator[ServerHandle]:
    srv = start_server([demo_artifact], control_dir=control_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipe(demo_artifact: Path) -> runtime.Pipeline:
    return runtime.load(demo_artifact)


@pytest.fixture(scope="module")
def net(control_dir: Path) -> Any:
    return runtime.load_control(control_dir / CN)


def _api(srv: ServerHandle) -> Any:
    """Calls with units pass their own `alwayson_scripts={}`: webuiapi's default is one dict shared by every
    call in the process, into which it writes the units, so later calls (other tests) would resend them."""
    return webuiapi.WebUIApi(host="127.0.0.1", port=int(srv.url.rsplit(":", 1)[1]))


def _hint(w: int = SIZE, h: int = SIZE, seed: int = 0) -> Image.Image:
    """Shapes on a dark background (edges for canny, structure for the ControlNet)."""
    rng = np.random.default_rng(seed)
    a = np.full((h, w, 3), 20, dtype=np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, w - 16), rng.integers(0, h - 16)
        a[y:y + rng.integers(8, 16), x:x + rng.integers(8, 16)] = rng.integers(80, 255, 3)
    return Image.fromarray(a)


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _decode(r: httpx.Response) -> list[Image.Image]:
    assert r.status_code == 200, r.text
    return [Image.open(io.BytesIO(base64.b64decode(d))) for d in r.json()["images"]]


def _same(a: Image.Image, b: Image.Image, tol: int = 1) -> None:
    x, y = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    assert x.shape == y.shape
    assert np.abs(x - y).max() <= tol, f"max pixel difference {np.abs(x - y).max()}"


def _differ(a: Image.Image, b: Image.Image) -> None:
    x, y = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    assert np.abs(x - y).max() > 8, "the ControlNet changed nothing"


def _local(pipe: runtime.Pipeline, kind: str, *args: Any, **kw: Any) -> list[Image.Image]:
    out = getattr(pipe, kind)(*args, syntax="a1111", emphasis="a1111", **kw)
    assert isinstance(out, list)
    return out


def _control(net: Any, image: Image.Image, weight: float = 1.0, start: float = 0.0,
             end: float = 1.0) -> dict[str, Any]:
    return dict(control=[net], control_image=[image], control_scale=[weight], control_start=[start],
                control_end=[end], guess_mode=False)


# ---- webuiapi ------------------------------------------------------------------------------------------


def test_txt2img_unit_equals_runtime(server: ServerHandle, pipe: runtime.Pipeline, net: Any) -> None:
    hint = _hint()
    unit = webuiapi.ControlNetUnit(image=hint, module="none", model=CN, weight=0.8, guidance_start=0.1,
                                   guidance_end=0.9)  # the client's defaults otherwise ("Resize and Fill", ...)
    off = webuiapi.ControlNetUnit(image=_hint(seed=9), model="no-such-model", enabled=False)
    r = _api(server).txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, steps=4, width=SIZE, height=SIZE,
                             cfg_scale=6.0, sampler_name="Euler a", batch_size=2, controlnet_units=[unit, off],
                             alwayson_scripts={})  # not webuiapi's shared default dict (see _api)
    assert len(r.images) == 2 and r.info["all_seeds"] == [11, 12]
    want = _local(pipe, "text2img", PROMPT, NEGATIVE, steps=4, scale=6.0, height=SIZE, width=SIZE, seed=[11, 12],
                  scheduler="euler_a", batch_size=2, **_control(net, hint, 0.8, 0.1, 0.9))
    plain = _local(pipe, "text2img", PROMPT, NEGATIVE, steps=4, scale=6.0, height=SIZE, width=SIZE, seed=[11, 12],
                   scheduler="euler_a", batch_size=2)
    for got, exp, without in zip(r.images, want, plain, strict=True):
        _same(got, exp)
        _differ(got, without)


def test_img2img_unit_without_image_uses_init(server: ServerHandle, pipe: runtime.Pipeline, net: Any) -> None:
    """As the extension: a unit with no image takes the img2img input (here 96x80, "Just Resize")."""
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8))
    unit = webuiapi.ControlNetUnit(model=CN, weight=1.2, resize_mode="Just Resize")
    r = _api(server).img2img(images=[init], prompt=PROMPT, seed=5, steps=5, denoising_strength=0.6, width=SIZE,
                             height=SIZE, sampler_name="Euler", cfg_scale=5.0, controlnet_units=[unit],
                             alwayson_scripts={})
    resized = imgs.resize(init, SIZE, SIZE, 0)
    want = _local(pipe, "img2img", resized, PROMPT, strength=0.6, steps=5, scale=5.0, seed=5, scheduler="euler",
                  **_control(net, resized, 1.2))
    _same(r.images[0], want[0])


def test_inpaint_only_masked_crops_the_control_image(server: ServerHandle, pipe: runtime.Pipeline,
                                                      net: Any) -> None:
    """Inpaint "only masked": the control image is cut by the same box as the picture."""
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 40, 48))
    hint = _hint(seed=4)
    unit = webuiapi.ControlNetUnit(image=hint, model=CN, weight=0.9, guidance_end=0.75)
    r = _api(server).img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=9, steps=4, denoising_strength=0.8,
                             width=SIZE, height=SIZE, sampler_name="DDIM", eta=0.0, inpaint_full_res=True,
                             inpaint_full_res_padding=4, controlnet_units=[unit], alwayson_scripts={})
    blurred = imgs.prepare_mask(mask, False, 4, 4)
    box = imgs.crop_region(blurred, 4, SIZE, SIZE)
    assert box is not None and box != (0, 0, SIZE, SIZE)

    def cut(im: Image.Image) -> Image.Image:
        return im.crop(box).resize((SIZE, SIZE), resample=Image.Resampling.LANCZOS)

    m = cut(blurred)
    out = _local(pipe, "inpaint", imgs.fill(cut(init), m), m, PROMPT, strength=0.8, steps=4, scale=7.0, seed=9,
                 scheduler="ddim", **_control(net, cut(hint), 0.9, 0.0, 0.75))
    _same(r.images[0], imgs.paste_back(init, out[0], blurred, box))


def test_listing_endpoints(server: ServerHandle) -> None:
    api = _api(server)
    assert api.controlnet_model_list() == [CN]  # "notes" is not an artifact
    assert api.controlnet_module_list() == ["none", "canny"]


# ---- raw HTTP --------------------------------------------------------------------------------------------


def _body(*units: dict[str, Any], key: str = "controlnet", **kw: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "seed": 3, "steps": 3, "width": SIZE, "height": SIZE, "sampler_name": "Euler",
            "alwayson_scripts": {key: {"args": list(units)}}, **kw}


def test_canny_raw_http(server: ServerHandle, pipe: runtime.Pipeline, net: Any) -> None:
    """module "canny" with the extension's fields: thresholds a/b, processor_res (the image's size here, so
    no rescaling), a disabled unit skipped whatever it holds."""
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    unit = {"image": _b64(photo), "module": "canny", "model": CN, "weight": 1.0, "threshold_a": 50,
            "threshold_b": 150, "processor_res": SIZE, "resize_mode": 0, "control_mode": 0, "low_vram": True,
            "pixel_perfect": False, "guidance_start": 0.0, "guidance_end": 1.0}
    body = _body(unit, {"enabled": False, "module": "depth", "image": "@@"}, key="ControlNet")
    got = _decode(httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120))
    edges = canny(photo, 50, 150)
    assert np.asarray(edges).any()
    want = _local(pipe, "text2img", PROMPT, steps=3, scale=7.0, height=SIZE, width=SIZE, seed=3, scheduler="euler",
                  **_control(net, edges))
    _same(got[0], want[0])


def test_requests_with_different_controls_batch_apart(server: ServerHandle, pipe: runtime.Pipeline,
                                                      net: Any) -> None:
    """Two requests with one ControlNet setup share a pipeline call; one without runs on its own; each
    equals its solo image."""
    hint = _hint(seed=7)
    unit = {"image": _b64(hint), "model": CN, "weight": 0.7, "resize_mode": "Just Resize"}
    bodies = [_body(unit, seed=40), _body(unit, seed=41, prompt="a cat"), _body(seed=42, prompt="a dog")]
    bodies[2].pop("alwayson_scripts")
    url = f"{server.url}/sdapi/v1/txt2img"
    _decode(httpx.post(url, json=bodies[0], timeout=120))  # the ControlNet is loaded before timing matters
    before = httpx.get(f"{server.url}/health").json()
    blocker = {"prompt": "x", "seed": 1, "steps": 40, "width": 256, "height": 256, "sampler_name": "Euler"}
    with ThreadPoolExecutor(4) as ex:
        first = ex.submit(httpx.post, url, json=blocker, timeout=300)
        time.sleep(0.5)
        futs = [ex.submit(httpx.post, url, json=b, timeout=300) for b in bodies]
        rs = [f.result() for f in futs]
        assert first.result().status_code == 200
    after = httpx.get(f"{server.url}/health").json()
    assert after["units_run"] - before["units_run"] == 4
    assert after["pipeline_calls"] - before["pipeline_calls"] == 3  # blocker; the two with control; the other
    for b, r in zip(bodies, rs, strict=True):
        extra = _control(net, hint, 0.7) if "alwayson_scripts" in b else {}
        want = _local(pipe, "text2img", b["prompt"], steps=3, scale=7.0, height=SIZE, width=SIZE, seed=b["seed"],
                      scheduler="euler", **extra)
        _same(_decode(r)[0], want[0])


GOOD_UNIT = {"image": "HINT", "module": "none", "model": CN}
ARGS = "alwayson_scripts.controlnet.args"


@pytest.mark.parametrize(("change", "extra", "status", "field"), [
    ({"module": "depth_midas"}, {}, 422, f"{ARGS}[0].module"),
    ({"model": "nope"}, {}, 404, f"{ARGS}[0].model"),
    ({"model": "../demo-cn"}, {}, 404, f"{ARGS}[0].model"),
    ({"model": f"/{CN}"}, {}, 404, f"{ARGS}[0].model"),
    ({"model": "notes"}, {}, 404, f"{ARGS}[0].model"),
    ({"model": None}, {}, 404, f"{ARGS}[0].model"),
    ({"image": "@@not base64@@"}, {}, 422, f"{ARGS}[0].image"),
    ({"image": base64.b64encode(b"not an image").decode()}, {}, 422, f"{ARGS}[0].image"),
    ({"image": ""}, {}, 422, f"{ARGS}[0].image"),
    ({"weight": "strong"}, {}, 422, f"{ARGS}[0].weight"),
    ({"guidance_start": 0.9, "guidance_end": 0.5}, {}, 422, f"{ARGS}[0].guidance_end"),
    ({"control_mode": "My prompt is more important"}, {}, 422, f"{ARGS}[0].control_mode"),
    ({"control_mode": 2}, {}, 422, f"{ARGS}[0].control_mode"),  # guess mode's weights differ for 7 residuals
    ({"control_mode": "Louder"}, {}, 422, f"{ARGS}[0].control_mode"),
    ({"resize_mode": "Resize and Fill", "image": "WIDE"}, {}, 422, f"{ARGS}[0].resize_mode"),
    ({"resize_mode": "Stretch"}, {}, 422, f"{ARGS}[0].resize_mode"),
    ({"mask": "HINT"}, {}, 422, f"{ARGS}[0].mask"),
    ({"enabled": "yes"}, {}, 422, f"{ARGS}[0].enabled"),
    ({"module": "canny", "threshold_a": 200, "threshold_b": 100}, {}, 422, f"{ARGS}[0].threshold_a"),
    ({"module": "canny", "processor_res": 10}, {}, 422, f"{ARGS}[0].processor_res"),
    ({}, {"enable_hr": True, "hr_upscaler": "Lanczos"}, 422, "enable_hr"),
    ({}, {"units": 4}, 422, ARGS),  # more units than the extension's default maximum (3)
    ({}, {"args": {"image": "x"}}, 422, ARGS),
])
def test_bad_units(server: ServerHandle, change: dict[str, Any], extra: dict[str, Any], status: int,
                   field: str) -> None:
    swap = {"HINT": _b64(_hint()), "WIDE": _b64(_hint(96, 64))}
    unit = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in {**GOOD_UNIT, **change}.items()}
    n = extra.pop("units", 1)
    body = _body(*[unit] * n, **{k: v for k, v in extra.items() if k != "args"})
    if "args" in extra:
        body["alwayson_scripts"]["controlnet"]["args"] = extra["args"]
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=json.dumps(body).encode(),
                   headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field, r.text
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_img2img_bad_unit(server: ServerHandle) -> None:
    body = {**_body({**GOOD_UNIT, "image": _b64(_hint()), "module": "openpose"}),
            "init_images": [_b64(_hint(seed=5))]}
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 422 and r.json()["field"] == f"{ARGS}[0].module", r.text


def test_control_dir_option(demo_artifact: Path, control_dir: Path) -> None:
    """`python -m runtime.serve` (and `sdexport serve`, which is it) takes --control-dir; it must be a folder."""
    s = settings_from(parser().parse_args([str(demo_artifact), "--control-dir", str(control_dir)]))
    assert s.control_dir == control_dir
    with pytest.raises(ValueError, match="not a directory"):
        settings_from(parser().parse_args([str(demo_artifact), "--control-dir", str(control_dir / "missing")]))


# ---- the mapping alone (no server): pairing and guess mode -----------------------------------------------


def _plan(control_dir: Path, manifest: Any, net: Any, size: int = SIZE, rows: int = 2, **unit: Any) -> Any:
    from runtime.serve import controlnet as cn

    nets = cn.ControlNets(control_dir, "cpu")
    nets.load = lambda name: net  # type: ignore[method-assign]
    scripts = {"controlnet": {"args": [{**GOOD_UNIT, "image": _b64(_hint()), **unit}]}}
    return cn.plan(scripts, nets, manifest, size, size, 2**24, rows=rows)


@pytest.mark.parametrize(("size", "rows", "match"), [(320, 2, "320 px is outside"), (SIZE, 10, "10 UNet rows")])
def test_control_artifact_shape_range_is_checked(demo_artifact: Path, control_dir: Path, net: Any, size: int,
                                                 rows: int, match: str) -> None:
    """A size or batch outside the control artifact's range is a 4xx naming the unit's model, before any work."""
    from runtime.manifest import read_manifest
    from runtime.serve.errors import RequestError

    with pytest.raises(RequestError, match=match) as e:
        _plan(control_dir, read_manifest(demo_artifact, verify=False), net, size=size, rows=rows)
    assert e.value.field == f"{ARGS}[0].model"


def test_controlnet_of_another_shape_is_refused(demo_artifact: Path, control_dir: Path) -> None:
    from runtime.manifest import read_manifest
    from runtime.serve.errors import RequestError
    from sdexport.controlnet import ControlNet
    from sdexport.presets import random_pipeline

    unet = dict(random_pipeline("demo").configs.unet)
    other = ControlNet.from_unet_config({**unet, "cross_attention_dim": 48})
    with pytest.raises(RequestError, match="context width 48") as e:
        _plan(control_dir, read_manifest(demo_artifact, verify=False), other)
    assert e.value.field == f"{ARGS}[0].model" and e.value.status == 422


def test_controlnet_is_more_important_is_guess_mode_for_13_residuals(demo_artifact: Path, control_dir: Path,
                                                                     net: Any) -> None:
    """A1111's "ControlNet is more important" is the original guess mode; SD 1.x / 2.x ControlNets (13
    residuals) get it, as diffusers' guess_mode."""
    from dataclasses import replace

    from runtime.manifest import read_manifest

    layout = [(32, 1)] * 4 + [(64, 2)] * 3 + [(64, 4)] * 3 + [(64, 8)] * 3
    info = replace(net.info, residuals=tuple(layout))
    manifest = replace(read_manifest(demo_artifact, verify=False), control_residuals=[list(r) for r in layout])
    fake = type("Net", (), {"info": info, "check_shape": lambda self, *a: None})()
    plan = _plan(control_dir, manifest, fake, control_mode="ControlNet is more important", weight=0.5)
    kw = plan.at(SIZE, SIZE).kwargs
    assert kw["guess_mode"] is True and kw["control_scale"] == [0.5] and kw["control"] == [fake]
    assert _plan(control_dir, manifest, fake, control_mode=0).at(SIZE, SIZE).kwargs["guess_mode"] is False


def test_transparency_is_laid_over_white() -> None:
    """As the extension's HWC3: a transparent control image pixel is white, an opaque one unchanged."""
    from runtime.serve.controlnet import rgb

    im = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    im.putpixel((1, 0), (10, 20, 30, 0))
    out = rgb(im)
    assert (out.getpixel((0, 0)), out.getpixel((1, 0))) == ((10, 20, 30), (255, 255, 255))
    assert rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)
