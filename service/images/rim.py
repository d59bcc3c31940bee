"""The matte's per-pixel passes at the photo's own size, compiled (numba): what
:mod:`service.images.matte` solved at its working resolution, applied to the photo's own pixels
in the blocks of the working pixels that need it.

In numpy each of these passes is some thirty array operations over the pixels gathered from the
photo, each a trip through memory: at 12 MP (2 million pixels at the rim of a photo scaled up)
about 150 ms; compiled, one pass over each pixel, about a tenth of it. They release the GIL, so
the service's codec threads run them side by side.

The working grid maps to the photo's pixels as OpenCV's ``INTER_NEAREST_EXACT`` does (a photo
pixel belongs to the working pixel its centre falls in: :func:`blocks`), and values between the
working pixels are bilinear, centres aligned, the border replicated (``INTER_LINEAR`` with
``BORDER_REPLICATE``)."""

from __future__ import annotations

import math

import numpy as np

from service.images.compiled import compiled

__all__ = ["ALPHA", "BOTH", "COLOUR", "apply_filter", "blocks", "unmix"]

# How :func:`unmix` unmixes (service.images.matte.UNMIX's names).
ALPHA, COLOUR, BOTH = 0, 1, 2


def blocks(n: int, ln: int) -> np.ndarray:
    """For a side of ``n`` photo pixels over ``ln`` working pixels, the first photo pixel of each
    working pixel's block and one past the last (``ln + 1`` int64): pixel ``i`` is in working
    pixel ``floor((i + 0.5) · ln / n)``."""
    of = np.minimum(((np.arange(n) + 0.5) * (ln / n)).astype(np.int64), ln - 1)
    return np.searchsorted(of, np.arange(ln + 1), side="left").astype(np.int64)


@compiled()
def _corners(n: int, ln: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``n`` photo pixels along a side of ``ln`` working pixels, a bilinear
    sample's two working indices and the second one's weight (centres aligned, the border
    replicated)."""
    i0 = np.empty(n, np.int64)
    i1 = np.empty(n, np.int64)
    t = np.empty(n, np.float32)
    s = ln / n
    for j in range(n):
        f = (j + 0.5) * s - 0.5
        fl = math.floor(f)
        t[j] = f - fl
        i0[j] = min(max(int(fl), 0), ln - 1)
        i1[j] = min(max(int(fl) + 1, 0), ln - 1)
    return i0, i1, t


@compiled(inline="always")
def _row_end(wys: np.ndarray, k: int) -> int:
    """One past the last of the working pixels from ``k`` on in ``wys[k]``'s row (``wys``
    ascending, as ``np.nonzero`` gives them)."""
    end = k
    while end < wys.size and wys[end] == wys[k]:
        end += 1
    return end


@compiled()
def _columns(wxs: np.ndarray, start: int, stop: int, cols: np.ndarray) -> np.ndarray:
    """The photo's columns in the blocks of working columns ``wxs[start:stop]`` (ascending)."""
    n = 0
    for k in range(start, stop):
        n += cols[wxs[k] + 1] - cols[wxs[k]]
    out = np.empty(n, np.int64)
    n = 0
    for k in range(start, stop):
        for x in range(cols[wxs[k]], cols[wxs[k] + 1]):
            out[n] = x
            n += 1
    return out


@compiled(inline="always")
def _level(v: float) -> np.uint8:
    """A value in [0, 1] (clamped) as an 8-bit level, rounded half up."""
    return np.uint8(int(min(max(v, 0.0), 1.0) * 255 + 0.5))


@compiled(inline="always")
def _bilinear(
    plane: np.ndarray,
    c: int,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    w00: float,
    w01: float,
    w10: float,
    w11: float,
) -> float:
    """Channel ``c`` of ``plane`` between four working pixels, by their weights."""
    return (
        plane[y0, x0, c] * w00
        + plane[y0, x1, c] * w01
        + plane[y1, x0, c] * w10
        + plane[y1, x1, c] * w11
    )


