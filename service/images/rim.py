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

__all__ = ["apply_filter", "blocks", "unmix"]


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


# The colour's passes are compiled with NumPy's error model: Python's checks each division for
# zero (none can be: alpha is at least FLOOR of a level, the determinant at least the spread's),
# and its branch keeps LLVM from vectorising the loop over a chunk's pixels (12 MP, 2.5 million
# partial pixels: 57 against 94 ms, eight pixels at a time with AVX2).
_CHUNK = 256  # pixels gathered before the math runs over them: their planes stay in L1 (17 KB)


@compiled(error_model="numpy")
def _colours(
    v: np.ndarray, n: int, noise2: np.float32, floor: np.float32, apart: np.float32, f: np.ndarray
) -> None:
    """The foreground's colour (``f``: 3×n float32) of ``n`` pixels held as planes (``v``: 17×n
    float32): the foreground's model (mean, then covariance RR RG RB GG GB BB), the background's
    (mean, then a channel's variance), the pixel's colour and its given alpha, all in [0, 1]."""
    one = np.float32(1)
    for i in range(n):
        f0, f1, f2 = v[0, i], v[1, i], v[2, i]
        s00, s01, s02, s11, s12, s22 = v[3, i], v[4, i], v[5, i], v[6, i], v[7, i], v[8, i]
        b0, b1, b2, vb = v[9, i], v[10, i], v[11, i], v[12, i]
        i0, i1, i2, given = v[13, i], v[14, i], v[15, i], v[16, i]
        # The foreground's covariance's adjugate (its inverse times its determinant).
        a00, a11, a22 = s11 * s22 - s12 * s12, s00 * s22 - s02 * s02, s00 * s11 - s01 * s01
        a01, a02, a12 = s02 * s12 - s01 * s22, s01 * s12 - s02 * s11, s01 * s02 - s00 * s12
        # The alpha the colour reads: along the ray r from the background's mean through the
        # pixel, the point nearest the foreground's mean in its own metric; it counts where it
        # is below 1 (and it is above 0 then, both forms being positive), down to floor × given,
        # and as far as the two means are apart in that metric (D², squared spreads): by
        # D² / (D² + apart), so that where the subject looks like the background (a face against
        # a pale sky) the given alpha stands.
        r0, r1, r2 = i0 - b0, i1 - b1, i2 - b2
        m0, m1, m2 = f0 - b0, f1 - b1, f2 - b2
        p0 = a00 * r0 + a01 * r1 + a02 * r2
        p1 = a01 * r0 + a11 * r1 + a12 * r2
        p2 = a02 * r0 + a12 * r1 + a22 * r2
        near = p0 * r0 + p1 * r1 + p2 * r2
        towards = p0 * m0 + p1 * m1 + p2 * m2
        reading = near / max(towards, np.float32(1e-30))
        a = min(given, reading) if towards > near else given
        a = max(a, floor * given)
        det_s = s00 * a00 + s01 * a01 + s02 * a02
        d2 = (  # D² × det S
            m0 * (a00 * m0 + a01 * m1 + a02 * m2)
            + m1 * (a01 * m0 + a11 * m1 + a12 * m2)
            + m2 * (a02 * m0 + a12 * m1 + a22 * m2)
        )
        a = given + (a - given) * d2 / (d2 + apart * det_s)
        # The colour d + μF that unmixes the pixel against the background's mean, less its
        # excess over the foreground's mean as far as the noise t outweighs the spread S:
        # F = μF + S (S + t)⁻¹ d, with (S + t)⁻¹ from S's adjugate (Cayley-Hamilton: adj(S + t)
        # = adj S + t (tr S − S) + t², det(S + t) = det S + t tr adj S + t² tr S + t³).
        b = one - a
        inv = one / a
        t = (noise2 + b * b * vb) * inv * inv
        d0, d1, d2 = (i0 - b * b0) * inv - f0, (i1 - b * b1) * inv - f1, (i2 - b * b2) * inv - f2
        tr = s00 + s11 + s22
        tt = t * t
        m00, m11, m22 = (
            a00 + t * (tr - s00) + tt,
            a11 + t * (tr - s11) + tt,
            a22 + t * (tr - s22) + tt,
        )
        m01, m02, m12 = a01 - t * s01, a02 - t * s02, a12 - t * s12
        det = det_s + t * (a00 + a11 + a22) + tt * tr + tt * t
        q = one / det
        z0 = (m00 * d0 + m01 * d1 + m02 * d2) * q
        z1 = (m01 * d0 + m11 * d1 + m12 * d2) * q
        z2 = (m02 * d0 + m12 * d1 + m22 * d2) * q
        f[0, i] = f0 + s00 * z0 + s01 * z1 + s02 * z2
        f[1, i] = f1 + s01 * z0 + s11 * z1 + s12 * z2
        f[2, i] = f2 + s02 * z0 + s12 * z1 + s22 * z2


