"""The subject's own colour where a cut-out's alpha is partial.

There the photo's pixel is a mix, ``I = α F + (1 − α) B``, of the subject's colour ``F`` and the
old background's ``B``; a cut-out that keeps ``I`` shows the old background around the subject
on any new page. Each partial pixel's ``F`` is estimated as Bayesian matting does it (Chuang,
Curless, Salesin and Szeliski, 2001), with local colour models made once for the whole photo:

- :func:`models`, from the photo at the working resolution (scaled down, at most
  ``service.images.matte.WORK_PIXELS``): the foreground's mean colour and covariance over the
  pixels that are surely foreground (α = 1, one working pixel in from the edge) in each block of
  4×4 working pixels (``LEVEL``), the background's mean and variance likewise where α = 0; where
  a block holds none, what is around is carried in by pull-push (Gortler et al., 1996: the sure
  pixels summed by halves, then passed back down), which widens the spread by as much as the
  colours it draws from differ.
- :func:`service.images.rim.unmix`, at the photo's own size and only where 0 < α < 1, each pixel
  from its own colour and the models there (bilinearly): first the alpha its colour reads, the
  point on the ray from the background's mean through the pixel that the foreground's model
  finds likeliest; where that is below the given alpha (an alpha too high at the rim, which
  leaves the old background in) the lesser is used, down to ``FLOOR`` of the given one, and as
  far as the two models are apart (``APART``: where the subject looks like the background the
  reading is noise, and the given alpha stands). Then the likeliest foreground and background
  for that alpha, the pixel (noise ``NOISE``) and both models: ``F = μF + ΣF (ΣF + t)⁻¹ (F' −
  μF)``, the colour ``F'`` that unmixes the pixel against the background's mean, drawn towards
  the foreground's mean as far as ``t``, the noise its division by α amplifies, ``(NOISE² +
  (1 − α)² σB²) / α²``, outweighs the foreground's own spread. Where α is near 1 that is the
  photo's pixel; where it is small, the foreground's mean.

Pixels where α is 0 or 1 keep the photo's colour. The work at the photo's size is a pass over
its partial pixels; what it reads is the models, 13 float32 planes on a grid of at most 10 000
pixels. So the stage holds no full-size buffer but the answer's colour, 3 bytes a pixel; the
rest is at the working resolution (the photo in float32, 12 bytes a working pixel: 1.8 MB).
The constants were chosen by ``python -m bench.matting`` (bench/README.md has the figures).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from service.images import rim
from service.images.compiled import compiled

__all__ = ["APART", "FLOOR", "LEVEL", "NOISE", "SPREAD", "Models", "models", "paint"]

# The photo's noise, as a share of the range: how far a pixel may be from its mix of the two
# models by chance. Measured by bench.matting's fringe (synthetic composites: with the true alpha
# / with the matte's): 0.005 gives 1.41 / 4.52, 0.007 1.61 / 4.65, 0.01 1.92 / 4.88; lower lets
# more of an error in the background's model through to the colour, which shows on the horse's
# mane as the field's green between the strands (0.005: faint, 0.007: gone).
NOISE = 0.007
# The least spread of either model (a share of the range, on each channel), so that a model of
# one colour still allows a little: 0.005 1.27 / 4.37 (with NOISE 0.005); 0.02 and 0.05 raise
# the mane's green where the background's model is off.
SPREAD = 0.01
# The least share of the given alpha the colour's reading may bring it down to: 0 and 0.25 give
# the same figures; it keeps a pixel whose colour reads as background (a background unlike its
# model) from being unmixed by a near-zero alpha into a colour of neither.
FLOOR = 0.25
# How far apart (in squared spreads of the foreground's model, D²) the two models' means must be
# for the colour's reading of alpha to count half: it counts D² / (D² + APART). Where the subject
# looks like the background (a face's edge against a pale sky, Composition-1k's JPEG blocks in
# it), the reading follows the noise and showed the working grid's blocks in the colour; 9 (three
# spreads) takes them out and keeps the haze out of a hairline against a grey-mauve wall, which
# 100 lets back in. The synthetic composites are far apart: 4.48 with the matte's alpha with and
# without it (4.50 with 100).
APART = 9.0
# The models' grid: the working grid halved this many times, each of its pixels the mean and
# spread of the sure pixels in its block (at the working resolution's most, 150 000 pixels, a
# block of 4×4 is 10×10 photo pixels at 1 MP, 36×36 at 12 MP). Measured by bench.matting's
# fringe (with the true alpha / the matte's): 1 gives 1.41 / 4.45 but leaves the blocks visible
# in the colour where a noisy alpha is near 1 (a face's edge against a bright sky); 2 1.49 /
# 4.52, 3 1.55 / 4.59; a window of 5×5 working pixels on the working grid instead 1.61 / 4.65.
LEVEL = 2

_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


@dataclass(frozen=True)
class Models:
    """The local colour models at the working resolution (float32, colours in [0, 1]):
    ``foreground`` h×w×9, the mean (R, G, B) then the covariance (RR, RG, RB, GG, GB, BB), its
    diagonal at least ``SPREAD``²; ``background`` h×w×4, the mean then the variance of a channel
    (isotropic), at least ``SPREAD``²."""

    foreground: np.ndarray
    background: np.ndarray


def _known(alpha_w: np.ndarray, level: int) -> np.ndarray:
    """Where ``alpha_w`` (h×w uint8) is surely ``level`` (0 or 255), as float32 weights: one pixel
    in from the edge of such pixels (their edge pixels may be mixes the alpha calls sure), or
    all of them where that leaves none; with none at all, every pixel weighted by its nearness
    to ``level`` squared (a map that never reaches it)."""
    sure = (alpha_w == level).astype(np.uint8)
    inner = cv2.erode(sure, np.ones((3, 3), np.uint8))
    if inner.any():
        return inner.astype(np.float32)
    if sure.any():
        return sure.astype(np.float32)
    near = alpha_w.astype(np.float32) * np.float32(1 / 255)
    return np.square(near if level else 1 - near)


def _resized(x: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """``x`` at ``size`` (w, h), its channel axis kept (OpenCV drops a single channel's), four
    channels at a time (OpenCV's area resize by other than a whole factor takes no more)."""
    if x.ndim == 2:
        return cv2.resize(x, size, interpolation=interpolation).reshape(size[1], size[0])
    parts = [
        cv2.resize(np.ascontiguousarray(x[..., c : c + 4]), size, interpolation=interpolation)
        for c in range(0, x.shape[2], 4)
    ]
    return np.dstack([p.reshape(size[1], size[0], -1) for p in parts])


def _fill(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``values`` (h×w×c float32) where ``weight`` (h×w, in [0, 1]) is 1, blended elsewhere with
    what is around, by pull-push: each coarser level the weighted sum of four (its weight at most
    1), then each finer level its own weighted values plus the coarser one's for the rest."""
    levels = [(values * weight[..., None], weight)]
    while max(levels[-1][1].shape) > 1:
        xs, ws = levels[-1]
        size = (-(-ws.shape[1] // 2), -(-ws.shape[0] // 2))
        xs = _resized(xs, size, cv2.INTER_AREA) * np.float32(4)
        ws = _resized(ws, size, cv2.INTER_AREA) * np.float32(4)
        cap = np.minimum(ws, 1) / np.maximum(ws, 1e-12)
        levels.append((xs * cap[..., None], ws * cap))
    xs, ws = levels.pop()
    out = xs / np.maximum(ws, 1e-12)[..., None]
    for xs, ws in reversed(levels):
        up = _resized(out, (ws.shape[1], ws.shape[0]), cv2.INTER_LINEAR)
        out = xs + (1 - ws)[..., None] * up
    return out.astype(np.float32, copy=False)


@compiled()
def _block_sums(
    image_w: np.ndarray, fg: np.ndarray, bg: np.ndarray, hm: int, wm: int
) -> tuple[np.ndarray, np.ndarray]:
    """Over each of hm×wm blocks of the working grid (pixel (y, x) in block (y·hm // h,
    x·wm // w)), the sums weighted by ``fg`` (h×w float32) of the photo ``image_w``'s (h×w×3)
    channels, their six products and the weights (hm×wm×10), and weighted by ``bg`` of the
    channels, the sum of their squares and the weights (hm×wm×5); in float64, as the covariance
    is a small difference of these."""
    h, w = fg.shape
    fs = np.zeros((hm, wm, 10), np.float64)
    bs = np.zeros((hm, wm, 5), np.float64)
    for y in range(h):
        by = y * hm // h
        for x in range(w):
            bx = x * wm // w
            r, g, b = image_w[y, x, 0], image_w[y, x, 1], image_w[y, x, 2]
            k = fg[y, x]
            if k > 0:
                s = fs[by, bx]
                s[0] += k * r
                s[1] += k * g
                s[2] += k * b
                s[3] += k * r * r
                s[4] += k * r * g
                s[5] += k * r * b
                s[6] += k * g * g
                s[7] += k * g * b
                s[8] += k * b * b
                s[9] += k
            k = bg[y, x]
            if k > 0:
                s = bs[by, bx]
                s[0] += k * r
                s[1] += k * g
                s[2] += k * b
                s[3] += k * (r * r + g * g + b * b)
                s[4] += k
    return fs, bs


def _filled_means(sums: np.ndarray) -> np.ndarray:
    """Block sums (h×w×c, their weights last) as means (h×w×(c − 1) float32), filled where a
    block holds no weight (:func:`_fill`)."""
    count = sums[..., -1]
    means = (sums[..., :-1] / np.maximum(count, 1e-12)[..., None]).astype(np.float32)
    return _fill(means, np.minimum(count, 1).astype(np.float32))


def models(
    image_w: np.ndarray, alpha_w: np.ndarray, *, level: int = LEVEL, spread: float = SPREAD
) -> Models:
    """The foreground's and background's local colour models (:class:`Models`) of the photo
    ``image_w`` (h×w×3 float32 in [0, 1]) with alpha ``alpha_w`` (h×w uint8), both at the
    working resolution: on its grid halved ``level`` times."""
    h, w = alpha_w.shape
    hm, wm = -(-h // 2**level), -(-w // 2**level)
    image_w = np.ascontiguousarray(image_w, np.float32)
    fs, bs = _block_sums(image_w, _known(alpha_w, 255), _known(alpha_w, 0), hm, wm)
    fg, bg = _filled_means(fs), _filled_means(bs)
    cov = fg[..., 3:] - np.dstack([fg[..., a] * fg[..., b] for a, b in _PAIRS])
    floor = np.float32(spread * spread)
    for n in (0, 3, 5):  # the diagonal: RR, GG, BB
        cov[..., n] = np.maximum(cov[..., n], 0) + floor
    foreground = np.dstack([fg[..., :3], cov])
    var = (bg[..., 3] - np.square(bg[..., :3]).sum(axis=2)) * np.float32(1 / 3)
    background = np.dstack([bg[..., :3], np.maximum(var, 0) + floor])
    return Models(np.ascontiguousarray(foreground), np.ascontiguousarray(background))


def paint(
    rgb: np.ndarray,
    alpha: np.ndarray,
    out: np.ndarray,
    m: Models,
    wys: np.ndarray,
    wxs: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
) -> None:
    """Write into ``out`` (H×W×3 uint8) the foreground's colour where 0 < ``alpha`` < 255 (H×W
    uint8) in the blocks of the working pixels (``wys``, ``wxs``) of the photo ``rgb`` (H×W×3
    uint8), from the models ``m`` (:func:`service.images.rim.unmix`; ``rows``/``cols``:
    :func:`service.images.rim.blocks`)."""
    rim.unmix(
        rgb, alpha, out, m.foreground, m.background, wys, wxs, rows, cols, NOISE**2, FLOOR, APART
    )
