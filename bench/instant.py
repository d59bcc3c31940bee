"""The service with an instant network: ``python -m service``, every engine replaced by a stand-in
that costs nothing, to measure the serving path alone (what Triton's perf_analyzer does with an
identity model).

    python -m bench.instant --host 127.0.0.1 --port 8000   # the arguments of python -m service

The stand-in returns the input's first channel as the fused map: a map shaped like the photo, so
masks and cut-outs have a subject to crop and encode, in a few microseconds. Everything else runs
as it does in the service: weights verified, settings read, requests decoded, batched,
post-processed and encoded. It lives here, never in a setting of the service: no deployment can
turn it on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import model.segmenter
from model.engines import Engine, EngineName, EngineOptions

__all__ = ["InstantEngine", "install"]


class InstantEngine:
    """An :class:`model.engines.Engine` whose network costs nothing."""

    name: EngineName = "torch"  # the label metrics and /readyz show; the identity says instant
    allocates_per_call = False
    ready_at_load = True
    artifact_digest: str | None = "instant"
    arithmetic = "none (an instant stand-in)"

    def __init__(self, options: EngineOptions) -> None:
        self.device = options.device
        # ``fast`` on the CPU is an int8 model: the stand-in says so, so the service runs the
        # request's path of the precision it stands in for (service/core/scale.py).
        fast = options.precision == "fast" and options.device.type == "cpu"
        self.dtype = "int8" if fast else options.dtype

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x[:, :1].astype(np.float32)


def _load(name: EngineName, weights: Path, model_name: str, options: EngineOptions) -> Engine:
    return InstantEngine(options)


def install() -> None:
    """Make every Segmenter of this process load the stand-in instead of its engine."""
    model.segmenter.load_engine = _load  # type: ignore[assignment]


if __name__ == "__main__":
    from service.__main__ import main

    install()
    sys.exit(main(sys.argv[1:]))
