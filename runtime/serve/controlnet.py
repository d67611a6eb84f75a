"""A1111's ControlNet extension on the API: `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`.

A unit is the extension's (and the `webuiapi` ControlNetUnit's) dict: `image` (base64), `module`
(`none` or `canny`), `model` (a control artifact directly inside the server's --control-dir, by folder
name; never a path), `weight`, `guidance_start`, `guidance_end`, plus the preprocessor fields. Units with
`enabled: false` are skipped. Everything else is honoured or refused with the field's name (4xx):

- `canny` runs as the extension does: the image's short side scaled to `processor_res` (cubic up, area
  down; `pixel_perfect` derives it from the output size), edge-padded to a multiple of 64,
  `cv2.Canny(threshold_a, threshold_b)` (a negative threshold: the default 100 / 200), the padding cut off.
- `weight`, `guidance_start`, `guidance_end` are the pipeline's control_scale / control_start / control_end
  (runtime/control.py: diffusers' rule for the model calls a ControlNet acts on).
- `resize_mode` (to the output size, Lanczos): "Just Resize", "Crop and Resize", and "Resize and Fill" only
  where the image already has the output's aspect ratio (then all three are one resize).
- `control_mode`: "Balanced", or "ControlNet is more important" as guess mode (the original ControlNet's
  guess mode, which diffusers defines with `logspace(-1, 0)` for the extension's `0.825 ** (12 - i)`: the
  same within 0.6%, the most on the shallowest skip), for 13-residual (SD 1.x / 2.x) ControlNets only, in every unit
  alike; "My prompt is more important" (scaled residuals with CFG on both halves) is refused.
- `low_vram` is a memory hint (accepted); `mask`, `hr_option` other than "Both", and hires fix are refused.

Requests batch together only with the same ControlNets, images and settings (`ControlCall.key`).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runtime.artifact import model_info
from runtime.canny import HIGH_THRESHOLD, LOW_THRESHOLD, canny
from runtime.control import check_pair
from runtime.control_artifact import CONTROL_KIND, ControlArtifact, ControlManifest, load_control
from runtime.manifest import MANIFEST, ArtifactError, Manifest
from runtime.serve import images as imgs
from runtime.serve.errors import RequestError

SCRIPT = "controlnet"  # the alwayson_scripts key (A1111 matches it case-insensitively; webuiapi sends "ControlNet")
MODULES = ("none", "canny")
MAX_UNITS = 3  # the extension's default unit count ("Multi-ControlNet: max models")
RESIZE_MODES = {"Just Resize": 0, "Crop and Resize": 1, "Resize and Fill": 2,  # and the extension's aliases
                "Inner Fit (Scale to Fit)": 1, "Outer Fit (Shrink to Fit)": 2, "Scale to Fit (Inner Fit)": 1,
                "Envelope (Outer Fit)": 2}
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
GUESS_RESIDUALS = 13  # guess mode's scales match the extension's for this residual count only


class ControlNets:
    """The control artifacts of --control-dir, by folder name, loaded on first use; the last CACHE used
    stay loaded (a job holding an evicted one keeps it until it ends)."""

    CACHE = MAX_UNITS + 1

    def __init__(self, folder: Path | None, device: str) -> None:
        self.folder = folder
        self.device = device
        self.manifests: dict[str, ControlManifest] = {}
        if folder is not None:
            for p in sorted(folder.iterdir()):
                if (p / MANIFEST).is_file() and _is_control(p):
                    self.manifests[p.name] = ControlManifest.read(p, verify=False)  # verified on load
        self._loaded: OrderedDict[str, ControlArtifact] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, name: object, field: str) -> str:
        if self.folder is None:
            raise RequestError(field, "this server was started without --control-dir (no ControlNets)")
        if not isinstance(name, str) or name not in self.manifests:  # a dict lookup: no path reaches the disk
            raise RequestError(field, f"unknown ControlNet {name!r}; this server has {sorted(self.manifests)} "
                                      "(see /controlnet/model_list)", status=404)
        return name

    def load(self, name: str) -> ControlArtifact:
        assert self.folder is not None
        with self._lock:
            if name not in self._loaded:
                try:
                    self._loaded[name] = load_control(self.folder / name, device=self.device)
                except ArtifactError as e:  # the server's fault, not the request's
                    raise RequestError("model", f"ControlNet {name!r} failed to load: {e}", status=500) from None
                while len(self._loaded) > self.CACHE:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(name)
            return self._loaded[name]


def _is_control(path: Path) -> bool:
    import json

    try:
        return bool(json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("kind") == CONTROL_KIND)
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class _Unit:
    model: str
    image: Image.Image  # the preprocessed map, before resizing to the output
    digest: str
    resize_mode: int
    weight: float
    start: float
    end: float


@dataclass(frozen=True)
class ControlCall:
    """The pipeline keywords of a request's ControlNets at one output size, and their batching key."""

    kwargs: dict[str, Any]
    key: Hashable


