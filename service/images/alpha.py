"""The alpha stage: the network's map at the photo's size in, the photo as guide; out come every
answer's planes, in the codec pool beside the encode:

- a mask (255 where the map reaches the threshold) and a probability answer (the map's 8-bit
  levels), as they are or, with ``refine=true``, refined with the photo (:func:`refined`);
- a cut-out's alpha and colour (:func:`cutout`): the mask or the map as alpha, or the matte
  solved from the photo in a band at the subject's edge, with the subject's own colour where
  alpha is partial.

One filter does all the work with the photo: the colour guided filter of
:mod:`service.images.matte`, fitted at a working resolution in a band at the map's edge and
applied to the photo's own pixels there, with the refinement's constants
(:data:`~service.images.matte.REFINE`) or the matte's.
"""

from __future__ import annotations

import math

import numpy as np

from model.postprocess import level_cut
from service.images import matte
from service.params import SegmentParams

__all__ = ["cutout", "mask_of", "refined"]


def mask_of(levels: np.ndarray, threshold: float) -> np.ndarray:
    """255 where a map's 8-bit levels over 255 reach ``threshold`` (compared in float32, as
    every mask of the service is: :func:`model.postprocess.level_cut`), else 0."""
    cut = math.ceil(level_cut(threshold))  # whole levels: x ≥ cut exactly when x ≥ ceil(cut)
    return np.where(levels >= cut, np.uint8(255), np.uint8(0))


def refined(rgb: np.ndarray, levels: np.ndarray, params: SegmentParams) -> np.ndarray:
    """The answer's map for ``refine=true``: the map's 8-bit ``levels`` (H×W, the probability
    answer's) refined with the photo ``rgb`` (H×W×3 uint8) as guide
    (:func:`service.images.matte.refine`), as levels for a soft answer, else thresholded."""
    better = matte.refine(rgb, levels)
    return better if params.soft_map else mask_of(better, params.threshold)


def cutout(
    rgb: np.ndarray, levels: np.ndarray, params: SegmentParams
) -> tuple[np.ndarray, np.ndarray]:
    """A cut-out's alpha and colour (H×W uint8, H×W×3 uint8) from the photo ``rgb`` and the
    answer's map ``levels`` (:func:`service.core.infer.finish`'s): with ``alpha=mask`` the mask
    and the photo; with ``soft`` and ``matte`` (:func:`service.images.matte.cutout`) the map or
    the matte solved from it, and the subject's own colour where alpha is partial."""
    how = params.cutout_alpha
    if how == "soft" or how == "matte":
        return matte.cutout(rgb, levels, how, threshold=params.threshold)
    return levels, rgb
