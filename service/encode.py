"""8-bit maps → the answer's bytes: a one-channel mask, or the photo with the mask as alpha."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.decode import DecodedImage
from service.params import Format, SegmentParams

__all__ = ["MEDIA_TYPES", "Rendered", "render"]

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


@dataclass(frozen=True)
class Rendered:
    """An answer: its bytes, their media type, and headers that describe it."""

    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def render(levels: np.ndarray, image: DecodedImage, params: SegmentParams) -> Rendered:
    """The answer for one image; ``levels`` is its H×W uint8 map from inference."""
    return Rendered(_encode(levels, image, params), MEDIA_TYPES[params.format])


def _encode(levels: np.ndarray, image: DecodedImage, params: SegmentParams) -> bytes:
    fmt = params.format
    if params.output != "cutout":
        return _save(Image.fromarray(levels, "L"), fmt)
    alpha = levels if image.alpha is None else np.minimum(levels, image.alpha)
    rgba = np.dstack((image.rgb, alpha))
    # Colour under alpha 0 is invisible; zeroing it halves PNG encoding time and makes a
    # photo's cut-out several times smaller.
    rgba[alpha == 0] = 0
    return _save(Image.fromarray(rgba, "RGBA"), fmt)
