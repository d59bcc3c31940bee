"""The mask's map back keeps its bytes: ``finish_on_cpu`` compares the upscaled levels with
:func:`model.postprocess.level_cut` instead of dividing the full-size map by 255 and comparing
the quotient with the threshold. The two must agree on every pixel, for every map, size and
threshold (the division rounds in float32, so the cut is found in float32, not as t × 255)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from model.postprocess import finish_on_cpu, level_cut

THRESHOLDS = [0.0, 1e-9, 1 / 255, 0.25, 0.5, 127 / 255, 128 / 255, 0.7, 254 / 255, 0.9999, 1.0]
SIZES = [(320, 320), (321, 320), (320, 977), (480, 640), (641, 1283), (1001, 333)]


def _before(levels: np.ndarray, size: tuple[int, int], threshold: float) -> np.ndarray:
    """The mask as finish_on_cpu made it before: the quotient compared with the threshold."""
    h, w = size
    m = cv2.resize(levels.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    m /= np.float32(255)
    return cv2.compare(m, float(np.float32(threshold)), cv2.CMP_GE)  # type: ignore[call-overload]


def _maps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(34)
    noise = rng.integers(0, 256, (320, 320), dtype=np.uint8)
    smooth = cv2.GaussianBlur(noise, (0, 0), 12)
    smooth = cv2.normalize(smooth, None, 0, 255, cv2.NORM_MINMAX)
    yy, xx = np.mgrid[:320, :320]
    disc = np.where((yy - 150) ** 2 + (xx - 170) ** 2 < 90**2, 255, 0).astype(np.uint8)
    one = np.zeros((320, 320), np.uint8)
    one[200, 17] = 255
    ramp = (xx * 255 // 319).astype(np.uint8)  # every level, next to its neighbours
    ties = np.where((yy + xx) % 2 == 0, 127, 128).astype(np.uint8)  # halfway blends
    return {
        "random": noise,
        "smooth": smooth,
        "disc": disc,
        "soft disc": cv2.GaussianBlur(disc, (0, 0), 3),
        "all 0": np.zeros((320, 320), np.uint8),
        "all 255": np.full((320, 320), 255, np.uint8),
        "one pixel": one,
        "corner pixel": np.pad(np.full((1, 1), 255, np.uint8), ((0, 319), (319, 0))),
        "ramp": ramp,
        "ties": ties,
    }


MAPS = _maps()


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("size", SIZES)
def test_masks_are_the_bytes_of_the_division(name: str, size: tuple[int, int]) -> None:
    levels = MAPS[name]
    for threshold in THRESHOLDS:
        got = finish_on_cpu(levels, size, probability=False, threshold=threshold)
        assert got is not None
        np.testing.assert_array_equal(got, _before(levels, size, threshold), err_msg=str(threshold))


def test_random_thresholds_and_a_large_map() -> None:
    rng = np.random.default_rng(7)
    levels = MAPS["random"]
    for threshold in rng.random(25):
        got = finish_on_cpu(levels, (1500, 2000), probability=False, threshold=float(threshold))
        np.testing.assert_array_equal(got, _before(levels, (1500, 2000), float(threshold)))


def test_the_cut_is_exact_for_every_level_and_many_thresholds() -> None:
    """Around the cut, every float32 level on either side gives the same answer both ways."""
    rng = np.random.default_rng(3)
    d = np.float32(255)
    for threshold in [*THRESHOLDS, *rng.random(200)]:
        t, cut = np.float32(threshold), np.float32(level_cut(float(threshold)))
        near = [cut]
        for _ in range(4):
            near.append(np.nextafter(near[-1], np.float32(np.inf)))
        below = [cut]
        for _ in range(4):
            below.append(np.nextafter(below[-1], np.float32(-np.inf)))
        for x in [*near, *below[1:], *np.arange(256, dtype=np.float32)]:
            if x < 0:
                continue  # a blend of levels is never below 0 (the cut of t = 0 is 0)
            assert (x >= cut) == (np.float32(x) / d >= t), (threshold, x)