@dataclass(frozen=True)
class ControlPlan:
    units: tuple[_Unit, ...]
    guess_mode: bool
    nets: tuple[ControlArtifact, ...]
    where: str  # the units' field prefix in error messages, as the request spelt it

    def at(self, width: int, height: int, box: tuple[int, int, int, int] | None = None,
           size: tuple[int, int] | None = None) -> ControlCall:
        """Control images for a width x height output; with an inpaint crop `box` of a `size` picture, the
        image is laid over the whole picture first and cut as the init image is."""
        images = []
        for i, u in enumerate(self.units):
            if box is None:
                images.append(_resize(u, width, height, self.where, i))
            else:
                assert size is not None
                full = _resize(u, size[0], size[1], self.where, i)
                images.append(full.crop(box).resize((width, height), resample=Image.Resampling.LANCZOS))
        kwargs = dict(control=list(self.nets), control_image=images, control_scale=[u.weight for u in self.units],
                      control_start=[u.start for u in self.units], control_end=[u.end for u in self.units],
                      guess_mode=self.guess_mode)
        key = (tuple((u.model, u.digest, u.resize_mode, u.weight, u.start, u.end) for u in self.units),
               self.guess_mode, width, height, box, size)
        return ControlCall(kwargs, key)


def _resize(u: _Unit, width: int, height: int, where: str, i: int) -> Image.Image:
    if u.resize_mode == 2 and u.image.width * height != u.image.height * width:
        raise RequestError(_f(where, i, "resize_mode"), f"'Resize and Fill' is supported only for a control image of "
                                                 f"the output's aspect ratio ({width}x{height}); use 'Just Resize' "
                                                 "or 'Crop and Resize'")
    return imgs.resize(u.image, width, height, 1 if u.resize_mode == 1 else 0)


def _f(where: str, i: int, name: str) -> str:
    return f"{where}[{i}].{name}"


def script_args(alwayson: dict[str, Any]) -> tuple[str, Any] | None:
    """The ControlNet entry of alwayson_scripts (its key as sent, and its args), if any."""
    for name, script in alwayson.items():
        if name.lower() == SCRIPT:
            return name, script.get("args") if isinstance(script, dict) else script
    return None


def plan(alwayson: dict[str, Any], nets: ControlNets, model: Manifest, width: int, height: int,
         max_pixels: int, fallback: Image.Image | None = None, rows: int = 1) -> ControlPlan | None:
    """The enabled ControlNet units of a request, checked, preprocessed and paired with `model` (None: none).
    `fallback` is img2img's init image, used (as the extension does) by a unit without an image; `rows`
    the UNet rows of one of its pipeline calls (the control artifact must take them)."""
    found = script_args(alwayson)
    if found is None:
        return None
    name, args = found
    if args in (None, [], [False]):
        return None
    where = f"alwayson_scripts.{name}.args"
    if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
        raise RequestError(where, "must be a list of ControlNet unit objects")
    if len(args) > MAX_UNITS:
        raise RequestError(where, f"{len(args)} units; at most {MAX_UNITS}")
    if nets.folder is None and any(a.get("enabled", True) is not False for a in args):
        raise RequestError(f"alwayson_scripts.{name}", "this server was started without --control-dir "
                                                       "(no ControlNets)")
    units, guess, loaded = [], set(), []
    for i, a in enumerate(args):
        enabled = a.get("enabled", True)
        if not isinstance(enabled, bool):
            raise RequestError(_f(where, i, "enabled"), f"must be true or false, got {enabled!r}")
        if not enabled:
            continue
        unit, guess_mode = _unit(where, i, a, nets, width, height, max_pixels, fallback)
        net = nets.load(unit.model)
        try:
            check_pair(net.info, model_info(model), i)
            net.check_shape(rows, height, width)
        except ValueError as e:
            raise RequestError(_f(where, i, "model"), str(e)) from None
        if guess_mode and len(net.info.residuals) != GUESS_RESIDUALS:
            raise RequestError(_f(where, i, "control_mode"), "'ControlNet is more important' is available for "
                               "SD 1.x / 2.x ControlNets only (its weights differ from guess mode's here)")
        units.append(unit)
        guess.add(guess_mode)
        loaded.append(net)
    if not units:
        return None
    if len(guess) > 1:
        raise RequestError(_f(where, 0, "control_mode"), "units must share one control mode on this server")
    return ControlPlan(tuple(units), guess.pop(), tuple(loaded), where)


def _number(a: dict[str, Any], where: str, i: int, name: str, default: float) -> float:
    v = a.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RequestError(_f(where, i, name), f"must be a finite number, got {v!r}")
    return float(v)


