"""The network's ``N×1×S×S`` maps back to per-image maps at each image's own size."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model import scratch

__all__ = [
    "finish_on_cpu",
    "from_levels",
    "level_cut",
    "levels_on_cpu",
    "minmax",
    "resize_map",
    "resize_maps",
    "to_levels",
    "to_mask",
    "to_probability",
]


def minmax(maps: Tensor) -> Tensor:
    """Per-image min–max normalisation to [0, 1], as the authors do (a flat map becomes 0)."""
    flat = maps.flatten(1).float()
    lo = flat.amin(dim=1).view(-1, 1, 1, 1)
    hi = flat.amax(dim=1).view(-1, 1, 1, 1)
    return (maps.float() - lo) / (hi - lo).clamp(min=1e-12)


# Reductions stronger than this (320 → fewer than 20 pixels) are done on the CPU on CUDA hosts.
_CUDA_MIN_SCALE = 1 / 16


def resize_map(m: Tensor, size: tuple[int, int]) -> Tensor:
    """One ``1×S×S`` map → ``H×W``. Bilinear with anti-aliasing when shrinking, like the authors'
    PIL ``resize(BILINEAR)``; a plain bilinear upscale otherwise."""
    if m.device.type == "cpu" and size[0] >= m.shape[-2] and size[1] >= m.shape[-1]:
        return _upscale_on_cpu(m[0], size)
    if (
        m.device.type == "cuda"
        and min(size[0] / m.shape[-2], size[1] / m.shape[-1]) < _CUDA_MIN_SCALE
    ):
        # CUDA's anti-aliased kernel holds a filter as wide as the reduction in shared memory
        # and refuses a 320 → 1 reduction (84 kB against 48 kB, on an H200); such a map is at
        # most a few rows or columns, cheap on the CPU.
        return resize_map(m.cpu(), size).to(m.device)
    out = F.interpolate(m[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0]


def _upscale_on_cpu(m: Tensor, size: tuple[int, int]) -> Tensor:
    """OpenCV's bilinear upscale, the same half-pixel grid as ``F.interpolate`` with
    ``align_corners=False``: 12 MP in 18 ms against torch's 74-94 ms (one thread,
    bench/README.md). Its float arithmetic rounds differently: on four reference photos' U2NETP
    maps at 2, 6 and 12 MP it differed by at most 2.1e-5 (2.9e-5 with OpenCV's SIMD off), which
    flipped 0-7 mask pixels of 12 M and moved 0.002-0.015% of the 8-bit soft map by one level
    (tests/test_postprocess.py bounds both with headroom)."""
    import cv2

    h, w = size
    return torch.from_numpy(
        cv2.resize(m.contiguous().numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
    )


def to_probability(p: Tensor) -> Tensor:
    """A [0, 1] map as 8-bit levels, rounded to nearest (as PIL rounds its resize)."""
    return p.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def to_mask(p: Tensor, threshold: float) -> Tensor:
    """255 where the probability is at least ``threshold``, else 0."""
    # A bool is one byte of 0 or 1: viewed as uint8 instead of copied into a new tensor.
    return torch.ge(p, threshold).view(torch.uint8).mul_(255)


def to_levels(maps: Tensor) -> Tensor:
    """Network maps ``N×1×S×S`` → ``N×S×S`` uint8, on their device: the authors' 8-bit step.

    The authors' script turns the S×S map into 8 bits (PIL's float-to-L conversion truncates)
    before resizing it; doing the same is what brings the maps within ~1e-4 of theirs. Everything
    an answer needs from the network is in these levels, which is what makes them worth caching.
    """
    return minmax(maps).mul_(255).floor_().to(torch.uint8)[:, 0]


def levels_on_cpu(maps: np.ndarray) -> np.ndarray:
    """:func:`to_levels` in numpy, for maps on the CPU: each step rounded in float32 as
    PyTorch rounds it, so the same levels (tests/test_postprocess.py), without PyTorch's OpenMP
    team, whose threads spin between parallel regions on cores the codec threads need."""
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    lo = flat.min(axis=1).reshape(n, 1, 1, 1)
    span = np.maximum(flat.max(axis=1).reshape(n, 1, 1, 1) - lo, np.float32(1e-12))
    x = maps - lo
    x /= span
    x *= np.float32(255)
    np.floor(x, out=x)
    return x.astype(np.uint8)[:, 0]


def from_levels(levels: Tensor, size: tuple[int, int]) -> Tensor:
    """One ``S×S`` uint8 map → ``H×W`` float in [0, 1], on its device.

    The levels are whole numbers, exact in float32, so this gives the same values whether they
    come straight from the network or from a cache."""
    return resize_map(levels[None].float(), size).div_(255)


def resize_maps(maps: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Network maps ``N×1×S×S`` → one ``H×W`` float map in [0, 1] per image, on their device."""
    levels = to_levels(maps)
    return [from_levels(levels[i], hw) for i, hw in enumerate(sizes)]


def finish_on_cpu(
    levels: np.ndarray, size: tuple[int, int], *, probability: bool, threshold: float
) -> np.ndarray | None:
    """One ``S×S`` uint8 map → the ``H×W`` uint8 answer map (``to_probability`` or ``to_mask`` of
    ``from_levels``), in OpenCV and numpy, for an enlargement (every side at least S) on the CPU;
    None for a reduction, which :func:`from_levels` makes (anti-aliased, in PyTorch).

    The same operations as the PyTorch path, each rounded in float32 as it rounds (the upscale
    is the same OpenCV call), so the same bytes (tests/test_postprocess.py), without PyTorch:
    the service runs this in its codec threads, where PyTorch's CPU operations would each start
    an OpenMP team of their own beside the network's."""
    import cv2

    h, w = size
    if h < levels.shape[0] or w < levels.shape[1]:
        return None
    # The full-size float map lives for this call only, the answer's map for its request: both
    # written into kept buffers rather than fresh pages (model/scratch.py; 12 MP: 7.3 against
    # 11.5 ms for the float map).
    m: np.ndarray = cv2.resize(
        levels.astype(np.float32),
        (w, h),
        scratch.array((h, w), np.float32),
        interpolation=cv2.INTER_LINEAR,
    )
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
