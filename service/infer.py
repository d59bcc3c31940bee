"""The model's work in two halves: the batch function the worker runs (decoded images in, each
image's 8-bit network map and its answer's map out), and ``finish``, the second half alone, which
turns a network map (fresh, or from the map cache) into the map an answer is rendered from.

A miss and a cache hit run the same ``finish`` on the same device, so their answers are the same
bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.postprocess import to_mask, to_probability
from model.refine import refine
from model.segmenter import Segmenter
from service.params import SegmentParams

__all__ = ["Job", "Segmented", "finish", "run_batch"]


@dataclass(frozen=True)
class Job:
    image: torch.Tensor  # H×W×3 uint8, what the network sees
    params: SegmentParams


@dataclass(frozen=True)
class Segmented:
    """One job's result: ``levels``, the network's S×S uint8 map (what the map cache keeps), and
    ``map``, the H×W uint8 map of the answer, both on the CPU."""

    levels: torch.Tensor
    map: torch.Tensor


def finish(
    segmenter: Segmenter, levels: torch.Tensor, image: torch.Tensor, params: SegmentParams
) -> torch.Tensor:
    """An S×S uint8 network map → the H×W uint8 map on the CPU: the soft map for
    ``probability``, else the mask; resized back, and refined first if asked, on the model's
    device (``refine`` works in place: the unrefined map is not needed afterwards)."""
    with torch.inference_mode():
        m = segmenter.expand(levels, (image.shape[0], image.shape[1]))
        if params.refine:
            m = refine(m, image, out=m)
        out = to_probability(m) if params.output == "probability" else to_mask(m, params.threshold)
        return out.cpu()


def run_batch(segmenter: Segmenter, jobs: list[Job]) -> list[Segmented]:
    """Every job's network map and answer map. Maps are reduced to 8 bits on the model's device,
    so only a quarter of the bytes come back."""
    levels = segmenter.levels([job.image for job in jobs])
    return [
        Segmented(lv.cpu(), finish(segmenter, lv, job.image, job.params))
        for lv, job in zip(levels, jobs, strict=True)
    ]
