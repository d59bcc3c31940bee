"""A cut-out's edge: alpha solved from the photo in a band at the subject's boundary, and the
foreground's own colour where alpha is partial.

The network's map is 320×320 scaled up: its edges are ramps that ignore the photo's own edges,
and its colour at the rim is the photo's mix of subject and old background. Two steps fix that:

- :func:`matte`: inside a band around the map's boundary (where the map is unsure, widened by a
  share of the photo's short side), alpha is a colour guided filter of the map (He, Sun and Tang,
  2010), which fits the map in each window as a linear function of the photo's colour, so that
  it follows the photo's edges; outside the band alpha is the map snapped to 0 or 1.
- :func:`foreground`: where 0 < α < 1, the colour written is the foreground's own, estimated
  from local models of the foreground's and the background's colours and the pixel itself
  (:mod:`service.images.foreground`), so that no rim of the old background is left.

Both work at a working resolution of at most ``WORK_PIXELS`` (the photo scaled down): the
filter tile by tile, only on tiles the band reaches, the colour's models on the whole of it. At
the photo's own size, compiled passes (:mod:`service.images.rim`) apply what was solved there
(the filter's coefficients, the colour's models, bilinearly) to the photo's own pixels, only in
the blocks of the working pixels where alpha is partial. So a 12 MP photo costs about what its
boundary costs (the full-size passes beside them are the photo scaled down, by halves, and the
working alpha scaled up). :func:`cutout` does both for a cut-out, the photo scaled down once.
The method and its constants were chosen by ``python -m bench.matting`` (bench/README.md has the
figures).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from model import scratch
from model.cofactors import solve_symmetric3
from service.images import foreground as colour
from service.images import rim

__all__ = [
    "BAND",
    "EPS",
    "RADIUS",
    "Alpha",
    "Band",
    "band",
    "cutout",
    "foreground",
    "matte",
    "warm",
]

# The band's half-width, in shares of the photo's short side (at least 2 pixels), beyond the
# pixels where the map is between UNSURE and 1 - UNSURE: the ceiling's reach (2% each side).
BAND = 0.02
UNSURE = 0.02
# The guided filter's window radius, in the network's pixels at the photo's scale (its long side
# over 320): the window must span the map's ramp, which is as wide as a few of them.
RADIUS = 4.0
# A contrast stretch around 0.5 after the filter (clamped); 1 is none. Measured by bench.matting
# on matting-dev: 2 (REFINE's, below) lowers whole SAD to 93.85 but raises MSE to 308 and the
# edge band's SAD to 33.03; 1 keeps MSE at 295.6 and gives the band's best SAD (32.87).
STRETCH = 1.0
# Then what is within SNAP of 0 or 1 is settled there (the rest stretched to fill the range):
# the box windows' tails, a few hundredths across the whole band. Measured by bench.matting on
# matting-dev: 0 gives whole SAD / MSE 94.66 / 295.6, 0.01 94.52 / 297.3, 0.015 94.46 / 298.1,
# 0.02 94.40 / 298.8 (rembg's alpha matting: 94.47 / 298.4); it also halves the partial pixels
# that the full-size passes and the foreground's colour pay for (12 MP: 2.3 s to 1.1 s).
SNAP = 0.015
EPS = 3e-4  # its regularisation: larger keeps more of the map, smaller follows colour more
# Below this many pixels a photo has no edge worth solving: the map thresholded, the photo's
# colour (found by the OpenAPI fuzzing test: a 1×1 PNG).
_LEAST_PIXELS = 4
TILE = 128  # the side of a tile, at the working resolution
# The working resolution's most pixels: a photo larger is solved scaled down, and what was solved
# applied to its own pixels.
# Measured by bench.matting on matting-dev (SAD / MSE / the edge band's SAD / fringe): 1.5 MP
# 32.87 in the band; 250 000 94.46 / 298.10 / 32.87 / 19.43; 150 000 94.44 / 298.06 / 32.84 /
# 19.18; 100 000 94.46 / 298.05 / 32.85 / 19.65. A 12 MP cut-out's working-resolution passes
# cost about their pixels.
WORK_PIXELS = 150_000


@dataclass(frozen=True)
class Band:
    """Where an edge method works: ``mask`` (H×W bool) and the tiles that hold any of it, as
    (top, left) corners of ``tile``-sized squares."""

    mask: np.ndarray
    tiles: list[tuple[int, int]]
    tile: int


def _radius(share: float, short: int, least: int = 2) -> int:
    return max(least, round(share * short))


def band(soft: np.ndarray, *, width: float = BAND, tile: int = TILE) -> Band:
    """The band around ``soft``'s boundary (``soft``: H×W float32 in [0, 1]): pixels within
    ``width`` × the short side of one where the map is unsure."""
    h, w = soft.shape
    unsure = cv2.inRange(soft, UNSURE, 1 - UNSURE)  # 255 where unsure
    r = _radius(width, min(h, w))
    # A square dilation's cost does not depend on its radius in OpenCV (van Herk's method).
    wide = cv2.dilate(unsure, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1)))
    th, tw = -(-h // tile), -(-w // tile)
    padded = np.zeros((th * tile, tw * tile), np.uint8)
    padded[:h, :w] = wide
    any_in = padded.reshape(th, tile, tw, tile).max(axis=(1, 3))
    tiles = [(int(y) * tile, int(x) * tile) for y, x in zip(*np.nonzero(any_in), strict=True)]
    return Band(wide > 0, tiles, tile)


def _box(x: np.ndarray, r: int) -> np.ndarray:
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def _coefficients(guide: np.ndarray, p: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He, Sun and Tang's colour guided filter of ``p`` (h×w float32) by ``guide`` (h×w×3
    float32 in [0, 1]): the box-averaged ``a`` (3 planes) and ``b`` of ``q = a·I + b``, h×w×4."""
    mean_i = _box(guide, r)
    mean_p = _box(p, r)
    cov_ip = _box(guide * p[..., None], r) - mean_i * mean_p[..., None]
    s00, s01, s02, s11, s12, s22 = (
        _box(guide[..., a] * guide[..., b], r) - mean_i[..., a] * mean_i[..., b] for a, b in _PAIRS
    )
    s00, s11, s22 = s00 + eps, s11 + eps, s22 + eps
    v0, v1, v2 = cov_ip[..., 0], cov_ip[..., 1], cov_ip[..., 2]
    a0, a1, a2 = solve_symmetric3(s00, s01, s02, s11, s12, s22, v0, v1, v2)
    b = mean_p - a0 * mean_i[..., 0] - a1 * mean_i[..., 1] - a2 * mean_i[..., 2]
    return _box(cv2.merge([a0, a1, a2, b]), r)


