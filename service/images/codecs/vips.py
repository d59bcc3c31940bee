"""libvips (``pyvips`` with the ``pyvips-binary`` wheel): what imgproxy and sharp run on.

Its images are lazy pipelines over the decoded arrays, evaluated a strip at a time as the
encoder asks for them: the cut-out's RGBA, its zeroed colour under alpha 0 and its background
exist only as strips, never as full-size copies. PNG is written with zlib level 2 and the "up"
row filter for photos (12 MP cut-out: 135 against Pillow's 396 ms, 5.10 against 5.51 MB); a
0/255 mask's PNG by a coder made for its runs (:mod:`service.images.codecs.maskpng`; 12 MP: 2
against libvips' 8 ms, a third smaller); JPEG with libjpeg-turbo at Pillow's settings (the same
pixels); WebP with libwebp at Pillow's (lossless, fastest method).

Where Pillow's own arithmetic makes the pixels (its Lanczos for ``max_side``, and its blending
of a photo's partial transparency with a background), libvips composes the region into memory
and Pillow does the rest, as :class:`~service.images.codecs.pillow.PillowEncoder` does.
"""

from __future__ import annotations

import logging

import numpy as np
import pyvips
from PIL import Image

from service.images.codecs import Format, Picture, maskpng
from service.images.codecs.pillow import finish_cutout, finish_map

__all__ = ["VipsEncoder"]

# The codec pool already runs one answer per thread, beside the network on every core: a
# pipeline's own worker threads would only take cores from them. No operation cache either: it
# would keep requests' arrays alive after they are answered.
pyvips.concurrency_set(1)
pyvips.cache_set_max(0)


class _Demote(logging.Filter):
    """libvips reports routine events at INFO, once per image ("threadpool completed with 1
    workers"): they go to DEBUG, so that they show only where DEBUG is asked for and never
    drown the access log or break the command's progress bar. Warnings pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger("pyvips").addFilter(_Demote())

_FILTER_NONE, _FILTER_UP = 0x08, 0x20  # libpng's row filter flags
_PNG_LEVEL = 2


def _wrap(arr: np.ndarray) -> pyvips.Image:
    """A C-contiguous uint8 H×W or H×W×C array as a vips image over the same memory."""
    arr = np.ascontiguousarray(arr)
    bands = 1 if arr.ndim == 2 else arr.shape[2]
    return pyvips.Image.new_from_memory(arr.data, arr.shape[1], arr.shape[0], bands, "uchar")


def _save(im: pyvips.Image, fmt: Format, quality: int, *, binary: bool) -> bytes:
    if fmt == "png":
        # A 0/255 mask deflates best as it is; photos and soft maps gain from the "up" filter.
        row_filter = _FILTER_NONE if binary and im.bands == 1 else _FILTER_UP
        body = im.pngsave_buffer(compression=_PNG_LEVEL, filter=row_filter, keep=0)
    elif fmt == "webp":
        body = im.webpsave_buffer(lossless=True, effort=0, keep=0)
    else:
        # Pillow's: 4:2:0 at every quality (libvips would turn subsampling off from 90 up).
        body = im.jpegsave_buffer(Q=quality, subsample_mode="on", keep=0)
    return bytes(body)


def _from_pil(im: Image.Image) -> pyvips.Image:
    return _wrap(np.asarray(im))


class VipsEncoder:
    """Lazy libvips pipelines from the arrays to the encoded answer."""

    name = "vips"

    def encode(self, p: Picture, fmt: Format, quality: int) -> bytes:
        left, top, width, height = p.region
        levels = _wrap(p.levels)
        if not p.whole:
            levels = levels.crop(left, top, width, height)
        if p.rgb is None:
            if p.scaled:
                small = finish_map(_to_pil(levels, "L"), p)
                if p.binary and fmt == "png":
                    return maskpng.encode(np.asarray(small)) or _save(
                        _from_pil(small), fmt, quality, binary=True
                    )
                return _save(_from_pil(small), fmt, quality, binary=p.binary)
            if p.binary and fmt == "png":
                rows, cols = slice(top, top + height), slice(left, left + width)
                return maskpng.encode(p.levels[rows, cols]) or _save(
                    levels, fmt, quality, binary=True
                )
            return _save(levels, fmt, quality, binary=p.binary)
        colour = _wrap(p.rgb)
        if not p.whole:
            colour = colour.crop(left, top, width, height)
        if p.alpha is None:
            alpha = levels
        else:  # the photo's own transparency is kept where the mask keeps the photo
            rows, cols = slice(top, top + height), slice(left, left + width)
            alpha = _wrap(np.minimum(p.levels[rows, cols], p.alpha[rows, cols]))
        # Colour under alpha 0 is invisible: zeroed, it makes the PNG several times smaller. A
        # 0/255 alpha does it as a bitwise AND (x & 255 = x, x & 0 = 0): the same pixels as the
        # choice below, and the 12 MP cut-out PNG takes 162 against 216 ms of CPU time (libvips
        # computes the strips on one thread while its encoder writes on another).
        if p.binary and p.alpha is None:
            rgba = (colour & alpha).bandjoin(alpha)
        else:  # the same with a mask of alpha > 0 (255 or 0): 12 MP, 174 against 187 ms
            rgba = (colour & (alpha > 0)).bandjoin(alpha)
        bg = p.background
        if p.scaled or (bg is not None and not (p.binary and p.alpha is None)):
            # Pillow's resampling, or its blending of partial transparency with the colour.
            im = finish_cutout(_to_pil(rgba, "RGBA"), p)
            return _save(_from_pil(im), fmt, quality, binary=False)
        if bg is None:
            return _save(rgba, fmt, quality, binary=False)
        # A 0/255 alpha: the answer is the photo or the colour, pixel by pixel.
        if bg[3] == 255:
            return _save(alpha.ifthenelse(colour, list(bg[:3])), fmt, quality, binary=False)
        return _save(alpha.ifthenelse(colour.bandjoin(255), list(bg)), fmt, quality, binary=False)


def _to_pil(im: pyvips.Image, mode: str) -> Image.Image:
    """The pipeline evaluated into one buffer, as a Pillow image over it."""
    return Image.frombuffer(mode, (im.width, im.height), im.write_to_memory(), "raw", mode, 0, 1)
