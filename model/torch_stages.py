"""The pipeline's steps on a PyTorch device: what a GPU host runs beside the torch engine, so that
only 8-bit maps cross to the host. The CPU's are :mod:`model.postprocess` (numpy and OpenCV);
tests/test_postprocess.py holds the two to the same bytes. Imported only where PyTorch is the
engine: it comes with the ``gpu`` extra."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Staging",
    "finish",
    "from_levels",
    "levels_of",
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
    """One ``1×S×S`` map → ``H×W``: PyTorch's anti-aliased bilinear resize, like the authors'
    PIL ``resize(BILINEAR)``; on the CPU an enlargement is OpenCV's, as the CPU's own path
    (:func:`model.postprocess.resize_levels`) makes it."""
    if m.device.type == "cpu" and size[0] >= m.shape[-2] and size[1] >= m.shape[-1]:
        from model.postprocess import resize_levels

        return torch.from_numpy(resize_levels(m[0].numpy(), size))
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


def to_probability(p: Tensor) -> Tensor:
    """A [0, 1] map as 8-bit levels, rounded to nearest (as PIL rounds its resize)."""
    return p.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def to_mask(p: Tensor, threshold: float) -> Tensor:
    """255 where the probability is at least ``threshold``, else 0."""
    # A bool is one byte of 0 or 1: viewed as uint8 instead of copied into a new tensor.
    return torch.ge(p, threshold).view(torch.uint8).mul_(255)


def to_levels(maps: Tensor) -> Tensor:
    """Network maps ``N×1×S×S`` → ``N×S×S`` uint8 on their device: the authors' 8-bit step
    (:func:`model.postprocess.to_levels`)."""
    return minmax(maps).mul_(255).floor_().to(torch.uint8)[:, 0]


def from_levels(levels: Tensor, size: tuple[int, int]) -> Tensor:
    """One ``S×S`` uint8 map → ``H×W`` float in [0, 1], on its device."""
    return resize_map(levels[None].float(), size).div_(255)


def resize_maps(maps: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Network maps ``N×1×S×S`` → one ``H×W`` float map in [0, 1] per image, on their device."""
    levels = to_levels(maps)
    return [from_levels(levels[i], hw) for i, hw in enumerate(sizes)]


@torch.inference_mode()
def levels_of(run: Callable[[Tensor], Tensor], x: Tensor) -> np.ndarray:
    """The 8-bit maps of a batch already on the device, made there by ``run`` (the torch
    engine's network) and :func:`to_levels`: only they cross to the host."""
    return to_levels(run(x)).cpu().numpy()


@torch.inference_mode()
def finish(
    levels: np.ndarray,
    size: tuple[int, int],
    device: torch.device,
    *,
    probability: bool,
    threshold: float,
) -> np.ndarray:
    """:func:`model.postprocess.finish_on_cpu` on ``device``: the map resized back there and
    only the answer's 8-bit map brought to the host."""
    # Levels from a cache are read-only bytes; PyTorch's tensors are writable views.
    m = from_levels(torch.from_numpy(np.array(levels)).to(device), size)
    out = to_probability(m) if probability else to_mask(m, threshold)
    return out.cpu().numpy()


class Staging:
    """Page-locked host memory for a batch of inputs, grown to the largest batch seen and
    reused, so a batch's copy to the device is one asynchronous transfer.

    Reused only once the last transfer from it is done: the device's stream runs in order, and
    the maps of the batch that used it were copied back before this one was asked for."""

    def __init__(self) -> None:
        self._pinned: Tensor | None = None

    def batch(self, inputs: Sequence[np.ndarray], device: torch.device) -> Tensor:
        """The prepared inputs stacked, on ``device``."""
        n = len(inputs)
        have = self._pinned
        if have is None or have.shape[0] < n:
            have = torch.empty((n, *inputs[0].shape), dtype=torch.float32).pin_memory()
            self._pinned = have
        np.stack(inputs, out=have[:n].numpy())
        return have[:n].to(device, non_blocking=True)