@dataclass(frozen=True)
class _Grid:
    """The photo's size and the working resolution's, and the way between them."""

    size: tuple[int, int]  # (h, w) of the photo
    work: tuple[int, int]  # (h, w) at the working resolution

    @classmethod
    def of(cls, h: int, w: int, max_pixels: int) -> _Grid:
        s = min(1.0, (max_pixels / (h * w)) ** 0.5)
        return cls((h, w), (max(1, round(h * s)), max(1, round(w * s))))

    @property
    def scaled(self) -> bool:
        return self.size != self.work

    def down(self, x: np.ndarray) -> np.ndarray:
        """``x`` at the working resolution: area averages, first halved while it is three times
        as large (OpenCV halves an even size in a tenth of the time of another ratio: 12 MP to
        250 000 pixels in 4 ms, against 23 in one step; an odd last row or column left out)."""
        if not self.scaled:
            return x
        (lh, lw) = self.work
        while x.shape[0] >= 3 * lh and x.shape[1] >= 3 * lw:
            h, w = x.shape[0] // 2, x.shape[1] // 2
            x = cv2.resize(x[: 2 * h, : 2 * w], (w, h), interpolation=cv2.INTER_AREA)
        return cv2.resize(x, (lw, lh), interpolation=cv2.INTER_AREA)

    def sample(
        self, plane: np.ndarray, rect: tuple[slice, slice], nearest: bool = False
    ) -> np.ndarray:
        """``plane`` (at the working resolution) bilinearly resampled at ``rect``'s pixels."""
        (h, w), (lh, lw) = self.size, self.work
        ys = (np.arange(rect[0].start, rect[0].stop, dtype=np.float32) + 0.5) * (lh / h) - 0.5
        xs = (np.arange(rect[1].start, rect[1].stop, dtype=np.float32) + 0.5) * (lw / w) - 0.5
        map_x = np.broadcast_to(xs[None, :], (ys.size, xs.size))
        map_y = np.broadcast_to(ys[:, None], (ys.size, xs.size))
        interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        return cv2.remap(plane, map_x.copy(), map_y.copy(), interp, borderMode=cv2.BORDER_REPLICATE)