def _unit(where: str, i: int, a: dict[str, Any], nets: ControlNets, width: int, height: int, max_pixels: int,
          fallback: Image.Image | None) -> tuple[_Unit, bool]:
    at = f"{where}[{i}]"
    module = a.get("module", "none")
    if module not in MODULES:
        raise RequestError(f"{at}.module", f"preprocessor {module!r} is not available; use one of {list(MODULES)} "
                                            "(or pass a prepared image with 'none')")
    model = nets.resolve(a.get("model"), f"{at}.model")
    weight = _number(a, where, i, "weight", 1.0)
    start, end = _number(a, where, i, "guidance_start", 0.0), _number(a, where, i, "guidance_end", 1.0)
    if weight < 0:
        raise RequestError(f"{at}.weight", f"must be >= 0, got {weight}")
    if not 0 <= start < end <= 1:
        raise RequestError(_f(where, i, "guidance_start" if not 0 <= start < 1 else "guidance_end"),
                           f"need 0 <= guidance_start < guidance_end <= 1, got {start} and {end}")
    mode = a.get("control_mode", "Balanced")
    mode = CONTROL_MODES[mode] if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < 3 else mode
    if mode not in CONTROL_MODES:
        raise RequestError(f"{at}.control_mode", f"{mode!r} is not one of {list(CONTROL_MODES)}")
    if mode == CONTROL_MODES[1]:
        raise RequestError(f"{at}.control_mode", "'My prompt is more important' is not supported; use 'Balanced' "
                                                  "or 'ControlNet is more important'")
    resize = a.get("resize_mode", "Crop and Resize")
    resize = RESIZE_MODES.get(resize, -1) if isinstance(resize, str) else resize
    if isinstance(resize, bool) or resize not in (0, 1, 2):
        raise RequestError(f"{at}.resize_mode", f"{a.get('resize_mode')!r} is not one of {list(RESIZE_MODES)[:3]}")
    if a.get("mask") not in (None, ""):
        raise RequestError(f"{at}.mask", "per-unit masks are not supported")
    if a.get("hr_option", "Both") != "Both":
        raise RequestError(f"{at}.hr_option", "only 'Both' (hires fix with ControlNet is not supported)")
    for flag in ("low_vram", "pixel_perfect"):
        if not isinstance(a.get(flag, False), bool):
            raise RequestError(_f(where, i, flag), f"must be true or false, got {a.get(flag)!r}")
    data = a.get("image")
    if data in (None, "") and fallback is not None:
        image = fallback
    elif data in (None, ""):
        raise RequestError(f"{at}.image", "give the control image (base64)")
    else:
        image = rgb(imgs.decode_image(data, f"{at}.image", max_pixels))
    if module == "canny":
        image = _canny(where, i, a, image, width, height, resize)
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    return _Unit(model, image, f"{image.size}:{digest}", resize, weight, start, end), mode == CONTROL_MODES[2]


def rgb(image: Image.Image) -> Image.Image:
    """The extension's HWC3: RGB, with any transparency laid over white."""
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGB")
    x = np.asarray(image.convert("RGBA"), dtype=np.float32)
    alpha = x[..., 3:] / 255.0
    return Image.fromarray((x[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8))


def _canny(where: str, i: int, a: dict[str, Any], image: Image.Image, width: int, height: int,
           resize: int) -> Image.Image:
    """The extension's canny: resize_image_with_pad to processor_res, cv2.Canny, padding removed."""
    at = f"{where}[{i}]"
    try:
        import cv2
    except ImportError:
        raise RequestError(f"{at}.module", "canny needs OpenCV on the server (pip install 'sdexport[canny]')",
                           status=501) from None
    if a.get("pixel_perfect", False):  # the extension's pixel_perfect_resolution
        k0, k1 = height / image.height, width / image.width
        res = max(1, round((min(k0, k1) if resize == 2 else max(k0, k1)) * min(image.size)))
    else:
        res = int(_number(a, where, i, "processor_res", 512))
        if not 64 <= res <= 4096:
            raise RequestError(f"{at}.processor_res", f"must be within 64..4096, got {res}")
    a_, b_ = _number(a, where, i, "threshold_a", -1), _number(a, where, i, "threshold_b", -1)
    low = LOW_THRESHOLD if a_ < 0 else int(a_)
    high = HIGH_THRESHOLD if b_ < 0 else int(b_)
    if not (a_ < 0 or a_.is_integer()) or not (b_ < 0 or b_.is_integer()) or not 0 <= low <= high <= 1024:
        raise RequestError(f"{at}.threshold_a", f"canny needs whole numbers 0 <= threshold_a <= threshold_b <= 1024, "
                                                 f"got {a_} and {b_}")
    arr = np.asarray(image.convert("RGB"))
    k = res / min(arr.shape[:2])
    h, w = max(1, round(arr.shape[0] * k)), max(1, round(arr.shape[1] * k))
    if h * w > 4096 * 4096:
        raise RequestError(f"{at}.processor_res", f"{res} would preprocess a {w}x{h} image; too large")
    arr = cv2.resize(arr, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(arr, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
    return canny(Image.fromarray(padded), low, high).crop((0, 0, w, h))


def model_list(nets: ControlNets) -> dict[str, list[str]]:
    return {"model_list": sorted(nets.manifests)}


def module_list() -> dict[str, list[str]]:
    return {"module_list": list(MODULES)}


__all__ = ["MAX_UNITS", "MODULES", "SCRIPT", "ControlCall", "ControlNets", "ControlPlan", "model_list", "module_list",
           "plan", "script_args"]
