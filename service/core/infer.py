"""The model's work in three parts, so that the device's worker runs only what is batched:

- ``prepare``: per image, beside the decode in the codec pool: the network's normalised input;
- ``run_batch``: the worker's part: a batch of prepared inputs through the network, each image's
  8-bit network map out (what the map cache keeps);
- ``finish``: per image, beside the encode: an 8-bit network map (fresh, or from the map cache)
  → the H×W map the answer is rendered from.

A miss and a cache hit run the same ``finish`` on the same levels, so their answers are the same
bytes. ``finish`` runs in the codec pool, except where it needs PyTorch's CPU kernels (a
reduction, or ``refine``, on a CPU host: :func:`finishes_on_worker`): those run on the worker's
thread, where every CPU PyTorch operation of the service runs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from model.postprocess import finish_on_cpu, to_mask, to_probability
from model.refine import refine
from model.segmenter import Segmenter
from model.weights import WeightsSpec
from service.params import SegmentParams

__all__ = ["Levels", "Model", "finish", "finishes_on_worker", "run_batch"]


class Levels(np.ndarray):
    """An ``S×S`` uint8 network map that says which arithmetic made it (``int8`` or
    ``float32`` under ``auto``'s cascade): the answer's ``Server-Timing`` names it."""

    arithmetic: str = ""


class Counting(Protocol):
    """A labelled counter's child (prometheus-client's)."""

    def inc(self, amount: float = 1) -> None: ...


class Model(Protocol):
    """What a request's path needs of a model beside its network: the per-image halves, and
    what names its maps. A :class:`~model.segmenter.Segmenter` is one; a front process, which
    runs no network, has :class:`service.processes.remote.RemoteModel`."""

    spec: WeightsSpec

    @property
    def identity(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def precision(self) -> str:
        """The precision its maps are made at (``faithful``, ``fast``, ``float32``)."""
        ...

    def prepare(self, image: np.ndarray) -> np.ndarray: ...

    def expand(self, levels: Tensor, size: tuple[int, int]) -> Tensor: ...


def run_batch(
    segmenter: Segmenter, inputs: list[np.ndarray], *, second_looks: Counting | None = None
) -> list[np.ndarray]:
    """Each prepared input's ``S×S`` uint8 network map, on the CPU. Maps are reduced to 8 bits
    on the model's device, so only a quarter of the bytes come back. Under ``auto`` each map is
    a :class:`Levels`, and ``second_looks`` counts those the cascade made again in float32."""
    levels, made = segmenter.maps_of(inputs)
    if segmenter.precision != "auto":  # one arithmetic for every map: /readyz says which
        return list(levels)
    out = []
    for lv, arithmetic in zip(levels, made, strict=True):
        tagged = lv.view(Levels)
        tagged.arithmetic = arithmetic
        out.append(tagged)
    if second_looks is not None:
        second_looks.inc(sum(a != "int8" for a in made))
    return out


def finishes_on_worker(segmenter: Model, size: tuple[int, int], params: SegmentParams) -> bool:
    """Whether ``finish`` needs PyTorch on the CPU for an image of ``size`` (H, W): a map
    reduced to a smaller image (anti-aliased), or refined. libgomp gives every thread that
    starts parallel work a team of its own, and once a process has more such threads than CPUs
    it stops spinning between parallel regions: the worker's operations then took twice as long
    (a 12 MP refine: 110 against 68 ms), so they stay on the worker's one thread."""
    side = segmenter.spec.input_size
    return segmenter.device.type == "cpu" and (params.refine or min(size) < side)


def finish(
    segmenter: Model,
    levels: np.ndarray,
    image: np.ndarray,
    params: SegmentParams,
    *,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """An ``S×S`` uint8 network map → the ``H×W`` uint8 map of the answer, on the CPU: the soft
    map for ``probability`` and for a cut-out whose alpha is soft or a matte, else the mask;
    resized back to ``size`` (H, W; by default that of ``image``, the H×W×3 the network saw),
    refined first if asked (``image`` then at full size), on the model's device."""
    h, w = size or image.shape[:2]
    probability = params.soft_map
    if segmenter.device.type == "cpu" and not params.refine:
        done = finish_on_cpu(levels, (h, w), probability=probability, threshold=params.threshold)
        if done is not None:
            return done
    with torch.inference_mode():
        # Levels from a cache are read-only bytes; PyTorch's tensors are writable views.
        m = segmenter.expand(torch.from_numpy(np.array(levels)), (h, w))
        if params.refine:
            # ``refine`` works in place: the unrefined map is not needed afterwards.
            m = refine(m, torch.from_numpy(image), out=m)
        out = to_probability(m) if probability else to_mask(m, params.threshold)
        return out.cpu().numpy()
