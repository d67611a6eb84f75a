"""The Canny edge preprocessor of ControlNet's canny models (optional extra: `pip install sdexport[canny]`,
i.e. opencv-python-headless): OpenCV's `cv2.Canny` on the RGB image with the reference thresholds
(low 100, high 200: lllyasviel's annotator, diffusers' docs and the A1111 extension's defaults), edges
white on black in three channels, as the ControlNet was trained on."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["HIGH_THRESHOLD", "LOW_THRESHOLD", "canny"]

LOW_THRESHOLD = 100
HIGH_THRESHOLD = 200


def canny(image: Image.Image, low: int = LOW_THRESHOLD, high: int = HIGH_THRESHOLD) -> Image.Image:
    """An RGB edge map of `image` (same size): 255 on the edges `cv2.Canny(rgb, low, high)` finds."""
    try:
        import cv2
    except ImportError:
        raise ImportError("the Canny preprocessor needs OpenCV: pip install 'sdexport[canny]' "
                          "(opencv-python-headless)") from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"canny takes a PIL image, got {type(image).__name__}")
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low} and {high}")
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