def _levels(q: np.ndarray, stretch: float, snap: float) -> np.ndarray:
    """The filter's output stretched around 0.5, and within ``snap`` of 0 or 1 settled there, as
    8-bit alpha."""
    q = (q - 0.5) * (stretch / (1 - 2 * snap)) + 0.5
    return np.rint(np.clip(q, 0, 1) * 255).astype(np.uint8)


def _up(grid: _Grid, plane: np.ndarray) -> np.ndarray:
    """``plane`` (8-bit, at the working resolution) at the photo's size, each pixel the working
    pixel it falls in (nearest, centres aligned)."""
    h, w = grid.size
    return cv2.resize(plane, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)


@dataclass(frozen=True)
class _Near:
    """Working pixels (``wys``, ``wxs``) whose blocks of the photo's pixels a pass at the
    photo's size visits, and the blocks' bounds (:func:`service.images.rim.blocks`)."""

    wys: np.ndarray
    wxs: np.ndarray
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def of(cls, grid: _Grid, mask: np.ndarray) -> _Near:
        (h, w), (lh, lw) = grid.size, grid.work
        wys, wxs = np.nonzero(mask)
        return cls(wys, wxs, rim.blocks(h, lh), rim.blocks(w, lw))


def _unit(soft: np.ndarray) -> np.ndarray:
    """A map as float32 in [0, 1]: 8-bit levels over 255, or as it is."""
    if soft.dtype == np.uint8:
        return soft.astype(np.float32) * np.float32(1 / 255)
    return soft.astype(np.float32, copy=False)


def _settled(soft: np.ndarray) -> np.ndarray:
    """The map (float32) at 0.5 as 8-bit alpha (0 or 255)."""
    return cv2.compare(soft, 0.5, cv2.CMP_GE)  # type: ignore[call-overload]


def _tiny(soft: np.ndarray, threshold: float) -> np.ndarray:
    """The map at ``threshold`` for a photo of a handful of pixels (OpenCV reads a 1×1 array as
    a scalar)."""
    return np.where(_unit(soft) >= threshold, 255, 0).astype(np.uint8)


def _windows(
    shape: tuple[int, int], b: Band, pad: int
) -> Iterator[tuple[tuple[int, int], tuple[slice, slice], tuple[slice, slice]]]:
    """For each tile of the band: its corner, its padded window, and the tile within it."""
    h, w = shape
    for y, x in b.tiles:
        y0, x0 = max(0, y - pad), max(0, x - pad)
        y1, x1 = min(h, y + b.tile + pad), min(w, x + b.tile + pad)
        ty1, tx1 = min(h, y + b.tile), min(w, x + b.tile)
        inner = (slice(y - y0, ty1 - y0), slice(x - x0, tx1 - x0))
        yield (y, x), (slice(y0, y1), slice(x0, x1)), inner


def matte(
    rgb: np.ndarray,
    soft: np.ndarray,
    *,
    radius: float = RADIUS,
    eps: float = EPS,
    width: float = BAND,
    stretch: float = STRETCH,
    snap: float = SNAP,
    threshold: float = 0.5,
    max_pixels: int = WORK_PIXELS,
) -> np.ndarray:
    """Alpha (H×W uint8) for the photo ``rgb`` (H×W×3 uint8) from its map ``soft`` (H×W, the
    network's map at the photo's size: float32 in [0, 1], or its 8-bit levels); its half-way
    contour is where the map reaches ``threshold``."""
    h, w = soft.shape
    if h * w < _LEAST_PIXELS:  # no edge to solve; OpenCV reads a 1×1 array as a scalar
        return _tiny(soft, threshold)
    grid = _Grid.of(h, w, max_pixels)
    knobs = _Knobs(radius, eps, width, stretch, snap, threshold)
    rgb = np.ascontiguousarray(rgb)
    return _matte(rgb, grid.down(rgb), soft, grid, knobs)[0]


@dataclass(frozen=True)
class _Knobs:
    radius: float = RADIUS
    eps: float = EPS
    width: float = BAND
    stretch: float = STRETCH
    snap: float = SNAP
    threshold: float = 0.5


