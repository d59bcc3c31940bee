"""Pillow: the header reader, the decoder of every format and mode, and the reference encoder.

Pillow stays where it is the one that reads an odd format (palettes, 16-bit, CMYK through its ICC
profile, TIFF, GIF), and its encoder is the reference whose pixels the faster ones must give.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from service.errors import BadRequest, ImageTooLarge, UnsupportedImage
from service.images.codecs import (
    FORMATS,
    DecodedImage,
    Format,
    Header,
    Picture,
    choose_decoder,
)

__all__ = [
    "PillowDecoder",
    "PillowEncoder",
    "compose_rgba",
    "decoding",
    "finish",
    "read_header",
    "save",
]

_WHITE = 255
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Lanczos, after a box reduction by a whole factor while the image stays over twice the target
# size (Pillow's reducing_gap=2): close to Lanczos over the whole image, and half the time of it
# for a 12 MP cut-out scaled to 1024 (bench/README.md). A gap of 3 reduced nothing there.
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 2.0


# -- header and decoding -------------------------------------------------------------------------


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth grey ("I;16", "I", "F") scaled to "L" rather than clipped."""
    arr = np.asarray(im)
    if im.mode == "F":
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        scale = 255.0 if peak <= 1.0 else 255.0 / peak
        out = np.nan_to_num(arr * scale)
    else:
        peak = int(arr.max()) if arr.size else 0
        out = arr / 257.0 if peak > 255 else arr.astype(np.float64)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """Through the embedded ICC profile when there is one, so colours look as in a viewer."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(
                im, src, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
            if out is not None:
                return out
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain conversion below
    return im.convert("RGB")


def _normalise_mode(im: Image.Image) -> Image.Image:
    """Any PIL mode → "RGB" or "RGBA"."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _to_8bit(im).convert("RGB")
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im)
    if im.mode == "P" and "transparency" in im.info:
        return im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        return im if im.mode == "RGBA" else im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read; 400/413/415 as :func:`decode`."""
    if not data:
        raise BadRequest("the image is empty")
    im: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
    width, height = im.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if width < 1 or height < 1:
        raise UnsupportedImage(f"the image has no pixels ({width}×{height})")
    return im


def read_header(data: bytes, *, max_pixels: int) -> Header:
    """Size, transparency and the decoder to use, from the header alone (cheap); 400 if empty,
    415 if not an image in a supported format, 413 if too large."""
    with decoding():
        im = _open(data, max_pixels)
        alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
        chosen = choose_decoder(im.format, im.mode)
        # The tag exif_transpose would read (EXIF, else XMP); only needed where Pillow does not
        # decode, and parsed only then.
        orientation = 1 if chosen == "pillow" else int(im.getexif().get(0x0112, 1) or 1)
        return Header(im.size[0], im.size[1], alpha, chosen, orientation)


class PillowDecoder:
    """Every format and mode Pillow reads, normalised to 8-bit RGB (+ alpha), upright."""

    name = "pillow"

    def decode(self, data: bytes, header: Header) -> DecodedImage:
        with decoding():
            im = _open(data, header.width * header.height)
            im.load()
            # In place and without same-mode conversions: each copy would be a full-size image.
            ImageOps.exif_transpose(im, in_place=True)
            im = _normalise_mode(im)
        arr = np.array(im)  # a writable copy, as every decoder gives
        del im  # PIL's own buffer (4 bytes a pixel) goes before the next full-size array
        return finish(arr)


def finish(arr: np.ndarray) -> DecodedImage:
    """H×W×3 or H×W×4 uint8 → the decoded image, its transparent parts over white for the
    network."""
    if arr.shape[2] == 3:
        return DecodedImage(rgb=arr, alpha=None, model_rgb=arr)
    rgb, alpha = np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3])
    del arr
    return DecodedImage(rgb=rgb, alpha=alpha, model_rgb=_over_white(rgb, alpha))


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colour composited over white, a band of rows at a time so that the 16-bit
    intermediates stay small whatever the image's size."""
    out = np.empty_like(rgb)
    step = max(1, (1 << 20) // max(1, rgb.shape[1]))
    for top in range(0, rgb.shape[0], step):
        a = alpha[top : top + step, :, None].astype(np.uint16)
        band = rgb[top : top + step] * a
        band += _WHITE * (255 - a) + 127
        band //= 255
        out[top : top + step] = band
    return out


@contextmanager
def decoding() -> Iterator[None]:
    """PIL's errors as the service's 413/415; PIL's own bomb warning silenced (our limit
    applies before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageTooLarge(str(exc)) from exc
        raise UnsupportedImage(
            f"not an image in a supported format ({', '.join(FORMATS)})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnsupportedImage(f"the image could not be decoded: {exc}") from exc


# -- composing and encoding ----------------------------------------------------------------------


def save(im: Image.Image, fmt: Format, quality: int) -> bytes:
    """The reference encoder settings."""
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


def _rows_cols(p: Picture) -> tuple[slice, slice]:
    left, top, width, height = p.region
    return slice(top, top + height), slice(left, left + width)


def compose_rgba(p: Picture) -> np.ndarray:
    """The cut-out's region as RGBA, colour zeroed under alpha 0 (numpy: the reference)."""
    assert p.rgb is not None
    rows, cols = _rows_cols(p)
    rgb = p.rgb if p.whole else p.rgb[rows, cols]
    levels = p.levels if p.whole else p.levels[rows, cols]
    alpha = levels if p.alpha is None else np.minimum(levels, p.alpha[rows, cols])
    rgba = np.dstack((rgb, alpha))
    # Colour under alpha 0 is invisible; zeroing it halves PNG encoding time and makes a
    # photo's cut-out several times smaller.
    rgba[alpha == 0] = 0
    return rgba


def finish_cutout(im: Image.Image, p: Picture) -> Image.Image:
    """A cut-out's RGBA region → the answer's image: scaled down, then put on its background."""
    if p.scaled:  # Pillow resamples RGBA premultiplied, so no dark fringes
        im = im.resize(p.size, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    bg = p.background
    if bg is None:
        return im
    if bg[3] == 255:
        canvas = Image.new("RGB", im.size, bg[:3])
        canvas.paste(im, mask=im.getchannel("A"))
        return canvas
    return Image.alpha_composite(Image.new("RGBA", im.size, bg), im)


def finish_map(im: Image.Image, p: Picture) -> Image.Image:
    """A map's region → the answer's image: scaled down, a mask kept binary."""
    if p.scaled:
        im = im.resize(p.size, _RESAMPLE, reducing_gap=_REDUCING_GAP)
        if p.binary:  # a mask stays binary: the resampled map at half-way
            im = im.point(lambda v: 255 if v >= 128 else 0)
    return im


class PillowEncoder:
    """Today's answers, byte for byte: numpy composes, Pillow scales and encodes."""

    name = "pillow"

    def encode(self, picture: Picture, fmt: Format, quality: int) -> bytes:
        return save(self.image(picture), fmt, quality)

    def image(self, p: Picture) -> Image.Image:
        if p.rgb is None:
            rows, cols = _rows_cols(p)
            levels = p.levels if p.whole else p.levels[rows, cols]
            return finish_map(Image.fromarray(levels, "L"), p)
        return finish_cutout(Image.fromarray(compose_rgba(p), "RGBA"), p)
