"""Images in and out of the API: base64 PNG/JPEG with a pixel limit checked before decoding, PNG out with
the `parameters` text, and A1111's mask handling (blur, invert, "fill", "only masked" crop and paste)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from runtime.serve.errors import RequestError


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 image (A1111 also takes a `data:image/...;base64,` prefix), opened lazily so that its
    size is checked against `max_pixels` before any pixel is decoded (no decompression bombs)."""
    if not isinstance(data, str) or not data:
        raise RequestError(field, "must be a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise RequestError(field, f"is {w}x{h} pixels, above this server's limit of {max_pixels}",
                                   status=413)
            im.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(field, "is too large to decode (decompression bomb)", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RequestError(field, f"is not a readable image ({e})") from None
    return im


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Base64 PNG with A1111's `parameters` tEXt chunk (default: the image's own)."""
    text = parameters if parameters is not None else image.info.get("parameters")
    meta = PngInfo()
    if isinstance(text, str):
        meta.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def resize(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's resize_mode 0 ("Just resize") and 1 ("Crop and resize"), Lanczos as A1111."""
    if image.size == (width, height):
        return image
    if mode == 0:
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    w = width if ratio > src_ratio else image.width * height // image.height
    h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((w, h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    return out


def prepare_mask(mask: Image.Image, invert: bool, blur_x: int, blur_y: int) -> Image.Image:
    """A1111: greyscale, inverted on request, then a Gaussian blur (x and y radii)."""
    m = mask.convert("L")
    if invert:
        m = ImageOps.invert(m)
    if blur_x > 0 or blur_y > 0:
        m = m.filter(ImageFilter.GaussianBlur((max(blur_x, 0), max(blur_y, 0))))
    return m


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0 ("fill", modules/masking.py): the masked area painted with ever less
    blurred copies of the rest of the image."""
    image_mod = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    masked = masked.convert("RGBa")
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def crop_region(mask: Image.Image, pad: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A1111's "only masked" region: the mask's bounding box plus `pad`, grown to the aspect of
    width x height within the image (modules/masking.py get_crop_region / expand_crop_region)."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    iw, ih = mask.size
    x1, y1, x2, y2 = max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, iw), min(box[3] + pad, ih)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) < ratio:  # too tall: widen
        want = round((y2 - y1) * ratio)
        x1, x2 = _grow(x1, x2, want, iw)
    else:
        want = round((x2 - x1) / ratio)
        y1, y2 = _grow(y1, y2, want, ih)
    return x1, y1, x2, y2


def _grow(a: int, b: int, want: int, limit: int) -> tuple[int, int]:
    want = min(want, limit)
    a -= (want - (b - a)) // 2
    a = min(max(a, 0), limit - want)
    return a, a + want


def paste_back(original: Image.Image, generated: Image.Image, mask: Image.Image,
               box: tuple[int, int, int, int] | None) -> Image.Image:
    """A1111's overlay: the generated image (pasted back into its crop box for "only masked") over the
    original through the blurred mask; `original` and `mask` share one size."""
    if box is None:
        full = generated.convert("RGB")
    else:
        full = original.convert("RGB").copy()
        w, h = box[2] - box[0], box[3] - box[1]
        full.paste(generated.convert("RGB").resize((w, h), resample=Image.Resampling.LANCZOS), box[:2])
    out = Image.composite(full, original.convert("RGB"), mask)
    out.info = dict(generated.info)
    return out
