"""The codec layer: bytes → pixels and pixels → bytes, each backed by the library image servers use
for the job, with the pixels of the Pillow path as the contract.

Decoders (one module per library, chosen per input from its header, never by catching every
exception):

- ``turbojpeg``: JPEG through libjpeg-turbo called directly (``simplejpeg``), 3× faster than
  Pillow's decoder on a 12 MP photo (36 against 102 ms, bench/README.md), the same library with
  the same settings (ISLOW DCT, fancy upsampling), so the same pixels;
- ``pillow``: every format and mode (PNG, WebP, GIF, BMP, TIFF, CMYK JPEG through its ICC
  profile, 16-bit, palettes), and any JPEG that libjpeg-turbo reports damaged, so what Pillow
  does with it (415 for a truncated file) stays the answer.

Encoders (composing the answer from the decoded photo and the map, and encoding it):

- ``vips``: libvips (what imgproxy and sharp run on) composes lazily from the arrays, without a
  full-size copy, and writes PNG 3× faster than Pillow's zlib at no larger a size; a 0/255
  mask's PNG is written by a coder made for its runs (``maskpng``: 4× faster than libvips'
  zlib, a third smaller);
- ``pillow``: the reference every backend is held to, pixel for pixel
  (``tests/test_codecs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal, Protocol

import numpy as np

__all__ = [
    "DECODERS",
    "ENCODERS",
    "FORMATS",
    "DecodedImage",
    "Decoder",
    "Encoder",
    "Header",
    "Picture",
    "Reduction",
    "choose_decoder",
    "decoder",
    "encoder",
]

# What may be read: the formats browsers and cameras produce. Exotic Pillow plugins stay off.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

Format = Literal["png", "webp", "jpeg"]


@dataclass(frozen=True)
class DecodedImage:
    """``rgb``: colour as decoded (H×W×3 uint8); ``alpha``: its transparency, if it had any;
    ``model_rgb``: what the network sees (transparent parts over white). ``full``: for a
    photo decoded at a reduced scale (:func:`service.images.decode.decode`'s ``min_side``),
    the (width, height) of the photo itself, which its answer keeps; ``None`` when the
    arrays are the photo at full size."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    model_rgb: np.ndarray
    full: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the photo (and of its answer), whatever scale it was decoded at."""
        return self.full or (self.rgb.shape[1], self.rgb.shape[0])

    @property
    def scaled(self) -> bool:
        """Decoded at a reduced scale: the arrays are smaller than the photo."""
        return self.full is not None


@dataclass(frozen=True)
class Header:
    """What an image's header says, read before any pixel is decoded."""

    width: int
    height: int
    alpha: bool  # it may have transparency, so decoding keeps an alpha plane
    # The decoder that gives this input Pillow's pixels fastest (a key of DECODERS).
    decoder: str = "pillow"
    orientation: int = 1  # EXIF orientation (1: upright), as Pillow's exif_transpose reads it


@dataclass(frozen=True)
class Reduction:
    """How much smaller a JPEG may be decoded: by at most ``max_factor`` (2, 4 or 8) a side,
    keeping both sides at least ``min_side`` pixels; a photo whose short side is ``full_from``
    or more is decoded in full."""

    min_side: int
    max_factor: int = 8
    full_from: int | None = None


@dataclass(frozen=True)
class Picture:
    """An answer before encoding: full-size planes, the part of them kept, and its final size.

    ``levels`` is the H×W uint8 map; ``rgb`` (with ``alpha``, the photo's own transparency) is
    set for a cut-out and ``None`` for a map. ``region`` is (left, top, width, height);
    ``size`` (w, h) is the region's own size or smaller (``max_side``). ``binary``: a mask, which
    stays 0/255 when scaled. ``background``: RGBA to put a cut-out on.
    """

    levels: np.ndarray
    rgb: np.ndarray | None
    alpha: np.ndarray | None
    region: tuple[int, int, int, int]
    size: tuple[int, int]
    binary: bool
    background: tuple[int, int, int, int] | None

    @property
    def whole(self) -> bool:
        """The region is the whole image."""
        h, w = self.levels.shape
        return self.region == (0, 0, w, h)

    @property
    def scaled(self) -> bool:
        return self.size != self.region[2:]


class Decoder(Protocol):
    """Bytes whose header was read → pixels, exactly as Pillow's path gives them."""

    name: str

    def decode(self, data: bytes, header: Header) -> DecodedImage | None:
        """The image, or None when this library cannot give Pillow's pixels for this input
        (a damaged file, which Pillow then decodes or refuses as it always did)."""
        ...


class Encoder(Protocol):
    """A :class:`Picture` → the bytes of a PNG, WebP or JPEG."""

    name: str

    def encode(self, picture: Picture, fmt: Format, quality: int) -> bytes: ...


DECODERS = ("turbojpeg", "pillow")
ENCODERS = ("vips", "pillow")
# JPEGs that libjpeg-turbo turns into Pillow's pixels by itself: 8-bit YCbCr, RGB or grey (an
# MPO is a JPEG with more pictures after the first, which is the one read). CMYK and YCCK go
# through their ICC profile in Pillow's path. An ICC profile on an RGB JPEG is not applied on
# either path; EXIF orientation is applied after decoding, from the same tag Pillow reads.
_TURBO_MODES = frozenset({("JPEG", "RGB"), ("JPEG", "L"), ("MPO", "RGB"), ("MPO", "L")})


def choose_decoder(fmt: str | None, mode: str) -> str:
    """The decoder for an input of this format and mode, as its header gives them."""
    return "turbojpeg" if (fmt, mode) in _TURBO_MODES else "pillow"


@cache
def decoder(name: str) -> Decoder:
    """The decoder called ``name``; its library is imported on first use."""
    if name == "turbojpeg":
        from service.images.codecs.turbojpeg import TurboJpegDecoder

        return TurboJpegDecoder()
    if name == "pillow":
        from service.images.codecs.pillow import PillowDecoder

        return PillowDecoder()
    raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {name!r}")


@cache
def encoder(name: str = "vips") -> Encoder:
    """The encoder called ``name`` (default: the fastest, ``vips``)."""
    if name == "vips":
        from service.images.codecs.vips import VipsEncoder

        return VipsEncoder()
    if name == "pillow":
        from service.images.codecs.pillow import PillowEncoder

        return PillowEncoder()
    raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, not {name!r}")
