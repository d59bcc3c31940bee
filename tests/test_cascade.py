"""``auto``: int8 for every photo, float32 again where the int8 map is uncertain (model.cascade)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import cascade
from model.cascade import SCORES, Cascade, Look, near
from model.device import CPU
from model.engines.openvino_files import record_of
from model.postprocess import to_levels
from model.segmenter import Segmenter
from service.core.infer import run_batch

from .conftest import load_rgb, reference_dir, weights_file
from .test_api import metric, png_bytes, post_image, running, settings

S = 320


def _disc(radius: float, soft: float) -> np.ndarray:
    """A centred disc: a map that goes from 0.02 to 0.98 over ``soft`` pixels at its edge."""
    y, x = np.mgrid[:S, :S]
    r = np.hypot(y - S / 2, x - S / 2)
    return (0.02 + 0.96 / (1 + np.exp((r - radius) / soft))).astype(np.float32)


# Decided by the input's mean: a bright photo gets a soft map from int8 (uncertain), a dark one
# a sharp map (certain). float32 answers each with a disc of another size, so the levels say
# which arithmetic made them.
UNCERTAIN_INT8, CERTAIN_INT8 = _disc(60, 25), _disc(90, 0.5)
FLOAT32 = {True: _disc(70, 2), False: _disc(100, 2)}


class StandIn:
    """An engine that answers by the input's brightness, recording the batches it ran."""

    name = "openvino"
    device = CPU
    allocates_per_call = False
    ready_at_load = True
    artifact_digest = None

    def __init__(self, maps: dict[bool, np.ndarray], dtype: str, arithmetic: str):
        self.maps, self.dtype, self.arithmetic = maps, dtype, arithmetic
        self.batches: list[int] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        out = [self.maps[bool(xi.mean() > 0)][None] for xi in x]
        return np.stack(out)


def stand_ins(threshold: float) -> tuple[Cascade, StandIn, StandIn]:
    int8 = StandIn({True: UNCERTAIN_INT8, False: CERTAIN_INT8}, "int8", "int8+float32")
    f32 = StandIn(FLOAT32, "float32", "float32")
    return Cascade(int8, f32, "near", threshold), int8, f32  # type: ignore[arg-type]


def inputs(*bright: bool) -> list[np.ndarray]:
    return [np.full((3, S, S), 1.0 if b else -1.0, np.float32) for b in bright]


def levels(m: np.ndarray) -> np.ndarray:
    return to_levels(m[None, None])[0]


def test_the_stand_ins_are_what_they_claim() -> None:
    """The rule's 0.5 sits between the two int8 maps' near-threshold scores."""
    uncertain = near(Look(levels(UNCERTAIN_INT8), UNCERTAIN_INT8))
    certain = near(Look(levels(CERTAIN_INT8), CERTAIN_INT8))
    assert certain < 0.05 < 0.5 < uncertain < 1


def test_uncertain_gets_float32_and_certain_int8() -> None:
    """A batch of three: the two uncertain photos are run again in float32 as one batch; each
    map is the bytes of the arithmetic that made it."""
    engine, int8, f32 = stand_ins(0.5)
    fused, looks = engine.forward_looks(np.stack(inputs(True, False, True)))
    assert looks == [True, False, True]
    assert int8.batches == [3]
    assert f32.batches == [2]
    got = to_levels(fused)
    assert np.array_equal(got[0], levels(FLOAT32[True]))
    assert np.array_equal(got[1], levels(CERTAIN_INT8))
    assert np.array_equal(got[2], levels(FLOAT32[True]))


@pytest.mark.parametrize(("threshold", "again"), [(0.0, [True, True]), (1.0, [False, False])])
def test_forced_thresholds(threshold: float, again: list[bool]) -> None:
    engine, _, f32 = stand_ins(threshold)
    _, looks = engine.forward_looks(np.stack(inputs(True, False)))
    assert looks == again
    assert f32.batches == ([2] if again[0] else [])


