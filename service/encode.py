"""8-bit maps → PNG or WebP bytes: a one-channel mask, or the photo with the mask as alpha."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

from service.decode import DecodedImage
from service.infer import Output

__all__ = ["MEDIA_TYPES", "Format", "encode"]

Format = Literal["png", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "webp": "image/webp"}


def _save(im: Image.Image, fmt: Format) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        # Level 1: several times faster than the default 6, and masks compress well anyway.
        im.save(buf, "PNG", compress_level=1)
    else:
        # Lossless keeps the mask and alpha exact; method 0 is the fastest encoder setting.
        im.save(buf, "WEBP", lossless=True, method=0)
    return buf.getvalue()


def encode(levels: np.ndarray, image: DecodedImage, output: Output, fmt: Format) -> bytes:
    """``levels`` is the H×W uint8 map from inference for this image."""
    if output != "cutout":
        return _save(Image.fromarray(levels, "L"), fmt)
    alpha = levels if image.alpha is None else np.minimum(levels, image.alpha)
    rgba = np.dstack((image.rgb, alpha))
    # Colour under alpha 0 is invisible; zeroing it halves PNG encoding time and makes a
    # photo's cut-out several times smaller.
    rgba[alpha == 0] = 0
    return _save(Image.fromarray(rgba, "RGBA"), fmt)
