"""Scores of an int8 map's uncertainty, computed at the network's resolution from the int8 pass
alone: the cascade (``auto``) runs a photo again in float32 when its score is at or above the
model's threshold.

Every score is in [0, 1) (a ratio ``r`` is given as ``r / (1 + r)``, which keeps its order), so
a threshold of 0 sends every photo to float32 and 1 none. ``python -m bench.cascade`` measures
each as a curve: share run again against masks moved against MAE, both against float32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.engines import (
    Engine,
    EngineName,
    EngineOptions,
    cpu_features,
    float32_cpu_engine,
    load_engine,
)
from model.engines.cascade_rule import RULES, Rule, read_rule, rule_file, write_rule
from model.postprocess import to_levels

__all__ = [
    "RULES",
    "SCORES",
    "Cascade",
    "Look",
    "Rule",
    "load_cascade",
    "near",
    "read_rule",
    "rule_file",
    "score_of",
    "write_rule",
]


@dataclass(frozen=True)
class Look:
    """What the int8 pass gives for one photo: its 8-bit map (``S×S`` uint8, after the
    authors' min–max step), the raw fused map before it (``S×S`` float), and, where the engine
    exposes them, the six side maps after their sigmoid (``6×S×S``)."""

    levels: np.ndarray
    fused: np.ndarray
    sides: np.ndarray | None = None


def _ratio(r: float) -> float:
    return r / (1.0 + r)


def _foreground(p: np.ndarray) -> float:
    return max(float((p >= 0.5).mean()), 1.0 / p.size)


def _map(look: Look) -> np.ndarray:
    return look.levels.astype(np.float32) / np.float32(255)


def near(look: Look, lo: float = 0.3, hi: float = 0.7) -> float:
    """The share of pixels between ``lo`` and ``hi`` over the share at or above 0.5: how much
    of the subject a small shift of the map could move across the mask's threshold."""
    p = _map(look)
    return _ratio(float(((p > lo) & (p < hi)).mean()) / _foreground(p))


def narrow(look: Look) -> float:
    """:func:`near` within 0.1 of the threshold."""
    return near(look, 0.4, 0.6)


def width(look: Look) -> float:
    """The pixels between 0.3 and 0.7 per pixel of the mask's boundary: how wide and flat the
    map's slope is where it crosses 0.5 (whatever the subject's area)."""
    p = _map(look)
    mask = p >= 0.5
    edge = (mask[1:, :] != mask[:-1, :]).sum() + (mask[:, 1:] != mask[:, :-1]).sum()
    band = float(((p > 0.3) & (p < 0.7)).sum())
    return _ratio(band / max(float(edge), 1.0) / 4)


def span(look: Look) -> float:
    """How far the raw map is from spanning [0, 1]: the authors' min–max step magnifies
    int8's rounding by 1 / (max − min)."""
    f = look.fused
    return _ratio(1.0 / max(float(f.max() - f.min()), 1e-6) - 1.0)


def sides(look: Look) -> float:
    """The side maps' disagreement with the fused mask: the mean share of pixels whose side
    of 0.5 differs, over the share at or above 0.5."""
    if look.sides is None:
        raise ValueError("this score needs the side maps")
    mask = _map(look) >= 0.5
    flips = np.mean([float(((s >= 0.5) != mask).mean()) for s in look.sides])
    return _ratio(float(flips) / _foreground(_map(look)))


def d1(look: Look) -> float:
    """:func:`sides` for the finest side map alone."""
    if look.sides is None:
        raise ValueError("this score needs the side maps")
    return sides(Look(look.levels, look.fused, look.sides[:1]))


def spread(look: Look) -> float:
    """The side maps' mean standard deviation per pixel, over the share at or above 0.5."""
    if look.sides is None:
        raise ValueError("this score needs the side maps")
    return _ratio(float(look.sides.std(axis=0).mean()) / _foreground(_map(look)))


SCORES: dict[str, Callable[[Look], float]] = {
    "near": near,
    "narrow": narrow,
    "width": width,
    "span": span,
    "sides": sides,
    "d1": d1,
    "spread": spread,
}


def score_of(name: str) -> Callable[[Look], float]:
    if name not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, not {name!r}")
    return SCORES[name]


class Cascade:
    """Two loaded engines of one network, held to the :class:`~model.engines.Engine`
    interface: every batch through ``first`` (int8), then the photos whose score is at or
    above ``threshold`` through ``second`` (float32) again, as one batch, on the same thread.

    :meth:`forward_looks` says which photos the second engine answered."""

    name: EngineName = "cascade"
    allocates_per_call: bool
    ready_at_load: bool

    def __init__(self, first: Engine, second: Engine, score: str, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"a cascade's threshold is in [0, 1], not {threshold}")
        if first.device != second.device:
            raise ValueError("a cascade's engines run on one device")
        self.first, self.second = first, second
        self.score, self.threshold = score, threshold
        self._score = score_of(score)
        self.device = first.device
        self.dtype = first.dtype
        self.allocates_per_call = first.allocates_per_call or second.allocates_per_call
        self.ready_at_load = first.ready_at_load and second.ready_at_load
        self.arithmetic = f"{first.arithmetic}, {second.arithmetic} where {score} ≥ {threshold:g}"
        parts = [f"{e.name}@{e.artifact_digest or e.dtype}" for e in (first, second)] + [
            f"{score}>={threshold!r}"
        ]
        # Maps are cached under it: another rule answers other photos with float32's map.
        self.artifact_digest: str | None = hashlib.sha256("|".join(parts).encode()).hexdigest()

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.forward_looks(x)[0]

    def forward_looks(self, x: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """The fused maps ``N×1×S×S`` and, per photo, whether float32 made its map."""
        fused = self.first.forward(x)
        levels = to_levels(fused)
        looks = [
            self._score(Look(levels[i], fused[i, 0])) >= self.threshold for i in range(len(fused))
        ]
        again = [i for i, look in enumerate(looks) if look]
        if again:
            fused[again] = self.second.forward(x[again])
        return fused, looks


def load_cascade(
    weights: Path, model: str, options: EngineOptions, threshold: float | None = None
) -> Cascade:
    """The int8 model (OpenVINO) and the float32 engine ``float32`` runs on this CPU, each
    loaded once, and the recorded rule (``threshold``, if given, in place of its own)."""
    from model.engines.openvino_files import record_of

    first = load_engine("openvino", weights, model, replace(options, precision="fast"))
    vendor, flags = cpu_features()
    second = load_engine(
        float32_cpu_engine(vendor, flags), weights, model, replace(options, precision="float32")
    )
    rule = read_rule(weights, model, record_of(weights, "int8"))
    return Cascade(first, second, rule.score, rule.threshold if threshold is None else threshold)
