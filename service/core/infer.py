"""The model's work in three parts, so that the device's worker runs only what is batched:

- ``prepare``: per image, beside the decode in the codec pool: the network's normalised input;
- ``run_batch``: the worker's part: a batch of prepared inputs through the network, each image's
  8-bit network map out (what the map cache keeps);
- ``finish``: per image, beside the encode: an 8-bit network map (fresh, or from the map cache)
  → the H×W map the answer is rendered from.

A miss and a cache hit run the same ``finish`` on the same levels, so their answers are the same
bytes. ``finish`` runs in the codec pool: the map back to the photo's size (numpy and OpenCV on a
CPU host, the device on a GPU), then the alpha stage (:mod:`service.images.alpha`), which refines
the map with the photo where ``refine=true`` asks.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from model.device import Device
from model.segmenter import Segmenter
from model.weights import WeightsSpec
from service.images import alpha
from service.params import SegmentParams

__all__ = ["Levels", "Model", "finish", "run_batch"]


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
    def device(self) -> Device: ...

    @property
    def precision(self) -> str:
        """The precision its maps are made at (``faithful``, ``fast``, ``float32``)."""
        ...

    def prepare(self, image: np.ndarray) -> np.ndarray: ...

    def finish(
        self, levels: np.ndarray, size: tuple[int, int], *, probability: bool, threshold: float
    ) -> np.ndarray:
        """An ``S×S`` uint8 map → the ``H×W`` uint8 map of the answer: the probability's 8-bit
        levels, or the mask at ``threshold`` (:meth:`model.segmenter.Segmenter.finish`)."""
        ...


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
    and refined with ``image`` (then at full size) if asked."""
    h, w = size or image.shape[:2]
    refine = params.refine
    m = segmenter.finish(
        levels, (h, w), probability=params.soft_map or refine, threshold=params.threshold
    )
    return alpha.refined(image, m, params) if refine else m
