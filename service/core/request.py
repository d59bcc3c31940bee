"""The typed request the core answers, whichever face read it (the HTTP routes, the compatible
APIs, the in-process :class:`u2serve.Remover`, the command's folder runs)."""

from __future__ import annotations

from dataclasses import dataclass

from service.params import SegmentParams

__all__ = ["Submission"]


@dataclass(frozen=True)
class Submission:
    """What a request asks for: the image's bytes, the URL to fetch them from, or the id of an
    image uploaded before (one of the three); the model (None: the default one) and the
    parameters of the answer. ``max_pixels``: the answer scaled down as the whole image would
    be to hold at most that many pixels (remove.bg's ``size``; no parameter of ``/segment``)."""

    params: SegmentParams
    image: bytes | None = None
    url: str | None = None
    model: str | None = None
    image_id: str | None = None
    max_pixels: int | None = None
