"""The batch function the worker runs: decoded images in, one 8-bit map per request out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.postprocess import to_mask, to_probability
from model.refine import refine
from model.segmenter import Segmenter
from service.params import SegmentParams

__all__ = ["Job", "run_batch"]


@dataclass(frozen=True)
class Job:
    image: torch.Tensor  # H×W×3 uint8, what the network sees
    params: SegmentParams


def run_batch(segmenter: Segmenter, jobs: list[Job]) -> list[torch.Tensor]:
    """One H×W uint8 map on the CPU per job: the soft map for ``probability``, else the mask.

    Maps are reduced to 8 bits on the model's device, so only a quarter of the bytes come back.
    ``refine`` is applied there too, to the full-resolution map, with the photo as guide, in
    place (the unrefined map is not needed afterwards).
    """
    maps = segmenter.predict([job.image for job in jobs])
    maps = [
        refine(m, job.image, out=m) if job.params.refine else m
        for m, job in zip(maps, jobs, strict=True)
    ]
    out = [
        to_probability(m)
        if job.params.output == "probability"
        else to_mask(m, job.params.threshold)
        for m, job in zip(maps, jobs, strict=True)
    ]
    return [t.cpu() for t in out]
