"""The matte's compiled passes at the photo's size (service/images/rim.py), against the same
arithmetic written plainly in numpy and OpenCV."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.images import rim

RNG = np.random.default_rng(7)


@pytest.mark.parametrize(("n", "ln"), [(10, 10), (4000, 447), (3254, 335), (17, 5), (9, 8)])
def test_blocks_are_opencvs_nearest_exact(n: int, ln: int) -> None:
    """A photo pixel's block is the working pixel OpenCV's INTER_NEAREST_EXACT gives it."""
    bounds = rim.blocks(n, ln)
    of = np.repeat(np.arange(ln), np.diff(bounds))
    plane = np.arange(ln, dtype=np.uint16)[None, :].repeat(2, 0)
    cv = cv2.resize(plane, (n, 2), interpolation=cv2.INTER_NEAREST_EXACT)[0]
    assert bounds[0] == 0
    assert bounds[-1] == n
    assert np.array_equal(of, cv)


def _bilinear(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``plane`` at ``size`` (h, w) bilinearly, centres aligned, the border replicated."""
    h, w = size
    return cv2.resize(plane, (w, h), interpolation=cv2.INTER_LINEAR)


def _every(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    wys, wxs = np.nonzero(np.ones(shape, np.uint8))
    return wys, wxs


def test_the_filter_applied_is_the_coefficients_scaled_up_and_applied() -> None:
    h, w, lh, lw = 90, 130, 20, 31
    rgb = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    coefs = RNG.normal(0, 0.5, (lh, lw, 4)).astype(np.float32)
    alpha = np.zeros((h, w), np.uint8)
    wys, wxs = _every((lh, lw))
    rim.apply_filter(rgb, alpha, coefs, wys, wxs, rim.blocks(h, lh), rim.blocks(w, lw), 1.5)
    c = _bilinear(coefs, (h, w))
    q = (c[..., :3] * (rgb / 255.0)).sum(axis=2) + c[..., 3]
    want = np.rint(np.clip((q - 0.5) * 1.5 + 0.5, 0, 1) * 255)
    assert ((want > 0) & (want < 255)).mean() > 0.2  # a third of the pixels partial
    # Measured: the same levels (float32 against float64, OpenCV's weights); a level leaves room
    # for another CPU's rounding (the pass is compiled with fastmath: its sums may be reordered).
    assert np.abs(alpha.astype(np.int16) - want).max() <= 1


def test_the_filter_visits_only_the_blocks_it_is_given() -> None:
    h, w, lh, lw = 60, 80, 6, 8
    rgb = np.full((h, w, 3), 128, np.uint8)
    coefs = np.zeros((lh, lw, 4), np.float32)
    coefs[..., 3] = 0.5
    alpha = np.full((h, w), 7, np.uint8)
    rows, cols = rim.blocks(h, lh), rim.blocks(w, lw)
    rim.apply_filter(rgb, alpha, coefs, np.array([2]), np.array([5]), rows, cols, 1.0)
    block = (slice(rows[2], rows[3]), slice(cols[5], cols[6]))
    assert (alpha[block] == 128).all()  # 0.5 in levels, rounded half up
    alpha[block] = 7
    assert (alpha == 7).all()


@pytest.mark.parametrize("spread", [0.01, 0.05], ids=["narrow models", "wide models"])
def test_a_known_foreground_is_unmixed(spread: float) -> None:
    """A photo mixed from a known foreground and background, with models whose means are them:
    the foreground comes back wherever alpha is partial (the wider the models' spread, the less
    the pixel's colour is trusted where alpha is small), and nothing else is written."""
    h, w = 40, 50
    f, b = np.array([0.8, 0.2, 0.1], np.float32), np.array([0.1, 0.6, 0.9], np.float32)
    a = np.linspace(0, 1, w, dtype=np.float32)[None, :].repeat(h, 0)
    level = np.rint(a * 255).astype(np.uint8)
    ratio = (level / 255.0)[..., None]
    rgb = np.rint((ratio * f + (1 - ratio) * b) * 255).astype(np.uint8)
    out = np.zeros_like(rgb)
    fg = np.zeros((8, 10, 9), np.float32)
    fg[..., :3] = f
    fg[..., [3, 6, 8]] = spread**2
    bg = np.zeros((8, 10, 4), np.float32)
    bg[..., :3], bg[..., 3] = b, spread**2
    wys, wxs = _every((8, 10))
    rows, cols = rim.blocks(h, 8), rim.blocks(w, 10)
    rim.unmix(rgb, level, out, fg, bg, wys, wxs, rows, cols, 0.007**2, 0.25, 9.0)
    partial = (level > 0) & (level < 255)
    assert not out[~partial].any()
    err = np.abs(out[partial].astype(np.float32) - f * 255)
    # Measured: a level at most with either spread (the photo holds it mixed at a level of 5 up
    # to 250), the same from a generic x86-64 build (SSE2, no FMA) as from the AVX2 one; two
    # leave room for another CPU's rounding.
    assert err.max() <= 2


def test_an_unknown_colour_is_drawn_towards_the_models_mean_where_alpha_is_small() -> None:
    """A pixel that is all background but for a faint alpha holds no sign of the foreground: its
    colour is the foreground's mean, not the noise in the pixel divided by a small alpha."""
    f, b = np.array([0.8, 0.2, 0.1], np.float32), np.array([0.1, 0.6, 0.9], np.float32)
    rng = np.random.default_rng(2)
    rgb = np.clip(b * 255 + rng.normal(0, 3, (20, 30, 3)), 0, 255).astype(np.uint8)
    level = np.full((20, 30), 3, np.uint8)  # alpha 0.012: the photo's noise is 5 times that
    fg = np.zeros((2, 3, 9), np.float32)
    fg[..., :3], fg[..., [3, 6, 8]] = f, 0.05**2
    bg = np.zeros((2, 3, 4), np.float32)
    bg[..., :3], bg[..., 3] = b, 0.01**2
    out = np.zeros_like(rgb)
    wys, wxs = _every((2, 3))
    rows, cols = rim.blocks(20, 2), rim.blocks(30, 3)
    rim.unmix(rgb, level, out, fg, bg, wys, wxs, rows, cols, 0.007**2, 0.25, 9.0)
    # Measured: within 2.5 levels of the mean (the same from a generic x86-64 build as from the
    # AVX2 one); divided by the alpha, the noise (3 levels) would be 255. 6 leaves room.
    assert np.abs(out.astype(np.float32) - f * 255).max() <= 6


def test_where_the_subject_looks_like_the_background_the_given_alpha_stands() -> None:
    """Models whose means are a spread apart (skin against a pale sky): the colour's reading of
    alpha follows the photo's noise there, so it barely counts, and a noisy pixel keeps about
    the colour it has instead of one unmixed by an alpha read off its noise."""
    f, b = np.array([0.80, 0.70, 0.65], np.float32), np.array([0.84, 0.74, 0.70], np.float32)
    rng = np.random.default_rng(4)
    given = 0.9
    mix = given * f + (1 - given) * b
    rgb = np.clip(mix * 255 + rng.normal(0, 3, (20, 30, 3)), 0, 255).astype(np.uint8)
    level = np.full((20, 30), round(given * 255), np.uint8)
    outs = []
    for spread in (0.05, 0.002):  # the means a spread apart, then twenty
        fg = np.zeros((2, 3, 9), np.float32)
        fg[..., :3], fg[..., [3, 6, 8]] = f, spread**2
        bg = np.zeros((2, 3, 4), np.float32)
        bg[..., :3], bg[..., 3] = b, 0.01**2
        out = np.zeros_like(rgb)
        wys, wxs = _every((2, 3))
        rows, cols = rim.blocks(20, 2), rim.blocks(30, 3)
        rim.unmix(rgb, level, out, fg, bg, wys, wxs, rows, cols, 0.007**2, 0.25, 9.0)
        outs.append(np.abs(out.astype(np.float32) - rgb).max())
    # Measured (three seeds): 2 levels from the photo's pixel at most where the means are a
    # spread apart; 10 to 12 where they are twenty apart and the reading counts (the noise read
    # as alpha), the same from a generic x86-64 build as from the AVX2 one. 5 and 8 leave room
    # for other CPUs' rounding.
    assert outs[0] <= 5
    assert outs[1] >= 8


def test_the_passes_run_where_numba_can_keep_no_cache() -> None:
    """On a read-only file system numba finds nowhere to keep its cache and refuses a function
    asked to cache outright (the Kubernetes manifest's read-only root, with no NUMBA_CACHE_DIR):
    the passes are then compiled in the process. Here numba is told to look only where a script
    never has a cache (IPython's cells), as it would find nothing on such a file system."""
    code = "from service.images.matte import warm; warm(); print('warm')"
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "IPythonCacheLocator"}
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "warm"
