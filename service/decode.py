"""Bytes → pixels: any common format and mode to 8-bit RGB, upright, within the size limits."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from service.errors import BadRequest, ImageTooLarge, UnsupportedImage

__all__ = ["FORMATS", "DecodedImage", "Header", "decode", "read_header"]

# What PIL may try: the formats browsers and cameras produce. Exotic plugins stay off.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_WHITE = 255


@dataclass(frozen=True)
class DecodedImage:
    """``rgb``: colour as decoded (H×W×3 uint8); ``alpha``: its transparency, if it had any;
    ``model_rgb``: what the network sees (transparent parts over white)."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    model_rgb: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.rgb.shape[1], self.rgb.shape[0]


@dataclass(frozen=True)
class Header:
    """What an image's header says, read before any pixel is decoded."""

    width: int
    height: int
    alpha: bool  # it may have transparency, so decoding keeps an alpha plane


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


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
    """Size and transparency from the header alone (cheap), with :func:`decode`'s errors."""
    with _decoding():
        im = _open(data, max_pixels)
        alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
        return Header(im.size[0], im.size[1], alpha)


def decode(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode an uploaded image; 400 if empty, 415 if not a decodable image, 413 if too large."""
    with _decoding():
        im = _open(data, max_pixels)
        im.load()
        # In place and without same-mode conversions: each copy would be a full-size image.
        ImageOps.exif_transpose(im, in_place=True)
        im = _normalise_mode(im)
    arr = np.array(im)  # a writable copy: torch.from_numpy refuses read-only buffers
    del im  # PIL's own buffer (4 bytes a pixel) goes before the next full-size array
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
def _decoding() -> Iterator[None]:
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
