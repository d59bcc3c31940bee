"""The subject's box and share, against their definition written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from service.images.box import Box, Subject, fit_size, side_within, subject


def _by_definition(levels: np.ndarray, cutoff: int) -> Subject:
    fg = levels >= cutoff
    if not fg.any():
        return Subject(None, 0.0)
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    box = Box(int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
    return Subject(box, float(np.count_nonzero(fg)) / fg.size)


def _maps() -> list[np.ndarray]:
    rng = np.random.default_rng(15)
    soft = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    blob = np.zeros((40, 61), np.uint8)
    blob[7:19, 30:44] = 200
    blob[25, 2] = 255
    one = np.zeros((9, 9), np.uint8)
    one[8, 0] = 1
    return [
        soft,
        np.where(soft >= 128, 255, 0).astype(np.uint8),  # a mask
        blob,
        one,
        np.zeros((5, 4), np.uint8),
        np.full((3, 7), 255, np.uint8),
        np.full((1, 1), 17, np.uint8),
        soft[3:30:2, 5:50:3],  # a strided view
        soft.T,  # not C-contiguous
    ]


@pytest.mark.parametrize("cutoff", [0, 1, 2, 17, 128, 200, 254, 255, 256])
@pytest.mark.parametrize("index", range(len(_maps())))
def test_subject_is_its_definition(index: int, cutoff: int) -> None:
    levels = _maps()[index]
    got, want = subject(levels, cutoff), _by_definition(levels, cutoff)
    assert got.box == want.box
    assert got.ratio == pytest.approx(want.ratio, rel=1e-12)


@pytest.mark.parametrize(
    ("size", "pixels"),
    [
        ((770, 595), 250_000),
        ((3000, 2000), 250_000),
        ((20_000, 30), 250_000),
        ((6000, 4000), 1_500_000),
    ],
)
def test_side_within_bounds_the_whole_image(size: tuple[int, int], pixels: int) -> None:
    side = side_within(size, size, pixels)
    assert side is not None
    w, h = fit_size(size, side)
    assert w * h <= pixels
    assert (w + 1) * (h + 1) > pixels  # not a row or column smaller than it must be
    assert side_within(size, size, size[0] * size[1]) is None  # already within: no scaling


def test_side_within_keeps_the_wholes_scale_for_a_crop() -> None:
    size, crop = (2000, 1000), (500, 800)  # the whole scaled by 1/2 holds 0.5 MP
    side = side_within(size, crop, 500_000)
    assert side is not None
    assert fit_size(crop, side) == (250, 400)
