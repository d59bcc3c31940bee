"""The subject's own colour where alpha is partial (service/images/foreground.py and its pass at
the photo's size, service/images/rim.py's ``unmix``), on synthetic photos whose foreground is
known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.images import foreground as fgmod
from service.images import rim
from service.images.matte import foreground


def scene(h: int, w: int, ramp: float = 12.0) -> tuple[np.ndarray, ...]:
    """A photo (H×W×3 uint8) mixed from a known foreground and background (float, 0-255), both
    smooth colour gradients, across a wavy edge where alpha ramps over ``ramp`` pixels: the
    photo, the foreground, the background and the 8-bit alpha."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fg = np.dstack([200 - 60 * yy / h, 40 + 40 * xx / w, 30 + 0 * xx])
    bg = np.dstack([90 + 0 * xx, 160 + 40 * yy / h, 230 - 30 * xx / w])
    edge = w / 2 + 30 * np.sin(yy / 37)
    alpha = np.rint(np.clip((edge - xx) / ramp + 0.5, 0, 1) * 255).astype(np.uint8)
    a = (alpha / 255.0)[..., None]
    return np.rint(a * fg + (1 - a) * bg).astype(np.uint8), fg, bg, alpha


@pytest.mark.parametrize("max_pixels", [10_000_000, 100_000], ids=["own size", "scaled down"])
def test_a_known_foreground_is_recovered_at_the_photos_size(max_pixels: int) -> None:
    photo, fg, _, alpha = scene(480, 800)
    colour = foreground(photo, alpha, max_pixels=max_pixels).astype(np.float32)
    partial = (alpha > 0) & (alpha < 255)
    err = np.abs(colour - fg).max(axis=2)
    was = np.abs(photo.astype(np.float32) - fg).max(axis=2)
    clear = partial & (alpha >= 26)  # alpha at least 0.1: below, the colour barely shows
    assert was[clear].max() > 150  # the photo's rim is the background, nearly
    # Measured (levels, the worst channel): at most 2.9 (own size) and 3.4 (scaled down) where
    # alpha ≥ 0.1, 3.9 and 4.0 anywhere partial, 0.6 and 0.8 on average, the same levels from a
    # generic x86-64 build (SSE2, no FMA) as from the AVX2 one with FMA. The bounds leave three
    # levels for other CPUs' fused and reordered sums.
    assert err[clear].max() <= 6
    assert err[partial].max() <= 7
    assert err[partial].mean() <= 1.5


def test_pixels_with_alpha_0_or_255_are_untouched() -> None:
    photo, _, _, alpha = scene(240, 400)
    noise = np.random.default_rng(3).integers(0, 256, photo.shape, dtype=np.uint8)
    photo = np.where((alpha == 0)[..., None], noise, photo)  # a busy background
    colour = foreground(photo, alpha, max_pixels=30_000)
    settled = (alpha == 0) | (alpha == 255)
    assert np.array_equal(colour[settled], photo[settled])
    assert not np.array_equal(colour[~settled], photo[~settled])


def _working(
    photo: np.ndarray, alpha: np.ndarray, lh: int, lw: int
) -> tuple[fgmod.Models, np.ndarray, np.ndarray]:
    """The models from the photo scaled to lh×lw, and the blocks of its pixels at its size."""
    h, w = alpha.shape
    photo_w = cv2.resize(photo, (lw, lh), interpolation=cv2.INTER_AREA)
    alpha_w = cv2.resize(alpha, (lw, lh), interpolation=cv2.INTER_AREA)
    m = fgmod.models(photo_w.astype(np.float32) / 255, alpha_w)
    return m, rim.blocks(h, lh), rim.blocks(w, lw)


def test_the_band_limited_colour_is_the_whole_photos_inside_the_band() -> None:
    """The pass visits only the blocks of the working pixels that hold a partial pixel; asked to
    visit every block of the photo it writes the same colours (and nothing else)."""
    photo, _, _, alpha = scene(300, 500)
    lh, lw = 120, 200
    m, rows, cols = _working(photo, alpha, lh, lw)
    of_row = np.repeat(np.arange(lh), np.diff(rows))
    of_col = np.repeat(np.arange(lw), np.diff(cols))
    band = np.zeros((lh, lw), bool)
    ys, xs = np.nonzero((alpha > 0) & (alpha < 255))
    band[of_row[ys], of_col[xs]] = True
    assert band.mean() < 0.2  # a band: a fraction of the photo
    outs = []
    for where in (band, np.ones_like(band)):
        out = photo.copy()
        wys, wxs = np.nonzero(where)
        fgmod.paint(photo, alpha, out, m, wys, wxs, rows, cols)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], photo)