@compiled(error_model="numpy")
def _flush(
    v: np.ndarray,
    n: int,
    noise2: np.float32,
    floor: np.float32,
    apart: np.float32,
    f: np.ndarray,
    xs: np.ndarray,
    y: int,
    out: np.ndarray,
) -> None:
    """:func:`_colours` of the ``n`` pixels gathered, written to ``out`` at row ``y``, columns
    ``xs``."""
    _colours(v, n, noise2, floor, apart, f)
    for i in range(n):
        x = xs[i]
        out[y, x, 0] = _level(f[0, i])
        out[y, x, 1] = _level(f[1, i])
        out[y, x, 2] = _level(f[2, i])


@compiled(error_model="numpy")
def unmix(
    rgb: np.ndarray,
    alpha: np.ndarray,
    out: np.ndarray,
    fg: np.ndarray,
    bg: np.ndarray,
    wys: np.ndarray,
    wxs: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    noise2: float,
    floor: float,
    apart: float,
) -> None:
    """In the blocks of the working pixels (``wys``, ``wxs``), where 0 < ``alpha`` < 255: ``out``
    (H×W×3 uint8) = the foreground's colour estimated from the photo ``rgb`` and the local colour
    models (:mod:`service.images.foreground`), bilinearly between the pixels of the models' grid
    (coarser than the working one): ``fg`` (h×w×9 float32: mean, then covariance RR RG RB GG GB
    BB) and ``bg`` (h×w×4: mean, then a channel's variance). The alpha used is the given one or,
    where less, the one the pixel's colour reads (at least ``floor`` of the given one, and by
    how far apart the models are, ``apart``: see :func:`_colours`); ``noise2``: the photo's
    noise variance. Pixels are gathered a chunk at a time (the models
    interpolated, the photo's colour and alpha) and the math run over the chunk."""
    y0s, y1s, tys = _corners(alpha.shape[0], fg.shape[0])
    x0s, x1s, txs = _corners(alpha.shape[1], fg.shape[1])
    k255 = np.float32(1 / 255)
    # float32 throughout: no widening
    n2, least, far = np.float32(noise2), np.float32(floor), np.float32(apart)
    line = np.empty((fg.shape[1], 13), np.float32)  # both models between two rows, at a photo row
    v = np.empty((17, _CHUNK), np.float32)
    f = np.empty((3, _CHUNK), np.float32)
    xs = np.empty(_CHUNK, np.int64)
    k = 0
    while k < wys.size:  # a working row at a time, the photo's rows in order (as they lie)
        end = _row_end(wys, k)
        wy = wys[k]
        # The models' columns the blocks' photo pixels fall between.
        lo = x0s[cols[wxs[k]]]
        hi = x1s[cols[wxs[end - 1] + 1] - 1] + 1
        for y in range(rows[wy], rows[wy + 1]):
            y0, y1, ty = y0s[y], y1s[y], tys[y]
            for i in range(lo, hi):
                for c in range(9):
                    line[i, c] = fg[y0, i, c] + (fg[y1, i, c] - fg[y0, i, c]) * ty
                for c in range(4):
                    line[i, 9 + c] = bg[y0, i, c] + (bg[y1, i, c] - bg[y0, i, c]) * ty
            n = 0
            for x in _columns(wxs, k, end, cols):
                level = alpha[y, x]
                if level == 0 or level == 255:
                    continue
                x0, x1, tx = x0s[x], x1s[x], txs[x]
                for c in range(13):
                    v[c, n] = line[x0, c] + (line[x1, c] - line[x0, c]) * tx
                v[13, n] = rgb[y, x, 0] * k255
                v[14, n] = rgb[y, x, 1] * k255
                v[15, n] = rgb[y, x, 2] * k255
                v[16, n] = level * k255
                xs[n] = x
                n += 1
                if n == _CHUNK:
                    _flush(v, n, n2, least, far, f, xs, y, out)
                    n = 0
            _flush(v, n, n2, least, far, f, xs, y, out)
        k = end
