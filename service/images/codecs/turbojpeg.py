"""JPEG through libjpeg-turbo called directly (``simplejpeg``): what every fast JPEG path calls.

Pillow decodes JPEG with libjpeg-turbo too, with the accurate integer DCT and fancy upsampling;
``simplejpeg`` asks for the same, without Pillow's 4-byte-a-pixel buffer and its copy into numpy,
so the pixels are the same at a third of the time (12 MP: 36 against 102 ms). EXIF orientation is
applied as ``ImageOps.exif_transpose`` would, as a view, then one contiguous copy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import simplejpeg

from service.images.codecs import DecodedImage, Header

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
                data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True
            )
        except ValueError:  # simplejpeg's one error type: libjpeg could not decode it cleanly
            return None
        if rgb.shape[:2] != (header.height, header.width):
            return None  # not the picture the header described: Pillow decides
        upright = _UPRIGHT.get(header.orientation)
        if upright is not None:
            rgb = np.ascontiguousarray(upright(rgb))
        return DecodedImage(rgb=rgb, alpha=None, model_rgb=rgb)