# ``refine=true``: the same filter over a mask's or a probability's map, with the constants the
# map's refinement was measured with (bench.refine on 100 ECSSD photos: radius 2 and eps 1e-3 at
# about 640 px on the long side, then a contrast stretch of 2, which brings most of the MAE gain,
# the filter the rest and all of max F's). Its radius is in the network's pixels at the photo's
# scale, as RADIUS is: 1.0 is 2 working pixels at 640 px, the least the filter takes anyway.
REFINE = _Knobs(radius=1.0, eps=1e-3, stretch=2.0, snap=0.0)
REFINE_PIXELS = 300_000  # 640×480: the long side of a 4:3 photo at about 640 px


def refine(
    rgb: np.ndarray, soft: np.ndarray, *, knobs: _Knobs = REFINE, max_pixels: int = REFINE_PIXELS
) -> np.ndarray:
    """The map ``soft`` (H×W, float32 in [0, 1] or 8-bit levels) refined with the photo ``rgb``
    (H×W×3 uint8) as guide, as 8-bit levels: the guided filter fitted at a working resolution of
    at most ``max_pixels`` and applied to the photo's own pixels in the band at the map's edge,
    then stretched (``knobs``, :data:`REFINE`); beyond the band the map settled to 0 or 255."""
    h, w = soft.shape
    if h * w < _LEAST_PIXELS:  # no edge to solve; OpenCV reads a 1×1 array as a scalar
        return _levels(_unit(soft), knobs.stretch, knobs.snap)
    grid = _Grid.of(h, w, max_pixels)
    rgb = np.ascontiguousarray(rgb)
    return _matte(rgb, grid.down(rgb), soft, grid, knobs)[0]


def _recentred(soft: np.ndarray, threshold: float) -> np.ndarray:
    """The map (float32 in [0, 1]) with ``threshold`` moved to 0.5, linearly on each side, so
    that the matte's half-way contour is the mask's at that threshold: 0 makes every pixel
    foreground, as it does the mask."""
    if threshold == 0.5:
        return soft
    if threshold <= 0:
        return np.ones_like(soft)
    low = soft * np.float32(0.5 / threshold)
    if threshold >= 1:
        return np.where(soft >= 1, np.float32(1), low).astype(np.float32)
    high = np.float32(0.5) + (soft - np.float32(threshold)) * np.float32(0.5 / (1 - threshold))
    return np.where(soft < threshold, low, high).astype(np.float32)


def _matte(
    rgb: np.ndarray, rgb_w: np.ndarray, soft: np.ndarray, grid: _Grid, k: _Knobs
) -> tuple[np.ndarray, _Near | None]:
    """The matte at the photo's size, and the working pixels in whose blocks it is partial
    (None: the working resolution is the photo's)."""
    soft_w = _recentred(_unit(grid.down(soft)), k.threshold)
    r = max(2, round(k.radius * max(grid.work) / 320))
    b = band(soft_w, width=k.width)
    # Outside the band the coefficients give the settled map (a = 0, b = 0 or 1), so that the
    # band's edge pixels interpolate towards what surrounds them.
    coefs = np.zeros((*grid.work, 4), np.float32)
    coefs[..., 3] = soft_w >= 0.5
    alpha_w = _settled(soft_w)
    for (y, x), win, inner in _windows(grid.work, b, 2 * r + 1):
        guide = rgb_w[win].astype(np.float32) * np.float32(1 / 255)
        got = _coefficients(guide, soft_w[win], r, k.eps)[inner]
        tile = (slice(y, y + got.shape[0]), slice(x, x + got.shape[1]))
        where = b.mask[tile]
        coefs[tile][where] = got[where]
        q = got[..., 3] + (got[..., :3] * guide[inner]).sum(axis=2)
        alpha_w[tile][where] = _levels(q[where], k.stretch, k.snap)
    if not grid.scaled:
        return alpha_w, None
    # At the photo's own size: the working alpha (nearest; beyond the band the map is settled
    # over wide areas, so its threshold at either size is the same), then in the blocks of the
    # working pixels where it is partial (or beside one) the coefficients applied to the photo's
    # own pixels (He and Sun, 2015).
    alpha = _up(grid, alpha_w)
    # (A cross: the same figures in bench.matting as a square, with fewer pixels to visit.)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    near = _Near.of(grid, cv2.dilate(cv2.inRange(alpha_w, 1, 254), cross))
    scale = k.stretch / (1 - 2 * k.snap)
    rim.apply_filter(rgb, alpha, coefs, near.wys, near.wxs, near.rows, near.cols, scale)
    return alpha, near


