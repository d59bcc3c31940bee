"""8-bit maps → the answer: a one-channel mask, the photo with an alpha (the mask, the soft map or
a matte solved from the photo: the alpha stage, :mod:`service.images.alpha`; on a colour if
asked), or the subject's box as JSON; cropped and scaled down as asked, with headers that give
the subject's box in the answer's grid."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from service.images import alpha
from service.images.box import Box, Subject, crop_region, fit_size, side_within, subject
from service.images.codecs import Picture, encoder
from service.images.decode import DecodedImage
from service.params import SegmentParams

__all__ = ["BOX_HEADERS", "MEDIA_TYPES", "Rendered", "render"]

MEDIA_TYPES: dict[str, str] = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
BOX_HEADERS = (
    "X-Foreground-Left",
    "X-Foreground-Top",
    "X-Foreground-Width",
    "X-Foreground-Height",
    "X-Foreground-Ratio",
)


@dataclass(frozen=True)
class Rendered:
    """An answer: its bytes, their media type, headers that describe it, and for an image its
    (width, height)."""

    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)
    size: tuple[int, int] | None = None


def _cutoff(params: SegmentParams) -> int:
    """The level at which a pixel of the map ``run_batch`` returned is foreground."""
    if params.soft_map:
        # The 8-bit map is rounded; the box is of the pixels whose level reaches the threshold.
        return math.ceil(params.threshold * 255)
    return 1  # a mask: 0 or 255, so every level but 0 (counted without a threshold)


def _box_headers(found: Subject, box: Box | None) -> dict[str, str]:
    b = box or Box(0, 0, 0, 0)  # no foreground: a 0×0 box at the origin, and a ratio of 0
    values = (b.left, b.top, b.width, b.height, f"{found.ratio:.6f}")
    return dict(zip(BOX_HEADERS, map(str, values), strict=True))


def render(
    levels: np.ndarray,
    image: DecodedImage,
    params: SegmentParams,
    *,
    codec: str = "vips",
    max_pixels: int | None = None,
) -> Rendered:
    """The answer for one image; ``levels`` is its H×W uint8 map from inference. ``codec``:
    the encoder of :mod:`service.images.codecs` (every one gives the same pixels). ``max_pixels``:
    scale the answer down as the whole image would be to hold at most this many pixels (a crop
    at that scale), as ``max_side`` scales it."""
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
    max_side = params.max_side
    if max_pixels is not None:
        within = side_within(size, (region.width, region.height), max_pixels)
        if within is not None:
            max_side = within if max_side is None else min(max_side, within)
    out_size = fit_size((region.width, region.height), max_side)
    answer_box = found.box.within(region, out_size) if found.box else None
    is_cutout = params.output == "cutout"
    colour = None
    if is_cutout:
        levels, colour = alpha.cutout(image.rgb, levels, params)
    picture = Picture(
        levels=levels,
        rgb=colour,
        alpha=image.alpha if is_cutout else None,
        region=(region.left, region.top, region.width, region.height),
        size=out_size,
        binary=not params.soft_map,
        background=params.background if is_cutout else None,
    )
    body = encoder(codec).encode(picture, params.format, params.jpeg_quality)
    return Rendered(body, MEDIA_TYPES[params.format], _box_headers(found, answer_box), out_size)
