"""JPEG through libjpeg-turbo called directly (``simplejpeg``): what every fast JPEG path calls.

Pillow decodes JPEG with libjpeg-turbo too, with the accurate integer DCT and fancy upsampling;
``simplejpeg`` asks for the same, without Pillow's 4-byte-a-pixel buffer and its copy into numpy,
so the pixels are the same at a third of the time (12 MP: 36 against 102 ms). EXIF orientation is
applied as ``ImageOps.exif_transpose`` would, as a view, then one contiguous copy.

:meth:`TurboJpegDecoder.decode_reduced` decodes at 1/2, 1/4 or 1/8 of the size inside the
IDCT, for answers that need only the network's input (``fast`` masks, soft maps and boxes,
service/core/scale.py). Only those powers of two: libjpeg-turbo's other factors (3/8, 7/8…) took
longer than a full decode of a 1 MP photo (8.2 against 4.5 ms at 7/8). A 12 MP photo at 1/8 took
21 against 41 ms: the entropy decoding of every coefficient remains.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import simplejpeg

from model import scratch
from service.images.codecs import DecodedImage, Header, Reduction

__all__ = ["TurboJpegDecoder"]

# Pillow's transposition for each EXIF orientation (ImageOps.exif_transpose), as numpy views.
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270 (90° clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90 (90° anticlockwise)
}


class TurboJpegDecoder:
    """8-bit YCbCr, RGB and greyscale JPEG (baseline or progressive, any subsampling)."""

    name = "turbojpeg"

    def decode(self, data: bytes, header: Header) -> DecodedImage | None:
        try:
            # strict: libjpeg's warnings (a truncated or corrupt stream) are errors here, so
            # such a file goes to Pillow, whose answer for it (415 when truncated, its pixels
            # otherwise) stays the service's.
            rgb = simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                fastdct=False,
                fastupsample=False,
                strict=True,
                # Into a buffer kept from an earlier request (model/scratch.py), as large as
                # the header says: a photo larger than its header is a ValueError, like any
                # other that libjpeg cannot decode cleanly.
                buffer=scratch.array((header.height, header.width, 3), np.uint8),
            )
        except ValueError:  # simplejpeg's one error type: libjpeg could not decode it cleanly
            return None
        if rgb.shape[:2] != (header.height, header.width):
            return None  # not the picture the header described: Pillow decides
        return _upright(rgb, header)

    def decode_reduced(self, data: bytes, header: Header, reduce: Reduction) -> DecodedImage | None:
        """The photo decoded at the smallest of 1/2, 1/4 and 1/8 of its size that ``reduce``
        allows, with ``full`` its own size; at full size (``full`` None) where none does; None
        where :meth:`decode` would give None."""
        w, h = header.width, header.height
        if reduce.full_from is not None and min(w, h) >= reduce.full_from:
            return self.decode(data, header)
        k = next(
            (
                k
                for k in (8, 4, 2)
                if k <= reduce.max_factor and -(-min(w, h) // k) >= reduce.min_side
            ),
            1,
        )
        if k == 1:
            return self.decode(data, header)
        try:
            # libjpeg-turbo scales each side to ceil(side / k); asking for exactly that makes
            # simplejpeg choose 1/k, the smallest factor that reaches it.
            rgb = simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                fastdct=False,
                fastupsample=False,
                strict=True,
                min_width=-(-w // k),
                min_height=-(-h // k),
                buffer=scratch.array((-(-h // k), -(-w // k), 3), np.uint8),
            )
        except ValueError:
            return None
        if rgb.shape[:2] != (-(-h // k), -(-w // k)):
            return None  # not the picture the header described: Pillow decides, in full
        image = _upright(rgb, header)
        full = (h, w) if header.orientation in _TURNED else (w, h)
        return DecodedImage(rgb=image.rgb, alpha=None, model_rgb=image.model_rgb, full=full)


# The orientations that turn the picture a quarter: its upright width is its stored height.
_TURNED = frozenset({5, 6, 7, 8})


def _upright(rgb: np.ndarray, header: Header) -> DecodedImage:
    upright = _UPRIGHT.get(header.orientation)
    if upright is not None:
        view = upright(rgb)
        rgb = scratch.array(view.shape, np.uint8)
        np.copyto(rgb, view)
    return DecodedImage(rgb=rgb, alpha=None, model_rgb=rgb)
