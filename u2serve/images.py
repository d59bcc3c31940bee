"""The kinds of image a Python caller has, as the bytes ``POST /segment`` reads, and its answer
given back in the same kind.

- bytes (or a ``bytearray``/``memoryview``): sent as they are; the answer is the service's bytes.
- a path (``str`` or ``os.PathLike``): the file's bytes, sent as they are; the answer is the
  service's bytes, not a file: writing files (names, what to do with one that exists, resuming)
  is ``u2serve segment``'s job, and bytes are what a caller writes anywhere it likes.
- a PIL image: its pixels in a lossless file (PNG; TIFF for the modes the service converts
  itself, CMYK and 32-bit grey), with its EXIF orientation, so the service reads the very pixels
  and turns them upright as it would the photo's file; the answer is decoded back into a PIL
  image (``output=box``: its JSON, as a dict).
- a numpy array (what ``PIL.Image.fromarray`` takes: H×W grey, H×W×3 RGB, H×W×4 RGBA): as the
  PIL image of it; the answer is decoded back into an array (``output=box``: a dict).

So an answer in any kind is the service's answer for those bytes; a PIL image or array costs a
lossless encode on the way in and a decode on the way out.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

import numpy as np
from PIL import Image

__all__ = ["ImageInput", "Kind", "answer_as", "as_fields", "upload_of"]

ImageInput: TypeAlias = (
    bytes | bytearray | memoryview | str | os.PathLike[str] | Image.Image | np.ndarray
)
Kind = Literal["bytes", "path", "pil", "numpy"]

# What PNG holds as it is; the service's decoder reads it back to the same pixels.
_PNG_MODES = frozenset({"1", "L", "LA", "I;16", "I;16B", "P", "RGB", "RGBA"})
# What the service's decoder converts in its own way (CMYK through its ICC profile, 32-bit and
# float grey scaled to 8 bits): sent as it is, in a TIFF, for that conversion to apply.
_TIFF_MODES = frozenset({"CMYK", "I", "F"})
_ORIENTATION = 0x0112


def _lossless(im: Image.Image) -> bytes:
    """The image's pixels in a file the service reads back to the same pixels."""
    if im.mode not in _PNG_MODES | _TIFF_MODES:
        # Any other mode the service would convert to RGB(A) itself; converted here, the same.
        im = im.convert("RGBA" if "A" in im.mode or "a" in im.mode else "RGB")
    extra: dict[str, Any] = {}
    orientation = im.getexif().get(_ORIENTATION)
    if orientation not in (None, 1):
        exif = Image.Exif()
        exif[_ORIENTATION] = orientation
        extra["exif"] = exif
    buf = io.BytesIO()
    if im.mode in _TIFF_MODES:
        im.save(buf, "TIFF", **extra)
    else:
        # Level 1: the fastest deflate; the pixels are the same at every level.
        im.save(buf, "PNG", compress_level=1, **extra)
    return buf.getvalue()


def upload_of(image: ImageInput) -> tuple[bytes, Kind]:
    """The bytes to send for ``image``, and its kind (for :func:`answer_as`)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image), "bytes"
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as f:
            return f.read(), "path"
    if isinstance(image, Image.Image):
        return _lossless(image), "pil"
    if isinstance(image, np.ndarray):
        try:
            im = Image.fromarray(image)
        except TypeError as exc:
            raise TypeError(
                f"an array of shape {image.shape} and dtype {image.dtype} is not an image: give "
                "H×W, H×W×3 (RGB) or H×W×4 (RGBA) uint8"
            ) from exc
        return _lossless(im), "numpy"
    raise TypeError(
        f"an image is bytes, a path, a PIL image or a numpy array, not {type(image).__name__}"
    )


def answer_as(kind: Kind, body: bytes, media_type: str) -> Any:
    """An answer's bytes as the kind of image it was asked for with."""
    if kind in ("bytes", "path"):
        return body
    if media_type.split(";")[0].strip() == "application/json":
        return json.loads(body)
    im = Image.open(io.BytesIO(body))
    im.load()  # the pixels are read now; the buffer is not needed after
    return np.array(im) if kind == "numpy" else im


def as_fields(options: Mapping[str, object]) -> dict[str, str]:
    """Options as the strings of a query string or form: booleans ``true``/``false``, None left
    out (the parameter's default), anything else as ``str`` gives it."""
    fields = {}
    for name, value in options.items():
        if value is None:
            continue
        fields[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return fields
