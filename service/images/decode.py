"""Bytes → pixels: any common format and mode to 8-bit RGB, upright, within the size limits.

The header is read first (the size limit applies before any pixel is decoded), and names the
decoder of :mod:`service.images.codecs` that gives this input Pillow's pixels fastest; a decoder
that
cannot decode an input cleanly hands it to Pillow, whose answer it was before.
"""

from __future__ import annotations

from service.images.codecs import FORMATS, DecodedImage, Header, Reduction, decoder
from service.images.codecs.pillow import read_header

__all__ = ["FORMATS", "DecodedImage", "Header", "Reduction", "decode", "read_header"]


def decode(
    data: bytes, *, max_pixels: int, header: Header | None = None, reduce: Reduction | None = None
) -> DecodedImage:
    """Decode an uploaded image; 400 if empty, 415 if not a decodable image, 413 if too large.
    ``header``: what :func:`read_header` already read of these bytes, if the caller has it.
    ``reduce``: the photo may be decoded smaller, as far as it allows (JPEG through
    libjpeg-turbo only; the result's ``full`` then gives its size); every other input decodes
    in full, as without it."""
    header = header or read_header(data, max_pixels=max_pixels)
    if reduce is not None and header.decoder == "turbojpeg":
        from service.images.codecs.turbojpeg import TurboJpegDecoder

        reduced = TurboJpegDecoder().decode_reduced(data, header, reduce)
        if reduced is not None:
            return reduced
    elif header.decoder != "pillow":
        image = decoder(header.decoder).decode(data, header)
        if image is not None:
            return image
    image = decoder("pillow").decode(data, header)
    assert image is not None  # Pillow decodes or raises the service's error
    return image