def reference(photo: np.ndarray, alpha: np.ndarray, m: fgmod.Models) -> np.ndarray:
    """The same estimate written plainly over every pixel, in float64: the models sampled
    bilinearly (OpenCV's, centres aligned), the alpha the colour reads (the point on the ray from
    the background's mean through the pixel nearest the foreground's mean, in the metric of its
    covariance, counted as far as the two means are apart in it), and Bayesian matting's system
    for F and B given that alpha (Chuang et al.: the foreground's and background's Gaussians,
    the photo's noise)."""
    h, w = alpha.shape

    def sampled(planes: np.ndarray) -> np.ndarray:
        parts = [
            cv2.resize(np.ascontiguousarray(planes[..., c : c + 3]), (w, h)).reshape(h, w, -1)
            for c in range(0, planes.shape[2], 3)
        ]
        return np.dstack(parts).astype(np.float64).reshape(-1, planes.shape[2])

    fgm, bgm = sampled(m.foreground), sampled(m.background)
    mu_f, mu_b, var_b = fgm[:, :3], bgm[:, :3], bgm[:, 3]
    cov = np.empty((h * w, 3, 3))
    for n, (i, j) in enumerate(((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))):
        cov[:, i, j] = cov[:, j, i] = fgm[:, 3 + n]
    prec_f = np.linalg.inv(cov)
    pixel = photo.reshape(-1, 3) / 255.0
    given = alpha.reshape(-1) / 255.0
    r = pixel - mu_b
    pr = np.einsum("nij,nj->ni", prec_f, r)
    near, towards = (pr * r).sum(1), (pr * (mu_f - mu_b)).sum(1)
    reading = np.where(towards > near, near / np.maximum(towards, 1e-300), 1.0)
    a = np.maximum(np.minimum(given, reading), fgmod.FLOOR * given)
    apart = np.einsum("ni,nij,nj->n", mu_f - mu_b, prec_f, mu_f - mu_b)  # D², in spreads²
    a = given + (a - given) * apart / (apart + fgmod.APART)
    lam, eye = 1 / fgmod.NOISE**2, np.eye(3)
    system = np.zeros((h * w, 6, 6))
    system[:, :3, :3] = prec_f + (lam * a**2)[:, None, None] * eye
    system[:, :3, 3:] = system[:, 3:, :3] = (lam * a * (1 - a))[:, None, None] * eye
    system[:, 3:, 3:] = (1 / var_b + lam * (1 - a) ** 2)[:, None, None] * eye
    rhs = np.concatenate(
        [
            np.einsum("nij,nj->ni", prec_f, mu_f) + (lam * a)[:, None] * pixel,
            mu_b / var_b[:, None] + (lam * (1 - a))[:, None] * pixel,
        ],
        axis=1,
    )
    partial = (given > 0) & (given < 1)
    solved = np.linalg.solve(system[partial], rhs[partial][..., None])[..., 0]
    out = photo.reshape(-1, 3).copy()
    out[partial] = np.rint(np.clip(solved[:, :3], 0, 1) * 255).astype(np.uint8)
    return out.reshape(photo.shape)


def test_the_pass_is_bayesian_matting_with_the_colours_alpha() -> None:
    """The compiled pass (its 3×3 form of the system, float32, fastmath) against the 6×6 system
    solved in float64 over the whole photo, with models whose spread is wide (a textured
    foreground and a busy background) and an alpha too high at the rim, so that the colour's
    reading, the floor and the pull towards the foreground's mean all count."""
    photo, _, _, alpha = scene(150, 250)
    rng = np.random.default_rng(5)
    photo = np.clip(photo + rng.normal(0, 12, photo.shape), 0, 255).astype(np.uint8)
    alpha = np.where((alpha > 0) & (alpha < 255), np.clip(alpha * 1.6, 1, 254), alpha)
    alpha = alpha.astype(np.uint8)
    m, rows, cols = _working(photo, alpha, 60, 100)
    out = photo.copy()
    wys, wxs = np.nonzero(np.ones((60, 100), bool))
    fgmod.paint(photo, alpha, out, m, wys, wxs, rows, cols)
    want = reference(photo, alpha, m)
    diff = np.abs(out.astype(np.int16) - want)
    # Measured: the same levels on every pixel, from the AVX2 build with FMA and from a generic
    # x86-64 one (SSE2, no FMA), float32 against float64. Two levels, and 2% of the partial
    # pixels off at all, leave room for another CPU's fused and reordered sums.
    partial = (alpha > 0) & (alpha < 255)
    assert diff.max() <= 2
    assert (diff.max(axis=2)[partial] > 0).mean() < 0.02
    assert np.array_equal(out[~partial], photo[~partial])


def test_an_alpha_too_high_at_the_rim_does_not_keep_the_old_background() -> None:
    # The matte's alpha is never exact: here it says up to 1.8 times what the photo holds.
    photo, fg, bg, alpha = scene(480, 800)
    high = np.where(alpha < 255, np.clip(alpha * 1.8, 0, 254), 255).astype(np.uint8)
    rim_ = (alpha >= 26) & (alpha <= 230) & (high < 255)
    a = (high / 255.0)[..., None]
    given_alone = np.clip((photo - (1 - a) * bg) / np.maximum(a, 1 / 255), 0, 255)  # true bg
    colour = foreground(photo, high).astype(np.float32)
    # Measured: unmixed with the given alpha alone, up to 84 levels of the background stay in;
    # the colour's reading takes them out, to 2 levels at most (the same from a generic x86-64
    # build). 8 leaves room for other CPUs' rounding.
    assert np.abs(given_alone - fg).max(axis=2)[rim_].max() > 60
    assert np.abs(colour - fg).max(axis=2)[rim_].max() <= 8


@pytest.mark.parametrize("level", [0, 255])
def test_models_of_a_photo_with_no_sure_pixel_are_finite(level: int) -> None:
    """A map that never reaches 255 (or 0): the models are drawn from every pixel, weighted."""
    alpha = np.full((40, 60), 128 if level == 255 else 200, np.uint8)
    alpha[:, :30] = 250 if level == 255 else 5
    image = np.random.default_rng(1).random((40, 60, 3), dtype=np.float32)
    m = fgmod.models(image, alpha)
    assert np.isfinite(m.foreground).all()
    assert np.isfinite(m.background).all()
    assert (m.foreground[..., [3, 6, 8]] >= fgmod.SPREAD**2 * 0.999).all()
    assert (m.background[..., 3] >= fgmod.SPREAD**2 * 0.999).all()