def foreground(rgb: np.ndarray, alpha: np.ndarray, *, max_pixels: int = WORK_PIXELS) -> np.ndarray:
    """The photo ``rgb`` (H×W×3 uint8) with the foreground's own colour, estimated, where
    0 < ``alpha`` < 255 (``alpha``: H×W uint8); a new array, the same elsewhere."""
    h, w = alpha.shape
    if h * w < _LEAST_PIXELS:
        return rgb.copy()
    grid = _Grid.of(h, w, max_pixels)
    rgb, alpha = np.ascontiguousarray(rgb), np.ascontiguousarray(alpha)
    return _foreground(rgb, grid.down(rgb), alpha, grid.down(alpha), grid)


def _foreground(
    rgb: np.ndarray,
    rgb_w: np.ndarray,
    alpha: np.ndarray,
    alpha_w: np.ndarray,
    grid: _Grid,
    near: _Near | None = None,
) -> np.ndarray:
    """:func:`foreground`, given the photo and its alpha (8-bit) at the working resolution too,
    and perhaps ``near``, the working pixels in whose blocks are all those where alpha is
    partial."""
    # A copy, contiguous as the callers made the photo, in a buffer kept from an earlier
    # request (model/scratch.py): at 12 MP a fresh one is 36 MB of pages to fault in.
    out = scratch.array(rgb.shape, np.uint8)
    np.copyto(out, rgb)
    partial_w = cv2.inRange(alpha_w, 1, 254)
    # Nothing partial at the working resolution: nothing to do (scaled down, a pixel or two of
    # a level or two may be partial in the photo, where its colour does not show).
    if not cv2.countNonZero(partial_w):
        return out
    models = colour.models(rgb_w.astype(np.float32) * np.float32(1 / 255), alpha_w)
    if near is None:  # the working pixels where alpha is partial, and those beside them
        near = _Near.of(grid, cv2.dilate(partial_w, np.ones((3, 3), np.uint8)))
    colour.paint(rgb, alpha, out, models, near.wys, near.wxs, near.rows, near.cols)
    return out


Alpha = Literal["soft", "matte"]


def cutout(
    rgb: np.ndarray,
    levels: np.ndarray,
    alpha: Alpha,
    *,
    threshold: float = 0.5,
    max_pixels: int = WORK_PIXELS,
    **knobs: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A cut-out's alpha and colour (H×W uint8, H×W×3 uint8) from the photo ``rgb`` and its
    map's 8-bit ``levels`` at the photo's size: ``soft``, the map itself, or ``matte``, solved
    (its half-way contour where the map reaches ``threshold``; ``knobs``: :func:`matte`'s), with
    the foreground's colour where alpha is partial; the photo scaled down once for both."""
    h, w = levels.shape
    rgb = np.ascontiguousarray(rgb)  # the compiled passes' one layout
    if h * w < _LEAST_PIXELS:
        a = levels if alpha == "soft" else _tiny(levels, threshold)
        return a, rgb.copy()
    grid = _Grid.of(h, w, max_pixels)
    rgb_w = grid.down(rgb)
    if alpha == "matte":
        a, near = _matte(rgb, rgb_w, levels, grid, _Knobs(**knobs, threshold=threshold))
    else:
        a, near = levels, None
    return a, _foreground(rgb, rgb_w, a, grid.down(a), grid, near)


def warm() -> None:
    """Compile the passes at the photo's size (or load them from numba's cache) before the
    first cut-out asks for them: a cut-out of a small synthetic photo, scaled down to work."""
    side = int(WORK_PIXELS**0.5) + 64
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    disc = np.clip((side / 3 - np.hypot(y - side / 2, x - side / 2)) / 8 + 0.5, 0, 1)
    rgb = np.dstack([disc * 200 + 40, disc * 60 + 100, 220 - disc * 180]).astype(np.uint8)
    levels = np.rint(disc * 255).astype(np.uint8)
    for alpha in ("soft", "matte"):
        cutout(rgb, levels, alpha)