@compiled()
def apply_filter(
    rgb: np.ndarray,
    alpha: np.ndarray,
    coefs: np.ndarray,
    wys: np.ndarray,
    wxs: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    scale: float,
) -> None:
    """In the blocks of the working pixels (``wys``, ``wxs``): ``alpha`` (H×W uint8) = the
    guided filter's coefficients ``coefs`` (h×w×4 float32: a for R, G, B, then b) applied to the
    photo ``rgb`` (H×W×3 uint8, over 255), then ``(q - 0.5) · scale + 0.5`` clamped to [0, 1],
    in levels. ``rows``/``cols``: :func:`blocks`."""
    y0s, y1s, tys = _corners(alpha.shape[0], coefs.shape[0])
    x0s, x1s, txs = _corners(alpha.shape[1], coefs.shape[1])
    k255, one = np.float32(1 / 255), np.float32(1)
    k = 0
    while k < wys.size:  # a working row at a time, the photo's rows in order (as they lie)
        end = _row_end(wys, k)
        wy = wys[k]
        for y in range(rows[wy], rows[wy + 1]):
            y0, y1, ty = y0s[y], y1s[y], tys[y]
            for x in _columns(wxs, k, end, cols):
                x0, x1, tx = x0s[x], x1s[x], txs[x]
                w00, w01 = (one - ty) * (one - tx), (one - ty) * tx
                w10, w11 = ty * (one - tx), ty * tx
                q = _bilinear(coefs, 3, y0, y1, x0, x1, w00, w01, w10, w11)
                for c in range(3):
                    v = _bilinear(coefs, c, y0, y1, x0, x1, w00, w01, w10, w11)
                    q += v * rgb[y, x, c] * k255
                alpha[y, x] = _level((q - 0.5) * scale + 0.5)
        k = end


@compiled()
def unmix(
    rgb: np.ndarray,
    alpha: np.ndarray,
    out: np.ndarray,
    f_means: np.ndarray,
    b_means: np.ndarray,
    wys: np.ndarray,
    wxs: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    how: int,
) -> None:
    """In the blocks of the working pixels (``wys``, ``wxs``), where 0 < ``alpha`` < 255: ``out``
    (H×W×3 uint8) = the foreground's colour, from the local means of the foreground and the
    background (``f_means``, ``b_means``: h×w×3 float32 in [0, 1]) and the photo ``rgb``:
    ``f + a ((I - b) - a (f - b))``, with ``a`` the given alpha (``ALPHA``), the one the pixel's
    colour reads off the line from ``b`` to ``f`` (``COLOUR``), or the lesser (``BOTH``)."""
    y0s, y1s, tys = _corners(alpha.shape[0], f_means.shape[0])
    x0s, x1s, txs = _corners(alpha.shape[1], f_means.shape[1])
    k255 = np.float32(1 / 255)
    lw = f_means.shape[1]
    line = np.empty((lw, 6), np.float32)  # both means between two working rows, at one photo row
    k = 0
    while k < wys.size:  # a working row at a time, the photo's rows in order (as they lie)
        end = _row_end(wys, k)
        wy = wys[k]
        lo = max(wxs[k] - 1, 0)
        hi = min(wxs[end - 1] + 2, lw)
        for y in range(rows[wy], rows[wy + 1]):
            y0, y1, ty = y0s[y], y1s[y], tys[y]
            for i in range(lo, hi):
                for c in range(3):
                    line[i, c] = f_means[y0, i, c] + (f_means[y1, i, c] - f_means[y0, i, c]) * ty
                    line[i, c + 3] = (
                        b_means[y0, i, c] + (b_means[y1, i, c] - b_means[y0, i, c]) * ty
                    )
            for x in _columns(wxs, k, end, cols):
                level = alpha[y, x]
                if level == 0 or level == 255:
                    continue
                x0, x1, tx = x0s[x], x1s[x], txs[x]
                f0 = line[x0, 0] + (line[x1, 0] - line[x0, 0]) * tx
                f1 = line[x0, 1] + (line[x1, 1] - line[x0, 1]) * tx
                f2 = line[x0, 2] + (line[x1, 2] - line[x0, 2]) * tx
                b0 = line[x0, 3] + (line[x1, 3] - line[x0, 3]) * tx
                b1 = line[x0, 4] + (line[x1, 4] - line[x0, 4]) * tx
                b2 = line[x0, 5] + (line[x1, 5] - line[x0, 5]) * tx
                r = rgb[y, x, 0] * k255 - b0
                g = rgb[y, x, 1] * k255 - b1
                b = rgb[y, x, 2] * k255 - b2
                d0, d1, d2 = f0 - b0, f1 - b1, f2 - b2
                a = level * k255
                if how != ALPHA:
                    seen = (r * d0 + g * d1 + b * d2) / (d0 * d0 + d1 * d1 + d2 * d2 + 1e-4)
                    seen = min(max(seen, 0.0), 1.0)
                    a = seen if how == COLOUR else min(a, seen)
                out[y, x, 0] = _level(f0 + a * (r - a * d0))
                out[y, x, 1] = _level(f1 + a * (g - a * d1))
                out[y, x, 2] = _level(f2 + a * (b - a * d2))
        k = end
