"""The batch function the worker runs: decoded images in, one 8-bit map per request out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model.postprocess import to_mask, to_probability
from model.segmenter import Segmenter

__all__ = ["Job", "Output", "run_batch"]

Output = Literal["mask", "probability", "cutout"]


@dataclass(frozen=True)
class Job:
    image: torch.Tensor  # H×W×3 uint8, what the network sees
    output: Output
    threshold: float


def run_batch(segmenter: Segmenter, jobs: list[Job]) -> list[torch.Tensor]:
    """One H×W uint8 map on the CPU per job: the soft map for ``probability``, else the mask.

    Maps are reduced to 8 bits on the model's device, so only a quarter of the bytes come back.
    """
    maps = segmenter.predict([job.image for job in jobs])
    out = [
        to_probability(m) if job.output == "probability" else to_mask(m, job.threshold)
        for m, job in zip(maps, jobs, strict=True)
    ]
    return [t.cpu() for t in out]