def test_every_score_is_below_one() -> None:
    """So that a threshold of 1 leaves every photo with int8, whatever the score."""
    sides = np.stack([UNCERTAIN_INT8] * 6)
    for m in (UNCERTAIN_INT8, CERTAIN_INT8, np.zeros((S, S), np.float32)):
        look = Look(levels(m), m, sides)
        for name, score in SCORES.items():
            assert 0.0 <= score(look) < 1.0, name


def test_a_threshold_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stand_ins(1.5)


@pytest.fixture
def stand_in_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` loads the stand-ins instead of the int8 and float32 models."""

    def load(weights: Path, model: str, options: object, threshold: float | None) -> Cascade:
        return stand_ins(0.5 if threshold is None else threshold)[0]

    monkeypatch.setattr("model.segmenter.load_cascade", load)


class Count:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


def test_run_batch_tags_and_counts(stand_in_auto: None, u2netp_weights: Path) -> None:
    seg = Segmenter("u2netp", u2netp_weights, device="cpu", precision="auto")
    assert seg.precision == "auto"
    count = Count()
    out = run_batch(seg, inputs(True, False, False), second_looks=count)
    assert [getattr(lv, "arithmetic", None) for lv in out] == ["float32", "int8", "int8"]
    assert count.value == 1
    assert np.array_equal(out[0], levels(FLOAT32[True]))
    assert np.array_equal(out[1], levels(CERTAIN_INT8))


async def test_the_answer_and_the_metric_say_which(
    stand_in_auto: None, u2netp_weights: Path
) -> None:
    """Through the app: a bright photo is looked at again, a dark one is not; each answer's
    Server-Timing names its arithmetic, and the counter counts the one second look."""
    white = np.full((S, S, 3), 255, np.uint8)
    black = np.zeros((S, S, 3), np.uint8)
    async with running(settings(u2netp_weights, precision="auto")) as (_, c):
        r = await post_image(c, png_bytes(Image.fromarray(white)), "image/png")
        assert r.status_code == 200
        assert ', float32"' in r.headers["server-timing"]
        r = await post_image(c, png_bytes(Image.fromarray(black)), "image/png")
        assert ', int8"' in r.headers["server-timing"]
        text = (await c.get("/metrics")).text
        assert metric(text, "u2serve_second_looks_total", {"model": "u2netp"}) == 1
        ready = (await c.get("/readyz")).json()
        assert "float32" in str(ready)
        assert "int8" in str(ready)


# -- the real models ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["u2netp", "u2net"])
@pytest.mark.parametrize(("threshold", "same_as"), [(0.0, "float32"), (1.0, "fast")])
def test_forced_threshold_gives_one_arithmetic(name: str, threshold: float, same_as: str) -> None:
    """0: every map is float32's bytes; 1: every map is int8's (``fast``)."""
    weights = weights_file(name)
    auto = Segmenter(name, weights, device="cpu", precision="auto", threshold=threshold)
    alone = Segmenter(name, weights, device="cpu", precision=same_as)
    photos = sorted((reference_dir() / "images").iterdir())[:3]
    prepared = [auto.prepare(load_rgb(p).numpy()) for p in photos]
    got, made = auto.maps_of(prepared)
    assert np.array_equal(got, alone.levels_of(prepared))
    assert made == (["float32"] * 3 if threshold == 0 else ["int8"] * 3)


@pytest.mark.parametrize("name", ["u2netp", "u2net"])
def test_the_rule_is_recorded_beside_the_int8_model(name: str) -> None:
    weights = weights_file(name)
    rule = cascade.read_rule(weights, name, record_of(weights, "int8"))
    assert rule == cascade.RULES[name]
    with pytest.raises(Exception, match="another int8 model"):
        cascade.read_rule(weights, name, {"xml_sha256": "0", "bin_sha256": "0"})
