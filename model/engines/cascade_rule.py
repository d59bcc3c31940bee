"""The cascade's rule (``U2SERVE_PRECISION=auto``, :mod:`model.cascade`): which score of an int8
map decides a float32 second look, and from which value on; recorded beside the int8 model it was
measured for, as the engines record their derived files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.engines import prepare_hint
from model.weights import WeightsError

__all__ = ["RULES", "Rule", "read_rule", "rule_file", "write_rule"]


@dataclass(frozen=True)
class Rule:
    """Which score decides a second look, and from which value on."""

    score: str
    threshold: float


# Measured with `python -m bench.cascade` (bench/README.md, "The cascade"): tuned on development
# photos, never on the authors' 18. Rewritten into <weights>.cascade.json beside the int8 model
# by `python -m weights prepare` (and fetch); U2SERVE_CASCADE_THRESHOLD overrides the threshold.
RULES: dict[str, Rule] = {
    # width at its 15% on 100 ECSSD photos: there 0 masks moved and MAE 0.00101 against float32
    # (int8 alone: 3, 0.00196); on 40 composited matting photos no one tuned on 70% went again,
    # 0 moved and MAE 0.00028 (int8 alone: 14, 0.00680). near, the next best, left 0.00110 and
    # 0.00094 at its 20%.
    "u2net": Rule("width", 0.225),
    # U2NETP's int8 moves too much for a cascade to pay: width at its 40% on ECSSD left 1 mask
    # moved and MAE 0.00227; on the matting photos 85% went again, 1 moved, MAE 0.00126 (int8
    # alone: 23 of 40, 0.04761). Its faithful stays float32; this rule is for ``auto`` asked.
    "u2netp": Rule("width", 0.24),
}
_FORMAT = "u2serve-cascade-v1"


def rule_file(weights: Path) -> Path:
    return weights.with_suffix(".cascade.json")


def write_rule(weights: Path, model: str, int8: dict[str, Any]) -> Path:
    """Record this version's rule for ``model`` beside the int8 model it was measured for
    (``int8``: that model's own record, whose file digests it names)."""
    rule = RULES[model]
    record = {
        "format": _FORMAT,
        "model": model,
        "score": rule.score,
        "threshold": rule.threshold,
        "int8_xml_sha256": int8["xml_sha256"],
        "int8_bin_sha256": int8["bin_sha256"],
    }
    path = rule_file(weights)
    part = path.with_suffix(".part")
    part.write_text(json.dumps(record, indent=2) + "\n")
    part.replace(path)
    return path


def read_rule(weights: Path, model: str, int8: dict[str, Any]) -> Rule:
    """The recorded rule, checked against the int8 model it is for and this version's choice;
    :class:`~model.weights.WeightsError` otherwise."""
    path, hint = rule_file(weights), prepare_hint(weights, model)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise WeightsError(f"{path} is missing or not a {_FORMAT} record. {hint}")
    if (record.get("int8_xml_sha256"), record.get("int8_bin_sha256")) != (
        int8.get("xml_sha256"),
        int8.get("bin_sha256"),
    ):
        raise WeightsError(f"{path} was measured for another int8 model. {hint}")
    rule = Rule(str(record.get("score")), float(record.get("threshold", -1)))
    if record.get("model") != model or rule != RULES[model]:
        raise WeightsError(f"{path} records another rule than this version chooses. {hint}")
    return rule
