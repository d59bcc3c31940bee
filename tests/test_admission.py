"""Admission: one bound on the requests the service holds, whichever stage they wait in
(service/core/admission.py). The codec pool is held behind a gate, never raced."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.core.admission import Admission, Counts, in_flight_limit
from service.core.pipeline import Pipeline
from service.errors import QueueFull
from service.metrics import Metrics
from service.processes.shared import Shared
from service.settings import Settings

from .test_api import assert_error, metric, photo, running, settings, until


@contextmanager
def held_pool(pipeline: Pipeline) -> Iterator[threading.Event]:
    """The codec pool's one thread busy until the event is set (set on exit in any case)."""
    opened = threading.Event()
    busy = pipeline.parts.codec_pool.submit(opened.wait)
    try:
        yield opened
    finally:
        opened.set()
        busy.result()


def post(c: httpx.AsyncClient) -> asyncio.Future[httpx.Response]:
    return asyncio.ensure_future(
        c.post("/segment", content=photo(), headers={"content-type": "image/jpeg"})
    )


def one_thread(weights: Path, **kw: Any) -> Settings:
    """U2NETP, batches of one, one codec thread: the bound is max_queue + 2."""
    return settings(weights, max_batch_size=1, max_batch_wait_ms=0, codec_threads=1, **kw)


async def test_requests_waiting_for_a_busy_codec_pool_count_against_the_bound(
    u2netp_weights: Path,
) -> None:
    """With the codec pool busy, the network is idle, yet the service refuses past its bound:
    three held (one waiting beyond the batch and the codec thread), the other two 503 with
    Retry-After at once, and the three answered once the pool is free."""
    async with running(one_thread(u2netp_weights, max_queue=1)) as (app, c):
        pipeline: Pipeline = app.state.runtime.pipeline
        admission = pipeline.parts.admission
        assert admission.limit == 3
        with held_pool(pipeline) as opened:
            sent = [post(c) for _ in range(5)]
            await until(lambda: sum(f.done() for f in sent) == 2 and admission.held == 3)
            text = (await c.get("/metrics")).text
            assert metric(text, "u2serve_queue_depth", {"stage": "decode"}) == 3
            assert metric(text, "u2serve_queue_depth", {"stage": "batch"}) == 0
            assert metric(text, "u2serve_requests_in_flight_limit") == 3
            for f in sent:
                if f.done():
                    r = f.result()
                    assert_error(r, 503, "overloaded")
                    assert r.headers["retry-after"] == "1"  # nothing answered yet: the floor
            opened.set()
            rs = await asyncio.gather(*sent)
        text = (await c.get("/metrics")).text
    assert sorted(r.status_code for r in rs) == [200, 200, 200, 503, 503]
    assert metric(text, "u2serve_rejected_total", {"reason": "queue_full"}) == 2
    assert metric(text, "u2serve_queue_depth", {"stage": "decode"}) == 0
    assert admission.held == 0


async def test_a_request_waiting_for_the_codec_pool_is_withdrawn_at_its_deadline(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its deadline passes while the pool is held: 504, and its photo is never decoded, not
    even once the pool is free."""
    async with running(one_thread(u2netp_weights, request_timeout_s=0.3)) as (app, c):
        pipeline: Pipeline = app.state.runtime.pipeline
        decoded = 0
        decode = pipeline._decode

        def counted(*args: Any) -> Any:
            nonlocal decoded
            decoded += 1
            return decode(*args)

        monkeypatch.setattr(pipeline, "_decode", counted)
        with held_pool(pipeline):
            r = await post(c)
            assert_error(r, 504, "timeout")
            assert "for a thread to decode it" in r.json()["error"]["message"]
        # Anything left in the pool has run once this has.
        await asyncio.wrap_future(pipeline.parts.codec_pool.submit(lambda: None))
        assert decoded == 0
        text = (await c.get("/metrics")).text
        assert metric(text, "u2serve_queue_depth", {"stage": "decode"}) == 0
        assert metric(text, "u2serve_rejected_total", {"reason": "queue_full"}) == 0
        assert pipeline.parts.admission.held == 0


def test_every_fronts_requests_count_against_one_bound() -> None:
    """Two fronts' admissions over the counts the supervisor shares: what one holds, the other
    may not take, either's answers make room for both, and what a dead front held is given
    back when the supervisor forgets it."""
    shared = Shared(
        held=multiprocessing.Array("q", 2),
        depth=multiprocessing.Value("i", 0),
        retry_after=multiprocessing.Value("i", 1),
        worker_ready=multiprocessing.Value("b", 1),
        requests=multiprocessing.Array("i", 2),
        answered=multiprocessing.Value("q", 0),
        directory=Path("."),
    )
    a, b = (
        Admission(3, Metrics(), Counts(shared.requests, shared.answered, front)) for front in (0, 1)
    )
    a.admit()
    a.admit()
    b.admit()
    assert a.held == b.held == 3
    for full in (a, b):
        with pytest.raises(QueueFull) as exc:
            full.admit()
        assert exc.value.headers is not None
        assert exc.value.headers["Retry-After"] == "1"
    a.release()
    b.admit()
    assert list(shared.requests) == [1, 2]
    assert shared.answered.value == 1
    with shared.held.get_lock():
        shared.held[1] = 1000  # and the memory their images were charged
    shared.forget_front(1)  # front 1 died with two requests: they are held no more
    assert a.held == 1
    assert list(shared.held) == [0, 0]
    a.admit()
    a.admit()
    assert list(shared.requests) == [3, 0]


def test_the_bound_counts_every_fronts_codec_threads() -> None:
    s = Settings(max_queue=10, codec_threads=3, workers=4)
    assert in_flight_limit(s, 32) == 10 + 32 + 3 * 4


def test_retry_after_is_the_whole_paths_drain_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers counted at 10 a second by then: 25 held are 2.5 s of work, said as 3."""
    clock = [100.0]
    monkeypatch.setattr("service.core.admission.time.monotonic", lambda: clock[0])
    admission = Admission(30, Metrics())
    for _ in range(30):
        admission.admit()
    for _ in range(5):
        admission.release()
        clock[0] += 0.1
    assert admission.held == 25
    # Five answers, the first at 100.0 and the last at 100.4: four intervals of 0.1 s.
    assert admission.retry_after() == 3
    clock[0] += 60  # long idle: what was measured has aged out
    assert admission.retry_after() == 1
