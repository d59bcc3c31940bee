"""The network's ``N×1×S×S`` maps back to per-image maps at each image's own size, in numpy and
OpenCV: the CPU's half of the pipeline, which never imports PyTorch. (On a GPU the same steps
run on the device: :mod:`model.torch_stages`, held to these by tests/test_postprocess.py.)"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from model import scratch

__all__ = [
    "finish_on_cpu",
    "from_levels",
    "level_cut",
    "resize_levels",
    "to_levels",
]


def to_levels(maps: np.ndarray) -> np.ndarray:
    """Network maps ``N×1×S×S`` float32 → ``N×S×S`` uint8: the authors' 8-bit step.

    The authors' script min–max normalises each map (a flat map becomes 0) and turns it into 8
    bits (PIL's float-to-L conversion truncates) before resizing it; doing the same is what
    brings the maps within ~1e-4 of theirs. Everything an answer needs from the network is in
    these levels, which is what makes them worth caching. Each step is rounded in float32 as
    PyTorch rounds it, so these are the levels the device-side step gives
    (tests/test_postprocess.py)."""
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    lo = flat.min(axis=1).reshape(n, 1, 1, 1)
    span = np.maximum(flat.max(axis=1).reshape(n, 1, 1, 1) - lo, np.float32(1e-12))
    x = maps - lo
    x /= span
    x *= np.float32(255)
    np.floor(x, out=x)
    return x.astype(np.uint8)[:, 0]


@lru_cache(maxsize=256)
def _taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's anti-aliased bilinear weights for one axis (``F.interpolate(mode="bilinear",
    antialias=True)``, a triangle as wide as the reduction, normalised): for each output pixel
    the source indices (``dst×k``, clamped into the axis where the weight is 0) and weights
    (``dst×k`` float32), in float32 as PyTorch computes them."""
    scale = np.float32(src / dst)
    support = scale if scale >= 1 else np.float32(1)
    inverse = np.float32(1) / scale if scale >= 1 else np.float32(1)
    centre = scale * (np.arange(dst, dtype=np.float32) + np.float32(0.5))
    first = np.maximum((centre - support + np.float32(0.5)).astype(np.int64), 0)
    count = np.minimum((centre + support + np.float32(0.5)).astype(np.int64), src) - first
    k = int(count.max())
    j = np.arange(k, dtype=np.int64)
    x = ((first[:, None] + j).astype(np.float32) - centre[:, None] + np.float32(0.5)) * inverse
    x = np.abs(x)
    w = np.where(x < 1, np.float32(1) - x, np.float32(0)).astype(np.float32)
    w[j[None, :] >= count[:, None]] = 0
    # Summed one tap after another, as PyTorch sums them, then each divided by the sum.
    total = np.zeros(dst, np.float32)
    for t in range(k):
        total += w[:, t]
    w = np.where(total[:, None] != 0, w / np.where(total == 0, 1, total)[:, None], w)
    return np.minimum(first[:, None] + j, src - 1), w.astype(np.float32)


def _reduce_axis(x: np.ndarray, dst: int, axis: int) -> np.ndarray:
    index, weight = _taps(x.shape[axis], dst)
    x = np.moveaxis(x, axis, -1)
    out = x[..., index[:, 0]] * weight[:, 0]
    for t in range(1, index.shape[1]):
        out += x[..., index[:, t]] * weight[:, t]
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def resize_levels(
    levels: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None
) -> np.ndarray:
    """One ``S×S`` uint8 map → the ``H×W`` float32 map in levels (0-255, not rounded).

    An enlargement (no side smaller than S) is OpenCV's bilinear upscale, the same half-pixel
    grid as ``F.interpolate`` with ``align_corners=False``: 12 MP in 18 ms against torch's
    74-94 ms (one thread, bench/README.md); its float arithmetic rounds differently from
    PyTorch's by at most 2.1e-5 of the range. Where any side shrinks, it is the anti-aliased
    bilinear filter the authors' PIL resize stands for, as PyTorch's ``antialias=True`` computes
    it, the width then the height (within 5e-5 levels of it, tests/test_postprocess.py).
    ``out``: where an enlargement is written (an ``H×W`` float32 array), else a new array."""
    import cv2

    h, w = size
    m = levels.astype(np.float32)
    if h >= levels.shape[0] and w >= levels.shape[1]:
        up: np.ndarray = cv2.resize(m, (w, h), out, interpolation=cv2.INTER_LINEAR)
        return up
    return _reduce_axis(_reduce_axis(m, w, 1), h, 0)


def from_levels(levels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One ``S×S`` uint8 map → ``H×W`` float32 in [0, 1].

    The levels are whole numbers, exact in float32, so this gives the same values whether they
    come straight from the network or from a cache."""
    m = resize_levels(levels, size)
    m /= np.float32(255)
    return m


def finish_on_cpu(
    levels: np.ndarray, size: tuple[int, int], *, probability: bool, threshold: float
) -> np.ndarray:
    """One ``S×S`` uint8 map → the ``H×W`` uint8 answer map: the probability's 8-bit levels (the
    map over 255, times 255, rounded to nearest as PIL rounds its resize), or the mask (255
    where the probability is at least ``threshold``, else 0), in OpenCV and numpy.

    The same operations as the device-side path (:mod:`model.torch_stages`), each rounded in
    float32 as it rounds, so the same bytes (tests/test_postprocess.py). The answer's map is
    written into a kept buffer (model/scratch.py)."""
    import cv2

    h, w = size
    # The full-size float map lives for this call only: written into a kept buffer rather than
    # fresh pages (model/scratch.py; 12 MP: 7.3 against 11.5 ms).
    m = resize_levels(levels, size, scratch.array((h, w), np.float32))
    if probability:
        # A band of rows at a time, so that the four passes stay in the CPU's cache (12 MP:
        # 16 against 22 ms); each pixel's arithmetic is the same.
        out = scratch.array((h, w), np.uint8)
        step = max(1, (1 << 16) // w)
        for y in range(0, h, step):
            part = m[y : y + step]
            part /= np.float32(255)
            part *= np.float32(255)
            np.rint(part, out=part)
            out[y : y + step] = np.clip(part, 0, 255, out=part)
        return out
    # 255 where the probability (the level over 255, in float32) is at least the threshold
    # (compared in float32, as PyTorch compares a float32 tensor with a Python number), else 0:
    # the same as the level at least the least float32 whose quotient reaches it, without the
    # division's pass over the full-size map (12 MP: 5 of 15 ms).
    mask = scratch.array((h, w), np.uint8)
    if h * w < 4:  # OpenCV reads an array of a handful of pixels as a scalar
        return np.multiply(m >= level_cut(threshold), np.uint8(255), out=mask, dtype=np.uint8)
    return cv2.compare(m, level_cut(threshold), cv2.CMP_GE, mask)  # type: ignore[call-overload]


def level_cut(threshold: float) -> float:
    """The least float32 level ``x`` (of a map in levels 0-255) with ``float32(x / 255) >=
    float32(threshold)``: division by 255 rounded to float32 never decreases as ``x`` grows, so
    ``x >= level_cut(t)`` is exactly ``x / 255 >= t`` for every float32 ``x``."""
    t, d = np.float32(threshold), np.float32(255)
    if t <= 0:
        return 0.0  # every level, the smallest being 0 (a bilinear blend of levels ≥ 0)
    x = np.float32(t * d)
    down, up = np.float32(-np.inf), np.float32(np.inf)
    while np.nextafter(x, down) / d >= t:
        x = np.nextafter(x, down)
    while x / d < t:
        x = np.nextafter(x, up)
    return float(x)
