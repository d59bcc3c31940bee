"""8-bit maps → the answer: a one-channel mask, the photo with the mask as alpha (on a colour if
asked), or the subject's box as JSON; cropped and scaled down as asked, with headers that give the
subject's box in the answer's grid."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.box import Box, Subject, crop_region, fit_size, subject
from service.decode import DecodedImage
from service.params import Format, SegmentParams

__all__ = ["BOX_HEADERS", "MEDIA_TYPES", "Rendered", "render"]

MEDIA_TYPES: dict[str, str] = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
BOX_HEADERS = (
    "X-Foreground-Left",
    "X-Foreground-Top",
    "X-Foreground-Width",
    "X-Foreground-Height",
    "X-Foreground-Ratio",
)
# Lanczos, after a box reduction by a whole factor while the image stays over twice the target
# size (Pillow's reducing_gap=2): close to Lanczos over the whole image, and half the time of it
# for a 12 MP cut-out scaled to 1024 (bench/README.md). A gap of 3 reduced nothing there.
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 2.0


def _save(im: Image.Image, fmt: Format, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        # Level 1: several times faster than the default 6, and masks compress well anyway.
        im.save(buf, "PNG", compress_level=1)
    elif fmt == "webp":
        # Lossless keeps the mask and alpha exact; method 0 is the fastest encoder setting.
        im.save(buf, "WEBP", lossless=True, method=0)
    else:
        im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class Rendered:
    """An answer: its bytes, their media type, and headers that describe it."""

    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def _cutoff(params: SegmentParams) -> int:
    """The level at which a pixel of the map ``run_batch`` returned is foreground."""
    if params.output == "probability":
        # The 8-bit map is rounded; the box is of the pixels whose level reaches the threshold.
        return math.ceil(params.threshold * 255)
    return 255  # a mask: 0 or 255


def _box_headers(found: Subject, box: Box | None) -> dict[str, str]:
    b = box or Box(0, 0, 0, 0)  # no foreground: a 0×0 box at the origin, and a ratio of 0
    values = (b.left, b.top, b.width, b.height, f"{found.ratio:.6f}")
    return dict(zip(BOX_HEADERS, map(str, values), strict=True))


def render(levels: np.ndarray, image: DecodedImage, params: SegmentParams) -> Rendered:
    """The answer for one image; ``levels`` is its H×W uint8 map from inference."""
    found = subject(levels, _cutoff(params))
    size = image.size
    region = crop_region(found.box, params.margin, size) if params.crop else Box(0, 0, *size)
    if params.output == "box":
        doc: dict[str, object] = {
            "image": {"width": size[0], "height": size[1]},
            "box": found.box.as_dict() if found.box else None,
            "foreground_ratio": round(found.ratio, 6),
        }
        if params.crop:
            doc["crop"] = region.as_dict()
        body = json.dumps(doc, separators=(",", ":")).encode()
        return Rendered(body, "application/json", _box_headers(found, found.box))
    out_size = fit_size((region.width, region.height), params.max_side)
    answer_box = found.box.within(region, out_size) if found.box else None
    im = _image(levels, image, params, region, out_size)
    body = _save(im, params.format, params.jpeg_quality)
    return Rendered(body, MEDIA_TYPES[params.format], _box_headers(found, answer_box))


def _image(
    levels: np.ndarray,
    image: DecodedImage,
    params: SegmentParams,
    region: Box,
    out_size: tuple[int, int],
) -> Image.Image:
    rows = slice(region.top, region.bottom)
    cols = slice(region.left, region.right)
    whole = (region.width, region.height) == image.size
    levels = levels if whole else levels[rows, cols]
    scaled = out_size != (region.width, region.height)
    if params.output != "cutout":
        im = Image.fromarray(levels, "L")
        if scaled:
            im = im.resize(out_size, _RESAMPLE, reducing_gap=_REDUCING_GAP)
            if params.output == "mask":  # a mask stays binary: the resampled map at half-way
                im = im.point(lambda v: 255 if v >= 128 else 0)
        return im
    rgb = image.rgb if whole else image.rgb[rows, cols]
    alpha = levels if image.alpha is None else np.minimum(levels, image.alpha[rows, cols])
    rgba = np.dstack((rgb, alpha))
    # Colour under alpha 0 is invisible; zeroing it halves PNG encoding time and makes a
    # photo's cut-out several times smaller.
    rgba[alpha == 0] = 0
    im = Image.fromarray(rgba, "RGBA")
    if scaled:  # Pillow resamples RGBA premultiplied, so no dark fringes
        im = im.resize(out_size, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    bg = params.background
    if bg is None:
        return im
    if bg[3] == 255:
        canvas = Image.new("RGB", im.size, bg[:3])
        canvas.paste(im, mask=im.getchannel("A"))
        return canvas
    return Image.alpha_composite(Image.new("RGBA", im.size, bg), im)
