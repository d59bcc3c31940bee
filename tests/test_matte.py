"""The cut-out's matte and foreground colour (service/images/matte.py) on synthetic photos whose
alpha and foreground are known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.images.matte import foreground, matte

F = np.array([200, 40, 30], np.float32)  # the foreground's colour
B = np.array([250, 250, 250], np.float32)  # the old background: white


def network_like(alpha: np.ndarray) -> np.ndarray:
    """What the network's map looks like at the photo's size: the alpha seen at 320×320
    (smoothed a little, as its edges are) and scaled back up bilinearly."""
    h, w = alpha.shape
    small = cv2.resize(alpha.astype(np.float32), (320, 320), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 1.0)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def composite(alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return np.rint(a * F + (1 - a) * B).astype(np.uint8)


def step(h: int, w: int) -> np.ndarray:
    alpha = np.zeros((h, w), np.float32)
    alpha[:, : w // 2] = 1
    return alpha


@pytest.mark.parametrize("max_pixels", [10_000_000, 100_000], ids=["own size", "scaled down"])
def test_a_hard_edge_stays_hard(max_pixels: int) -> None:
    truth = step(480, 800)
    got = matte(composite(truth), network_like(truth), max_pixels=max_pixels) / 255
    # The map's ramp is ~8 px wide here; the matte follows the photo's one-pixel step, with the
    # filter's box tails beside it (no stretch after the filter: service.images.matte.STRETCH).
    # Measured beyond the step's two columns: 0.110 at the photo's size, 0.106 scaled down, against
    # the map's 0.18; 0.15 leaves 10 levels for other CPUs' float rounding (which moves a level).
    away = np.ones_like(truth, bool)
    away[:, 400 - 1 : 400 + 1] = False
    assert np.abs(got - truth)[away].max() <= 0.15
    soft = network_like(truth)
    assert np.abs(soft - truth)[away].max() > 0.1  # the map itself is not hard (0.18)


def test_a_linear_ramp_of_alpha_is_recovered() -> None:
    h, w = 480, 800
    x = np.arange(w, dtype=np.float32)
    truth = 1 - np.clip((x - 396) / 8, 0, 1)[None, :].repeat(h, 0)  # 1 → 0 over 8 px
    got = matte(composite(truth), network_like(truth)) / 255
    # Measured 0.028 at most (at the ramp's ends) and 0.0005 on average; 0.08 and 0.003 leave
    # headroom for other CPUs' float rounding (a level or two).
    assert np.abs(got - truth).max() <= 0.08
    assert np.abs(got - truth).mean() <= 0.003


def test_the_foregrounds_own_colour_at_the_rim() -> None:
    h, w = 480, 800
    x = np.arange(w, dtype=np.float32)
    truth = 1 - np.clip((x - 396) / 8, 0, 1)[None, :].repeat(h, 0)
    photo = composite(truth)
    alpha = np.rint(truth * 255).astype(np.uint8)
    colour = foreground(photo, alpha).astype(np.float32)
    rim = (truth > 0.1) & (truth < 0.9)
    err = np.abs(colour[rim] - F).max()
    was = np.abs(photo[rim].astype(np.float32) - F).max()
    # The photo's rim is up to 192 levels off (white mixed in); the estimate measured at most
    # 1 level off (the same from a generic x86-64 build as from the AVX2 one); 6 allows for
    # other CPUs' rounding.
    assert was > 100
    assert err <= 6
    # Where alpha is 0 or 1 the photo is left as it is.
    settled = (alpha == 0) | (alpha == 255)
    assert np.array_equal(colour[settled], photo[settled])


def test_an_alpha_too_high_at_the_rim_does_not_keep_the_old_background() -> None:
    # The matte's alpha is never exact: here it says 0.9 where the photo is half background.
    h, w = 480, 800
    x = np.arange(w, dtype=np.float32)
    truth = 1 - np.clip((x - 396) / 8, 0, 1)[None, :].repeat(h, 0)
    photo = composite(truth)
    alpha = np.rint(np.clip(truth * 1.8, 0, 1) * 255).astype(np.uint8)
    rim = (truth > 0.1) & (truth < 0.9) & (alpha < 255)
    a = (alpha / 255.0)[..., None]
    given_alone = (photo - (1 - a) * B) / np.maximum(a, 1 / 255)  # with the true background
    colour = foreground(photo, alpha).astype(np.float32)
    # Measured where alpha is partial: the given alpha alone leaves up to 98 levels of white in,
    # the estimate (the colour's reading of alpha) 30 (its foreground model is drawn from the
    # pixels this alpha calls opaque, the inner ones of them mixes yet at this 8-pixel ramp;
    # blur-fusion's estimate left 48), the same from a generic x86-64 build (SSE2, no FMA) as
    # from the AVX2 one; 40 leaves room for other CPUs' rounding.
    assert np.abs(given_alone[rim] - F).max() >= 80
    assert np.abs(colour[rim] - F).max() <= 40


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 2), (2, 1), (2, 2), (1, 5), (3, 1), (4, 300)])
def test_tiny_photos_get_an_alpha_and_a_colour(h: int, w: int) -> None:
    """No edge to solve in a handful of pixels, but an answer all the same, of the right shape."""
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    soft = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
    alpha = matte(rgb, soft)
    assert alpha.shape == (h, w)
    assert alpha.dtype == np.uint8
    assert foreground(rgb, alpha).shape == (h, w, 3)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_the_matte_is_half_way_where_the_map_reaches_the_threshold(threshold: float) -> None:
    """``threshold`` steers the matte as it steers the mask: on a photo with no edge of its own
    (one colour), alpha crosses one half where the map crosses the threshold."""
    h, w = 200, 400
    soft = np.linspace(1, 0, w, dtype=np.float32)[None, :].repeat(h, 0)  # 1 → 0 across
    rgb = np.full((h, w, 3), 128, np.uint8)
    alpha = matte(rgb, soft, threshold=threshold)
    crossing = int(np.argmax(alpha[h // 2] < 128))
    want = int(np.argmax(soft[h // 2] < threshold))
    # Measured: the same column at 0.5, two columns off at 0.3 and 0.7 (the ramp's slope changes
    # at the threshold, and the filter's windows average across it); four leave room.
    assert abs(crossing - want) <= 4


def test_a_threshold_of_0_keeps_every_pixel() -> None:
    soft = np.linspace(1, 0, 300, dtype=np.float32)[None, :].repeat(100, 0)
    assert (matte(np.full((100, 300, 3), 90, np.uint8), soft, threshold=0) == 255).all()
