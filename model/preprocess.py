"""Images (uint8 ``H×W×3`` arrays) to the network's normalised ``3×S×S`` input, one at a time.

The authors' steps: bilinear resize to S×S without anti-aliasing, divide by the image maximum,
ImageNet normalisation. Downscaling without anti-aliasing reads at most two source rows and two
source columns per output pixel, so we gather only those (≤ 2S rows, ≤ 2S columns) from the uint8
image and blend them in float: the cost does not grow with the photo.

Each image is prepared on its own, on the CPU, in numpy: the service does it in its codec pool
beside the decode, so the device worker only stacks prepared inputs. The arithmetic is
PyTorch's bilinear kernel's, operation by operation in float32 (each multiply and add rounded on
its own, as separate PyTorch operations round), so the input is bit for bit what
``F.interpolate(mode="bilinear", align_corners=False)`` and the former PyTorch blend gave
(tests/test_preprocess.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from model.weights import WeightsSpec

__all__ = ["normalise", "prepare", "preprocess", "resize_weights"]


def resize_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0``, ``i1`` (int64) and weights of ``i1`` (float32) for a bilinear
    resize of one axis, the same arithmetic as ``F.interpolate(mode="bilinear",
    align_corners=False)``."""
    # float32 throughout, like PyTorch's kernel, so the weights agree to the last bit.
    scale = np.float32(src / dst)
    pos = (np.arange(dst, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    np.maximum(pos, np.float32(0), out=pos)
    i0 = np.minimum(pos.astype(np.int64), src - 1)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, pos - i0.astype(np.float32)


@lru_cache(maxsize=512)
def _axis(src: int, dst: int, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis's gather indices (lower neighbours, then upper) and the weights of each pair
    (``1 - w``, ``w``), each repeated ``channels`` times; photos come in a few sizes, so they
    are kept."""
    i0, i1, w = resize_weights(src, dst)
    wn = w.repeat(channels)
    return np.concatenate((i0, i1)), np.float32(1) - wn, wn


@lru_cache(maxsize=8)
def _means(mean: tuple[float, ...], std: tuple[float, ...], size: int) -> tuple[np.ndarray, ...]:
    """The normalisation's per-channel mean and std, repeated along a row of ``size`` pixels."""
    return np.tile(np.asarray(mean, np.float32), size), np.tile(np.asarray(std, np.float32), size)


# OpenCV's remap takes images under 32767 pixels a side (SHRT_MAX).
_REMAP_MAX_SIDE = 32766


def _gather(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``image[rows][:, cols]``: the pixels at every row of ``rows`` and column of ``cols``.

    OpenCV's nearest-neighbour remap at whole-number coordinates copies each pixel, reading only
    those asked for; numpy's two ``take`` calls first copied every row asked for in full (a
    12 MP photo's 640 rows: 7.7 MB, a fresh mapping each time). One at a time, on a freshly
    decoded photo: 1.2 against 2.0 ms at 1 MP, 2.4 against 5.4 ms at 12 MP (bench/README.md)."""
    import cv2

    if max(image.shape[:2]) > _REMAP_MAX_SIDE:
        return image.take(rows, axis=0).take(cols, axis=1)
    shape = (len(rows), len(cols))
    x = np.broadcast_to(cols.astype(np.float32), shape)
    y = np.broadcast_to(rows.astype(np.float32)[:, None], shape)
    out: np.ndarray = cv2.remap(image, np.array(x), np.array(y), cv2.INTER_NEAREST)
    return out


def prepare(image: np.ndarray, spec: WeightsSpec) -> np.ndarray:
    """One uint8 ``H×W×3`` image → its normalised ``3×S×S`` float32 input (C-contiguous)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 H×W×3 array, got {image.dtype} {image.shape}")
    s = spec.input_size
    rows, wy1, wy = _axis(image.shape[0], s, 1)
    cols, wx1, wx = _axis(image.shape[1], s, 3)
    # The 2S×2S patch the resize reads, each row's pixels' channels side by side: columns
    # [:3S] are the left neighbours, [3S:] the right ones; rows [:S] the upper, [S:] the lower.
    # Rows are 3S long, so every operation runs along a whole row; the uint8 patch is cast in
    # each multiply, so no temporary reaches the 2 MiB from which glibc maps (and faults in)
    # every buffer afresh (service/core/budget.py).
    patch = _gather(image, rows, cols).reshape(2 * s, 6 * s)
    left, right = patch[:, : 3 * s], patch[:, 3 * s :]
    top = np.multiply(left[:s], wx1, dtype=np.float32)
    top += np.multiply(right[:s], wx, dtype=np.float32)
    bottom = np.multiply(left[s:], wx1, dtype=np.float32)
    bottom += np.multiply(right[s:], wx, dtype=np.float32)
    x = top
    x *= wy1[:, None]
    bottom *= wy[:, None]
    x += bottom
    peak = max(x.max(), np.float32(1e-6))
    mean, std = _means(spec.mean, spec.std, s)
    x /= peak
    x -= mean
    x /= std
    return np.ascontiguousarray(x.reshape(s, s, 3).transpose(2, 0, 1))


def normalise(x: np.ndarray, spec: WeightsSpec) -> np.ndarray:
    """Divide each image by its own maximum, then the ImageNet mean and std (``N×3×S×S``)."""
    peak = np.maximum(x.max(axis=(1, 2, 3), keepdims=True), np.float32(1e-6))
    mean = np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1)
    return ((x / peak - mean) / std).astype(np.float32)


def preprocess(images: Sequence[np.ndarray], spec: WeightsSpec) -> np.ndarray:
    """Resize and normalise a batch of uint8 ``H×W×3`` images of any sizes → ``N×3×S×S``
    float32."""
    return np.stack([prepare(np.asarray(im), spec) for im in images])
